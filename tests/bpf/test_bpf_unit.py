"""Unit tests of the TC programs (bpf_c/host_routing.c) with BPF_PROG_TEST_RUN.

Each test: build a packet with scapy, set the maps from Python, run the
program, then check the verdict, the bytes that come out and the counters
(and, tracing being on, the trace event naming the redirect target).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import socket
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings, strategies as hst
from scapy.layers.inet import ICMP, IP, UDP, TCP, IPOption_NOP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import ARP, Dot1Q, Ether

from datapath import bpf_build, features, libbpf, shared_types as st, tc_attach
from datapath.host_routing import DatapathMaps
from tests.bpf.harness import (BPF_FUNC_SKB_CHANGE_HEAD, add_local_pod, from_pod, from_underlay,
                               helper_calls, ip_batch, nonzero_counters,
                               private_netns, run_prog, send_raw, wait_for)
from tests.bpf.packets import (CLUSTER_CIDRS, DST_IFINDEX, DST_MAC, DST_NODE_MAC, EXTERNAL_DST,
                               HIN_MAC, LOCAL_DST, NARROW_MTU, POD_MAC, REMOTE_DST, ROUTER_IP, SRC,
                               TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, assert_ip_checksum_ok,
                               assert_valid_frag_needed, pod_packet, underlay_packet)


def only_counter(dp, name: str, packets: int, nbytes: int):
    assert nonzero_counters(dp.maps) == {name: (packets, nbytes)}


def one_event(dp):
    events = dp.maps.read_trace_events()
    assert len(events) == 1, events
    return events[0]


# -- from_pod: forwarding -------------------------------------------------------------------

def test_local_pod_is_redirected_to_peer_with_rewritten_macs(dp, route_ns):
    add_local_pod(dp)
    data, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert (out.dst, out.src) == (DST_MAC, DST_NODE_MAC)
    assert out[IP].ttl == 63
    assert_ip_checksum_ok(res.data_out)
    # nothing but MACs, TTL and checksum changed
    assert res.data_out[12:22] == data[12:22] and res.data_out[26:] == data[26:]
    only_counter(dp, "redirect_peer", 1, len(data))
    ev = one_event(dp)
    assert (ev.hook, ev.reason, ev.ifindex_in, ev.ifindex_out) == (
        "from_pod", "redirect_peer", route_ns.hin, DST_IFINDEX)
    assert (ev.saddr, ev.daddr, ev.sport, ev.dport, ev.protocol, ev.len) == (
        SRC, LOCAL_DST, 40000, 5201, 17, len(data))


def test_the_spoof_check_follows_a_pod_that_moves_or_goes(dp, route_ns):
    """from_pod checks a source by its veth's slot in `pod_veths` first: a pod moved to
    another veth, or removed, must not keep its old veth's slot (set_endpoint and
    delete_endpoint empty it), and an empty slot (address 0) vouches for nothing."""
    add_local_pod(dp)
    _, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    assert res.retval == TC_ACT_REDIRECT
    dp.maps.set_endpoint(SRC, route_ns.narrow, POD_MAC, HIN_MAC)     # moved off hin
    _, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    assert res.retval == TC_ACT_SHOT
    dp.maps.set_endpoint(SRC, route_ns.hin, POD_MAC, HIN_MAC)        # back
    _, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    assert res.retval == TC_ACT_REDIRECT
    dp.maps.delete_endpoint(SRC)
    _, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    assert res.retval == TC_ACT_SHOT
    unknown = pod_packet(LOCAL_DST, src="0.0.0.0")
    unknown[Ether].src = "00:00:00:00:00:00"
    _, res = from_pod(dp, route_ns, unknown)
    assert res.retval == TC_ACT_SHOT
    assert nonzero_counters(dp.maps)["drop_spoofed"][0] == 3


@pytest.mark.parametrize("dst, out_dev", [(REMOTE_DST, "uplink"),
                                          ("198.18.3.30", "narrow"),
                                          ("198.18.4.40", "uplink")],     # next hop unresolved
                         ids=["remote_pod", "narrow", "no_neighbour_yet"])
def test_routed_destination_is_redirected_to_neighbour(dp, route_ns, dst, out_dev):
    add_local_pod(dp)       # present but not the destination
    data, res = from_pod(dp, route_ns, pod_packet(dst))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    # bpf_redirect_neigh fills the MACs when it transmits; here only the TTL changed
    assert (out.dst, out.src) == (HIN_MAC, POD_MAC)
    assert out[IP].ttl == 63
    assert_ip_checksum_ok(res.data_out)
    assert res.data_out[26:] == data[26:]
    only_counter(dp, "redirect_neigh", 1, len(data))
    ev = one_event(dp)
    assert (ev.reason, ev.ifindex_out, ev.daddr) == ("redirect_neigh", getattr(route_ns, out_dev),
                                                     dst)


def test_tcp_ports_are_traced(dp, route_ns):
    pkt = (Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=SRC, dst=REMOTE_DST)
           / TCP(sport=33333, dport=80, flags="S"))
    _, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    ev = one_event(dp)
    assert (ev.protocol, ev.sport, ev.dport) == (6, 33333, 80)


def test_ip_options_are_skipped_using_ihl(dp, route_ns):
    add_local_pod(dp)
    pkt = pod_packet(LOCAL_DST, options=[IPOption_NOP()] * 8)
    assert pkt[IP].ihl is None and len(bytes(pkt[IP])) - 8 - 32 == 28
    data, res = from_pod(dp, route_ns, pkt)
    assert Ether(data)[IP].ihl == 7
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert out[IP].ttl == 63 and out[IP].ihl == 7
    assert_ip_checksum_ok(res.data_out)
    assert out[UDP].sport == 40000 and bytes(out[UDP].payload) == b"x" * 32
    ev = one_event(dp)
    assert (ev.sport, ev.dport) == (40000, 5201)    # read behind the options

    _, res = from_pod(dp, route_ns, pod_packet(REMOTE_DST, options=[IPOption_NOP()] * 4))
    assert res.retval == TC_ACT_REDIRECT
    assert_ip_checksum_ok(res.data_out)
    assert nonzero_counters(dp.maps) == {"redirect_peer": (1, len(data)),
                                         "redirect_neigh": (1, len(data) - 4)}


def _id_for_checksum(want: int, **ipkw) -> int:
    """An IP id that makes the header checksum `want` (one's complement arithmetic)."""
    base = IP(bytes(IP(src=SRC, dst=LOCAL_DST, id=0, **ipkw) / UDP() / (b"x" * 32))).chksum
    s0 = ~base & 0xffff                     # header sum without the id
    ident = ((~want & 0xffff) - s0) % 0xffff
    got = IP(bytes(IP(src=SRC, dst=LOCAL_DST, id=ident, **ipkw) / UDP() / (b"x" * 32))).chksum
    assert got == want, (hex(ident), hex(got))
    return ident


def test_checksum_carry_on_ttl_decrement(dp, route_ns):
    """The incremental checksum update must match a full recompute, including the
    one's complement end-around carry (an old checksum of 0xfeff must become 0x0000)."""
    add_local_pod(dp)
    carry_id = _id_for_checksum(0xfeff, ttl=64)
    _, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST, ttl=64, id=carry_id))
    assert Ether(res.data_out)[IP].chksum == 0x0000
    assert_ip_checksum_ok(res.data_out)
    for ttl in (2, 3, 64, 128, 255):
        for tos in (0, 0xff):
            for ident in (0, 0x00ff, 0xfeff, 0xffff):
                _, res = from_pod(dp, route_ns, pod_packet(LOCAL_DST, ttl=ttl, tos=tos, id=ident))
                assert res.retval == TC_ACT_REDIRECT
                assert Ether(res.data_out)[IP].ttl == ttl - 1
                assert_ip_checksum_ok(res.data_out)


# -- from_pod: handed to the stack ----------------------------------------------------------

@pytest.mark.parametrize("dst", ["198.18.99.5", "198.18.98.5"], ids=["unreachable", "blackhole"])
def test_fib_miss_passes_unchanged(dp, route_ns, dst):
    data, res = from_pod(dp, route_ns, pod_packet(dst))
    assert res.retval == TC_ACT_OK
    assert res.data_out == data
    only_counter(dp, "pass_fib_miss", 1, len(data))
    assert one_event(dp).ifindex_out == 0


def test_no_route_at_all_is_reported_by_the_kernel_as_not_forwarded(dp, route_ns):
    """bpf_fib_lookup maps -ENETUNREACH to NOT_FWDED, the same code as a local address.

    The program cannot tell the two apart, so it counts pass_local. In the labs
    every node has a default route, so this only happens in a bare namespace.
    """
    data, res = from_pod(dp, route_ns, pod_packet("198.18.200.1"))
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp, "pass_local", 1, len(data))


@pytest.mark.parametrize("dst", [ROUTER_IP, "198.19.0.1"])
def test_node_local_destination_passes(dp, route_ns, dst):
    data, res = from_pod(dp, route_ns, pod_packet(dst))
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp, "pass_local", 1, len(data))


PASS_CASES = {
    "arp": (Ether(src=POD_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=SRC, pdst=ROUTER_IP),
            "pass_not_ipv4"),
    "vlan": (Ether(src=POD_MAC, dst=HIN_MAC) / Dot1Q(vlan=7) / IP(src=SRC, dst=LOCAL_DST)
             / UDP(), "pass_not_ipv4"),
    "first_fragment": (pod_packet(LOCAL_DST, flags="MF"), "pass_fragment"),
    "later_fragment": (Ether(src=POD_MAC, dst=HIN_MAC)
                       / IP(src=SRC, dst=LOCAL_DST, frag=100, proto=17) / (b"y" * 40),
                       "pass_fragment"),
    "ttl1_local": (pod_packet(LOCAL_DST, ttl=1), "pass_ttl"),
    "ttl0_local": (pod_packet(LOCAL_DST, ttl=0), "pass_ttl"),
    "ttl1_remote": (pod_packet(REMOTE_DST, ttl=1), "pass_ttl"),
    "ttl1_frag_needed": (pod_packet("198.18.3.30", ttl=1, flags="DF", payload=b"z" * 1400),
                         "pass_ttl"),
    "too_big_df_clear": (pod_packet("198.18.3.30", payload=b"z" * 1400), "pass_frag_needed"),
}


@pytest.mark.parametrize("case", PASS_CASES)
def test_pass_through_leaves_bytes_unchanged(dp, route_ns, case):
    pkt, reason = PASS_CASES[case]
    add_local_pod(dp)
    data, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_OK
    assert res.data_out == data
    only_counter(dp, reason, 1, len(data))
    ev = one_event(dp)
    assert ev.reason == reason and ev.ifindex_out == 0


@pytest.mark.parametrize("pkt, expected", [
    (Ether(src=POD_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=POD_MAC, psrc=SRC,
                                                       pdst=ROUTER_IP),
     (0x0806, 1, POD_MAC, SRC, ROUTER_IP)),
    (Ether(src=POD_MAC, dst=HIN_MAC) / ARP(op=2, hwsrc=POD_MAC, psrc=SRC, hwdst=HIN_MAC,
                                           pdst=ROUTER_IP),
     (0x0806, 2, POD_MAC, SRC, ROUTER_IP)),
    (Ether(src=POD_MAC, dst=HIN_MAC) / Dot1Q(vlan=7) / IP(src=SRC, dst=LOCAL_DST) / UDP(),
     (0x8100, 0, "", "0.0.0.0", "0.0.0.0")),
], ids=["arp_request", "arp_reply", "vlan"])
def test_a_frame_that_is_not_ipv4_is_traced_as_what_it_is(dp, route_ns, pkt, expected):
    """The trace record of a frame left to the stack names its ethertype and, for ARP, the
    operation, sender MAC, sender and target address (the monitor prints `arp who-has
    198.18.1.1 tell 198.18.1.10`, not `0.0.0.0 > 0.0.0.0`)."""
    _, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_OK
    ev = one_event(dp)
    assert ev.reason == "pass_not_ipv4"
    assert (ev.eth_proto, ev.arp_op, ev.arp_sha, ev.saddr, ev.daddr) == expected


def test_an_ipv4_trace_names_its_ethertype(dp, route_ns):
    add_local_pod(dp)
    from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    ev = one_event(dp)
    assert (ev.eth_proto, ev.arp_op, ev.arp_sha) == (0x0800, 0, "")


# -- from_pod: malformed --------------------------------------------------------------------

def _ip_bytes(**kw) -> bytes:
    return bytes(IP(src=SRC, dst=LOCAL_DST, **kw) / UDP(sport=1, dport=2) / (b"p" * 20))


ETH_IP = bytes(Ether(src=POD_MAC, dst=HIN_MAC, type=0x0800))
_ok_ip = _ip_bytes()
MALFORMED = {
    "ihl_4": ETH_IP + bytes([0x44]) + _ok_ip[1:],
    "ihl_0": ETH_IP + bytes([0x40]) + _ok_ip[1:],
    "ihl_15_short": ETH_IP + bytes([0x4f]) + _ok_ip[1:40],
    "version_6": ETH_IP + bytes([0x65]) + _ok_ip[1:],
    "tot_len_beyond_packet": ETH_IP + _ok_ip[:2] + (len(_ok_ip) + 1).to_bytes(2, "big")
    + _ok_ip[4:],
    "tot_len_below_ihl": ETH_IP + _ok_ip[:2] + (19).to_bytes(2, "big") + _ok_ip[4:],
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("hook", ["from_pod", "from_underlay"])
def test_malformed_is_dropped_and_counted(dp, route_ns, case, hook):
    add_local_pod(dp)
    data = MALFORMED[case]
    fn = from_pod if hook == "from_pod" else from_underlay
    _, res = fn(dp, route_ns, data)
    assert res.retval == TC_ACT_SHOT
    only_counter(dp, "drop_malformed", 1, len(data))
    ev = one_event(dp)
    assert (ev.hook, ev.reason) == (hook, "drop_malformed")


@pytest.mark.parametrize("ip_bytes", [1, 10, 19])
def test_truncated_ip_header_on_a_live_veth_is_dropped(loaded, dp, route_ns, ip_bytes):
    """BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header, so these go
    through a real veth: the pod end (hin-p) sends, from_pod runs at ingress of hin."""
    frame = ETH_IP + _ok_ip[:ip_bytes]
    created = tc_attach.attach(route_ns.name, "hin", loaded.from_pod.fd, "from_pod")
    try:
        send_raw(route_ns.name, "hin-p", frame)
        dropped = wait_for(lambda: dp.maps.counters()["drop_malformed"][0])
    finally:
        tc_attach.detach(route_ns.name, "hin", "ingress", remove_qdisc=created)
    assert dp.maps.counters()["drop_malformed"] == (1, len(frame))
    assert dropped == 1
    events = [e for e in dp.maps.read_trace_events() if e.reason == "drop_malformed"]
    assert [(e.hook, e.ifindex_in, e.len) for e in events] == [("from_pod", route_ns.hin,
                                                                len(frame))]


def test_ethernet_padding_after_tot_len_is_accepted(dp, route_ns):
    add_local_pod(dp)
    data = bytes(pod_packet(LOCAL_DST, payload=b"")) + b"\0" * 18    # padded to 60 bytes
    _, res = from_pod(dp, route_ns, data)
    assert res.retval == TC_ACT_REDIRECT
    only_counter(dp, "redirect_peer", 1, len(data))


def test_truncated_ethernet_never_reaches_the_program(dp, route_ns):
    """Frames shorter than an Ethernet header cannot be fed to an skb program at all
    (the kernel refuses them, as no device delivers them); the program checks anyway."""
    with pytest.raises(OSError) as exc:
        run_prog(dp.from_pod.fd, bytes(13), route_ns.name, route_ns.hin)
    assert exc.value.errno == 22
    assert nonzero_counters(dp.maps) == {}


# -- from_pod: ICMP fragmentation needed ----------------------------------------------------

@pytest.mark.parametrize("options", [0, 3], ids=["plain", "ip_options"])
def test_frag_needed_with_df_returns_icmp_to_the_pod(dp, route_ns, options):
    pkt = pod_packet("198.18.3.30", flags="DF", payload=b"z" * 1400, id=0x1234,
                     options=[IPOption_NOP()] * (4 * options))
    data, res = from_pod(dp, route_ns, pkt)
    orig = Ether(data)
    orig_ip_hdr = bytes(orig[IP])[:orig[IP].ihl * 4]
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert (out.dst, out.src) == (POD_MAC, HIN_MAC)
    ip = out[IP]
    assert (ip.src, ip.dst, ip.ttl, ip.proto, ip.ihl) == (ROUTER_IP, SRC, 64, 1, 5)
    assert ip.len == 576 == len(res.data_out) - 14          # RFC 1812: up to 576 bytes
    icmp = out[ICMP]
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, NARROW_MTU)
    # quoted: the original header (options included) and as much payload as fits
    quoted = res.data_out[14 + 20 + 8:]
    assert quoted == bytes(orig[IP])[:548] and quoted.startswith(orig_ip_hdr)
    assert isinstance(icmp.payload, IPerror) and icmp[IPerror].id == 0x1234
    assert isinstance(icmp[IPerror].payload, UDPerror)
    # checksums: rebuild without them and compare
    rebuilt = out.copy()
    del rebuilt[IP].chksum
    del rebuilt[ICMP].chksum
    rebuilt = Ether(bytes(rebuilt))
    assert (ip.chksum, icmp.chksum) == (rebuilt[IP].chksum, rebuilt[ICMP].chksum)
    assert bytes(rebuilt) == res.data_out
    only_counter(dp, "icmp_frag_needed", 1, len(data))
    ev = one_event(dp)
    assert (ev.reason, ev.ifindex_out, ev.len) == ("icmp_frag_needed", route_ns.hin, len(data))


def test_frag_needed_uses_router_ip_from_config(dp, route_ns):
    dp.maps.set_config("198.18.1.254", trace=False)
    _, res = from_pod(dp, route_ns, pod_packet("198.18.3.30", flags="DF", payload=b"z" * 1300))
    assert res.retval == TC_ACT_REDIRECT
    assert Ether(res.data_out)[IP].src == "198.18.1.254"
    assert dp.maps.read_trace_events() == []            # tracing off: no events
    only_counter(dp, "icmp_frag_needed", 1, len(bytes(pod_packet("198.18.3.30",
                                                                  payload=b"z" * 1300))))


def test_fits_exactly_at_mtu_is_forwarded(dp, route_ns):
    pkt = pod_packet("198.18.3.30", flags="DF", payload=b"z" * (NARROW_MTU - 28))
    assert len(pkt[IP]) == NARROW_MTU
    _, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    only_counter(dp, "redirect_neigh", 1, len(pkt))


@pytest.mark.parametrize("over", [1, 4])
def test_a_few_bytes_over_the_mtu_get_frag_needed(dp, route_ns, over):
    """bpf_fib_lookup's own check (tot_len 0) allows 4 bytes over the MTU (room for a VLAN
    tag): a 1281..1284-byte datagram must not leave on the 1280 link."""
    pkt = pod_packet("198.18.3.30", flags="DF", payload=b"z" * (NARROW_MTU - 28 + over))
    data, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert_valid_frag_needed(res.data_out, data, NARROW_MTU)
    only_counter(dp, "icmp_frag_needed", 1, len(data))


@pytest.fixture
def tiny_link(route_ns):
    """198.18.5.0/24 via a 500-byte link: too-big packets shorter than a full 548-byte quote."""
    ip_batch(route_ns.name, [
        "link add tiny mtu 500 type veth peer name tiny-p mtu 500",
        "link set tiny up", "link set tiny-p up",
        "addr add 198.19.5.1/24 dev tiny",
        "route add 198.18.5.0/24 via 198.19.5.2 dev tiny",
        "neigh replace 198.19.5.2 lladdr 02:00:00:00:05:02 dev tiny nud permanent",
    ])
    yield
    ip_batch(route_ns.name, ["link del tiny"])


@pytest.mark.parametrize("payload", [501 - 28, 547 - 28, 600 - 28],
                         ids=["odd_501", "odd_547", "over_548"])
def test_frag_needed_quotes_a_short_datagram_whole(dp, route_ns, tiny_link, payload):
    """Quotes of any length (odd ones too: summed with zero padding) get a right checksum."""
    pkt = pod_packet("198.18.5.30", flags="DF",
                     payload=bytes((7 * i) & 0xff for i in range(payload)))
    data, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert_valid_frag_needed(res.data_out, data, 500)


def test_tcp_segment_too_big_quotes_the_tcp_header_whole(dp, route_ns):
    """An offloaded TCP segment can only be cut after its checksum field (18 bytes into TCP):
    the quote holds the whole TCP header, which the pod's TCP needs anyway."""
    pkt = (Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=SRC, dst="198.18.3.30", flags="DF")
           / TCP(sport=40000, dport=5201, flags="A", seq=1000) / (b"t" * 1448))
    data, res = from_pod(dp, route_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert_valid_frag_needed(res.data_out, data, NARROW_MTU)
    assert Ether(res.data_out)[ICMP][TCPerror].seq == 1000


# A pod of this node whose link is narrower (its host-side veth is route_ns's 1280 "narrow").
NARROW_POD = "198.18.1.12"


@pytest.mark.parametrize("size, df, verdict, action", [
    (NARROW_MTU, True, "redirect_peer", TC_ACT_REDIRECT),
    (NARROW_MTU + 1, True, "icmp_frag_needed", TC_ACT_REDIRECT),
    (1500, False, "pass_frag_needed", TC_ACT_OK),
], ids=["fits", "too_big_df", "too_big_no_df"])
def test_same_node_pod_with_a_narrower_link(dp, route_ns, size, df, verdict, action):
    """The peer redirect skips the veth's MTU check: the datapath checks the destination
    pod's link itself and answers as for a routed packet (the stack fragments without DF)."""
    dp.maps.set_endpoint(NARROW_POD, route_ns.narrow, DST_MAC, DST_NODE_MAC)
    pkt = pod_packet(NARROW_POD, flags="DF" if df else 0, payload=b"n" * (size - 28))
    data, res = from_pod(dp, route_ns, pkt)
    assert res.retval == action
    only_counter(dp, verdict, 1, len(data))
    if verdict == "icmp_frag_needed":
        assert_valid_frag_needed(res.data_out, data, NARROW_MTU)
        assert Ether(res.data_out)[IP].dst == SRC
    elif verdict == "pass_frag_needed":
        assert res.data_out == data


@pytest.mark.parametrize("size, verdict, action", [
    (NARROW_MTU, "redirect_peer", TC_ACT_REDIRECT),
    (NARROW_MTU + 1, "pass_frag_needed", TC_ACT_OK),
], ids=["fits", "too_big"])
def test_underlay_to_a_pod_with_a_narrower_link(dp, route_ns, size, verdict, action):
    """Too big for the pod's link: the stack answers the sender on its node (or fragments)."""
    dp.maps.set_endpoint(NARROW_POD, route_ns.narrow, DST_MAC, DST_NODE_MAC)
    pkt = (Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
           / IP(src="198.18.2.20", dst=NARROW_POD, ttl=63, flags="DF")
           / UDP(sport=5201, dport=40000) / (b"u" * (size - 28)))
    data, res = from_underlay(dp, route_ns, pkt)
    assert res.retval == action
    only_counter(dp, verdict, 1, len(data))


# -- from_underlay ---------------------------------------------------------------------------

def test_underlay_to_local_pod_is_redirected_to_peer(dp, route_ns):
    add_local_pod(dp)
    data, res = from_underlay(dp, route_ns, underlay_packet(LOCAL_DST))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert (out.dst, out.src, out[IP].ttl) == (DST_MAC, DST_NODE_MAC, 62)
    assert_ip_checksum_ok(res.data_out)
    assert res.data_out[26:] == data[26:]
    only_counter(dp, "redirect_peer", 1, len(data))
    ev = one_event(dp)
    assert (ev.hook, ev.ifindex_in, ev.ifindex_out) == ("from_underlay", route_ns.uplink,
                                                        DST_IFINDEX)


BULK_PAYLOAD = b"b" * 2 * 1448     # two segments: test_run takes a page at most


@pytest.mark.parametrize("hook, device, pkt", [
    ("from_pod", "hin", pod_packet(LOCAL_DST, payload=BULK_PAYLOAD)),
    ("from_underlay", "uplink", underlay_packet(LOCAL_DST, payload=BULK_PAYLOAD)),
], ids=["from_pod", "from_underlay"])
def test_a_bulk_skb_to_a_local_pod_is_delivered_as_a_single_one_is(dp, route_ns, hook, device,
                                                                    pkt):
    """A GSO skb of two segments into a local pod goes through unclone_bulk()
    (bpf_skb_change_head with no room: a cloned skb gets a header of its own, so that the
    receiving socket can coalesce it): same verdict, same bytes out as the skb alone. Whether
    it was a clone test_run cannot show: the labs' counters do (docs); that the program makes
    the call, its instructions do."""
    assert BPF_FUNC_SKB_CHANGE_HEAD in helper_calls(dp.bpf, hook)
    add_local_pod(dp)
    data = bytes(pkt)
    ifindex = getattr(route_ns, device)
    prog = getattr(dp, hook).fd
    single = run_prog(prog, data, route_ns.name, ifindex)
    bulk = run_prog(prog, data, route_ns.name, ifindex, gso_size=1448, gso_segs=2)
    assert single.retval == bulk.retval == TC_ACT_REDIRECT
    assert bulk.data_out == single.data_out
    out = Ether(bulk.data_out)
    assert (out.dst, out.src, out[IP].ttl) == (DST_MAC, DST_NODE_MAC, pkt[IP].ttl - 1)
    assert bulk.data_out[34:] == data[34:]


UNDERLAY_PASS = {
    "not_endpoint": (underlay_packet("198.18.1.12"), "pass_not_endpoint"),
    "node_itself": (underlay_packet("198.19.0.1"), "pass_not_endpoint"),
    "arp": (Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="198.19.0.2", pdst="198.19.0.1"),
            "pass_not_ipv4"),
    "fragment": (underlay_packet(LOCAL_DST, flags="MF"), "pass_fragment"),
    "ttl1": (underlay_packet(LOCAL_DST, ttl=1), "pass_ttl"),
}


@pytest.mark.parametrize("case", UNDERLAY_PASS)
def test_underlay_pass_through(dp, route_ns, case):
    pkt, reason = UNDERLAY_PASS[case]
    add_local_pod(dp)
    data, res = from_underlay(dp, route_ns, pkt)
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp, reason, 1, len(data))


# -- counters, trace switch, invariants ----------------------------------------------------

def test_counters_accumulate_packets_and_bytes(dp, route_ns):
    add_local_pod(dp)
    sizes = [0, 100, 1000]
    for n in sizes:
        from_pod(dp, route_ns, pod_packet(LOCAL_DST, payload=b"a" * n))
    from_pod(dp, route_ns, pod_packet(REMOTE_DST))
    total = sum(len(pod_packet(LOCAL_DST, payload=b"a" * n)) for n in sizes)
    assert nonzero_counters(dp.maps) == {"redirect_peer": (3, total),
                                         "redirect_neigh": (1, len(pod_packet(REMOTE_DST)))}
    assert len(dp.maps.read_trace_events()) == 4


def test_trace_off_emits_nothing(dp, route_ns):
    dp.maps.set_trace(False)
    assert dp.maps.config() == st.Config(ROUTER_IP, False)
    from_pod(dp, route_ns, pod_packet(REMOTE_DST))
    assert dp.maps.read_trace_events() == []
    only_counter(dp, "redirect_neigh", 1, len(pod_packet(REMOTE_DST)))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=hst.binary(min_size=40, max_size=120), ethertype=hst.sampled_from([0x0800, 0x86dd]))
def test_every_packet_gets_exactly_one_counted_verdict(dp, route_ns, body, ethertype):
    """Random bytes behind an Ethernet header: one verdict, counted once; a drop is never silent.

    (test_run wants at least a full IPv4/IPv6 header's worth of bytes, hence min_size=40.)"""
    dp.maps.reset_counters()
    add_local_pod(dp)
    data = bytes(Ether(src=POD_MAC, dst=HIN_MAC, type=ethertype)) + body
    for fn in (from_pod, from_underlay):
        _, res = fn(dp, route_ns, data)
        assert res.retval in (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
    counts = nonzero_counters(dp.maps)
    assert sum(p for p, _ in counts.values()) == 2
    assert all(b == p * len(data) for p, b in counts.values())
    dropped = sum(p for r, (p, _) in counts.items() if r.startswith("drop_"))
    passed = sum(p for r, (p, _) in counts.items() if r.startswith("pass_"))
    assert dropped + passed + sum(counts.get(r, (0, 0))[0] for r in
                                  ("redirect_peer", "redirect_neigh", "icmp_frag_needed")) == 2
    dp.maps.read_trace_events()


# -- maps from Python -----------------------------------------------------------------------

def test_endpoints_roundtrip(dp):
    before = dp.maps.endpoints()
    assert set(before) == {SRC}
    dp.maps.set_endpoint("198.18.1.20", 7, "02:aa:bb:cc:dd:ee", b"\x02\x01\x02\x03\x04\x05")
    assert dp.maps.endpoints() == {**before, "198.18.1.20": st.Endpoint(7, "02:aa:bb:cc:dd:ee",
                                                                        "02:01:02:03:04:05")}
    assert dp.maps.delete_endpoint("198.18.1.20") is True
    assert dp.maps.delete_endpoint("198.18.1.20") is False
    assert dp.maps.endpoints() == before


def test_maps_reopened_by_prog_id_in_another_process(dp, route_ns):
    add_local_pod(dp)
    from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    code = textwrap.dedent(f"""
        import json
        from datapath.host_routing import DatapathMaps
        with DatapathMaps.from_prog_id({dp.from_underlay.id}) as m:
            m.set_endpoint("198.18.1.30", 9, "02:00:00:00:00:09", "02:00:00:00:00:08")
            print(json.dumps({{"eps": sorted(m.endpoints()), "ctr": m.counters(),
                               "cfg": m.config().router_ip}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=str(bpf_build.REPO_ROOT))
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["eps"] == [SRC, LOCAL_DST, "198.18.1.30"]
    assert seen["ctr"]["redirect_peer"] == [1, len(pod_packet(LOCAL_DST))]
    assert seen["cfg"] == ROUTER_IP
    assert "198.18.1.30" in dp.maps.endpoints()       # written by the other process


def test_from_prog_id_rejects_a_program_without_the_maps(dp):
    b = bpf_build.compile_bpf("ok.c", text="int f(struct __sk_buff *skb) { return 0; }")
    try:
        fd = bpf_build.load_program(b, "f")
        with pytest.raises(Exception, match="does not use the datapath maps"):
            DatapathMaps.from_prog_id(libbpf.prog_info(fd).id)
    finally:
        b.cleanup()


def test_shared_types_follow_the_header():
    assert st.REASONS["HR_REDIRECT_PEER"] == 0 and st.REASON_MAX == len(st.REASONS)
    assert st.REASON_NAMES[st.REASONS["HR_DROP_MALFORMED"]] == "drop_malformed"
    assert st.REASON_BY_NAME["pass_fib_miss"] == st.REASONS["HR_PASS_FIB_MISS"]
    raw = st.pack_endpoint(3, "02:00:00:00:00:01", "02:00:00:00:00:02")
    assert len(raw) == st.SIZEOF_ENDPOINT == 20
    assert raw[:4] == (3).to_bytes(4, "little") and raw[8:14] == bytes.fromhex("020000000001")
    assert st.unpack_config(st.pack_config("198.18.1.1", True)) == st.Config("198.18.1.1", True)
    assert st.pack_config("198.18.1.1")[:4] == bytes([198, 18, 1, 1])
    assert st.unpack_counter(st.pack_counter(5, 7)) == (5, 7)


# -- tc attach / detach ---------------------------------------------------------------------

def _tc(ns: str, *args: str) -> str:
    return subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def veth_ns():
    with private_netns() as name:
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name",
                        "v1"], check=True)
        yield name


def test_attach_detach_leaves_nothing_behind(loaded, veth_ns):
    before = _tc(veth_ns, "qdisc", "show", "dev", "v0")
    created = tc_attach.attach(veth_ns, "v0", loaded.from_pod.fd, "from_pod", "ingress",
                               mode="clsact")
    assert created is True
    assert "clsact" in _tc(veth_ns, "qdisc", "show", "dev", "v0")
    assert tc_attach.attached_programs(veth_ns, "v0", "ingress") == [(loaded.from_pod.id,
                                                                      "from_pod")]
    assert tc_attach.attached_programs(veth_ns, "v0", "egress") == []
    # attaching again swaps the program in place
    assert tc_attach.attach(veth_ns, "v0", loaded.from_underlay.fd, "from_underlay",
                            mode="clsact") is False
    assert tc_attach.attached_programs(veth_ns, "v0") == [(loaded.from_underlay.id,
                                                           "from_underlay")]
    assert tc_attach.detach(veth_ns, "v0", "ingress", remove_qdisc=created) is True
    assert _tc(veth_ns, "qdisc", "show", "dev", "v0") == before
    assert _tc(veth_ns, "filter", "show", "dev", "v0", "ingress") == ""


def test_preexisting_clsact_and_filters_are_kept(loaded, veth_ns):
    from pyroute2 import IPRoute
    subprocess.run(["tc", "-n", veth_ns, "qdisc", "add", "dev", "v0", "clsact"], check=True)
    with IPRoute(netns=veth_ns, flags=0) as ipr:      # someone else's filter, at prio 7
        ipr.tc("add-filter", "bpf", ipr.link_lookup(ifname="v0")[0], 2, parent=0xFFFFFFF3,
               prio=7, fd=loaded.from_underlay.fd, name="someone_else", direct_action=True)
    created = tc_attach.attach(veth_ns, "v0", loaded.from_pod.fd, "from_pod", "egress",
                               mode="clsact")
    assert created is False
    assert tc_attach.attached_programs(veth_ns, "v0", "egress") == [
        (loaded.from_pod.id, "from_pod"), (loaded.from_underlay.id, "from_underlay")]
    assert tc_attach.detach(veth_ns, "v0", "egress", remove_qdisc=created) is True
    assert "clsact" in _tc(veth_ns, "qdisc", "show", "dev", "v0")
    assert tc_attach.attached_programs(veth_ns, "v0", "egress") == [
        (loaded.from_underlay.id, "from_underlay")]
    assert "someone_else" in _tc(veth_ns, "filter", "show", "dev", "v0", "egress")
    assert tc_attach.detach(veth_ns, "v0", "egress") is False      # nothing of ours left


needs_tcx = pytest.mark.skipif(bool(tc_attach.tcx_missing()),
                               reason=f"kernel without TCX: {tc_attach.tcx_missing()}")


@needs_tcx
def test_tcx_attach_replace_detach(loaded, veth_ns):
    from netns_lab import netns
    before = _tc(veth_ns, "qdisc", "show", "dev", "v0")
    assert tc_attach.attach(veth_ns, "v0", loaded.from_pod.fd, "from_pod", mode="tcx") is False
    found = tc_attach.attached(veth_ns, "v0", "ingress")
    assert [(a.kind, a.prog_id, a.name) for a in found] == [("tcx", loaded.from_pod.id,
                                                              "from_pod")]
    assert _tc(veth_ns, "qdisc", "show", "dev", "v0") == before     # no clsact qdisc
    assert tc_attach.attached_programs(veth_ns, "v0", "egress") == []
    # someone else's program on the hook, held by its bpf_link: never ours
    probes = features.Probes()
    theirs, _, _ = probes.load(features.PROBE_FUNCS[features.SCHED_CLS])
    theirs_id = libbpf.prog_info(theirs).id
    link = netns.call_in(veth_ns, lambda: libbpf.link_create(
        theirs, socket.if_nametoindex("v0"), libbpf.BPF_TCX_INGRESS))
    try:
        # attaching again swaps ours in place, before theirs as it was
        tc_attach.attach(veth_ns, "v0", loaded.from_underlay.fd, "from_underlay", mode="tcx")
        assert tc_attach.attached_programs(veth_ns, "v0") == [
            (loaded.from_underlay.id, "from_underlay"), (theirs_id, "hr_probe_ok")]
        assert [a.name for a in tc_attach.attached(veth_ns, "v0")] == ["from_underlay"]
        # attached the other way, ours moves: one program of ours on the hook
        tc_attach.attach(veth_ns, "v0", loaded.from_pod.fd, "from_pod", mode="clsact")
        assert [(a.kind, a.name) for a in tc_attach.attached(veth_ns, "v0")] == [
            ("tc", "from_pod")]
        tc_attach.attach(veth_ns, "v0", loaded.from_pod.fd, "from_pod", mode="tcx")
        assert [(a.kind, a.name) for a in tc_attach.attached(veth_ns, "v0")] == [
            ("tcx", "from_pod")]
        assert tc_attach.detach(veth_ns, "v0", "ingress") is True
        assert tc_attach.attached(veth_ns, "v0") == []
        assert tc_attach.attached_programs(veth_ns, "v0") == [(theirs_id, "hr_probe_ok")]
        assert tc_attach.detach(veth_ns, "v0", "ingress") is False
    finally:
        link.close()
        probes.close()
    assert tc_attach.attached_programs(veth_ns, "v0") == []


def test_attach_errors_name_what_is_missing(loaded, veth_ns):
    with pytest.raises(tc_attach.TcError, match="no device 'nope'"):
        tc_attach.attach(veth_ns, "nope", loaded.from_pod.fd, "from_pod")
    with pytest.raises(tc_attach.TcError, match="hrtest-does-not-exist"):
        tc_attach.attach("hrtest-does-not-exist", "v0", loaded.from_pod.fd, "from_pod")
    assert not __import__("os").path.exists("/run/netns/hrtest-does-not-exist")
    with pytest.raises(ValueError):
        tc_attach.attach(veth_ns, "v0", loaded.from_pod.fd, "from_pod", "sideways")
    assert "clsact" not in _tc(veth_ns, "qdisc", "show", "dev", "v0")


# -- build errors ---------------------------------------------------------------------------

def test_compile_error_names_file_and_line(tmp_path):
    src = tmp_path / "broken.c"
    src.write_text("int f(struct __sk_buff *skb)\n{\n\treturn undefined_thing;\n}\n")
    with pytest.raises(bpf_build.BpfCompileError) as exc:
        bpf_build.compile_bpf(src)
    msg = str(exc.value)
    assert f"{src}:3:" in msg and "undefined_thing" in msg


def test_compile_error_in_an_included_header_names_it(tmp_path):
    (tmp_path / "bad.h").write_text("/* ok */\nstatic int x = ;\n")
    src = tmp_path / "main.c"
    src.write_text('#include "bad.h"\nint f(struct __sk_buff *skb) { return 0; }\n')
    with pytest.raises(bpf_build.BpfCompileError, match=r"bad\.h:2:"):
        bpf_build.compile_bpf(src, [f"-I{tmp_path}"])


def test_verifier_rejection_shows_log_tail(tmp_path):
    src = tmp_path / "unsafe.c"
    src.write_text(textwrap.dedent("""\
        #include <uapi/linux/bpf.h>
        int unchecked(struct __sk_buff *skb)
        {
        	unsigned char *data = (void *)(long)skb->data;
        	return data[20];	/* no bounds check against data_end */
        }
    """))
    b = bpf_build.compile_bpf(src)
    try:
        with pytest.raises(bpf_build.VerifierError) as exc:
            bpf_build.load_program(b, "unchecked")
    finally:
        b.cleanup()
    err = exc.value
    assert err.program == "unchecked"
    assert "invalid access to packet" in err.log_tail
    assert 0 < len(err.log_tail.splitlines()) <= bpf_build.VERIFIER_TAIL_LINES
    assert "unchecked" in str(err) and "invalid access to packet" in str(err)


def test_missing_kernel_headers_are_named(tmp_path):
    with pytest.raises(bpf_build.KernelHeadersMissing, match="0.0.0-nonexistent/build"):
        bpf_build.check_kernel_headers("0.0.0-nonexistent")


def test_production_source_compiles_without_warnings(capfd):
    b = bpf_build.compile_bpf(bpf_build.BPF_DIR / "host_routing.c")
    b.cleanup()
    assert "warning" not in capfd.readouterr().err


# -- end to end on real veths ----------------------------------------------------------------

def _ns_link(ns: str, dev: str) -> dict:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)[0]


@pytest.fixture
def mini_node(loaded):
    """A node netns with two pods and an underlay (MTU 1280) to a router holding
    203.0.113.10; from_pod on both host-side veths, from_underlay on the underlay."""
    with contextlib.ExitStack() as stack:
        node, pa, pb, rt = (stack.enter_context(private_netns()) for _ in range(4))
        for ns in (node, pa, pb, rt):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1",
                            "net.ipv4.conf.all.forwarding=1"], check=True, capture_output=True)
        ip_batch(node, [
            f"link add hA type veth peer name eth0 netns {pa}",
            f"link add hB type veth peer name eth0 netns {pb}",
            f"link add up0 mtu 1280 type veth peer name up0 netns {rt} mtu 1280",
            "link set hA up", "link set hB up", "link set up0 up",
            f"addr add {ROUTER_IP}/32 dev hA", f"addr add {ROUTER_IP}/32 dev hB",
            "addr add 198.19.0.1/24 dev up0",
            f"route add {SRC}/32 dev hA", f"route add {LOCAL_DST}/32 dev hB",
            "route add default via 198.19.0.254"])
        for ns, ip in ((pa, SRC), (pb, LOCAL_DST)):
            ip_batch(ns, ["link set eth0 up", f"addr add {ip}/32 dev eth0",
                          f"route add {ROUTER_IP}/32 dev eth0 scope link",
                          f"route add default via {ROUTER_IP} dev eth0 onlink"])
        ip_batch(rt, ["link set up0 up", "addr add 198.19.0.254/24 dev up0",
                      f"addr add {EXTERNAL_DST}/32 dev lo", "route add 198.18.1.0/24 via 198.19.0.1"])
        maps = loaded.maps
        for ip in list(maps.endpoints()):
            maps.delete_endpoint(ip)
        maps.reset_counters()
        # This mini cluster's far end (the "router" namespace) answers for EXTERNAL_DST.
        for cidr in CLUSTER_CIDRS + ("203.0.113.0/24",):
            maps.set_cluster_cidr(cidr)
        maps.set_config(ROUTER_IP, trace=True)
        maps.read_trace_events()
        for ns, ip, host in ((pa, SRC, "hA"), (pb, LOCAL_DST, "hB")):
            h = _ns_link(node, host)
            maps.set_endpoint(ip, h["ifindex"], _ns_link(ns, "eth0")["address"], h["address"])
        for dev, prog in (("hA", loaded.from_pod), ("hB", loaded.from_pod),
                          ("up0", loaded.from_underlay)):
            tc_attach.attach(node, dev, prog.fd, prog.name)
        yield {"node": node, "a": pa, "b": pb, "hA": _ns_link(node, "hA")["ifindex"],
               "hB": _ns_link(node, "hB")["ifindex"], "up0": _ns_link(node, "up0")["ifindex"]}


def _ping(ns: str, dst: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "2", "-i", "0.2",
                           "-W", "2", *extra, dst], capture_output=True, text=True, timeout=20)


def test_live_pod_to_pod_external_and_frag_needed(loaded, mini_node):
    """Real veths: the redirects deliver, and the pod's stack accepts the ICMP we build."""
    maps = loaded.maps
    p = _ping(mini_node["a"], LOCAL_DST)
    assert p.returncode == 0, p.stdout + p.stderr
    p = _ping(mini_node["a"], EXTERNAL_DST)
    assert p.returncode == 0, p.stdout + p.stderr
    p = _ping(mini_node["a"], EXTERNAL_DST, "-M", "do", "-s", "1400")
    assert p.returncode != 0
    assert f"From {ROUTER_IP}" in p.stdout and "Frag needed and DF set (mtu = 1280)" in p.stdout
    route = subprocess.run(["ip", "netns", "exec", mini_node["a"], "ip", "route", "get",
                            EXTERNAL_DST], capture_output=True, text=True).stdout
    assert "mtu 1280" in route          # the pod learned the path MTU from our ICMP

    c = maps.counters()
    assert c["redirect_peer"][0] >= 4           # 2 requests + 2 replies between the pods, ...
    assert c["redirect_neigh"][0] >= 1          # ... pings out via the underlay
    assert c["icmp_frag_needed"][0] == 1
    assert c["drop_malformed"] == c["drop_icmp_failed"] == (0, 0)
    seen = {(e.hook, e.reason, e.ifindex_in, e.ifindex_out) for e in maps.read_trace_events()}
    assert ("from_pod", "redirect_peer", mini_node["hA"], mini_node["hB"]) in seen
    assert ("from_pod", "redirect_peer", mini_node["hB"], mini_node["hA"]) in seen
    assert ("from_pod", "redirect_neigh", mini_node["hA"], mini_node["up0"]) in seen
    assert ("from_underlay", "redirect_peer", mini_node["up0"], mini_node["hA"]) in seen
    assert ("from_pod", "icmp_frag_needed", mini_node["hA"], mini_node["hA"]) in seen


# -- leaving the cluster, forwarding off ----------------------------------------------------

def test_destination_outside_the_cluster_goes_to_the_stack_unchanged(dp, route_ns):
    """With BPF SNAT off (no node IP configured), the stack's MASQUERADE must do it."""
    data, res = from_pod(dp, route_ns, pod_packet(EXTERNAL_DST))
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp, "pass_external", 1, len(data))


def test_forwarding_off_uses_the_datapath_node_routes(dp, route_ns):
    """With forwarding off the kernel refuses the FIB lookup: node_routes still route pods."""
    subprocess.run(["ip", "netns", "exec", route_ns.name, "sysctl", "-qw",
                    "net.ipv4.conf.all.forwarding=0", "net.ipv4.conf.hin.forwarding=0"],
                   check=True, timeout=10)
    try:
        data, res = from_pod(dp, route_ns, pod_packet(REMOTE_DST))
        assert res.retval == TC_ACT_OK and res.data_out == data
        only_counter(dp, "pass_fwd_disabled", 1, len(data))

        dp.maps.reset_counters()
        dp.maps.read_trace_events()
        dp.maps.set_node_route("198.18.2.0/24", "198.19.0.2", route_ns.uplink)
        data, res = from_pod(dp, route_ns, pod_packet(REMOTE_DST))
        assert res.retval == TC_ACT_REDIRECT
        assert Ether(res.data_out)[IP].ttl == 63
        assert_ip_checksum_ok(res.data_out)
        assert one_event(dp).ifindex_out == route_ns.uplink
        only_counter(dp, "redirect_neigh", 1, len(data))
    finally:
        subprocess.run(["ip", "netns", "exec", route_ns.name, "sysctl", "-qw",
                        "net.ipv4.conf.all.forwarding=1", "net.ipv4.conf.hin.forwarding=1"],
                       check=True, timeout=10)
