"""The packets of the BPF unit tests: who is who in the test namespace (conftest.py draws it),
the verdicts TC programs return, the scapy builders and the checksum checks, defined once.

A pod SRC sits behind the host-side veth `hin` (the node answers there as ROUTER_IP); a
second pod LOCAL_DST is on the same node; REMOTE_DST is a pod of another node, reached over
`uplink`; EXTERNAL_DST is outside the cluster, behind ROUTER on the underlay, where BPF SNAT
makes pods appear as NODE_IP.
"""

from __future__ import annotations

import struct

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

# Verdicts (linux/pkt_cls.h)
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

ROUTER_IP = "198.18.1.1"            # the pods' gateway, on hin
NODE_IP = "198.19.0.1"              # the node's underlay address: the SNAT source
NARROW_MTU = 1280                   # the `narrow` link, towards 198.18.3.0/24
CLUSTER_CIDRS = ("198.18.0.0/16", "198.19.0.0/16")  # pods and underlay: everything but 203.0.113/24

SRC = "198.18.1.10"                 # the sending pod, behind hin
POD_MAC = "02:00:00:00:01:0a"       # its eth0
HIN_MAC = "02:00:00:00:01:01"       # its host-side veth, hin

LOCAL_DST = "198.18.1.11"           # a pod on the same node
DST_MAC = "02:00:00:00:01:0b"       # its eth0
DST_NODE_MAC = "02:00:00:00:01:02"  # its host-side veth
DST_IFINDEX = 4242                  # its host-side veth (not checked by test_run)

REMOTE_DST = "198.18.2.20"          # a pod of another node, via 198.19.0.2 on uplink
EXTERNAL_DST = "203.0.113.10"       # outside the cluster, via ROUTER on uplink
ROUTER = "198.19.0.254"             # the underlay's router to the outside
ROUTER_MAC = "02:00:00:00:00:fe"


# -- builders ---------------------------------------------------------------------------------

def pod_packet(dst: str, src: str = SRC, ttl: int = 64, payload: bytes = b"x" * 32, **ipkw):
    """A UDP datagram the pod SRC sends to `dst`, as it arrives on hin."""
    return (Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=src, dst=dst, ttl=ttl, **ipkw)
            / UDP(sport=40000, dport=5201) / payload)


def underlay_packet(dst: str, ttl: int = 63, payload: bytes = b"u" * 16, **ipkw):
    """A UDP datagram from REMOTE_DST's node to `dst`, as it arrives on uplink."""
    return (Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
            / IP(src=REMOTE_DST, dst=dst, ttl=ttl, **ipkw) / UDP(sport=5201, dport=40000)
            / payload)


def out_pkt(l4, dst=EXTERNAL_DST, src=SRC, payload=b"hello", **ipkw):
    """The pod SRC's `l4` to the outside (to EXTERNAL_DST unless told), as it arrives on hin."""
    return Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=src, dst=dst, **ipkw) / l4 / payload


def in_pkt(l4, src=EXTERNAL_DST, dst=NODE_IP, payload=b"world"):
    """`l4` from the outside (from EXTERNAL_DST unless told), as it arrives on uplink."""
    return Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / IP(src=src, dst=dst) / l4 / payload


# -- checksums --------------------------------------------------------------------------------

def ones_sum(data: bytes) -> int:
    """The 16-bit one's complement sum (RFC 1071); 0xffff over a region with a right checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return total


def checksum_ok(region: bytes) -> bool:
    """Whether a checksummed region (an IPv4 header, an ICMP message) sums right."""
    return ones_sum(region) == 0xffff


def assert_ip_checksum_ok(frame: bytes):
    """The IPv4 header checksum equals a full recompute (so 0x0000, never its twin 0xffff)."""
    ip = Ether(frame)[IP]
    claimed = ip.chksum
    rebuilt = ip.copy()
    del rebuilt.chksum
    assert IP(bytes(rebuilt))[IP].chksum == claimed, "IPv4 header checksum is wrong"


def assert_valid_frag_needed(raw: bytes, orig: bytes, mtu: int):
    """A frag-needed for `orig` (an Ethernet frame) with next-hop `mtu`: the whole reply's
    checksums are right (scapy recomputes them) and it quotes the original datagram's
    first min(its length, 548) bytes, as the kernel's icmp_send() does."""
    out = Ether(raw)
    orig_ip = bytes(Ether(orig)[IP])
    quoted = min(len(orig_ip), 548)
    assert out[IP].len == 20 + 8 + quoted == len(raw) - 14
    assert (out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (3, 4, mtu)
    assert raw[14 + 20 + 8:] == orig_ip[:quoted]
    rebuilt = out.copy()
    del rebuilt[IP].chksum
    del rebuilt[ICMP].chksum
    assert bytes(Ether(bytes(rebuilt))) == raw, "IPv4 or ICMP checksum is wrong"
