"""IPv6 BPF SNAT (bpf_c/include/nat6.h) under BPF_PROG_TEST_RUN with scapy IPv6 packets.

The pod SRC6 (behind `hin` of conftest's route6_ns) talks to EXTERNAL_DST6, outside the
cluster: from_pod (which hands IPv6 to from_pod6) must rewrite the source to NODE_IP6 and a
NAT port, every checksum right, and from_underlay must translate replies and ICMPv6 errors
back. IPv6 has no header checksum: the L4 checksums cover the addresses through the
pseudo-header, ICMPv6's included. Each checksum is checked twice: summed over the raw bytes
(0xffff over the pseudo-header and the message) and against scapy's own computation.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as hst
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6PacketTooBig, ICMPv6ParamProblem, ICMPv6TimeExceeded,
                                IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment6)
from scapy.layers.l2 import Ether

from datapath import libbpf, shared_types as st
from tests.bpf.harness import loaded_datapath, reset_datapath6
from tests.bpf.harness import from_pod as run_out, from_underlay as run_in  # -> (bytes, result)
from tests.bpf.packets import (HIN_MAC, NARROW_MTU, POD_MAC, ROUTER_IP, ROUTER_MAC, TC_ACT_OK,
                               TC_ACT_REDIRECT, TC_ACT_SHOT, ones_sum)
from tests.bpf.packets6 import (EXTERNAL_DST6 as EXT6, NODE_IP6, ROUTER6, ROUTER6_UNDERLAY,
                                SRC6, assert_valid_packet_too_big)

PORT_MIN, PORT_MAX = 20000, 20999
TCP_PROTO, UDP_PROTO, ICMP6_PROTO = 6, 17, 58
UPLINK_MAC = "02:00:00:00:00:01"


@pytest.fixture(scope="module")
def loaded6():
    """A datapath whose `nat6` holds flows (the session's has a one-entry IPv6 table)."""
    yield from loaded_datapath(nat6_max_flows=1024)


@pytest.fixture
def snat6(loaded6, route6_ns):
    """The datapath reset (harness.reset_datapath6), both IPv6 NAT tables empty, IPv6 SNAT on:
    node_ip6 NODE_IP6, ports PORT_MIN..PORT_MAX."""
    dp = reset_datapath6(loaded6, route6_ns)
    set_nat6(dp)
    return dp


def set_nat6(dp, **overrides):
    dp.maps.set_config(ROUTER_IP, trace=True, router_ip6=ROUTER6, node_ip6=NODE_IP6,
                       nat={"nat_port_min": PORT_MIN, "nat_port_max": PORT_MAX, **overrides})


# -- packets and checksums ------------------------------------------------------------------

def out6(l4, dst=EXT6, payload=b"hello", src=SRC6):
    """The pod SRC6's `l4` to the outside, as it arrives on hin."""
    return Ether(src=POD_MAC, dst=HIN_MAC) / IPv6(src=src, dst=dst) / l4 / payload


def in6(l4, src=EXT6, payload=b"world", dst=NODE_IP6):
    """`l4` from the outside to the node, as it arrives on uplink."""
    return Ether(src=ROUTER_MAC, dst=UPLINK_MAC) / IPv6(src=src, dst=dst) / l4 / payload


def ip6(frame: bytes) -> bytes:
    return frame[14:]


def l4_sum_ok(ip: bytes, quoted: bool = False) -> bool:
    """The L4 checksum of an IPv6 packet without extension headers (TCP, UDP, ICMPv6), over
    its pseudo-header; a quote cut short (`quoted`) has nothing to check."""
    nh, plen = ip[6], struct.unpack("!H", ip[4:6])[0]
    l4 = ip[40:40 + plen]
    if quoted and len(l4) < plen:
        return True
    if nh == UDP_PROTO and l4[6:8] == b"\0\0":
        return False                              # not allowed in IPv6
    pseudo = ip[8:40] + struct.pack("!IxxxB", len(l4), nh)
    return ones_sum(pseudo + l4) == 0xffff


def scapy_agrees(frame: bytes) -> bool:
    """scapy computes the same checksums (every layer's, the quoted ones too) as the frame has."""
    p = Ether(frame)
    layer = p
    while layer:
        for field in ("chksum", "cksum"):
            if field in layer.fields:
                delattr(layer, field)
        layer = layer.payload
    return bytes(Ether(bytes(p))) == frame


def nat6_table(dp) -> dict[st.NatKey, st.NatEntry]:
    return dict(dp.maps.nat_entries(6))


def counters6(dp) -> dict[str, int]:
    return {reason: p for (family, reason), (p, _) in dp.maps.counters_by_family().items()
            if p and family == "ipv6"}


def open_flow(dp, ns, l4, payload=b"p" * 40) -> tuple[bytes, int]:
    """Send `l4` out; the translated IPv6 packet as it left and its NAT port / identifier."""
    _, res = run_out(dp, ns, out6(l4, payload=payload))
    assert res.retval == TC_ACT_REDIRECT, counters6(dp)
    sent = ip6(res.data_out)
    pkt = IPv6(sent)
    return sent, (pkt[ICMPv6EchoRequest].id if ICMPv6EchoRequest in pkt else pkt.payload.sport)


# -- out and back ---------------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_pod_flow_leaves_from_the_node_ipv6_address_and_its_reply_comes_back(snat6, route6_ns,
                                                                                proto):
    l4 = TCP(sport=40000, dport=80, flags="S", seq=1) if proto == "tcp" \
        else UDP(sport=40000, dport=53)
    _, res = run_out(snat6, route6_ns, out6(l4))
    assert res.retval == TC_ACT_REDIRECT
    out = IPv6(ip6(res.data_out))
    assert (out.src, out.dst, out.hlim) == (NODE_IP6, EXT6, 63)
    port = out.payload.sport
    assert PORT_MIN <= port <= PORT_MAX and out.payload.dport == l4.dport
    assert bytes(out.payload.payload) == b"hello"
    assert l4_sum_ok(ip6(res.data_out)) and scapy_agrees(res.data_out)
    pnum = TCP_PROTO if proto == "tcp" else UDP_PROTO
    table = nat6_table(snat6)
    assert set(table) == {st.NatKey(SRC6, EXT6, 40000, l4.dport, pnum, "out"),
                          st.NatKey(EXT6, NODE_IP6, l4.dport, port, pnum, "in")}
    assert (table[st.NatKey(SRC6, EXT6, 40000, l4.dport, pnum, "out")].addr,
            table[st.NatKey(EXT6, NODE_IP6, l4.dport, port, pnum, "in")].addr) == (NODE_IP6, SRC6)
    assert dict(snat6.maps.nat_entries(4)) == {}            # IPv4's table untouched

    _, res = run_out(snat6, route6_ns, out6(l4))            # the same flow keeps its port
    assert IPv6(ip6(res.data_out)).payload.sport == port

    reply = TCP(sport=80, dport=port, flags="SA", seq=7, ack=2) if proto == "tcp" \
        else UDP(sport=53, dport=port)
    _, res = run_in(snat6, route6_ns, in6(reply))
    assert res.retval == TC_ACT_REDIRECT
    back = Ether(res.data_out)
    assert (back.src, back.dst) == (HIN_MAC, POD_MAC)
    assert (back[IPv6].src, back[IPv6].dst, back[IPv6].hlim) == (EXT6, SRC6, 63)
    assert (back[IPv6].payload.sport, back[IPv6].payload.dport) == (l4.dport, 40000)
    assert bytes(back[IPv6].payload.payload) == b"world"
    assert l4_sum_ok(ip6(res.data_out)) and scapy_agrees(res.data_out)
    assert counters6(snat6) == {"snat_redirect_neigh": 2, "rnat_redirect_peer": 1}
    entry = nat6_table(snat6)[st.NatKey(SRC6, EXT6, 40000, l4.dport, pnum, "out")]
    assert entry.packets == 2 and entry.state & st.NAT_STATE_BITS["seen_reply"]


def test_icmpv6_echo_goes_by_its_identifier_both_ways(snat6, route6_ns):
    _, res = run_out(snat6, route6_ns, out6(ICMPv6EchoRequest(id=0x1234, seq=1)))
    assert res.retval == TC_ACT_REDIRECT
    out = IPv6(ip6(res.data_out))
    nat_id = out[ICMPv6EchoRequest].id
    assert out.src == NODE_IP6 and PORT_MIN <= nat_id <= PORT_MAX
    assert out[ICMPv6EchoRequest].seq == 1
    assert l4_sum_ok(ip6(res.data_out)) and scapy_agrees(res.data_out)

    _, res = run_in(snat6, route6_ns, in6(ICMPv6EchoReply(id=nat_id, seq=1)))
    assert res.retval == TC_ACT_REDIRECT
    back = IPv6(ip6(res.data_out))
    assert back.dst == SRC6 and back[ICMPv6EchoReply].id == 0x1234
    assert l4_sum_ok(ip6(res.data_out)) and scapy_agrees(res.data_out)
    assert counters6(snat6) == {"snat_redirect_neigh": 1, "rnat_redirect_peer": 1}
    assert set(nat6_table(snat6)) == {st.NatKey(SRC6, EXT6, 0x1234, 0, ICMP6_PROTO, "out"),
                                      st.NatKey(EXT6, NODE_IP6, 0, nat_id, ICMP6_PROTO, "in")}


def _fold_add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xffff) + (s >> 16)


def test_a_udp_checksum_that_comes_out_0_is_sent_as_ffff(snat6, route6_ns):
    """RFC 8200 8.1: 0 means "no checksum", which IPv6 does not allow. The payload is made so
    that the translated datagram's checksum computes to 0."""
    set_nat6(snat6, nat_port_min=30000, nat_port_max=30000)
    translated = bytes(IPv6(src=NODE_IP6, dst=EXT6) / UDP(sport=30000, dport=53, chksum=0)
                       / (b"\0\0" + b"z" * 10))
    total = ones_sum(translated[8:40] + struct.pack("!IxxxB", len(translated) - 40, 17)
                     + translated[40:])
    fill = 0xffff - total                    # the sum becomes 0xffff: checksum ~0xffff = 0
    payload = struct.pack("!H", fill) + b"z" * 10
    check = ones_sum(translated[8:40] + struct.pack("!IxxxB", 20, 17) + translated[40:48]
                     + payload)
    assert check == 0xffff                   # the test's own premise
    _, res = run_out(snat6, route6_ns, out6(UDP(sport=40000, dport=53), payload=payload))
    assert res.retval == TC_ACT_REDIRECT
    out = ip6(res.data_out)
    assert struct.unpack("!HH", out[40:44]) == (30000, 53)
    assert out[46:48] == b"\xff\xff" and l4_sum_ok(out)


def test_udp_without_a_checksum_is_not_nated(snat6, route6_ns):
    """A pod's is dropped (it would leave un-NATed or with a wrong sum); a remote's to the
    node IPv6 address stays with the node (whose stack drops it)."""
    raw = bytearray(bytes(out6(UDP(sport=40001, dport=53))))
    raw[14 + 40 + 6:14 + 40 + 8] = b"\0\0"
    _, res = run_out(snat6, route6_ns, bytes(raw))
    assert res.retval == TC_ACT_SHOT
    _, res = run_out(snat6, route6_ns, out6(UDP(sport=40001, dport=53)))
    port = IPv6(ip6(res.data_out)).payload.sport
    raw = bytearray(bytes(in6(UDP(sport=53, dport=port))))
    raw[14 + 40 + 6:14 + 40 + 8] = b"\0\0"
    data, res = run_in(snat6, route6_ns, bytes(raw))
    assert res.retval == TC_ACT_OK and res.data_out == data
    assert counters6(snat6) == {"drop_nat_unsupported": 1, "snat_redirect_neigh": 1,
                                "pass_nat_miss": 1}


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(proto=hst.sampled_from(["tcp", "udp"]), sport=hst.integers(1, 65535),
       dport=hst.integers(1, 65535), payload=hst.binary(max_size=300),
       flags=hst.integers(0, 0xff), tc=hst.integers(0, 255), fl=hst.integers(0, 0xfffff))
def test_translation_keeps_every_checksum_valid_and_reverses_exactly(snat6, route6_ns, proto,
                                                                     sport, dport, payload,
                                                                     flags, tc, fl):
    l4 = TCP(sport=sport, dport=dport, flags=flags & ~0x04) if proto == "tcp" \
        else UDP(sport=sport, dport=dport)
    pkt = out6(l4, payload=payload)
    pkt[IPv6].tc, pkt[IPv6].fl = tc, fl
    _, res = run_out(snat6, route6_ns, pkt)
    assert res.retval == TC_ACT_REDIRECT
    out = ip6(res.data_out)
    assert l4_sum_ok(out) and IPv6(out).src == NODE_IP6
    assert out[:8] == bytes(pkt[IPv6])[:7] + bytes([63])      # class, label, length kept
    assert bytes(IPv6(out).payload.payload) == payload
    reply = (TCP(sport=dport, dport=IPv6(out).payload.sport, flags="A") if proto == "tcp"
             else UDP(sport=dport, dport=IPv6(out).payload.sport))
    _, back = run_in(snat6, route6_ns, in6(reply, payload=payload))
    assert back.retval == TC_ACT_REDIRECT
    assert l4_sum_ok(ip6(back.data_out))
    b = IPv6(ip6(back.data_out))
    assert (b.dst, b.payload.dport, b.payload.sport) == (SRC6, sport, dport)


# -- what is not translated -----------------------------------------------------------------

def test_cluster_and_excluded_destinations_are_not_nated(snat6, route6_ns):
    """cluster_cidrs6 holds the cluster and [nat] exclude's IPv6 CIDRs (converge writes
    non_masquerade_cidrs6 there): neither is masqueraded."""
    snat6.maps.set_cluster_cidr6("2001:db8:2::/64")          # an excluded external range
    for dst in ("2001:db8:0:2::14", EXT6):                     # another node's pod, excluded
        _, res = run_out(snat6, route6_ns, out6(UDP(sport=40000, dport=53), dst=dst))
        assert res.retval == TC_ACT_REDIRECT
        assert IPv6(ip6(res.data_out)).src == SRC6
    assert nat6_table(snat6) == {}
    assert counters6(snat6) == {"redirect_neigh": 2}


def test_no_nat_hole_unknown_packets_to_the_node_ipv6_address_stay_with_the_node(snat6,
                                                                                 route6_ns):
    _, res = run_out(snat6, route6_ns, out6(TCP(sport=40000, dport=80, flags="S")))
    port = IPv6(ip6(res.data_out))[TCP].sport
    other = port + 1 if port < PORT_MAX else port - 1
    probes = [in6(TCP(sport=80, dport=other, flags="SA")),
              in6(TCP(sport=81, dport=port, flags="SA")),
              in6(TCP(sport=80, dport=port, flags="SA"), src="2001:db8:2::b"),
              in6(UDP(sport=80, dport=port)),
              in6(ICMPv6EchoRequest(id=port)),
              in6(ICMPv6DestUnreach(code=4) / IPv6(src=NODE_IP6, dst=EXT6)
                  / UDP(sport=other, dport=53))]
    for probe in probes:
        data, res = run_in(snat6, route6_ns, probe)
        assert res.retval == TC_ACT_OK and res.data_out == data, probe.summary()
    assert counters6(snat6) == {"snat_redirect_neigh": 1, "pass_nat_miss": len(probes)}


def test_tcp_fragments_and_other_protocols_to_the_outside_are_dropped(snat6, route6_ns):
    tcp_frag = out6(IPv6ExtHdrFragment(m=1, id=5) / TCP(sport=1, dport=80), payload=b"x" * 64)
    gre = Ether(src=POD_MAC, dst=HIN_MAC) / IPv6(src=SRC6, dst=EXT6, nh=47) / (b"\0" * 16)
    echo_reply = out6(ICMPv6EchoReply(id=7))                   # a pod answers no ping out
    for pkt in (tcp_frag, gre, echo_reply):
        _, res = run_out(snat6, route6_ns, pkt)
        assert res.retval == TC_ACT_SHOT, pkt.summary()
    assert counters6(snat6) == {"drop_nat_unsupported": 3}
    assert nat6_table(snat6) == {}


# -- ports, state, expiry -------------------------------------------------------------------

def test_port_allocation_collisions_exhaustion_and_five_tuple_reuse(snat6, route6_ns):
    set_nat6(snat6, nat_port_min=30000, nat_port_max=30001)
    ports = set()
    for sport in (1001, 1002):
        _, res = run_out(snat6, route6_ns, out6(UDP(sport=sport, dport=53)))
        assert res.retval == TC_ACT_REDIRECT
        ports.add(IPv6(ip6(res.data_out))[UDP].sport)
    assert ports == {30000, 30001}                  # collisions retried onto the free port
    before = set(nat6_table(snat6))
    _, res = run_out(snat6, route6_ns, out6(UDP(sport=1003, dport=53)))
    assert res.retval == TC_ACT_SHOT
    assert set(nat6_table(snat6)) == before
    # the same ports are free again towards another destination (5-tuple uniqueness)
    _, res = run_out(snat6, route6_ns, out6(UDP(sport=1003, dport=53), dst="2001:db8:2::b"))
    assert res.retval == TC_ACT_REDIRECT
    assert counters6(snat6) == {"snat_redirect_neigh": 3, "drop_nat_exhausted": 1}


def test_an_expired_flow_gives_its_port_back_and_its_late_reply_finds_nothing(snat6,
                                                                               route6_ns):
    set_nat6(snat6, nat_port_min=30000, nat_port_max=30000, nat_timeout_udp=0)
    _, res = run_out(snat6, route6_ns, out6(UDP(sport=1001, dport=53)))
    assert res.retval == TC_ACT_REDIRECT
    _, res = run_out(snat6, route6_ns, out6(UDP(sport=1002, dport=53)))
    assert res.retval == TC_ACT_REDIRECT and IPv6(ip6(res.data_out))[UDP].sport == 30000
    assert {(k.dir, k.sport, k.dport) for k in nat6_table(snat6)} == \
        {("out", 1002, 53), ("in", 53, 30000)}
    data, res = run_in(snat6, route6_ns, in6(UDP(sport=53, dport=30000)))
    assert res.retval == TC_ACT_OK and res.data_out == data


def test_tcp_state_follows_fin_and_rst_on_both_entries(snat6, route6_ns):
    """As IPv4's: the pod's FIN and the remote's plausible RST are on both entries at once,
    a new SYN on the closed tuple clears both (nat_flow.h's account_out, reset_state)."""
    _, res = run_out(snat6, route6_ns, out6(TCP(sport=40000, dport=80, flags="S", seq=1),
                                            payload=b""))
    port = IPv6(ip6(res.data_out))[TCP].sport
    keys = [st.NatKey(SRC6, EXT6, 40000, 80, TCP_PROTO, "out"),
            st.NatKey(EXT6, NODE_IP6, 80, port, TCP_PROTO, "in")]
    bits = st.NAT_STATE_BITS
    run_in(snat6, route6_ns, in6(TCP(sport=80, dport=port, flags="SA", seq=500, ack=2),
                                 payload=b""))
    run_out(snat6, route6_ns, out6(TCP(sport=40000, dport=80, flags="FA", seq=2, ack=501),
                                   payload=b""))
    assert [nat6_table(snat6)[k].state for k in keys] == [bits["seen_reply"] | bits["fin_out"]] * 2
    _, res = run_in(snat6, route6_ns, in6(TCP(sport=80, dport=port, flags="R", seq=501),
                                          payload=b""))
    assert res.retval == TC_ACT_REDIRECT
    closed = bits["seen_reply"] | bits["fin_out"] | bits["rst"]
    assert [nat6_table(snat6)[k].state for k in keys] == [closed, closed]
    from datapath import nat_table
    (flow,) = nat_table.flows(snat6.maps)
    assert (flow.protocol, flow.pod, flow.remote, flow.nat, flow.state) == \
        ("tcp", f"[{SRC6}]:40000", f"[{EXT6}]:80", f"[{NODE_IP6}]:{port}", "reset")
    assert flow.expires_in_s <= 10
    _, res = run_out(snat6, route6_ns, out6(TCP(sport=40000, dport=80, flags="S", seq=9000),
                                            payload=b""))
    assert IPv6(ip6(res.data_out))[TCP].sport == port        # the same tuple, reopened
    assert [nat6_table(snat6)[k].state for k in keys] == [0, 0]


def test_a_blind_rst_from_outside_changes_nothing(snat6, route6_ns):
    _, res = run_out(snat6, route6_ns, out6(TCP(sport=40000, dport=80, flags="S", seq=1)))
    port = IPv6(ip6(res.data_out))[TCP].sport
    run_in(snat6, route6_ns, in6(TCP(sport=80, dport=port, flags="SA", seq=1000, ack=2)))
    run_out(snat6, route6_ns, out6(TCP(sport=40000, dport=80, flags="A", seq=2, ack=1001)))
    _, res = run_in(snat6, route6_ns, in6(TCP(sport=80, dport=port, flags="R", seq=2**30),
                                          payload=b""))
    assert res.retval == TC_ACT_REDIRECT                       # the pod judges it
    state = nat6_table(snat6)[st.NatKey(SRC6, EXT6, 40000, 80, TCP_PROTO, "out")].state
    assert not state & st.NAT_STATE_BITS["rst"]


def test_flows_list_and_the_sweep_cover_the_ipv6_table(snat6, route6_ns):
    from datapath import nat_table
    run_out(snat6, route6_ns, out6(UDP(sport=1001, dport=53)))
    run_out(snat6, route6_ns, out6(TCP(sport=1002, dport=80, flags="S")))
    _, nat_id = open_flow(snat6, route6_ns, ICMPv6EchoRequest(id=0x77, seq=1))
    found = {f.protocol: f for f in nat_table.flows(snat6.maps)}
    assert set(found) == {"udp", "tcp", "icmp6"}
    assert (found["icmp6"].pod, found["icmp6"].remote, found["icmp6"].nat) == \
        (f"[{SRC6}]:{0x77}", EXT6, f"[{NODE_IP6}]:{nat_id}")
    assert found["udp"].remote == f"[{EXT6}]:53" and found["udp"].complete
    assert nat_table.sweep(snat6.maps) == 0
    now = max(e.last_seen_ns for _, e in snat6.maps.nat_entries(6))
    # UDP and the SYN expire after 60 s, the echo after 30 s: past 60 s and the grace, with
    # the SYN timeout raised meanwhile, UDP and ICMPv6 go (both entries each), TCP stays
    set_nat6(snat6, nat_timeout_tcp_syn=120)
    assert nat_table.sweep(snat6.maps, now + 59 * 10**9 - nat_table.SWEEP_GRACE_NS) == 2
    late = now + 60 * 10**9 + nat_table.SWEEP_GRACE_NS + 10**9
    assert nat_table.sweep(snat6.maps, late) == 2
    assert [f.protocol for f in nat_table.flows(snat6.maps)] == ["tcp"]


def test_a_replaced_datapath_keeps_the_ipv6_flows(snat6, route6_ns):
    """nat_handover.nat_snapshot / restore (converge's carry-over) take nat6 as nat."""
    from datapath import nat_handover
    open_flow(snat6, route6_ns, UDP(sport=1001, dport=53))
    snapshot = nat_handover.nat_snapshot(snat6.maps)
    assert sorted(name for name, _, _ in snapshot) == ["nat6", "nat6"]
    before = nat6_table(snat6)
    for key in before:
        snat6.maps.nat_delete(key)
    nat_handover.restore(snat6.maps, snapshot)
    assert nat6_table(snat6) == before


# -- ICMPv6 errors about a translated flow ----------------------------------------------------

ERRORS = {"dest-unreach": ICMPv6DestUnreach(code=4), "packet-too-big": ICMPv6PacketTooBig(mtu=1280),
          "time-exceeded": ICMPv6TimeExceeded(code=0), "param-problem": ICMPv6ParamProblem(ptr=6)}


@pytest.mark.parametrize("kind", sorted(ERRORS))
@pytest.mark.parametrize("flow", ["tcp", "udp", "echo", "tcp-quoted-8-bytes"])
def test_an_icmpv6_error_about_a_flow_is_translated_with_its_quote(snat6, route6_ns, kind, flow):
    l4 = {"tcp": TCP(sport=40000, dport=80, flags="A"), "udp": UDP(sport=40000, dport=53),
          "echo": ICMPv6EchoRequest(id=0x4242, seq=9)}[flow.split("-")[0]]
    sent, port = open_flow(snat6, route6_ns, l4)
    quote = sent[:48] if flow == "tcp-quoted-8-bytes" else sent
    err = Ether(src=ROUTER_MAC, dst=UPLINK_MAC) / IPv6(src=ROUTER6_UNDERLAY, dst=NODE_IP6) / \
        ERRORS[kind]
    raw = bytes(err / quote)
    _, res = run_in(snat6, route6_ns, raw)
    assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
    out = ip6(res.data_out)
    assert l4_sum_ok(out)                                   # ICMPv6 over the pseudo-header
    if flow != "tcp-quoted-8-bytes":
        assert scapy_agrees(res.data_out)
    outer = IPv6(out)
    assert (outer.src, outer.dst) == (ROUTER6_UNDERLAY, SRC6)
    assert out[40] == ERRORS[kind].type and out[41] == ERRORS[kind].code
    inner = out[48:]
    assert l4_sum_ok(inner, quoted=True)                    # the quoted L4, when all there
    assert IPv6(inner[:40]).src == SRC6 and inner[24:40] == sent[24:40]
    if flow == "echo":
        assert struct.unpack("!H", inner[44:46])[0] == 0x4242
    else:
        assert struct.unpack("!HH", inner[40:44]) == (40000, struct.unpack("!H", sent[42:44])[0])
    assert counters6(snat6) == {"snat_redirect_neigh": 1, "rnat_icmp_error": 1}


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_an_icmpv6_error_of_the_pods_leaves_from_the_node_quoting_what_the_remote_sent(
        snat6, route6_ns, proto):
    """The pod answers a remote's datagram with port unreachable: the error leaves from the
    node address, quoting the datagram as the remote sent it (to the node and NAT port)."""
    l4 = TCP(sport=40000, dport=80, flags="A") if proto == "tcp" else UDP(sport=40000, dport=53)
    _, port = open_flow(snat6, route6_ns, l4)
    back = TCP(sport=80, dport=40000, flags="A") if proto == "tcp" else UDP(sport=53,
                                                                            dport=40000)
    quoted = bytes(IPv6(src=EXT6, dst=SRC6, hlim=50) / back / (b"q" * 40))
    _, res = run_out(snat6, route6_ns, out6(ICMPv6DestUnreach(code=4), payload=b"") / quoted)
    assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
    out = ip6(res.data_out)
    assert l4_sum_ok(out) and scapy_agrees(res.data_out)
    assert (IPv6(out).src, IPv6(out).dst) == (NODE_IP6, EXT6)
    inner = out[48:]
    assert l4_sum_ok(inner)
    assert (IPv6(inner[:40]).src, IPv6(inner[:40]).dst) == (EXT6, NODE_IP6)
    assert struct.unpack("!HH", inner[40:44]) == (back.sport, port)
    assert counters6(snat6) == {"snat_redirect_neigh": 2}


def test_an_icmpv6_error_of_the_pods_about_no_flow_is_dropped(snat6, route6_ns):
    quoted = bytes(IPv6(src=EXT6, dst=SRC6) / UDP(sport=53, dport=40999) / b"x")
    _, res = run_out(snat6, route6_ns, out6(ICMPv6DestUnreach(code=4), payload=b"") / quoted)
    assert res.retval == TC_ACT_SHOT
    assert counters6(snat6) == {"drop_nat_unsupported": 1}


# -- fragments ------------------------------------------------------------------------------

def frames6(pkt, eth_src=POD_MAC, eth_dst=HIN_MAC, size=1280):
    """The frames of one datagram fragmented as a sender with a `size` MTU would."""
    return [Ether(src=eth_src, dst=eth_dst) / f for f in fragment6(pkt, size)]


def reassemble6(frames: list[bytes]) -> bytes:
    """The IPv6 datagram (the first fragment's addresses, no Fragment header) they make up."""
    parts, first = {}, None
    for f in frames:
        ip = f[14:]
        assert ip[6] == 44
        offset = struct.unpack("!H", ip[42:44])[0] & 0xfff8
        parts[offset] = ip[48:40 + struct.unpack("!H", ip[4:6])[0]]
        if offset == 0:
            first = ip
    data = b""
    for off in sorted(parts):
        assert off == len(data), "a hole between fragments"
        data += parts[off]
    hdr = bytearray(first[:40])
    hdr[4:6] = struct.pack("!H", len(data))
    hdr[6] = first[40]
    return bytes(hdr) + data


def frag_records6(dp) -> list[bytes]:
    return list(libbpf.map_keys(dp.maps.fd("nat6_frags"), st.SIZEOF_FRAG6_KEY))


@pytest.mark.parametrize("proto", ["udp", "echo"])
def test_a_fragmented_datagram_goes_out_and_its_fragmented_reply_comes_back(snat6, route6_ns,
                                                                            proto):
    """3,000 bytes in 3 fragments each way: the first by its L4 header, the others by the
    record it left in nat6_frags (only their address changes); the datagrams stay valid."""
    payload = bytes(range(256)) * 11 + b"z" * 184                      # 3,000 bytes
    l4 = UDP(sport=40000, dport=5353) if proto == "udp" else ICMPv6EchoRequest(id=0x1234, seq=3)
    frames = frames6(IPv6(src=SRC6, dst=EXT6) / IPv6ExtHdrFragment(id=0x4242) / l4 / payload)
    assert len(frames) == 3
    outs = []
    for f in frames:
        data = bytes(f)
        _, res = run_out(snat6, route6_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
        ip = ip6(res.data_out)
        assert IPv6(ip).src == NODE_IP6 and ip[7] == 63       # and the hop limit
        skip = 8 if f is frames[0] else 0            # the first's L4 header changes too
        assert ip[48 + skip:] == data[14 + 48 + skip:]
        outs.append(res.data_out)
    dgram = reassemble6(outs)
    assert l4_sum_ok(dgram)
    got = IPv6(dgram)
    nat_port = got[UDP].sport if proto == "udp" else got[ICMPv6EchoRequest].id
    assert PORT_MIN <= nat_port <= PORT_MAX and got.src == NODE_IP6
    assert dgram[48:] == payload
    assert counters6(snat6) == {"snat_fragment": 3}
    assert len(frag_records6(snat6)) == 1

    reply = UDP(sport=5353, dport=nat_port) if proto == "udp" else \
        ICMPv6EchoReply(id=nat_port, seq=3)
    back = []
    for f in frames6(IPv6(src=EXT6, dst=NODE_IP6) / IPv6ExtHdrFragment(id=0x5151) / reply
                     / payload[::-1], eth_src=ROUTER_MAC, eth_dst=UPLINK_MAC):
        _, res = run_in(snat6, route6_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
        assert Ether(res.data_out).dst == POD_MAC
        back.append(res.data_out)
    dgram = reassemble6(back)
    assert l4_sum_ok(dgram)
    got = IPv6(dgram)
    assert (got.src, got.dst) == (EXT6, SRC6)
    if proto == "udp":
        assert (got[UDP].sport, got[UDP].dport) == (5353, 40000)
    else:
        assert got[ICMPv6EchoReply].id == 0x1234
    assert dgram[48:] == payload[::-1]
    assert counters6(snat6) == {"snat_fragment": 3, "rnat_fragment": 3}
    assert len(frag_records6(snat6)) == 2


@pytest.mark.parametrize("proto", ["udp", "echo"])
def test_a_packet_too_big_about_a_first_fragment_reaches_the_pod_translated(snat6, route6_ns,
                                                                             proto):
    """A router's Packet Too Big about a fragmented datagram quotes a fragment (IPv6 header,
    Fragment header, and in the first the L4 header): the first's is translated, so the pod
    learns the path MTU; a later fragment's quote (no L4 header) stays with the node."""
    l4 = UDP(sport=40000, dport=5353) if proto == "udp" else ICMPv6EchoRequest(id=0x99, seq=1)
    frames = frames6(IPv6(src=SRC6, dst=EXT6) / IPv6ExtHdrFragment(id=0x77) / l4
                     / (b"f" * 3000), size=1500)
    sent = []
    for f in frames:
        _, res = run_out(snat6, route6_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
        sent.append(ip6(res.data_out))
    nat_port = struct.unpack("!H", sent[0][48 + (0 if proto == "udp" else 4):][:2])[0]
    for i, quote in enumerate(sent[:2]):
        err = Ether(src=ROUTER_MAC, dst=UPLINK_MAC) / IPv6(src=ROUTER6_UNDERLAY, dst=NODE_IP6) \
            / ICMPv6PacketTooBig(mtu=1280)
        raw = bytes(err / quote[:1232])
        data, res = run_in(snat6, route6_ns, raw)
        if i > 0:                                           # a later fragment: no L4 header
            assert res.retval == TC_ACT_OK and res.data_out == data
            continue
        assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
        out = ip6(res.data_out)
        assert l4_sum_ok(out) and IPv6(out).dst == SRC6
        inner = out[48:]
        assert IPv6(inner[:40]).src == SRC6 and inner[40] == (17 if proto == "udp" else 58)
        # the quoted L4 header is the pod's own again: port / identifier and the datagram's
        # checksum (not all quoted: moved incrementally) as the pod sent them
        assert inner[48:56] == bytes(frames[0])[14 + 48:14 + 56]
    assert counters6(snat6) == {"snat_fragment": len(frames), "rnat_icmp_error": 1,
                                "pass_nat_miss": 1}
    assert PORT_MIN <= nat_port <= PORT_MAX


def test_a_later_fragment_whose_first_was_not_seen_is_counted_never_leaked(snat6, route6_ns):
    first, middle, last = frames6(IPv6(src=SRC6, dst=EXT6) / IPv6ExtHdrFragment(id=7)
                                  / UDP(sport=40000, dport=53) / (b"a" * 3000))
    for f in (middle, last):
        _, res = run_out(snat6, route6_ns, f)
        assert res.retval == TC_ACT_SHOT
    _, res = run_out(snat6, route6_ns, first)
    assert res.retval == TC_ACT_REDIRECT
    port = [k.dport for k in nat6_table(snat6) if k.dir == "in"][0]
    # in: a later fragment without its first may be the node's own: to the stack, untouched
    inbound = frames6(IPv6(src=EXT6, dst=NODE_IP6) / IPv6ExtHdrFragment(id=9)
                      / UDP(sport=53, dport=port) / (b"c" * 3000),
                      eth_src=ROUTER_MAC, eth_dst=UPLINK_MAC)
    data, res = run_in(snat6, route6_ns, inbound[2])
    assert res.retval == TC_ACT_OK and res.data_out == data
    assert counters6(snat6) == {"drop_frag_untracked": 2, "snat_fragment": 1,
                                "pass_frag_untracked": 1}


def test_a_fragment_record_older_than_the_reassembly_timeout_is_not_used(snat6, route6_ns):
    first, middle, _ = frames6(IPv6(src=SRC6, dst=EXT6) / IPv6ExtHdrFragment(id=77)
                               / UDP(sport=40000, dport=53) / (b"a" * 3000))
    _, res = run_out(snat6, route6_ns, first)
    assert res.retval == TC_ACT_REDIRECT
    (key,) = frag_records6(snat6)
    size = st.ffi.sizeof("struct hr_frag_entry")
    raw = bytearray(libbpf.map_lookup(snat6.maps.fd("nat6_frags"), key, size))
    raw[0:8] = (1).to_bytes(8, "little")
    libbpf.map_update(snat6.maps.fd("nat6_frags"), key, bytes(raw))
    _, res = run_out(snat6, route6_ns, middle)
    assert res.retval == TC_ACT_SHOT
    assert counters6(snat6) == {"snat_fragment": 1, "drop_frag_untracked": 1}


def test_packets_never_overwrite_a_claimed_entrys_marker(snat6, route6_ns):
    """As IPv4's: a refresh must not overwrite HR_NAT_CLAIMED (all ones) in either entry."""
    claimed = (1 << 64) - 1
    _, port = open_flow(snat6, route6_ns, UDP(sport=40000, dport=53))
    for key, entry in snat6.maps.nat_entries(6):
        snat6.maps.nat_update(key, dataclasses.replace(entry, last_seen_ns=claimed))
    for pkt, run in ((out6(UDP(sport=40000, dport=53)), run_out),
                     (in6(UDP(sport=53, dport=port)), run_in)):
        _, res = run(snat6, route6_ns, pkt)
        assert res.retval == TC_ACT_REDIRECT
    assert {e.last_seen_ns for e in nat6_table(snat6).values()} == {claimed}


def udp_sum_ok(dgram: bytes) -> bool:
    """The UDP checksum of an IPv6 datagram with extension headers is what scapy computes."""
    pkt = IPv6(dgram)
    sent = pkt[UDP].chksum
    del pkt[UDP].chksum
    return sent != 0 and IPv6(bytes(pkt))[UDP].chksum == sent


def test_fragments_with_a_header_after_the_fragment_header_go_by_their_record(snat6,
                                                                              route6_ns):
    """Destination options after the Fragment header are in the first fragment only: the
    later ones say 60 where the first says 17 (UDP). The datagram is keyed by the Fragment
    header's next header (60 in all), and the later fragments go by the first's record
    (ports and protocol), both ways; the datagrams stay valid."""
    payload = bytes(range(256)) * 11 + b"z" * 184                      # 3,000 bytes
    frames = frames6(IPv6(src=SRC6, dst=EXT6) / IPv6ExtHdrFragment(id=0x6060)
                     / IPv6ExtHdrDestOpt() / UDP(sport=40000, dport=5353) / payload)
    assert len(frames) == 3 and {bytes(f)[14 + 40] for f in frames} == {60}
    assert bytes(frames[0])[14 + 48] == UDP_PROTO                     # in the first only
    outs = []
    for f in frames:
        _, res = run_out(snat6, route6_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
        outs.append(res.data_out)
    dgram = reassemble6(outs)
    got = IPv6(dgram)
    nat_port = got[UDP].sport
    assert got.src == NODE_IP6 and PORT_MIN <= nat_port <= PORT_MAX and udp_sum_ok(dgram)
    assert bytes(got[UDP].payload) == payload
    assert counters6(snat6) == {"snat_fragment": 3}

    back = []
    for f in frames6(IPv6(src=EXT6, dst=NODE_IP6) / IPv6ExtHdrFragment(id=0x7070)
                     / IPv6ExtHdrDestOpt() / UDP(sport=5353, dport=nat_port) / payload[::-1],
                     eth_src=ROUTER_MAC, eth_dst=UPLINK_MAC):
        _, res = run_in(snat6, route6_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters6(snat6)
        back.append(res.data_out)
    dgram = reassemble6(back)
    got = IPv6(dgram)
    assert (got.src, got.dst, got[UDP].sport, got[UDP].dport) == (EXT6, SRC6, 5353, 40000)
    assert udp_sum_ok(dgram) and bytes(got[UDP].payload) == payload[::-1]
    assert counters6(snat6) == {"snat_fragment": 3, "rnat_fragment": 3}
    assert len(frag_records6(snat6)) == 2


# -- a reply too big for the pod's link -----------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("size, verdict", [(NARROW_MTU, "rnat_redirect_peer"),
                                           (NARROW_MTU + 1, "icmp_frag_needed"),
                                           (1400, "icmp_frag_needed")])
def test_a_reply_too_big_for_the_pods_link_is_answered_to_the_remote(snat6, route6_ns, proto,
                                                                     size, verdict):
    """The pod behind `narrow` (1280), the underlay 1500. IPv6 routers never fragment: a
    reply too big gets a Packet Too Big from NODE_IP6, mtu 1280, quoting the datagram as the
    remote sent it (to NODE_IP6 and the NAT port: what its socket knows), out of the
    underlay device it came in on with the MACs swapped."""
    first, reply = {"tcp": (TCP(sport=40000, dport=80, flags="A", seq=1, ack=1),
                            TCP(sport=80, flags="A", seq=1, ack=41)),
                    "udp": (UDP(sport=40000, dport=53), UDP(sport=53))}[proto]
    _, reply.dport = open_flow(snat6, route6_ns, first)
    port = reply.dport
    snat6.maps.set_endpoint(SRC6, route6_ns.narrow, POD_MAC, HIN_MAC)   # the pod behind 1280
    pkt = Ether(src=ROUTER_MAC, dst=UPLINK_MAC) / IPv6(src=EXT6, dst=NODE_IP6, hlim=60) / reply
    pkt = pkt / (b"r" * (size - len(pkt[IPv6])))
    before = counters6(snat6)
    data, res = run_in(snat6, route6_ns, pkt)
    assert len(data) - 14 == size
    got = {k: v - before.get(k, 0) for k, v in counters6(snat6).items()
           if v != before.get(k, 0)}
    assert got == {verdict: 1}
    assert res.retval == TC_ACT_REDIRECT
    if verdict == "rnat_redirect_peer":
        back = IPv6(ip6(res.data_out))
        assert (back.dst, back.payload.dport) == (SRC6, 40000)
        assert l4_sum_ok(ip6(res.data_out))
        return
    out = Ether(res.data_out)
    assert (out.src, out.dst) == (UPLINK_MAC, ROUTER_MAC)
    assert (out[IPv6].src, out[IPv6].dst, out[IPv6].hlim) == (NODE_IP6, EXT6, 64)
    assert_valid_packet_too_big(res.data_out, data, NARROW_MTU, src=NODE_IP6)
    assert l4_sum_ok(ip6(res.data_out))                  # the ICMPv6 checksum, summed by hand
    quoted = IPv6(bytes(out[ICMPv6PacketTooBig].payload))
    assert (quoted.src, quoted.dst, quoted.hlim) == (EXT6, NODE_IP6, 60)
    assert (quoted.payload.sport, quoted.payload.dport) == (reply.sport, port)
    assert bytes(out[ICMPv6PacketTooBig].payload) == data[14:14 + 1232]   # byte for byte
    ev = [e for e in snat6.maps.read_trace_events() if e.reason == verdict][-1]
    assert ev.ifindex_out == route6_ns.uplink


def test_an_echo_reply_too_big_for_the_pods_link_goes_to_the_stack_translated(snat6,
                                                                              route6_ns):
    """An echo only loses that reply: the stack answers it (quoting the pod's identifier)."""
    _, ident = open_flow(snat6, route6_ns, ICMPv6EchoRequest(id=0x4321, seq=1))
    snat6.maps.set_endpoint(SRC6, route6_ns.narrow, POD_MAC, HIN_MAC)
    data, res = run_in(snat6, route6_ns, in6(ICMPv6EchoReply(id=ident, seq=1),
                                             payload=b"e" * 1300))
    assert res.retval == TC_ACT_OK
    back = IPv6(ip6(res.data_out))
    assert back.dst == SRC6 and back[ICMPv6EchoReply].id == 0x4321
    assert l4_sum_ok(ip6(res.data_out))
    assert counters6(snat6) == {"snat_redirect_neigh": 1, "pass_frag_needed": 1}


# -- an L4 header cut short by the payload length --------------------------------------------

@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_an_l4_header_cut_short_is_not_read_from_the_ethernet_padding(snat6, route6_ns, proto):
    """The payload length ends inside the L4 header; the frame goes on with padding that
    would pass for the rest (a checksum, TCP's flags). Out: dropped as unsupported, never
    translated from it; in: the node's own, untouched."""
    cut = 4 if proto == "udp" else 8                         # ports / ports and sequence
    nh = UDP_PROTO if proto == "udp" else TCP_PROTO
    pad = b"\x5a" * 24

    def frame(src_mac, dst_mac, src, dst, sport, dport):
        ip = IPv6(src=src, dst=dst, nh=nh, plen=cut)
        return Ether(src=src_mac, dst=dst_mac) / ip / (struct.pack("!HHI", sport, dport, 1)[:cut]
                                                       + pad)

    _, port = open_flow(snat6, route6_ns, UDP(sport=40000, dport=53) if proto == "udp"
                        else TCP(sport=40000, dport=53, flags="S", seq=1))
    before = counters6(snat6)
    data, res = run_out(snat6, route6_ns, frame(POD_MAC, HIN_MAC, SRC6, EXT6, 40000, 53))
    assert res.retval == TC_ACT_SHOT
    data, res = run_in(snat6, route6_ns, frame(ROUTER_MAC, UPLINK_MAC, EXT6, NODE_IP6, 53, port))
    assert res.retval == TC_ACT_OK and res.data_out == data
    got = {k: v - before.get(k, 0) for k, v in counters6(snat6).items()
           if v != before.get(k, 0)}
    assert got == {"drop_nat_unsupported": 1, "pass_nat_miss": 1}
