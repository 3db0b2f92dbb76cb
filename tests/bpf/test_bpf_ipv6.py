"""Unit tests of the IPv6 programs (from_pod6, from_underlay6, which from_pod and from_underlay
hand IPv6 frames to through `progs6`) with BPF_PROG_TEST_RUN and scapy IPv6 packets: every
branch, then random packets (hypothesis).

Each test runs the attached program (from_pod or from_underlay) on an IPv6 frame, so the
tail call is part of every case; the verdict must be counted under the family ipv6 only.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as hst
from scapy.layers.inet import TCP, UDP, UDPerror
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6MLQuery,
                                ICMPv6MLReport2, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RS,
                                ICMPv6PacketTooBig, ICMPv6Unknown, IPerror6, IPv6,
                                IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting, RouterAlert)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Ether

from datapath import bpf_build, libbpf, shared_types as st
from tests.bpf.harness import (from_pod, from_underlay, ip_batch, loaded_datapath,
                               reset_datapath6, run_example, run_prog, wait_for)
from tests.bpf.packets import (DST_IFINDEX, DST_MAC, DST_NODE_MAC, HIN_MAC, NARROW_MTU, POD_MAC,
                               TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT)
from tests.bpf.packets6 import (CLUSTER_CIDRS6, EXTERNAL_DST6, LOCAL_DST6, NARROW_DST6,
                                NODE_IP6, REMOTE_DST6, REMOTE_NODE6, ROUTER6, SRC6,
                                UNRESOLVED_DST6, assert_valid_packet_too_big, pod6_packet,
                                underlay6_packet)

OTHER_MAC = "02:00:00:00:01:99"
ETH6 = bytes(Ether(src=POD_MAC, dst=HIN_MAC, type=0x86dd))


def counted(dp) -> dict[tuple[str, str], tuple[int, int]]:
    return {k: v for k, v in dp.maps.counters_by_family().items() if v != (0, 0)}


def only_counter(dp, reason: str, nbytes: int, packets: int = 1):
    """Exactly this verdict, counted under ipv6 (never under ipv4)."""
    assert counted(dp) == {("ipv6", reason): (packets, nbytes)}


def one_event(dp):
    events = dp.maps.read_trace_events()
    assert len(events) == 1, events
    return events[0]


def add_local_pod6(dp, ip=LOCAL_DST6):
    dp.maps.set_endpoint(ip, DST_IFINDEX, DST_MAC, DST_NODE_MAC)


def assert_routed(data: bytes, out: bytes, hlim: int):
    """Only the hop limit changed (one lower); bpf_redirect_neigh fills the MACs later."""
    assert out[21] == hlim - 1 == data[21] - 1
    assert out[:21] == data[:21] and out[22:] == data[22:]


# -- from_pod: forwarding ---------------------------------------------------------------------

def test_local_pod_gets_the_packet_by_peer_redirect(dp6, route6_ns):
    add_local_pod6(dp6)
    data, res = from_pod(dp6, route6_ns, pod6_packet(LOCAL_DST6))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert (out.dst, out.src, out[IPv6].hlim) == (DST_MAC, DST_NODE_MAC, 63)
    assert res.data_out[12:21] == data[12:21] and res.data_out[22:] == data[22:]
    only_counter(dp6, "redirect_peer", len(data))
    ev = one_event(dp6)
    assert (ev.family, ev.hook, ev.reason, ev.ifindex_in, ev.ifindex_out) == (
        "ipv6", "from_pod", "redirect_peer", route6_ns.hin, DST_IFINDEX)
    assert (ev.saddr, ev.daddr, ev.sport, ev.dport, ev.protocol, ev.eth_proto, ev.len) == (
        SRC6, LOCAL_DST6, 40000, 5201, 17, 0x86dd, len(data))


@pytest.mark.parametrize("dst, dev", [(REMOTE_DST6, "uplink"), (NARROW_DST6, "narrow"),
                                      (UNRESOLVED_DST6, "uplink")],
                         ids=["remote_pod", "narrow", "no_neighbour_yet"])
def test_routed_destination_is_redirected_to_its_next_hop(dp6, route6_ns, dst, dev):
    add_local_pod6(dp6)
    data, res = from_pod(dp6, route6_ns, pod6_packet(dst))
    assert res.retval == TC_ACT_REDIRECT
    assert_routed(data, res.data_out, 64)
    only_counter(dp6, "redirect_neigh", len(data))
    ev = one_event(dp6)
    assert (ev.reason, ev.ifindex_out, ev.daddr) == ("redirect_neigh", getattr(route6_ns, dev),
                                                     dst)


def test_forwarding_off_uses_the_datapath_node_routes(dp6, route6_ns):
    sysctl = ["ip", "netns", "exec", route6_ns.name, "sysctl", "-qw"]
    subprocess.run([*sysctl, "net.ipv6.conf.all.forwarding=0", "net.ipv6.conf.hin.forwarding=0"],
                   check=True, timeout=10)
    try:
        data, res = from_pod(dp6, route6_ns, pod6_packet(REMOTE_DST6))
        assert res.retval == TC_ACT_OK and res.data_out == data
        only_counter(dp6, "pass_fwd_disabled", len(data))
        dp6.maps.reset_counters()
        dp6.maps.read_trace_events()
        dp6.maps.set_node_route6("2001:db8:0:2::/64", "2001:db8:1::2", route6_ns.uplink)
        data, res = from_pod(dp6, route6_ns, pod6_packet(REMOTE_DST6))
        assert res.retval == TC_ACT_REDIRECT
        assert_routed(data, res.data_out, 64)
        assert one_event(dp6).ifindex_out == route6_ns.uplink
        only_counter(dp6, "redirect_neigh", len(data))
    finally:
        subprocess.run([*sysctl, "net.ipv6.conf.all.forwarding=1",
                        "net.ipv6.conf.hin.forwarding=1"], check=True, timeout=10)


def test_tcp_ports_are_read_behind_extension_headers(dp6, route6_ns):
    ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[])
    pkt = pod6_packet(REMOTE_DST6, ext=ext, l4=TCP(sport=33333, dport=80, flags="S"))
    data, res = from_pod(dp6, route6_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert_routed(data, res.data_out, 64)
    ev = one_event(dp6)
    assert (ev.protocol, ev.sport, ev.dport) == (6, 33333, 80)


# -- from_pod: to the stack, dropped ---------------------------------------------------------

RS = ICMPv6ND_RS()
NS = ICMPv6ND_NS(tgt=ROUTER6)
MLD_HBH = IPv6ExtHdrHopByHop(options=[RouterAlert()])

POD_CASES = {
    "hop_limit_1_local": (pod6_packet(LOCAL_DST6, hlim=1), TC_ACT_OK, "pass_ttl"),
    "hop_limit_0_local": (pod6_packet(LOCAL_DST6, hlim=0), TC_ACT_OK, "pass_ttl"),
    "hop_limit_1_routed": (pod6_packet(REMOTE_DST6, hlim=1), TC_ACT_OK, "pass_ttl"),
    "hop_limit_1_too_big": (pod6_packet(NARROW_DST6, hlim=1, payload=b"z" * 1400), TC_ACT_OK,
                            "pass_ttl"),
    "router_solicitation": (Ether(src=POD_MAC, dst="33:33:00:00:00:02")
                            / IPv6(src="fe80::a", dst="ff02::2", hlim=255) / RS, TC_ACT_OK,
                            "pass_icmp6_control"),
    "neighbour_solicitation": (Ether(src=POD_MAC, dst="33:33:ff:00:00:01")
                               / IPv6(src="fe80::a", dst="ff02::1:ff00:1", hlim=255) / NS,
                               TC_ACT_OK, "pass_icmp6_control"),
    "dad_solicitation": (Ether(src=POD_MAC, dst="33:33:ff:00:00:0a")
                         / IPv6(src="::", dst="ff02::1:ff00:a", hlim=255)
                         / ICMPv6ND_NS(tgt=SRC6), TC_ACT_OK, "pass_icmp6_control"),
    "neighbour_advert_global": (Ether(src=POD_MAC, dst=HIN_MAC)
                                / IPv6(src=SRC6, dst=ROUTER6, hlim=255)
                                / ICMPv6ND_NA(tgt=SRC6), TC_ACT_OK, "pass_icmp6_control"),
    "control_from_another_address": (Ether(src=POD_MAC, dst=HIN_MAC)
                                     / IPv6(src="2001:db8:0:1::63", dst=REMOTE_DST6, hlim=255)
                                     / ICMPv6ND_NA(tgt=SRC6), TC_ACT_SHOT, "drop_spoofed"),
    "control_from_no_address_to_one": (Ether(src=POD_MAC, dst=HIN_MAC)
                                       / IPv6(src="::", dst=REMOTE_DST6, hlim=255)
                                       / ICMPv6ND_NS(tgt=REMOTE_DST6), TC_ACT_SHOT,
                                       "drop_spoofed"),
    "mld_report_router_alert": (Ether(src=POD_MAC, dst="33:33:00:00:00:16")
                                / IPv6(src="fe80::a", dst="ff02::16", hlim=1) / MLD_HBH
                                / ICMPv6MLReport2(), TC_ACT_OK, "pass_icmp6_control"),
    "mld_query": (Ether(src=POD_MAC, dst="33:33:00:00:00:01")
                  / IPv6(src="fe80::a", dst="ff02::1", hlim=1) / MLD_HBH / ICMPv6MLQuery(),
                  TC_ACT_OK, "pass_icmp6_control"),
    "link_local_source": (pod6_packet(REMOTE_DST6, src="fe80::a"), TC_ACT_SHOT,
                          "drop_link_local"),
    "link_local_destination": (pod6_packet("fe80::1"), TC_ACT_SHOT, "drop_link_local"),
    "link_local_echo": (pod6_packet("fe80::1", l4=ICMPv6EchoRequest()), TC_ACT_SHOT,
                        "drop_link_local"),
    "multicast_udp": (Ether(src=POD_MAC, dst="33:33:00:00:00:01")
                      / IPv6(src=SRC6, dst="ff02::1") / UDP(), TC_ACT_OK,
                      "pass_l2_multicast"),
    "unicast_frame_to_a_group": (pod6_packet("ff0e::5"), TC_ACT_OK, "pass_l2_multicast"),
    "spoofed_source": (pod6_packet(LOCAL_DST6, src="2001:db8:0:1::63"), TC_ACT_SHOT,
                       "drop_spoofed"),
    "unspecified_source": (pod6_packet(LOCAL_DST6, src="::"), TC_ACT_SHOT, "drop_spoofed"),
    "spoofed_source_unwalkable": (pod6_packet(LOCAL_DST6, src="2001:db8:0:1::63",
                                              ext=AH()), TC_ACT_SHOT, "drop_spoofed"),
    "fragment_local": (pod6_packet(LOCAL_DST6, ext=IPv6ExtHdrFragment(m=1, id=7)), TC_ACT_OK,
                       "pass_fragment"),
    "later_fragment_routed": (Ether(src=POD_MAC, dst=HIN_MAC) / IPv6(src=SRC6, dst=REMOTE_DST6)
                              / IPv6ExtHdrFragment(offset=100, nh=17, id=7) / (b"y" * 40),
                              TC_ACT_OK, "pass_fragment"),
    "fragment_behind_options": (pod6_packet(REMOTE_DST6, ext=IPv6ExtHdrHopByHop()
                                            / IPv6ExtHdrFragment(m=1, id=8)), TC_ACT_OK,
                                "pass_fragment"),
    "authentication_header": (pod6_packet(REMOTE_DST6, ext=AH()), TC_ACT_OK,
                              "pass_ext_headers"),
    "seven_extension_headers": (pod6_packet(REMOTE_DST6, ext=IPv6ExtHdrHopByHop()
                                            / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                                            / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                                            / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()),
                                TC_ACT_OK, "pass_ext_headers"),
    "two_fragment_headers": (pod6_packet(REMOTE_DST6, ext=IPv6ExtHdrFragment(m=1)
                                         / IPv6ExtHdrFragment(m=1)), TC_ACT_OK,
                             "pass_ext_headers"),
    "unreachable": (pod6_packet("2001:db8:0:99::5"), TC_ACT_OK, "pass_fib_miss"),
    "to_its_gateway": (pod6_packet(ROUTER6), TC_ACT_OK, "pass_local"),
    "to_the_node": (pod6_packet(NODE_IP6), TC_ACT_OK, "pass_local"),
    "external_without_snat": (pod6_packet(EXTERNAL_DST6), TC_ACT_OK, "pass_external"),
}


@pytest.mark.parametrize("case", POD_CASES)
def test_from_pod_verdicts(dp6, route6_ns, case):
    pkt, action, reason = POD_CASES[case]
    add_local_pod6(dp6)
    data, res = from_pod(dp6, route6_ns, pkt)
    assert (res.retval, counted(dp6)) == (action, {("ipv6", reason): (1, len(data))})
    if action == TC_ACT_OK:
        assert res.data_out == data
    ev = one_event(dp6)
    assert (ev.family, ev.reason, ev.ifindex_out, ev.eth_proto) == ("ipv6", reason, 0, 0x86dd)
    assert ev.saddr == Ether(data)[IPv6].src


def test_seven_extension_headers_are_too_many_but_six_are_walked(dp6, route6_ns):
    six = (IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
           / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt())
    data, res = from_pod(dp6, route6_ns, pod6_packet(REMOTE_DST6, ext=six))
    assert res.retval == TC_ACT_REDIRECT
    assert_routed(data, res.data_out, 64)
    assert one_event(dp6).dport == 5201         # the UDP header found behind all six


@pytest.mark.parametrize("cut", [2, 7, 12], ids=["in_its_first_bytes", "before_its_end",
                                                 "second_header_cut"])
def test_truncated_extension_headers_go_to_the_stack(dp6, route6_ns, cut):
    """An extension header the payload length ends in cannot be walked: the stack judges it
    (and answers with a Parameter Problem), the bytes as they were."""
    ext = bytes(IPv6ExtHdrDestOpt(nh=60, len=0)) + bytes(IPv6ExtHdrDestOpt(nh=59, len=0))
    body = ext[:cut]
    frame = ETH6 + bytes(IPv6(src=SRC6, dst=REMOTE_DST6, nh=60, plen=len(body))) + body
    if len(frame) < 14 + 40 + 8:        # test_run wants a few bytes; Ethernet pads anyway
        frame += b"\0" * (14 + 40 + 8 - len(frame))
    _, res = from_pod(dp6, route6_ns, frame)
    assert res.retval == TC_ACT_OK and res.data_out == frame
    only_counter(dp6, "pass_ext_headers", len(frame))


def test_spoofed_mac_and_the_endpoint_fallback(dp6, route6_ns):
    """The pod's own address from another MAC is spoofed; with the veth's slot empty (a veth
    beyond the array, say) endpoints6 decides, with the same answers."""
    add_local_pod6(dp6)
    pkt = pod6_packet(LOCAL_DST6)
    pkt[Ether].src = OTHER_MAC
    _, res = from_pod(dp6, route6_ns, pkt)
    assert res.retval == TC_ACT_SHOT
    libbpf.map_update(dp6.maps.fd("pod_veths"), route6_ns.hin.to_bytes(4, "little"),
                      bytes(st.SIZEOF_POD_VETH))
    assert dp6.maps.pod_veth(route6_ns.hin).ip6 is None
    _, res = from_pod(dp6, route6_ns, pod6_packet(LOCAL_DST6))
    assert res.retval == TC_ACT_REDIRECT
    _, res = from_pod(dp6, route6_ns, pkt)
    assert res.retval == TC_ACT_SHOT
    dp6.maps.set_endpoint(SRC6, route6_ns.narrow, POD_MAC, HIN_MAC)     # moved off hin
    _, res = from_pod(dp6, route6_ns, pod6_packet(LOCAL_DST6))
    assert res.retval == TC_ACT_SHOT
    assert counted(dp6) == {("ipv6", "drop_spoofed"): (3, 3 * len(pkt)),
                            ("ipv6", "redirect_peer"): (1, len(pkt))}


def test_to_another_nodes_host_namespace_is_refused(dp6, route6_ns):
    dp6.maps.set_cluster_cidr6("2001:db8:1::2/128", deny_from_pod=True)
    data, res = from_pod(dp6, route6_ns, pod6_packet("2001:db8:1::2"))
    assert res.retval == TC_ACT_SHOT
    only_counter(dp6, "drop_pod_to_node", len(data))


SNAT_IP6 = {"router_ip6": ROUTER6, "node_ip6": NODE_IP6}


@pytest.fixture(scope="module")
def loaded_nat6():
    """This module's own datapath with room in `nat6` for the flows SNAT tests open."""
    yield from loaded_datapath(nat6_max_flows=4096)


@pytest.fixture
def snat6_dp(loaded_nat6, route6_ns):
    """loaded_nat6 reset (reset_datapath6: its NAT tables empty), BPF SNAT to
    NODE_IP6 on, another node's underlay address REMOTE_NODE6 closed to pods."""
    dp = reset_datapath6(loaded_nat6, route6_ns)
    dp.maps.set_config("198.18.1.1", trace=True, **SNAT_IP6)
    dp.maps.set_cluster_cidr6(f"{REMOTE_NODE6}/128", deny_from_pod=True)
    return dp


def test_leaving_the_cluster_with_ipv6_snat_is_never_routed_un_natted(snat6_dp, route6_ns):
    """With node_ip6 set, what leaves the cluster is snat_out6()'s (nat6.h): NATed to the
    node's address and redirected, never from the pod's own address."""
    data, res = from_pod(snat6_dp, route6_ns, pod6_packet(EXTERNAL_DST6))
    assert res.retval == TC_ACT_REDIRECT
    only_counter(snat6_dp, "snat_redirect_neigh", len(data))
    assert Ether(res.data_out)[IPv6].src == NODE_IP6


def test_leaving_the_cluster_with_a_full_nat6_table_is_dropped(dp6, route6_ns):
    """The session datapath's `nat6` holds no flow: refused, counted."""
    dp6.maps.set_config("198.18.1.1", trace=True, **SNAT_IP6)
    data, res = from_pod(dp6, route6_ns, pod6_packet(EXTERNAL_DST6))
    assert res.retval == TC_ACT_SHOT
    only_counter(dp6, "drop_nat_table_full", len(data))


# -- what from_pod6 leaves to the stack, by destination ----------------------------------------

SEVEN_DEST_OPTS = (IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                   / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                   / IPv6ExtHdrDestOpt())


def first_fragment_cut(dst: str):
    """A first fragment whose header chain its payload ends in (a destination options header
    cut after 6 of its 8 bytes)."""
    body = bytes(IPv6ExtHdrFragment(nh=60, m=1, id=9)) + bytes(IPv6ExtHdrDestOpt(nh=6))[:6]
    return ETH6 + bytes(IPv6(src=SRC6, dst=dst, nh=44, plen=len(body))) + body


# how each is built for a destination, and the reason it goes to the stack with
UNROUTED6 = {
    "seven_extension_headers": (lambda dst: pod6_packet(dst, ext=SEVEN_DEST_OPTS,
                                                        l4=TCP(flags="S")), "pass_ext_headers"),
    "authentication_header": (lambda dst: pod6_packet(dst, ext=AH(), l4=TCP(flags="S")),
                              "pass_ext_headers"),
    "first_fragment_cut": (first_fragment_cut, "pass_ext_headers"),
    "node_information": (lambda dst: pod6_packet(dst, l4=ICMPv6Unknown(type=200)),
                         "pass_icmp6_control"),
}
# destination, BPF SNAT on, the verdict (None: to the stack with the packet's reason)
UNROUTED6_TO = {
    "external": (EXTERNAL_DST6, True, (TC_ACT_SHOT, "drop_nat_unsupported")),
    "another_nodes_host": (REMOTE_NODE6, True, (TC_ACT_SHOT, "drop_pod_to_node")),
    "another_nodes_host_snat_off": (REMOTE_NODE6, False, (TC_ACT_SHOT, "drop_pod_to_node")),
    "external_snat_off": (EXTERNAL_DST6, False, None),     # the stack's MASQUERADE
    "remote_pod": (REMOTE_DST6, True, None),                # inside: the stack routes it
    "gateway": (ROUTER6, True, None),
    "the_node": (NODE_IP6, True, None),
    "link_local": ("fe80::1", True, None),
    "group": ("ff02::1", True, None),
}


@pytest.mark.parametrize("to", UNROUTED6_TO)
@pytest.mark.parametrize("kind", UNROUTED6)
def test_unrouted_pod_packets_reach_the_stack_only_where_un_natted_is_right(dp6, route6_ns,
                                                                            kind, to):
    """Extension headers the program cannot walk and ICMPv6 control go to the stack for the
    pod's link, the node, or elsewhere in the cluster; never out of it un-NATed with BPF SNAT
    on, never to another node's host namespace (as route_from_pod's rule for IPv4)."""
    build, reason = UNROUTED6[kind]
    dst, snat, expected = UNROUTED6_TO[to]
    dp6.maps.set_cluster_cidr6(f"{REMOTE_NODE6}/128", deny_from_pod=True)
    if snat:
        dp6.maps.set_config("198.18.1.1", trace=True, **SNAT_IP6)
    data, res = from_pod(dp6, route6_ns, build(dst))
    action, reason = expected or (TC_ACT_OK, reason)
    assert (res.retval, counted(dp6)) == (action, {("ipv6", reason): (1, len(data))})
    if action == TC_ACT_OK:
        assert res.data_out == data


# -- Packet Too Big ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [NARROW_MTU + 1, 1400, 1500], ids=["one_over", "1400", "1500"])
def test_too_big_is_answered_with_packet_too_big(dp6, route6_ns, size):
    data, res = from_pod(dp6, route6_ns, pod6_packet(NARROW_DST6, payload=b"z" * (size - 48)))
    assert len(data) - 14 == size
    assert res.retval == TC_ACT_REDIRECT
    assert_valid_packet_too_big(res.data_out, data, NARROW_MTU)
    out = Ether(res.data_out)
    assert (out.dst, out.src, out[IPv6].hlim) == (POD_MAC, HIN_MAC, 64)
    only_counter(dp6, "icmp_frag_needed", len(data))
    ev = one_event(dp6)
    assert (ev.reason, ev.ifindex_out, ev.sport, ev.dport) == ("icmp_frag_needed", route6_ns.hin,
                                                               40000, 5201)


def test_fits_exactly_at_the_mtu(dp6, route6_ns):
    data, res = from_pod(dp6, route6_ns, pod6_packet(NARROW_DST6,
                                                    payload=b"z" * (NARROW_MTU - 48)))
    assert res.retval == TC_ACT_REDIRECT
    only_counter(dp6, "redirect_neigh", len(data))


def test_packet_too_big_quotes_a_tcp_segment_and_extension_headers(dp6, route6_ns):
    pkt = pod6_packet(NARROW_DST6, ext=IPv6ExtHdrDestOpt(),
                      l4=TCP(sport=40000, dport=5201, flags="A", seq=1000), payload=b"t" * 1400)
    data, res = from_pod(dp6, route6_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert_valid_packet_too_big(res.data_out, data, NARROW_MTU)


def test_packet_too_big_comes_from_the_configured_gateway(dp6, route6_ns):
    dp6.maps.set_config("198.18.1.1", trace=False, router_ip6="2001:db8:0:1::fe")
    data, res = from_pod(dp6, route6_ns, pod6_packet(NARROW_DST6, payload=b"z" * 1300))
    assert_valid_packet_too_big(res.data_out, data, NARROW_MTU, src="2001:db8:0:1::fe")
    assert dp6.maps.read_trace_events() == []


@pytest.mark.parametrize("size, verdict, action", [
    (NARROW_MTU, "redirect_peer", TC_ACT_REDIRECT),
    (NARROW_MTU + 1, "icmp_frag_needed", TC_ACT_REDIRECT),
], ids=["fits", "too_big"])
def test_same_node_pod_with_a_narrower_link(dp6, route6_ns, size, verdict, action):
    dp6.maps.set_endpoint(LOCAL_DST6, route6_ns.narrow, DST_MAC, DST_NODE_MAC)
    data, res = from_pod(dp6, route6_ns, pod6_packet(LOCAL_DST6, payload=b"n" * (size - 48)))
    assert res.retval == action
    only_counter(dp6, verdict, len(data))
    if verdict == "icmp_frag_needed":
        assert_valid_packet_too_big(res.data_out, data, NARROW_MTU)


def icmp6_error_from_pod(dst: str, size: int):
    """The pod's ICMPv6 error (port unreachable) about a datagram from `dst`, `size` bytes of
    IPv6 in all."""
    quote = IPv6(src=dst, dst=SRC6) / UDP(sport=53, dport=40000)
    pkt = Ether(src=POD_MAC, dst=HIN_MAC) / IPv6(src=SRC6, dst=dst) / ICMPv6DestUnreach(code=4)
    return pkt / quote / (b"e" * (size - 40 - 8 - 48))


@pytest.mark.parametrize("same_node", [False, True], ids=["routed", "same_node"])
def test_an_icmpv6_error_too_big_gets_no_packet_too_big(dp6, route6_ns, same_node):
    """RFC 4443 2.4 (e): no ICMPv6 error about an ICMPv6 error. The stack drops it, as the
    router it is (its own Packet Too Big would not be sent either)."""
    if same_node:
        dp6.maps.set_endpoint(LOCAL_DST6, route6_ns.narrow, DST_MAC, DST_NODE_MAC)
    data, res = from_pod(dp6, route6_ns,
                         icmp6_error_from_pod(LOCAL_DST6 if same_node else NARROW_DST6, 1400))
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp6, "pass_frag_needed", len(data))


def test_an_icmpv6_error_too_big_leaving_the_cluster_goes_to_the_stack_natted(snat6_dp,
                                                                             route6_ns):
    """Leaving the cluster, an oversized error of the pod's about a flow is translated and
    only then given to the stack (which drops it): never a Packet Too Big, never un-NATed."""
    flow = pod6_packet(EXTERNAL_DST6, l4=UDP(sport=40000, dport=53))
    _, res = from_pod(snat6_dp, route6_ns, flow)
    assert res.retval == TC_ACT_REDIRECT
    nat_port = Ether(res.data_out)[UDP].sport
    snat6_dp.maps.reset_counters()
    snat6_dp.maps.read_trace_events()
    data, res = from_pod(snat6_dp, route6_ns, icmp6_error_from_pod(EXTERNAL_DST6, 1600))
    assert res.retval == TC_ACT_OK
    only_counter(snat6_dp, "snat_pass_frag_needed", len(data))
    out = Ether(res.data_out)
    assert out[IPv6].src == NODE_IP6 and ICMPv6PacketTooBig not in out
    assert (out[IPerror6].dst, out[UDPerror].dport) == (NODE_IP6, nat_port)


# -- malformed ---------------------------------------------------------------------------------

_ok6 = bytes(IPv6(src=SRC6, dst=LOCAL_DST6) / UDP(sport=1, dport=2) / (b"p" * 20))
MALFORMED6 = {
    "version_4": bytes([0x45]) + _ok6[1:],
    "payload_length_beyond_the_frame": _ok6[:4] + (len(_ok6) - 40 + 1).to_bytes(2, "big")
    + _ok6[6:],
}


@pytest.mark.parametrize("case", MALFORMED6)
@pytest.mark.parametrize("hook", ["from_pod", "from_underlay"])
def test_malformed_is_dropped_and_counted(dp6, route6_ns, case, hook):
    add_local_pod6(dp6)
    data = ETH6 + MALFORMED6[case]
    _, res = (from_pod if hook == "from_pod" else from_underlay)(dp6, route6_ns, data)
    assert res.retval == TC_ACT_SHOT
    only_counter(dp6, "drop_malformed", len(data))
    assert (one_event(dp6).hook) == hook


def test_a_jumbogram_length_without_gso_goes_to_the_stack(dp6, route6_ns):
    """Payload length 0 behind a hop-by-hop header claims a jumbogram: only the stack
    knows the Jumbo Payload option."""
    data = ETH6 + _ok6[:4] + b"\0\0" + bytes([0]) + _ok6[7:] + bytes(IPv6ExtHdrHopByHop(nh=17))
    _, res = from_pod(dp6, route6_ns, data)
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp6, "pass_ext_headers", len(data))


def test_ethernet_padding_after_the_payload_is_accepted(dp6, route6_ns):
    add_local_pod6(dp6)
    data = bytes(pod6_packet(LOCAL_DST6, payload=b"")) + b"\0" * 18
    _, res = from_pod(dp6, route6_ns, data)
    assert res.retval == TC_ACT_REDIRECT
    only_counter(dp6, "redirect_peer", len(data))


# -- from_underlay -----------------------------------------------------------------------------

def test_underlay_to_a_local_pod_is_redirected_to_its_peer(dp6, route6_ns):
    add_local_pod6(dp6)
    data, res = from_underlay(dp6, route6_ns, underlay6_packet(LOCAL_DST6))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert (out.dst, out.src, out[IPv6].hlim) == (DST_MAC, DST_NODE_MAC, 62)
    assert res.data_out[22:] == data[22:]
    only_counter(dp6, "redirect_peer", len(data))
    ev = one_event(dp6)
    assert (ev.hook, ev.ifindex_in, ev.ifindex_out) == ("from_underlay", route6_ns.uplink,
                                                        DST_IFINDEX)


UNDERLAY_CASES = {
    "not_an_endpoint": (underlay6_packet("2001:db8:0:1::63"), TC_ACT_OK, "pass_not_endpoint"),
    "the_node_itself": (underlay6_packet(NODE_IP6), TC_ACT_OK, "pass_not_endpoint"),
    "hop_limit_1": (underlay6_packet(LOCAL_DST6, hlim=1), TC_ACT_OK, "pass_ttl"),
    "fragment": (underlay6_packet(LOCAL_DST6, ext=IPv6ExtHdrFragment(m=1)), TC_ACT_OK,
                 "pass_fragment"),
    "fragment_from_outside": (underlay6_packet(LOCAL_DST6, src=EXTERNAL_DST6,
                                               ext=IPv6ExtHdrFragment(m=1)), TC_ACT_SHOT,
                              "drop_not_from_cluster"),
    "from_outside": (underlay6_packet(LOCAL_DST6, src=EXTERNAL_DST6), TC_ACT_SHOT,
                     "drop_not_from_cluster"),
    "neighbour_solicitation": (Ether(dst="33:33:ff:00:00:01")
                               / IPv6(src="fe80::2", dst="ff02::1:ff00:1", hlim=255)
                               / ICMPv6ND_NS(tgt=NODE_IP6), TC_ACT_OK, "pass_icmp6_control"),
    "link_local": (underlay6_packet("fe80::1", src="fe80::2"), TC_ACT_OK, "pass_local"),
    "unwalkable": (underlay6_packet(LOCAL_DST6, ext=AH()), TC_ACT_OK, "pass_ext_headers"),
    # from outside to a pod: refused before the headers or ICMPv6 type could pass it
    "unwalkable_from_outside": (underlay6_packet(LOCAL_DST6, src=EXTERNAL_DST6, ext=AH()),
                                TC_ACT_SHOT, "drop_not_from_cluster"),
    "seven_headers_from_outside": (underlay6_packet(LOCAL_DST6, src=EXTERNAL_DST6,
                                                    ext=SEVEN_DEST_OPTS), TC_ACT_SHOT,
                                   "drop_not_from_cluster"),
    "control_from_outside": (Ether(dst="02:00:00:00:00:01")
                             / IPv6(src=EXTERNAL_DST6, dst=LOCAL_DST6)
                             / ICMPv6Unknown(type=200), TC_ACT_SHOT, "drop_not_from_cluster"),
    "link_local_source_to_a_pod": (underlay6_packet(LOCAL_DST6, src="fe80::2"), TC_ACT_SHOT,
                                   "drop_not_from_cluster"),
    "unwalkable_from_outside_to_the_node": (underlay6_packet(NODE_IP6, src=EXTERNAL_DST6,
                                                             ext=AH()), TC_ACT_OK,
                                            "pass_ext_headers"),
}


@pytest.mark.parametrize("case", UNDERLAY_CASES)
def test_from_underlay_verdicts(dp6, route6_ns, case):
    pkt, action, reason = UNDERLAY_CASES[case]
    add_local_pod6(dp6)
    data, res = from_underlay(dp6, route6_ns, pkt)
    assert (res.retval, counted(dp6)) == (action, {("ipv6", reason): (1, len(data))})
    if action == TC_ACT_OK:
        assert res.data_out == data


def test_for_the_node_ip_without_a_nat_flow_is_the_nodes(dp6, route6_ns):
    """With IPv6 SNAT on, a packet for node_ip6 that no flow expects goes to the stack."""
    dp6.maps.set_config("198.18.1.1", trace=True, router_ip6=ROUTER6, node_ip6=NODE_IP6)
    sizes = 0
    for pkt in (underlay6_packet(NODE_IP6, src=EXTERNAL_DST6),
                Ether(src="02:00:00:00:00:fe", dst="02:00:00:00:00:01")
                / IPv6(src=EXTERNAL_DST6, dst=NODE_IP6) / ICMPv6DestUnreach()
                / IPv6(src=NODE_IP6, dst=EXTERNAL_DST6) / UDP(sport=1, dport=2)):
        data, res = from_underlay(dp6, route6_ns, pkt)
        assert res.retval == TC_ACT_OK and res.data_out == data
        sizes += len(data)
    assert counted(dp6) == {("ipv6", "pass_nat_miss"): (2, sizes)}


# -- the hand-over, the maps -------------------------------------------------------------------

def test_an_empty_program_slot_leaves_ipv6_to_the_stack(loaded, dp6, route6_ns):
    """Without from_pod6 in `progs6`, from_pod passes IPv6 unchanged, counted as ipv6."""
    slot = st.PROG6_SLOTS["from_pod6"].to_bytes(4, "little")
    assert libbpf.map_delete(dp6.maps.fd("progs6"), slot)
    try:
        data, res = from_pod(dp6, route6_ns, pod6_packet(LOCAL_DST6))
    finally:
        libbpf.map_update(dp6.maps.fd("progs6"), slot,
                          loaded.programs6["from_pod6"].fd.to_bytes(4, "little"))
    assert res.retval == TC_ACT_OK and res.data_out == data
    only_counter(dp6, "pass_not_ipv4", len(data))
    ev = one_event(dp6)
    assert (ev.family, ev.eth_proto) == ("ipv6", 0x86dd)


def test_pod_veths_keeps_both_addresses_of_a_pod(dp6, route6_ns):
    maps = dp6.maps
    maps.set_endpoint("198.18.1.10", route6_ns.hin, POD_MAC, HIN_MAC)
    assert maps.pod_veth(route6_ns.hin) == st.PodVeth("198.18.1.10", POD_MAC, SRC6)
    assert maps.delete_endpoint(SRC6) is True
    assert maps.pod_veth(route6_ns.hin) == st.PodVeth("198.18.1.10", POD_MAC, None)
    assert maps.endpoints6() == {}
    maps.set_endpoint(SRC6, route6_ns.hin, POD_MAC, HIN_MAC)
    # another pod (another MAC) on the veth: the old pod's IPv4 address leaves the slot
    maps.set_endpoint("2001:db8:0:1::c", route6_ns.hin, OTHER_MAC, HIN_MAC)
    assert maps.pod_veth(route6_ns.hin) == st.PodVeth(None, OTHER_MAC, "2001:db8:0:1::c")
    assert set(maps.endpoints6()) == {SRC6, "2001:db8:0:1::c"}


def test_maps_reopened_by_prog_id_reach_the_ipv6_maps(loaded, dp6, route6_ns):
    """An attached program's maps are found by its id; the IPv6 programs' maps (which
    from_pod itself does not use) through the programs in its `progs6`."""
    code = textwrap.dedent(f"""
        import json
        from datapath.host_routing import DatapathMaps
        with DatapathMaps.from_prog_id({loaded.from_underlay.id}) as m:
            m.set_endpoint("2001:db8:0:1::30", 9, "02:00:00:00:00:09", "02:00:00:00:00:08")
            m.set_cluster_cidr6("2001:db8:5::/48")
            print(json.dumps({{"eps": sorted(m.endpoints6()), "cfg": m.config().router_ip6}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=str(bpf_build.REPO_ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ('{"eps": ["2001:db8:0:1::30", "2001:db8:0:1::a"], '
                                   f'"cfg": "{ROUTER6}"}}')
    key = st.pack_lpm6_key("2001:db8:5::/48")
    assert libbpf.map_lookup(dp6.maps.fd("cluster_cidrs6"), key, 4) == bytes(4)


def test_config_keeps_the_ipv6_addresses_when_tracing_is_switched(dp6):
    dp6.maps.set_config("198.18.1.1", router_ip6=ROUTER6, node_ip6=NODE_IP6)
    dp6.maps.set_trace(True)
    cfg = dp6.maps.config()
    assert (cfg.trace, cfg.router_ip6, cfg.node_ip6) == (True, ROUTER6, NODE_IP6)


# -- live: the pod's stack takes the Packet Too Big ---------------------------------------------

@pytest.fixture
def pod6_veth(loaded, route6_ns):
    """A pod namespace behind a new veth of route6_ns (from_pod attached), the narrow link
    its way to NARROW_DST6."""
    from tests.bpf.harness import ifindex, private_netns
    from datapath import tc_attach
    with private_netns() as pod:
        subprocess.run(["ip", "netns", "exec", pod, "sysctl", "-qw",
                        "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"],
                       check=True, capture_output=True, timeout=10)
        ip_batch(route6_ns.name, [f"link add hpod type veth peer name eth0 netns {pod}",
                                  "link set hpod up", f"addr add {ROUTER6}/128 dev hpod nodad",
                                  "route add 2001:db8:0:1::70/128 dev hpod"])
        ip_batch(pod, ["link set eth0 up", "addr add 2001:db8:0:1::70/128 dev eth0 nodad",
                       f"route add {ROUTER6}/128 dev eth0",
                       f"route add default via {ROUTER6} dev eth0"])
        hidx = ifindex(route6_ns.name, "hpod")
        mac = subprocess.run(["ip", "-n", pod, "-j", "link", "show", "eth0"], check=True,
                             capture_output=True, text=True).stdout
        import json
        pod_mac = json.loads(mac)[0]["address"]
        host_mac = json.loads(subprocess.run(["ip", "-n", route6_ns.name, "-j", "link", "show",
                                              "hpod"], check=True, capture_output=True,
                                             text=True).stdout)[0]["address"]
        loaded.maps.set_endpoint("2001:db8:0:1::70", hidx, pod_mac, host_mac)
        tc_attach.attach(route6_ns.name, "hpod", loaded.from_pod.fd, "from_pod")
        try:
            yield pod
        finally:
            loaded.maps.delete_endpoint("2001:db8:0:1::70")
            ip_batch(route6_ns.name, ["link del hpod"])


def test_live_packet_too_big_teaches_the_pod_the_path_mtu(dp6, route6_ns, pod6_veth):
    ping = subprocess.run(["ip", "netns", "exec", pod6_veth, "ping", "-6", "-n", "-c", "1",
                           "-W", "2", "-s", "1400", "-M", "do", NARROW_DST6],
                          capture_output=True, text=True, timeout=20)
    assert "Packet too big" in ping.stdout + ping.stderr, ping.stdout + ping.stderr
    assert "mtu=1280" in ping.stdout + ping.stderr or "mtu = 1280" in ping.stdout
    route = subprocess.run(["ip", "-n", pod6_veth, "-6", "route", "get", NARROW_DST6],
                           capture_output=True, text=True).stdout
    assert "mtu 1280" in route, route       # the pod's stack accepted our ICMPv6
    assert dp6.maps.counters_by_family()[("ipv6", "icmp_frag_needed")][0] >= 1


# -- random packets ----------------------------------------------------------------------------

FUZZ_CASES = 300
DESTS6 = [LOCAL_DST6, LOCAL_DST6, REMOTE_DST6, REMOTE_DST6, NARROW_DST6, NARROW_DST6,
          EXTERNAL_DST6, UNRESOLVED_DST6, NODE_IP6, ROUTER6, "2001:db8:0:99::1", "fe80::1",
          "ff02::1"]
SOURCES6 = [SRC6] * 6 + ["fe80::a", "::", REMOTE_DST6, EXTERNAL_DST6]
EXT_HEADERS = [IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrDestOpt,
               lambda: IPv6ExtHdrRouting(addresses=[]), lambda: IPv6ExtHdrFragment(m=1, id=5),
               lambda: IPv6ExtHdrFragment(offset=9), AH]


@hst.composite
def packets6(draw, dests=DESTS6):
    proto = draw(hst.sampled_from(["udp", "tcp", "echo", "error", "nd", "info", "raw"]))
    l4 = {"udp": lambda: UDP(sport=draw(hst.integers(1, 65535)), dport=5201),
          "tcp": lambda: TCP(sport=draw(hst.integers(1, 65535)), dport=80,
                             flags=draw(hst.integers(0, 0xFF))),
          "echo": lambda: ICMPv6EchoRequest(id=draw(hst.integers(0, 65535))),
          "error": lambda: ICMPv6PacketTooBig(mtu=1280) / IPv6(src=REMOTE_DST6, dst=SRC6),
          "nd": lambda: ICMPv6ND_NS(tgt=ROUTER6),
          "info": lambda: ICMPv6Unknown(type=draw(hst.integers(130, 255))),
          "raw": lambda: b""}[proto]()
    ip = IPv6(src=draw(hst.sampled_from(SOURCES6)), dst=draw(hst.sampled_from(dests)),
              hlim=draw(hst.sampled_from([0, 1, 2, 64, 255])), tc=draw(hst.integers(0, 255)),
              fl=draw(hst.integers(0, 0xFFFFF)))
    chain = draw(hst.sampled_from([0, 0, 0, 1, 2, 3, 8]))
    for make in draw(hst.lists(hst.sampled_from(EXT_HEADERS), min_size=chain, max_size=chain)):
        ip = ip / make()
    payload = b"p" * draw(hst.sampled_from([0, 8, 100, 1300, 1300, 3000]))
    data = bytearray(bytes(Ether(src=POD_MAC, dst=HIN_MAC) / ip / l4 / payload))
    mutation = draw(hst.sampled_from(["none"] * 6 + ["truncate", "plen", "flip"]))
    if mutation == "truncate":
        data = data[:draw(hst.integers(54, len(data)))]
    elif mutation == "plen":
        data[18:20] = draw(hst.integers(0, 65535)).to_bytes(2, "big")
    elif mutation == "flip":
        for _ in range(draw(hst.integers(1, 4))):
            data[draw(hst.integers(14, len(data) - 1))] ^= draw(hst.integers(1, 255))
    return bytes(data)


def check_invariants6(dp, data: bytes, res) -> None:
    """One verdict, counted once, under ipv6 (ipv4 for a frame the flips made another
    ethertype's); a pass leaves the bytes alone, a drop has a drop reason, a redirect changed
    the hop limit (and MACs) only, a Packet Too Big is valid."""
    assert res.retval in (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
    found = counted(dp)
    assert sum(p for p, _ in found.values()) == 1, found
    ((family, reason), (_, nbytes)), = found.items()
    event(reason)
    assert nbytes == len(data)
    assert family == "ipv6" or data[12:14] != b"\x86\xdd"
    if res.retval == TC_ACT_OK:
        assert "pass" in reason.split("_"), reason
        assert res.data_out == data
    elif res.retval == TC_ACT_SHOT:
        assert reason.startswith("drop_"), reason
    elif reason == "icmp_frag_needed":      # narrow's MTU, or uplink's for a larger packet
        mtu = Ether(res.data_out)[ICMPv6PacketTooBig].mtu
        assert mtu in (NARROW_MTU, 1500)
        assert_valid_packet_too_big(res.data_out, data, mtu)
    else:
        assert reason in ("redirect_peer", "redirect_neigh"), reason
        out = res.data_out
        assert out[21] == data[21] - 1 and data[21] > 1
        assert out[12:21] == data[12:21] and out[22:] == data[22:]
        if reason == "redirect_peer":
            assert out[:12] == bytes.fromhex((DST_MAC + DST_NODE_MAC).replace(":", ""))
        # only what a router may route: a global source and destination, walked headers
        ip = Ether(data)[IPv6]
        assert not ip.src.startswith("fe80") and not ip.dst.startswith(("fe80", "ff"))


SETTINGS = settings(max_examples=FUZZ_CASES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(data=packets6())
def test_fuzz_from_pod6(dp6, route6_ns, data):
    dp6.maps.reset_counters()
    add_local_pod6(dp6)
    check_invariants6(dp6, data, run_example(dp6.from_pod.fd, data, route6_ns.name,
                                             route6_ns.hin))
    dp6.maps.read_trace_events()


@SETTINGS
@given(data=packets6())
def test_fuzz_from_underlay6(dp6, route6_ns, data):
    dp6.maps.reset_counters()
    add_local_pod6(dp6)
    check_invariants6(dp6, data, run_example(dp6.from_underlay.fd, data, route6_ns.name,
                                             route6_ns.uplink))
    dp6.maps.read_trace_events()


# outside the cluster: via the default route; inside, closed to pods, local, on the link
OUTSIDE6 = [EXTERNAL_DST6, "2001:db8:2::b", "2001:db8:7::1"]
SNAT_DESTS6 = [*OUTSIDE6, *OUTSIDE6, REMOTE_NODE6, REMOTE_NODE6, REMOTE_DST6, LOCAL_DST6,
               NARROW_DST6, NODE_IP6, ROUTER6, "fe80::1", "ff02::1"]
NAT_REASONS6 = ("snat_redirect_neigh", "snat_fragment", "snat_pass_frag_needed")


def leaves_the_cluster6(addr: ipaddress.IPv6Address) -> bool:
    """Neither local (the gateway, the node), on the link, nor in the cluster's CIDRs."""
    return not (addr.is_link_local or addr.is_multicast
                or addr in (ipaddress.IPv6Address(ROUTER6), ipaddress.IPv6Address(NODE_IP6))
                or any(addr in ipaddress.IPv6Network(c) for c in CLUSTER_CIDRS6))


def check_snat_invariants6(dp, data: bytes, res) -> None:
    """check_snat_invariants of test_bpf_fuzz for IPv6: one verdict; a pass leaves the bytes
    alone, a translation comes from NODE_IP6. And the rule: from the pod's own address to
    outside the cluster nothing reaches the stack un-NATed but what the stack answers
    (pass_ttl, pass_fib_miss); to another node's host namespace, nothing at all."""
    assert res.retval in (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
    found = counted(dp)
    assert sum(p for p, _ in found.values()) == 1, found
    ((family, reason), _), = found.items()
    event(reason)
    if family != "ipv6":        # a flip made it another ethertype's
        return
    if res.retval == TC_ACT_SHOT:
        assert reason.startswith("drop_"), reason
    elif reason in NAT_REASONS6:
        assert Ether(res.data_out)[IPv6].src == NODE_IP6
    elif res.retval == TC_ACT_OK:
        assert reason.startswith("pass_") and res.data_out == data, reason
    src, dst = ipaddress.IPv6Address(data[22:38]), ipaddress.IPv6Address(data[38:54])
    if src != ipaddress.IPv6Address(SRC6):
        return
    if leaves_the_cluster6(dst) and res.retval != TC_ACT_SHOT:
        assert reason in ("pass_ttl", "pass_fib_miss", "icmp_frag_needed", *NAT_REASONS6), \
            reason
    if dst == ipaddress.IPv6Address(REMOTE_NODE6):
        assert res.retval == TC_ACT_SHOT, reason


@SETTINGS
@given(data=packets6(dests=SNAT_DESTS6))
def test_fuzz_from_pod6_with_snat(snat6_dp, route6_ns, data):
    snat6_dp.maps.reset_counters()
    add_local_pod6(snat6_dp)
    check_snat_invariants6(snat6_dp, data, run_example(snat6_dp.from_pod.fd, data,
                                                       route6_ns.name, route6_ns.hin))
    snat6_dp.maps.read_trace_events()


def test_progs6_keeps_the_ipv6_programs_only_while_pinned(route6_ns):
    """The kernel empties a program array when no file descriptor or pin of it is left in
    user space (the attached programs do not count): the pin converge makes keeps IPv6 going
    to from_pod6 after the loader is gone; without it IPv6 falls back to the stack."""
    import secrets
    from datapath import host_routing
    from netns_lab.state import BPF_PIN_ROOT
    pin = BPF_PIN_ROOT / f"hrtest-{secrets.token_hex(4)}" / "node1_progs6"
    loaded = host_routing.load("198.18.1.1", router_ip6=ROUTER6)
    try:
        loaded.maps.pin_progs6(pin)
        prog = libbpf.prog_fd_by_id(loaded.from_pod.id)   # the program, as a TC filter holds it
    finally:
        loaded.close()
    data = bytes(pod6_packet(REMOTE_DST6, src="2001:db8:0:1::63"))
    try:
        with prog:
            with host_routing.DatapathMaps.from_prog_id(loaded.from_pod.id) as maps:
                assert len(maps.progs6_ids()) == 2
            # from_pod6 judges it: not this veth's pod
            assert run_prog(prog.fileno(), data, route6_ns.name, route6_ns.hin).retval == \
                TC_ACT_SHOT
            pin.unlink()
            pin.parent.rmdir()

            def emptied():
                with host_routing.DatapathMaps.from_prog_id(loaded.from_pod.id) as maps:
                    return maps.progs6_ids() == []
            assert wait_for(emptied)
            # the stack's now (pass_not_ipv4)
            assert run_prog(prog.fileno(), data, route6_ns.name, route6_ns.hin).retval == \
                TC_ACT_OK
    finally:
        pin.unlink(missing_ok=True)
        if pin.parent.exists():
            pin.parent.rmdir()
