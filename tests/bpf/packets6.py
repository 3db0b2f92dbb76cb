"""The IPv6 packets of the BPF unit tests, as packets.py for IPv4: who is who in the IPv6 test
namespace (conftest.py's route6_ns draws it), the scapy builders and the checks.

A pod SRC6 sits behind the host-side veth `hin` (the node's gateway ROUTER6 is there); a
second pod LOCAL_DST6 is on the same node; REMOTE_DST6 is a pod of another node, via
uplink; NARROW_DST6 is behind the 1280-byte link `narrow`; EXTERNAL_DST6 is outside the
cluster, behind ROUTER6_UNDERLAY. The MACs and the same-node pod's veth are packets.py's.
"""

from __future__ import annotations

from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from tests.bpf.packets import HIN_MAC, POD_MAC

ROUTER6 = "2001:db8:0:1::1"          # the pods' gateway, on hin
NODE_IP6 = "2001:db8:1::1"           # the node's underlay address (uplink)
ROUTER6_UNDERLAY = "2001:db8:1::fe"  # the underlay's router to the outside
CLUSTER_CIDRS6 = ("2001:db8::/48", "2001:db8:1::/64")   # pods, underlay

SRC6 = "2001:db8:0:1::a"             # the sending pod, behind hin
LOCAL_DST6 = "2001:db8:0:1::b"       # a pod on the same node (packets.DST_* MACs, ifindex)
REMOTE_DST6 = "2001:db8:0:2::14"     # a pod of another node, via 2001:db8:1::2 on uplink
REMOTE_NODE6 = "2001:db8:1::2"
NARROW_DST6 = "2001:db8:0:3::1e"     # behind `narrow` (MTU 1280), via 2001:db8:1:1::2
UNRESOLVED_DST6 = "2001:db8:0:4::28" # via 2001:db8:1::3 on uplink: no neighbour entry
EXTERNAL_DST6 = "2001:db8:2::a"      # outside the cluster, via ROUTER6_UNDERLAY

ICMP6_CHECKSUMMED = 58


def pod6_packet(dst: str, src: str = SRC6, hlim: int = 64, payload: bytes = b"x" * 32,
                l4=None, ext=None):
    """A UDP datagram (or `l4`) the pod SRC6 sends to `dst`, extension headers `ext` first,
    as it arrives on hin."""
    ip = IPv6(src=src, dst=dst, hlim=hlim)
    if ext is not None:
        ip = ip / ext
    return (Ether(src=POD_MAC, dst=HIN_MAC) / ip
            / (l4 if l4 is not None else UDP(sport=40000, dport=5201)) / payload)


def underlay6_packet(dst: str, src: str = REMOTE_DST6, hlim: int = 63, payload: bytes = b"u" * 16,
                     ext=None):
    """A UDP datagram from another node to `dst`, as it arrives on uplink."""
    ip = IPv6(src=src, dst=dst, hlim=hlim)
    if ext is not None:
        ip = ip / ext
    return (Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / ip
            / UDP(sport=5201, dport=40000) / payload)


def assert_valid_packet_too_big(raw: bytes, orig: bytes, mtu: int, src: str = ROUTER6):
    """An ICMPv6 Packet Too Big for `orig` (an Ethernet frame) with `mtu`, from `src` to the
    original sender: 1280 bytes at most, quoting the original datagram's first bytes
    (RFC 4443 2.4 (c)), its checksum right over the pseudo-header (scapy recomputes it)."""
    out = Ether(raw)
    orig_ip = bytes(Ether(orig)[IPv6])
    quoted = min(len(orig_ip), 1280 - 48)
    assert (out[IPv6].src, out[IPv6].dst) == (src, Ether(orig)[IPv6].src)
    assert (out[IPv6].nh, out[IPv6].plen) == (ICMP6_CHECKSUMMED, 8 + quoted)
    assert len(raw) - 14 == 40 + 8 + quoted <= 1280
    ptb = out[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, mtu)
    assert raw[14 + 48:] == orig_ip[:quoted]
    rebuilt = out.copy()
    del rebuilt[ICMPv6PacketTooBig].cksum
    assert bytes(Ether(bytes(rebuilt))) == raw, "ICMPv6 checksum is wrong"
