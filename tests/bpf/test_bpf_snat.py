"""BPF SNAT (bpf_c/include/nat.h) under BPF_PROG_TEST_RUN with scapy-built packets.

The pod SRC (behind `hin`) talks to EXTERNAL_DST, outside the cluster: from_pod
must rewrite the source to NODE_IP and a NAT port with valid checksums, and
from_underlay must translate replies and ICMP errors back. Checksums are
verified on the raw bytes (the one's complement sum over each checksummed
region must be 0xffff), not by asking scapy to rebuild the packet.
"""

from __future__ import annotations

import dataclasses
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as hst
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, fragment
from scapy.layers.l2 import Ether

from datapath import libbpf, shared_types as st
from tests.bpf.harness import (SIZEOF_FRAG_KEY, add_local_pod, loaded_datapath, nonzero_counters,
                               reset_datapath, run_prog)
from tests.bpf.harness import from_pod as run_out, from_underlay as run_in  # -> (bytes in, result)
from tests.bpf.packets import (EXTERNAL_DST as EXT, HIN_MAC, LOCAL_DST, NARROW_MTU, NODE_IP,
                               POD_MAC, ROUTER, ROUTER_IP, ROUTER_MAC, SRC, TC_ACT_OK,
                               TC_ACT_REDIRECT, TC_ACT_SHOT, assert_valid_frag_needed, in_pkt,
                               ones_sum, out_pkt)

PORT_MIN, PORT_MAX = 20000, 20999
SIZEOF_FRAG_ENTRY = st.ffi.sizeof("struct hr_frag_entry")
TCP_PROTO, UDP_PROTO, ICMP_PROTO = 6, 17, 1


@pytest.fixture
def snat(dp):
    """dp with BPF SNAT on: node IP NODE_IP, ports PORT_MIN..PORT_MAX, no fragment records."""
    set_nat(dp)
    return dp


def set_nat(dp, **overrides):
    nat = {"nat_port_min": PORT_MIN, "nat_port_max": PORT_MAX, **overrides}
    dp.maps.set_config(ROUTER_IP, trace=True, node_ip=NODE_IP, nat=nat)


# -- packets and checksums ------------------------------------------------------------------

def check_ip_and_l4(ip_bytes: bytes, quoted: bool = False) -> None:
    """Assert the IPv4 header checksum and (unless `quoted` cuts it) the L4 checksum."""
    ihl = (ip_bytes[0] & 0xf) * 4
    assert ones_sum(ip_bytes[:ihl]) == 0xffff, "IPv4 header checksum"
    proto = ip_bytes[9]
    total = struct.unpack("!H", ip_bytes[2:4])[0]
    l4 = ip_bytes[ihl:total]
    if quoted and len(l4) < total - ihl:
        return
    if proto == ICMP_PROTO:
        assert ones_sum(l4) == 0xffff, "ICMP checksum"
        return
    if proto == UDP_PROTO and l4[6:8] == b"\0\0":
        return  # no checksum
    pseudo = ip_bytes[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    assert ones_sum(pseudo + l4) == 0xffff, f"L4 checksum (protocol {proto})"


def ip_of(frame: bytes) -> bytes:
    return frame[14:]


def nat_table(dp) -> dict[st.NatKey, st.NatEntry]:
    return dict(dp.maps.nat_entries())


def counters(dp) -> dict[str, int]:
    return {name: p for name, (p, _) in nonzero_counters(dp.maps).items()}


def entry_to(addr: str, port: int):
    """Equal to any NatEntry that writes addr:port."""
    class Match:
        def __eq__(self, other):
            return isinstance(other, st.NatEntry) and (other.addr, other.port) == (addr, port)

        def __repr__(self):
            return f"<NatEntry -> {addr}:{port}>"
    return Match()


# -- translation out and back ---------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_flow_leaves_from_the_node_ip_and_its_reply_comes_back(snat, route_ns, proto):
    l4 = TCP(sport=40000, dport=80, flags="S", seq=1) if proto == "tcp" \
        else UDP(sport=40000, dport=53)
    data, res = run_out(snat, route_ns, out_pkt(l4))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    assert out[IP].src == NODE_IP and out[IP].dst == EXT and out[IP].ttl == 63
    nat_port = out[IP].payload.sport
    assert PORT_MIN <= nat_port <= PORT_MAX
    assert out[IP].payload.dport == l4.dport and bytes(out[IP].payload.payload) == b"hello"
    check_ip_and_l4(ip_of(res.data_out))
    pnum = TCP_PROTO if proto == "tcp" else UDP_PROTO
    assert nat_table(snat) == {
        st.NatKey(SRC, EXT, 40000, l4.dport, pnum, "out"): entry_to(NODE_IP, nat_port),
        st.NatKey(EXT, NODE_IP, l4.dport, nat_port, pnum, "in"): entry_to(SRC, 40000),
    }

    # the same flow keeps its port
    _, res2 = run_out(snat, route_ns, out_pkt(l4))
    assert Ether(res2.data_out)[IP].payload.sport == nat_port

    reply = TCP(sport=80, dport=nat_port, flags="SA", seq=7, ack=2) if proto == "tcp" \
        else UDP(sport=53, dport=nat_port)
    _, res3 = run_in(snat, route_ns, in_pkt(reply))
    assert res3.retval == TC_ACT_REDIRECT
    back = Ether(res3.data_out)
    assert (back.src, back.dst) == (HIN_MAC, POD_MAC)
    assert back[IP].src == EXT and back[IP].dst == SRC and back[IP].payload.dport == 40000
    assert back[IP].payload.sport == l4.dport and bytes(back[IP].payload.payload) == b"world"
    check_ip_and_l4(ip_of(res3.data_out))
    assert counters(snat) == {"snat_redirect_neigh": 2, "rnat_redirect_peer": 1}
    entry = nat_table(snat)[st.NatKey(SRC, EXT, 40000, l4.dport, pnum, "out")]
    assert entry.packets == 2 and entry.state & st.NAT_STATE_BITS["seen_reply"]




def test_udp_without_checksum_stays_without(snat, route_ns):
    pkt = out_pkt(UDP(sport=40001, dport=53))
    raw = bytearray(bytes(pkt))
    raw[14 + 20 + 6:14 + 20 + 8] = b"\0\0"
    res = run_prog(snat.from_pod.fd, bytes(raw), route_ns.name, route_ns.hin)
    assert res.retval == TC_ACT_REDIRECT
    assert res.data_out[14 + 20 + 6:14 + 20 + 8] == b"\0\0"
    check_ip_and_l4(ip_of(res.data_out))


def test_icmp_echo_identifier_is_translated_both_ways(snat, route_ns):
    _, res = run_out(snat, route_ns, out_pkt(ICMP(type=8, id=0x1234, seq=1)))
    assert res.retval == TC_ACT_REDIRECT
    out = Ether(res.data_out)
    nat_id = out[ICMP].id
    assert out[IP].src == NODE_IP and PORT_MIN <= nat_id <= PORT_MAX and out[ICMP].seq == 1
    check_ip_and_l4(ip_of(res.data_out))

    _, res = run_in(snat, route_ns, in_pkt(ICMP(type=0, id=nat_id, seq=1)))
    assert res.retval == TC_ACT_REDIRECT
    back = Ether(res.data_out)
    assert back[IP].dst == SRC and back[ICMP].id == 0x1234 and back[ICMP].type == 0
    check_ip_and_l4(ip_of(res.data_out))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(proto=hst.sampled_from(["tcp", "udp"]), sport=hst.integers(1, 65535),
       dport=hst.integers(1, 65535), payload=hst.binary(max_size=300),
       flags=hst.integers(0, 0xff), tos=hst.integers(0, 255))
def test_translation_keeps_every_checksum_valid_and_reverses_exactly(snat, route_ns, proto, sport,
                                                                     dport, payload, flags, tos):
    l4 = TCP(sport=sport, dport=dport, flags=flags & ~0x04) if proto == "tcp" \
        else UDP(sport=sport, dport=dport)
    _, res = run_out(snat, route_ns, out_pkt(l4, payload=payload, tos=tos))
    assert res.retval == TC_ACT_REDIRECT
    check_ip_and_l4(ip_of(res.data_out))
    out = Ether(res.data_out)
    assert bytes(out[IP].payload.payload) == payload
    reply = (TCP(sport=dport, dport=out[IP].payload.sport, flags="A") if proto == "tcp"
             else UDP(sport=dport, dport=out[IP].payload.sport))
    _, back = run_in(snat, route_ns, in_pkt(reply, payload=payload))
    assert back.retval == TC_ACT_REDIRECT
    check_ip_and_l4(ip_of(back.data_out))
    b = Ether(back.data_out)
    assert (b[IP].dst, b[IP].payload.dport, b[IP].payload.sport) == (SRC, sport, dport)


# -- what is not translated -----------------------------------------------------------------

def test_destinations_inside_the_cluster_are_not_nated(snat, route_ns):
    for dst in ("198.18.2.20", "198.19.0.2"):        # a pod of another node, a node
        data, res = run_out(snat, route_ns, out_pkt(UDP(sport=40000, dport=53), dst=dst))
        assert res.retval == TC_ACT_REDIRECT
        assert Ether(res.data_out)[IP].src == SRC
    assert nat_table(snat) == {}
    assert counters(snat) == {"redirect_neigh": 2}


def test_no_nat_hole_unknown_flows_to_the_node_ip_stay_with_the_node(snat, route_ns):
    """Nothing reaches a pod from outside but replies to flows the pod opened."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S")))
    nat_port = Ether(res.data_out)[TCP].sport
    probes = [
        in_pkt(TCP(sport=80, dport=nat_port + 1 if nat_port < PORT_MAX else nat_port - 1,
                   flags="SA")),                                      # another port
        in_pkt(TCP(sport=81, dport=nat_port, flags="SA")),           # another remote port
        in_pkt(TCP(sport=80, dport=nat_port, flags="SA"), src="203.0.113.11"),  # another host
        in_pkt(UDP(sport=80, dport=nat_port)),                        # another protocol
        in_pkt(ICMP(type=8, id=nat_port)),                            # a ping of the node
    ]
    for probe in probes:
        data, res = run_in(snat, route_ns, probe)
        assert res.retval == TC_ACT_OK and res.data_out == data, probe.summary()
    # straight to the pod's address from outside: dropped, not routed in
    data, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=40000, flags="S"), dst=SRC))
    assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"snat_redirect_neigh": 1, "pass_nat_miss": len(probes),
                              "drop_not_from_cluster": 1}


def test_tcp_fragments_and_other_protocols_to_the_outside_are_dropped(snat, route_ns):
    """UDP and ICMP echo fragments are NATed (test_fragmented_*); a TCP fragment is not."""
    frag = Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=SRC, dst=EXT, flags="MF") / \
        TCP(sport=1, dport=80) / (b"x" * 64)
    gre = Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=SRC, dst=EXT, proto=47) / (b"\0" * 16)
    for pkt in (frag, gre, out_pkt(ICMP(type=13))):                # 13: timestamp request
        _, res = run_out(snat, route_ns, pkt)
        assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"drop_nat_unsupported": 3}
    assert nat_table(snat) == {}


def test_spoofed_source_address_or_mac_is_dropped(snat, route_ns):
    spoofed_ip = out_pkt(UDP(sport=1, dport=2), src="198.18.1.99")
    spoofed_mac = out_pkt(UDP(sport=1, dport=2))
    spoofed_mac[Ether].src = "02:00:00:00:66:66"
    for pkt in (spoofed_ip, spoofed_mac):
        _, res = run_out(snat, route_ns, pkt)
        assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"drop_spoofed": 2}
    assert nat_table(snat) == {}


# -- ports, exhaustion, expiry ----------------------------------------------------------------

def test_port_exhaustion_is_a_counted_drop_and_corrupts_nothing(snat, route_ns):
    set_nat(snat, nat_port_min=30000, nat_port_max=30001)
    ports = set()
    for sport in (1001, 1002):
        _, res = run_out(snat, route_ns, out_pkt(UDP(sport=sport, dport=53)))
        assert res.retval == TC_ACT_REDIRECT
        ports.add(Ether(res.data_out)[UDP].sport)
    assert ports == {30000, 30001}
    before = nat_table(snat)
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=1003, dport=53)))
    assert res.retval == TC_ACT_SHOT
    assert nat_table(snat).keys() == before.keys()
    # the same ports are free again towards another destination (5-tuple uniqueness)
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=1003, dport=53), dst="203.0.113.20"))
    assert res.retval == TC_ACT_REDIRECT
    assert counters(snat) == {"snat_redirect_neigh": 3, "drop_nat_exhausted": 1}


def test_an_expired_flow_gives_its_port_back(snat, route_ns):
    set_nat(snat, nat_port_min=30000, nat_port_max=30000, nat_timeout_udp=0)
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=1001, dport=53)))
    assert res.retval == TC_ACT_REDIRECT
    # idle timeout 0 s: the flow is expired at once, so another flow may take the port ...
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=1002, dport=53)))
    assert res.retval == TC_ACT_REDIRECT and Ether(res.data_out)[UDP].sport == 30000
    keys = {(k.dir, k.sport, k.dport) for k in nat_table(snat)}
    assert keys == {("out", 1002, 53), ("in", 53, 30000)}
    # ... and a late reply for the first one finds nothing to go to
    set_nat(snat, nat_port_min=30000, nat_port_max=30000, nat_timeout_udp=0)
    data, res = run_in(snat, route_ns, in_pkt(UDP(sport=53, dport=30000)))
    assert res.retval == TC_ACT_OK and res.data_out == data


def test_tcp_state_moves_with_rst_and_fin(snat, route_ns):
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S")))
    port = Ether(res.data_out)[TCP].sport
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    in_key = st.NatKey(EXT, NODE_IP, 80, port, TCP_PROTO, "in")
    assert nat_table(snat)[out_key].state == 0
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA", seq=500, ack=1)))
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="FA", seq=1, ack=501)))
    bits = st.NAT_STATE_BITS
    for key in (out_key, in_key):
        assert nat_table(snat)[key].state == bits["seen_reply"] | bits["fin_out"]
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="R", seq=501)))
    for key in (out_key, in_key):
        assert nat_table(snat)[key].state == (bits["seen_reply"] | bits["fin_out"] | bits["rst"])


def test_an_evicted_reverse_entry_is_restored_with_the_same_port(snat, route_ns):
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=40000, dport=53)))
    port = Ether(res.data_out)[UDP].sport
    in_key = st.NatKey(EXT, NODE_IP, 53, port, UDP_PROTO, "in")
    assert snat.maps.nat_delete(in_key)               # gone (a race with a delete)
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=40000, dport=53)))
    assert Ether(res.data_out)[UDP].sport == port
    assert nat_table(snat)[in_key].addr == SRC


def test_packets_never_overwrite_a_claimed_entrys_marker(snat, route_ns):
    """An entry claimed for deletion by another CPU (nat_claim: last_seen_ns is
    HR_NAT_CLAIMED, all ones) keeps its marker through the packets of its flow, out, back and
    a later fragment: a refresh overwriting it would let the entry be claimed again."""
    claimed = (1 << 64) - 1
    _, res = run_out(snat, route_ns, out_pkt(UDP(sport=40000, dport=53)))
    port = Ether(res.data_out)[UDP].sport
    keys = [st.NatKey(SRC, EXT, 40000, 53, UDP_PROTO, "out"),
            st.NatKey(EXT, NODE_IP, 53, port, UDP_PROTO, "in")]
    for key in keys:
        snat.maps.nat_update(key, dataclasses.replace(nat_table(snat)[key],
                                                      last_seen_ns=claimed))
    first, later = fragment(out_pkt(UDP(sport=40000, dport=53), payload=b"f" * 1200)[IP],
                            fragsize=600)[:2]
    for pkt, run in ((out_pkt(UDP(sport=40000, dport=53)), run_out),
                     (in_pkt(UDP(sport=53, dport=port)), run_in),
                     (Ether(src=POD_MAC, dst=HIN_MAC) / first, run_out),
                     (Ether(src=POD_MAC, dst=HIN_MAC) / later, run_out)):
        _, res = run(snat, route_ns, pkt)
        assert res.retval == TC_ACT_REDIRECT          # a claimed entry still looks fresh
    table = nat_table(snat)
    assert [table[k].last_seen_ns for k in keys] == [claimed, claimed]
    assert table[keys[0]].packets == 4 and table[keys[1]].packets == 1   # all counted


# -- a reply too big for the pod's link -------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("size, df, verdict", [
    (NARROW_MTU, True, "rnat_redirect_peer"),
    (NARROW_MTU + 1, True, "icmp_frag_needed"),
    (NARROW_MTU + 1, False, "pass_frag_needed"),
], ids=["fits", "too_big_df", "too_big_df_clear"])
def test_a_reply_too_big_for_the_pods_link(snat, route_ns, proto, size, df, verdict):
    """The pod's link is 1280 (route_ns's "narrow"), the underlay 1500. Too big with DF:
    the remote gets the frag-needed, from the node IP, mtu 1280, quoting its datagram as it
    sent it (to the node IP and NAT port: what its socket knows), out of the underlay device
    with the MACs swapped. DF clear: translated, to the stack, which fragments it."""
    l4 = TCP(sport=40000, dport=80, flags="A", seq=1, ack=1) if proto == "tcp" \
        else UDP(sport=40000, dport=53)
    _, port = _open_flow(snat, route_ns, l4)
    snat.maps.set_endpoint(SRC, route_ns.narrow, POD_MAC, HIN_MAC)   # the pod behind 1280
    reply = TCP(sport=80, dport=port, flags="A", seq=1, ack=41) if proto == "tcp" \
        else UDP(sport=53, dport=port)
    pkt = (Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01")
           / IP(src=EXT, dst=NODE_IP, ttl=60, flags="DF" if df else 0) / reply)
    pkt = pkt / (b"r" * (size - len(pkt[IP])))
    before = counters(snat)
    data, res = run_in(snat, route_ns, pkt)
    after = counters(snat)
    got = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert got == {verdict: 1}
    if verdict == "icmp_frag_needed":
        assert res.retval == TC_ACT_REDIRECT
        out = Ether(res.data_out)
        assert (out.src, out.dst) == ("02:00:00:00:00:01", ROUTER_MAC)
        assert (out[IP].src, out[IP].dst) == (NODE_IP, EXT)
        assert_valid_frag_needed(res.data_out, data, NARROW_MTU)   # quotes `data` as it came
        quoted = IP(bytes(out[ICMP].payload))
        assert (quoted.dst, quoted.payload.dport, quoted.ttl) == (NODE_IP, port, 60)
        ev = [e for e in snat.maps.read_trace_events() if e.reason == verdict][-1]
        assert ev.ifindex_out == route_ns.uplink
    else:
        assert res.retval == (TC_ACT_REDIRECT if verdict == "rnat_redirect_peer" else TC_ACT_OK)
        back = IP(ip_of(res.data_out))
        assert (back.dst, back.payload.dport, back.len) == (SRC, 40000, size)
        check_ip_and_l4(ip_of(res.data_out))


# -- ICMP errors about a translated flow -----------------------------------------------------

def _open_flow(dp, route_ns, l4) -> tuple[bytes, int]:
    """Send l4 out; return the translated IP packet as it left and its NAT port / id."""
    _, res = run_out(dp, route_ns, out_pkt(l4, payload=b"p" * 40))
    assert res.retval == TC_ACT_REDIRECT
    sent = ip_of(res.data_out)
    ip = IP(sent)
    return sent, (ip[ICMP].id if ICMP in ip else ip.payload.sport)


@pytest.mark.parametrize("case", ["tcp-frag-needed", "udp-port-unreachable",
                                  "icmp-time-exceeded", "tcp-quoted-8-bytes"])
def test_icmp_error_about_a_flow_is_translated_inner_header_included(snat, route_ns, case):
    if case.startswith("tcp"):
        sent, port = _open_flow(snat, route_ns, TCP(sport=40000, dport=80, flags="A"))
    elif case.startswith("udp"):
        sent, port = _open_flow(snat, route_ns, UDP(sport=40000, dport=53))
    else:
        sent, port = _open_flow(snat, route_ns, ICMP(type=8, id=0x4242, seq=9))
    icmp = {"tcp-frag-needed": ICMP(type=3, code=4, nexthopmtu=1280),
            "udp-port-unreachable": ICMP(type=3, code=3),
            "icmp-time-exceeded": ICMP(type=11, code=0),
            "tcp-quoted-8-bytes": ICMP(type=3, code=4, nexthopmtu=1280)}[case]
    quote = sent[:28] if case == "tcp-quoted-8-bytes" else sent    # RFC 792 minimum vs all
    err = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / IP(src=ROUTER, dst=NODE_IP) / icmp
    raw = bytes(err / quote)
    res = run_prog(snat.from_underlay.fd, raw, route_ns.name, route_ns.uplink)
    assert res.retval == TC_ACT_REDIRECT, counters(snat)
    out = ip_of(res.data_out)
    check_ip_and_l4(out)                                   # outer IPv4 + ICMP over everything
    outer = IP(out)
    assert outer.src == ROUTER and outer.dst == SRC
    assert outer[ICMP].type == icmp.type and outer[ICMP].code == icmp.code
    inner = out[28:]
    check_ip_and_l4(inner, quoted=True)                    # inner IPv4 (+ L4 when all there)
    assert inner[12:16] == bytes(map(int, SRC.split("."))) and inner[16:20] == sent[16:20]
    if case.startswith("icmp"):
        assert struct.unpack("!H", inner[24:26])[0] == 0x4242
    else:
        assert struct.unpack("!HH", inner[20:24]) == (40000, struct.unpack("!H", sent[22:24])[0])
    assert counters(snat)["rnat_icmp_error"] == 1


def test_icmp_error_about_an_unknown_flow_stays_with_the_node(snat, route_ns):
    inner = IP(src=NODE_IP, dst=EXT) / UDP(sport=PORT_MIN, dport=53)
    err = Ether() / IP(src=ROUTER, dst=NODE_IP) / ICMP(type=3, code=3) / bytes(inner)
    data, res = run_in(snat, route_ns, err)
    assert res.retval == TC_ACT_OK and res.data_out == data
    assert counters(snat) == {"pass_nat_miss": 1}


# -- the table from user space: flows and the expiry sweep -------------------------------------

def test_flows_pair_the_two_entries_and_name_the_tcp_state(snat, route_ns):
    from datapath import nat_table
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S")))
    port = Ether(res.data_out)[TCP].sport
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA")))
    (flow,) = nat_table.flows(snat.maps)
    assert (flow.protocol, flow.pod, flow.remote, flow.nat) == \
        ("tcp", f"{SRC}:40000", f"{EXT}:80", f"{NODE_IP}:{port}")
    assert flow.state == "established" and flow.complete
    assert (flow.packets_out, flow.packets_in) == (1, 1)
    assert 7490 < flow.expires_in_s <= 7500          # the established timeout
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="R")))
    (flow,) = nat_table.flows(snat.maps)
    assert flow.state == "reset" and flow.expires_in_s <= 10


def test_sweep_deletes_expired_flows_only(snat, route_ns):
    from datapath import nat_table
    run_out(snat, route_ns, out_pkt(UDP(sport=1001, dport=53)))
    run_out(snat, route_ns, out_pkt(TCP(sport=1002, dport=80, flags="S")))
    assert nat_table.sweep(snat.maps) == 0
    assert len(nat_table.flows(snat.maps)) == 2
    # both time out after 60 s idle: at 59 s nothing goes; past 60 s, with the SYN timeout
    # raised to 120 s meanwhile, only the UDP flow (both of its entries) does
    now = max(e.last_seen_ns for _, e in snat.maps.nat_entries())
    assert nat_table.sweep(snat.maps, now + 59 * 10**9) == 0
    set_nat(snat, nat_timeout_tcp_syn=120)
    late = now + 60 * 10**9 + nat_table.SWEEP_GRACE_NS + 10**9       # past expiry and grace
    assert nat_table.sweep(snat.maps, late) == 2          # both UDP entries
    assert [f.protocol for f in nat_table.flows(snat.maps)] == ["tcp"]


def test_another_nodes_host_namespace_is_closed_to_pods_unless_allowed(snat, route_ns):
    snat.maps.set_cluster_cidr("198.19.0.2/32", deny_from_pod=True)
    try:
        _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=22, flags="S"),
                                                 dst="198.19.0.2"))
        assert res.retval == TC_ACT_SHOT
        # the rest of the underlay and other nodes' pods stay reachable
        _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=22, flags="S"),
                                                 dst="198.18.2.20"))
        assert res.retval == TC_ACT_REDIRECT
        assert counters(snat) == {"drop_pod_to_node": 1, "redirect_neigh": 1}
    finally:
        snat.maps.set_cluster_cidr("198.19.0.2/32")


def test_an_entry_stamped_after_this_packet_read_the_clock_is_fresh(snat, route_ns):
    """Another CPU may refresh a flow between this packet's clock read and its lookup:
    a last-seen time in the future must not look 2^64 ns old (the flow would get a new
    port mid-stream and the remote would reset it)."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S")))
    port = Ether(res.data_out)[TCP].sport
    future = time.monotonic_ns() + 10**9
    for key, entry in snat.maps.nat_entries():
        snat.maps.nat_update(key, dataclasses.replace(entry, last_seen_ns=future))
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A")))
    assert Ether(res.data_out)[TCP].sport == port
    _, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="A")))
    assert res.retval == TC_ACT_REDIRECT


def age_flows(dp, seconds: float) -> None:
    """Move every entry's last packet `seconds` into the past."""
    for key, entry in dp.maps.nat_entries():
        dp.maps.nat_update(key, dataclasses.replace(
            entry, last_seen_ns=entry.last_seen_ns - int(seconds * 1e9)))


def _established_tcp_flow(dp, route_ns) -> tuple[int, list[st.NatKey]]:
    """A TCP flow of SRC:40000 to EXT:80 past its handshake: (NAT port, [OUT key, IN key])."""
    _, res = run_out(dp, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S")))
    port = Ether(res.data_out)[TCP].sport
    run_in(dp, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA")))
    return port, [st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out"),
                  st.NatKey(EXT, NODE_IP, 80, port, TCP_PROTO, "in")]


def test_a_busy_established_flow_stamps_its_entries_once_a_second(snat, route_ns):
    """An established flow's packets leave last_seen_ns alone while it is under a second
    old (nat_refresh_slack: no write to the entry's clock per packet), still count, and
    stamp it again once it is older."""
    port, keys = _established_tcp_flow(snat, route_ns)
    now = time.monotonic_ns()   # stamped anew: the six runs below take milliseconds of the 1 s
    for key, entry in snat.maps.nat_entries():
        snat.maps.nat_update(key, dataclasses.replace(entry, last_seen_ns=now))
    stamped = [now, now]
    for _ in range(3):
        run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A")))
        run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="A")))
    table = nat_table(snat)
    assert [table[k].last_seen_ns for k in keys] == stamped
    assert [table[k].packets for k in keys] == [4, 4]
    age_flows(snat, 1.5)
    aged = [nat_table(snat)[k].last_seen_ns for k in keys]
    before = time.monotonic_ns()
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A")))
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="A")))
    table = nat_table(snat)
    assert all(table[k].last_seen_ns >= before > seen for k, seen in zip(keys, aged))


def test_a_closing_flow_is_stamped_by_every_packet(snat, route_ns):
    """Once a FIN was seen, every packet stamps the entry: a port is taken again only
    after HR_NAT_REUSE_QUIET_NS of quiet since the flow's very last packet."""
    _, keys = _established_tcp_flow(snat, route_ns)
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="FA")))
    stamped = nat_table(snat)[keys[0]].last_seen_ns
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A")))
    assert nat_table(snat)[keys[0]].last_seen_ns > stamped


def _ended_flow_on_the_only_port(dp, route_ns):
    """Pod port 1001 to EXT:80 on NAT port 30000 (the only one), closed by FIN both ways;
    the pod's sequence numbers end at 102 (SYN at 1, 100 bytes, FIN)."""
    set_nat(dp, nat_port_min=30000, nat_port_max=30000)
    _, res = run_out(dp, route_ns, out_pkt(TCP(sport=1001, dport=80, flags="S", seq=1),
                                           payload=b""))
    assert Ether(res.data_out)[TCP].sport == 30000
    run_in(dp, route_ns, in_pkt(TCP(sport=80, dport=30000, flags="SA", seq=500, ack=2),
                                payload=b""))
    run_out(dp, route_ns, out_pkt(TCP(sport=1001, dport=80, flags="PA", seq=2, ack=501),
                                  payload=b"d" * 100))
    run_out(dp, route_ns, out_pkt(TCP(sport=1001, dport=80, flags="FA", seq=102, ack=501),
                                  payload=b""))
    run_in(dp, route_ns, in_pkt(TCP(sport=80, dport=30000, flags="FA", seq=501, ack=103),
                                payload=b""))
    out_key = st.NatKey(SRC, EXT, 1001, 80, TCP_PROTO, "out")
    assert nat_table(dp)[out_key].seq_end == 103
    assert nat_table(dp)[out_key].state & st.NAT_STATE_BITS["fin_in"]


def test_a_new_connection_may_take_the_port_of_one_that_ended(snat, route_ns):
    """As conntrack lets a SYN reuse a TIME_WAIT tuple: with one NAT port, a second
    connection waits for the first to end (RST, or FIN both ways), not for its timeout."""
    set_nat(snat, nat_port_min=30000, nat_port_max=30000)
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=1001, dport=80, flags="S", seq=1),
                                             payload=b""))
    assert Ether(res.data_out)[TCP].sport == 30000
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=30000, flags="SA", seq=500, ack=2),
                                  payload=b""))
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=1002, dport=80, flags="S", seq=9000)))
    assert res.retval == TC_ACT_SHOT                     # established: the port is taken
    run_out(snat, route_ns, out_pkt(TCP(sport=1001, dport=80, flags="FA", seq=2, ack=501),
                                    payload=b""))
    age_flows(snat, 3)
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=1002, dport=80, flags="S", seq=9000)))
    assert res.retval == TC_ACT_SHOT                     # half-closed: still taken
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=30000, flags="FA", seq=501, ack=3),
                                  payload=b""))
    age_flows(snat, 3)                                    # quiet since
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=1002, dport=80, flags="A", seq=9000)))
    assert res.retval == TC_ACT_SHOT                     # not a SYN: no reuse
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=1002, dport=80, flags="S", seq=9000)))
    assert res.retval == TC_ACT_REDIRECT and Ether(res.data_out)[TCP].sport == 30000
    assert {(k.dir, k.sport) for k in nat_table(snat)} == {("out", 1002), ("in", 80)}
    assert counters(snat)["drop_nat_exhausted"] == 3


@pytest.mark.parametrize("quiet_s, syn_seq, taken", [
    (0, 9000, False),          # the remote's last ACK may still be on its way
    (3, 50, False),            # the SYN starts below where the old flow ended (TIME_WAIT: RST)
    (3, 103, False),           # ... or exactly there
    (3, 104, True),
    (3, 103 + 2**31 + 1, False),   # "beyond" by more than half the sequence space is behind
])
def test_an_ended_flows_port_is_taken_only_after_a_quiet_time_and_beyond_its_sequence(
        snat, route_ns, quiet_s, syn_seq, taken):
    """nf_nat_used_tuple_harder + nf_seq_has_advanced: a stray last ACK of the old flow
    would reach the new pod (its RST then ends the new flow), and the remote's TIME_WAIT
    answers a SYN that does not start beyond the old flow with an RST or an ACK."""
    _ended_flow_on_the_only_port(snat, route_ns)
    age_flows(snat, quiet_s)
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=1002, dport=80, flags="S",
                                                 seq=syn_seq % 2**32), payload=b""))
    assert (res.retval == TC_ACT_REDIRECT) == taken
    in_entry = nat_table(snat)[st.NatKey(EXT, NODE_IP, 80, 30000, TCP_PROTO, "in")]
    assert in_entry.port == (1002 if taken else 1001)


def test_a_syn_ack_from_outside_clears_the_rst_and_fin_of_the_tuple(snat, route_ns):
    """The new flow of a taken-over port got an RST from its pod (answering the old flow's
    stray ACK): the remote's SYN-ACK reopens it, or it would live with the 10 s closing
    timeout and could itself be taken over while established."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=1),
                                             payload=b""))
    port = Ether(res.data_out)[TCP].sport
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="R", seq=77),
                                    payload=b""))
    bits = st.NAT_STATE_BITS
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    assert nat_table(snat)[out_key].state & bits["rst"]
    _, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA", seq=500, ack=2),
                                           payload=b""))
    assert res.retval == TC_ACT_REDIRECT
    for key in (out_key, st.NatKey(EXT, NODE_IP, 80, port, TCP_PROTO, "in")):
        assert nat_table(snat)[key].state == bits["seen_reply"]
    (flow,) = __import__("datapath.nat_table", fromlist=["flows"]).flows(snat.maps)
    assert flow.state == "established" and flow.expires_in_s > 3000


def test_ipv4_in_broadcast_or_multicast_frames_is_left_to_the_stack(snat, route_ns):
    """A redirect would drop such a frame unseen (the stack does not route it either):
    it goes to the stack, counted, whatever its IP destination."""
    for mac in ("ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"):
        pkt = out_pkt(UDP(sport=1, dport=2), dst="198.18.2.20")
        pkt[Ether].dst = mac
        data, res = run_out(snat, route_ns, pkt)
        assert res.retval == TC_ACT_OK and res.data_out == data
    assert counters(snat) == {"pass_l2_multicast": 2}


def test_an_evicted_forward_entry_is_restored_by_the_next_reply(snat, route_ns):
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S")))
    port = Ether(res.data_out)[TCP].sport
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    assert snat.maps.nat_delete(out_key)              # gone (a race with a delete)
    _, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA")))
    assert res.retval == TC_ACT_REDIRECT
    assert nat_table(snat)[out_key].port == port
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A")))
    assert Ether(res.data_out)[TCP].sport == port     # not a new port: no reset by the remote


@pytest.mark.parametrize("offset, believed", [(0, True), (5000, True), (2**30, False),
                                              (2**32 - 10, False)])
def test_an_rst_from_outside_changes_the_flow_only_near_the_expected_sequence(snat, route_ns,
                                                                             offset, believed):
    """A blind RST (a guessed sequence number) must not shorten a flow's life or free its
    port; the pod's own stack still sees it and judges it (RFC 5961)."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=1)))
    port = Ether(res.data_out)[TCP].sport
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA", seq=1000, ack=2)))
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A", seq=2, ack=1001)))
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    assert nat_table(snat)[out_key].seq_hint == 1001
    rst_seq = (1001 + offset) % 2**32
    _, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="R", seq=rst_seq),
                                           payload=b""))
    assert res.retval == TC_ACT_REDIRECT                    # delivered either way
    state = nat_table(snat)[out_key].state
    assert bool(state & st.NAT_STATE_BITS["rst"]) == believed


def test_batch_dump_sees_what_key_by_key_sees(snat, route_ns):
    from datapath import libbpf
    for sport in range(1000, 1300):
        run_out(snat, route_ns, out_pkt(UDP(sport=sport, dport=53)))
    fd = snat.maps.fd("nat")
    by_key = sorted(libbpf.map_items(fd, st.SIZEOF_NAT_KEY, st.SIZEOF_NAT_ENTRY))
    batched = sorted(libbpf.map_items_batch(fd, st.SIZEOF_NAT_KEY, st.SIZEOF_NAT_ENTRY, batch=64))
    assert len(by_key) == 600 and batched == by_key


@pytest.mark.parametrize("flags", ["R", "FA"])
@pytest.mark.parametrize("offset, believed", [(0, True), (5000, True), (2**30, False),
                                              (2**32 - 10, False)])
def test_a_fin_or_rst_from_outside_changes_the_flow_only_near_the_expected_sequence(
        snat, route_ns, flags, offset, believed):
    """A spoofed FIN, like a blind RST, must not shorten a flow's life (a half-closed flow
    would close, with the 10 s timeout, and its port could be taken)."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=1)))
    port = Ether(res.data_out)[TCP].sport
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA", seq=1000, ack=2)))
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="FA", seq=2, ack=1001),
                                    payload=b""))
    seq = (1001 + offset) % 2**32
    _, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags=flags, seq=seq,
                                               ack=3), payload=b""))
    assert res.retval == TC_ACT_REDIRECT                    # delivered either way
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    state = nat_table(snat)[out_key].state
    bit = st.NAT_STATE_BITS["rst" if flags == "R" else "fin_in"]
    assert bool(state & bit) == believed


@pytest.mark.parametrize("flags", ["R", "FA"])
def test_without_a_hint_after_a_reply_no_fin_or_rst_from_outside_is_believed(snat, route_ns,
                                                                            flags):
    """The OUT entry was put back by a reply (seq_hint 0): until the pod acknowledges again,
    a FIN or an RST with any sequence number must not close the flow."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=1)))
    port = Ether(res.data_out)[TCP].sport
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA", seq=1000, ack=2)))
    run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A", seq=2, ack=1001)))
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    assert snat.maps.nat_delete(out_key)              # gone (a race with a delete)
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="A", seq=1001, ack=2)))
    assert nat_table(snat)[out_key].seq_hint == 0      # put back, without a hint
    _, res = run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags=flags,
                                               seq=0x7777_0000, ack=2), payload=b""))
    assert res.retval == TC_ACT_REDIRECT
    assert nat_table(snat)[out_key].state == st.NAT_STATE_BITS["seen_reply"]


def test_an_rst_answering_the_syn_is_believed_only_if_it_acknowledges_it(snat, route_ns):
    """Before any reply the hint is 0: an RST that answers the pod's SYN acknowledges it
    (RFC 793); one with another ACK number is not believed."""
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=41),
                                             payload=b""))
    port = Ether(res.data_out)[TCP].sport
    out_key = st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="RA", seq=0, ack=9999),
                                  payload=b""))
    assert not nat_table(snat)[out_key].state & st.NAT_STATE_BITS["rst"]
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="RA", seq=0, ack=42),
                                  payload=b""))
    assert nat_table(snat)[out_key].state & st.NAT_STATE_BITS["rst"]


# -- flow integrity: a full table, and races between CPUs -------------------------------------

@pytest.fixture(scope="module")
def small_table_loaded():
    yield from loaded_datapath(nat_max_flows=4)


@pytest.fixture
def small_table(small_table_loaded, route_ns):
    set_nat(reset_datapath(small_table_loaded, route_ns))
    return small_table_loaded


@pytest.fixture(scope="module")
def raced_loaded():
    yield from loaded_datapath(cflags=["-DHR_TEST_RACES"])


@pytest.fixture
def raced(raced_loaded, route_ns):
    set_nat(reset_datapath(raced_loaded, route_ns))
    return raced_loaded


RACE_DIR = 0xee


def another_cpu_at(dp, point: int, entry: st.NatEntry) -> None:
    """At race point `point` of the next run, "another CPU" puts `entry` under the key the
    program is about to use (nat.h, HR_TEST_RACES)."""
    k = st.ffi.new("struct hr_nat_key *")
    k.dir, k.dport = RACE_DIR, point
    libbpf.map_update(dp.maps.fd("nat"), bytes(st.ffi.buffer(k)), st.pack_nat_entry(entry))


def race_entry_left(dp, point: int) -> bool:
    k = st.ffi.new("struct hr_nat_key *")
    k.dir, k.dport = RACE_DIR, point
    return libbpf.map_lookup(dp.maps.fd("nat"), bytes(st.ffi.buffer(k)),
                             st.SIZEOF_NAT_ENTRY) is not None


def test_a_full_table_refuses_new_flows_and_never_splits_a_live_one(small_table, route_ns):
    """Table of 4 flows: the 5th is a counted drop; no entry of the 4 is evicted, so each
    keeps its port and its replies reach its own pod (an LRU evicted one entry of a flow,
    and its port went to the next flow while replies were on their way)."""
    dp = small_table
    assert dp.maps.nat_capacity() == 8
    ports = {}
    for sport in range(1001, 1005):
        _, res = run_out(dp, route_ns, out_pkt(UDP(sport=sport, dport=53)))
        assert res.retval == TC_ACT_REDIRECT
        ports[sport] = Ether(res.data_out)[UDP].sport
    before = nat_table(dp)
    for sport in (1005, 1006):
        _, res = run_out(dp, route_ns, out_pkt(UDP(sport=sport, dport=53)))
        assert res.retval == TC_ACT_SHOT
    assert counters(dp)["drop_nat_table_full"] == 2
    assert nat_table(dp).keys() == before.keys()
    for sport, port in ports.items():
        _, res = run_out(dp, route_ns, out_pkt(UDP(sport=sport, dport=53)))
        assert Ether(res.data_out)[UDP].sport == port
        _, res = run_in(dp, route_ns, in_pkt(UDP(sport=53, dport=port)))
        assert res.retval == TC_ACT_REDIRECT and Ether(res.data_out)[UDP].dport == sport
    # an expired flow swept frees room for a new one
    from datapath import nat_table as nt
    now = max(e.last_seen_ns for _, e in dp.maps.nat_entries())
    out_key = st.NatKey(SRC, EXT, 1001, 53, UDP_PROTO, "out")
    in_key = st.NatKey(EXT, NODE_IP, 53, ports[1001], UDP_PROTO, "in")
    for key in (out_key, in_key):
        dp.maps.nat_update(key, dataclasses.replace(dp.maps.nat_lookup(key),
                                                    last_seen_ns=now - 100 * 10**9))
    assert nt.sweep(dp.maps, now) == 2
    _, res = run_out(dp, route_ns, out_pkt(UDP(sport=1005, dport=53)))
    assert res.retval == TC_ACT_REDIRECT


def test_a_full_table_gives_the_claimed_port_back_when_the_out_entry_does_not_fit(small_table,
                                                                                  route_ns):
    """7 of 8 entries used: a new flow's IN entry fits, its OUT entry does not; the IN entry
    goes again (no half flow left to point a port at a pod)."""
    dp = small_table
    for sport in range(1001, 1004):
        run_out(dp, route_ns, out_pkt(UDP(sport=sport, dport=53)))
    run_out(dp, route_ns, out_pkt(UDP(sport=1004, dport=53)))
    dp.maps.nat_delete(st.NatKey(SRC, EXT, 1004, 53, UDP_PROTO, "out"))
    in_keys = {k for k in nat_table(dp) if k.dir == "in"}
    assert len(nat_table(dp)) == 7
    _, res = run_out(dp, route_ns, out_pkt(UDP(sport=1005, dport=53), dst="203.0.113.20"))
    assert res.retval == TC_ACT_SHOT
    assert counters(dp)["drop_nat_table_full"] == 1
    assert {k for k in nat_table(dp) if k.dir == "in"} == in_keys


def test_two_cpus_putting_back_the_same_in_entry_keep_the_flows_port(raced, route_ns):
    """CPU A finds the IN entry missing and puts it back; CPU B did the same a moment
    before, so A's insert fails with EEXIST: A must use B's entry (it points back), not
    delete the flow and move it to a new port mid-stream (the remote resets it)."""
    _, res = run_out(raced, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=1)))
    port = Ether(res.data_out)[TCP].sport
    in_key = st.NatKey(EXT, NODE_IP, 80, port, TCP_PROTO, "in")
    in_entry = raced.maps.nat_lookup(in_key)
    assert raced.maps.nat_delete(in_key)
    another_cpu_at(raced, 1, dataclasses.replace(in_entry, last_seen_ns=time.monotonic_ns()))
    _, res = run_out(raced, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="A", seq=2)))
    assert not race_entry_left(raced, 1)                   # the race did happen
    assert res.retval == TC_ACT_REDIRECT and Ether(res.data_out)[TCP].sport == port
    table = nat_table(raced)
    assert table[in_key] == entry_to(SRC, 40000)
    assert table[st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out")] == entry_to(NODE_IP, port)
    assert len(table) == 2


def test_a_port_taken_over_by_another_cpu_meanwhile_is_not_deleted(raced, route_ns):
    """CPU A judges the flow on the only port expired; before A deletes it, CPU B took the
    port over for another pod's new flow. A must not delete B's fresh entry (B's replies
    would then go to A's pod): deletes happen only after a compare-and-swap claim."""
    set_nat(raced, nat_port_min=30000, nat_port_max=30000)
    run_out(raced, route_ns, out_pkt(UDP(sport=1001, dport=53)))
    age_flows(raced, 100)                                   # expired (60 s)
    in_key = st.NatKey(EXT, NODE_IP, 53, 30000, UDP_PROTO, "in")
    now = time.monotonic_ns()
    b_flow = st.NatEntry(created_ns=now, last_seen_ns=now, packets=0, bytes=0,
                         addr="198.18.1.11", port=2002, state=0)
    another_cpu_at(raced, 2, b_flow)
    _, res = run_out(raced, route_ns, out_pkt(UDP(sport=1002, dport=53)))
    assert not race_entry_left(raced, 2)
    assert res.retval == TC_ACT_SHOT                        # no port left for A
    assert raced.maps.nat_lookup(in_key) == entry_to("198.18.1.11", 2002)
    # B's reply goes to B's pod, never to A's
    raced.maps.set_endpoint("198.18.1.11", route_ns.hin, POD_MAC, HIN_MAC)
    _, res = run_in(raced, route_ns, in_pkt(UDP(sport=53, dport=30000)))
    assert res.retval == TC_ACT_REDIRECT
    assert (Ether(res.data_out)[IP].dst, Ether(res.data_out)[UDP].dport) == ("198.18.1.11", 2002)


def test_the_sweep_skips_flows_just_past_their_expiry(snat, route_ns):
    """The datapath may be taking over a flow that has just expired: the sweep leaves
    entries alone for a grace period past expiry, so that its delete by key does not hit
    the fresh entry of the flow that took the port."""
    from datapath import nat_table as nt
    run_out(snat, route_ns, out_pkt(UDP(sport=1001, dport=53)))
    now = max(e.last_seen_ns for _, e in snat.maps.nat_entries())
    assert nt.sweep(snat.maps, now + 60 * 10**9 + 10**9 // 2) == 0     # 0.5 s past expiry
    assert nt.sweep(snat.maps, now + 65 * 10**9) == 2


# -- ICMP errors: what a flow's life and the quoted bytes must not be affected by --------------

def test_an_icmp_error_does_not_keep_a_flow_alive(snat, route_ns):
    sent, port = _open_flow(snat, route_ns, UDP(sport=40000, dport=53))
    age_flows(snat, 30)
    before = {k: e.last_seen_ns for k, e in snat.maps.nat_entries()}
    err = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / IP(src=ROUTER, dst=NODE_IP) / \
        ICMP(type=3, code=1)
    res = run_prog(snat.from_underlay.fd, bytes(err / sent), route_ns.name, route_ns.uplink)
    assert res.retval == TC_ACT_REDIRECT
    assert {k: e.last_seen_ns for k, e in snat.maps.nat_entries()} == before


def test_an_icmp_error_followed_by_a_trailer_keeps_the_trailer_and_a_valid_checksum(snat,
                                                                                   route_ns):
    """The quote is the IPv4 header plus 8 bytes of TCP (no checksum field in it), then
    Ethernet padding: nothing may be written past the IPv4 total length, and the ICMP
    checksum must cover what is there (else the pod drops the error: a PMTU black hole)."""
    sent, port = _open_flow(snat, route_ns, TCP(sport=40000, dport=80, flags="A"))
    err = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / IP(src=ROUTER, dst=NODE_IP) / \
        ICMP(type=3, code=4, nexthopmtu=1280)
    trailer = bytes(range(0x40, 0x40 + 24))
    raw = bytes(err / sent[:28]) + trailer
    res = run_prog(snat.from_underlay.fd, raw, route_ns.name, route_ns.uplink)
    assert res.retval == TC_ACT_REDIRECT
    out = ip_of(res.data_out)
    total = struct.unpack("!H", out[2:4])[0]
    assert total == 20 + 8 + 28 and out[total:] == trailer
    check_ip_and_l4(out[:total])
    assert struct.unpack("!H", out[48:50])[0] == 40000


def test_a_fragment_from_outside_to_a_pod_is_dropped_like_any_packet(snat, route_ns):
    """Only replies reach pods from outside: a fragment must not slip past the check."""
    frag = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / \
        IP(src=EXT, dst=SRC, flags="MF") / UDP(sport=53, dport=40000) / (b"x" * 64)
    later = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / IP(src=EXT, dst=SRC, frag=8) / \
        (b"y" * 64)
    for pkt in (frag, later):
        _, res = run_in(snat, route_ns, pkt)
        assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"drop_not_from_cluster": 2}
    # from inside the cluster, fragments still go to the stack (which reassembles them)
    inside = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / \
        IP(src="198.18.2.20", dst=SRC, flags="MF") / UDP() / (b"x" * 64)
    _, res = run_in(snat, route_ns, inside)
    assert res.retval == TC_ACT_OK


@pytest.mark.parametrize("case", ["udp-port-unreachable", "tcp-quoted-8-bytes", "udp-no-checksum"])
def test_an_icmp_error_of_the_pods_about_a_flow_is_translated_through_it(snat, route_ns, case):
    """The pod answers a remote's datagram with port unreachable (or quotes a TCP segment):
    the error leaves from the node IP, quoting the datagram as the remote sent it (to the
    node IP and NAT port), every checksum right; it was dropped as unsupported."""
    l4 = TCP(sport=40000, dport=80, flags="A") if case.startswith("tcp") \
        else UDP(sport=40000, dport=53)
    _, port = _open_flow(snat, route_ns, l4)
    back = TCP(sport=80, dport=40000, flags="A") if case.startswith("tcp") \
        else UDP(sport=53, dport=40000)
    quoted = bytes(IP(src=EXT, dst=SRC, ttl=50) / back / (b"q" * 40))
    if case == "udp-no-checksum":
        quoted = quoted[:26] + b"\0\0" + quoted[28:]
    if case == "tcp-quoted-8-bytes":
        quoted = quoted[:28]
    err = out_pkt(ICMP(type=3, code=3), payload=b"") / quoted
    _, res = run_out(snat, route_ns, err)
    assert res.retval == TC_ACT_REDIRECT, counters(snat)
    out = ip_of(res.data_out)
    check_ip_and_l4(out)                                   # outer IPv4 + ICMP over everything
    outer = IP(out)
    assert outer.src == NODE_IP and outer.dst == EXT and outer[ICMP].type == 3
    inner = out[28:]
    check_ip_and_l4(inner, quoted=True)
    assert inner[12:16] == bytes(map(int, EXT.split("."))) and \
        inner[16:20] == bytes(map(int, NODE_IP.split(".")))
    assert struct.unpack("!HH", inner[20:24]) == (back.sport, port)
    if case == "udp-no-checksum":
        assert inner[26:28] == b"\0\0"
    assert counters(snat) == {"snat_redirect_neigh": 2}


def test_an_icmp_error_of_the_pods_about_no_flow_is_still_dropped(snat, route_ns):
    quoted = bytes(IP(src=EXT, dst=SRC) / UDP(sport=53, dport=40999) / b"x")
    _, res = run_out(snat, route_ns, out_pkt(ICMP(type=3, code=3), payload=b"") / quoted)
    assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"drop_nat_unsupported": 1}


def test_an_idle_established_flow_outlives_tcp_keepalive(snat, route_ns):
    """Linux sends its first keepalive after 7200 s idle (tcp_keepalive_time): the NAT
    flow must still be there, or the probe leaves from a new port and the remote resets
    the connection. The default established timeout is 2 h 5 min, in the datapath's
    defaults and in the topology's."""
    from netns_lab.topology import NatSettings
    assert st.NAT_CONFIG_DEFAULTS["nat_timeout_tcp_established"] >= 7500
    assert NatSettings().timeout_tcp_established >= 7500
    snat.maps.set_config(ROUTER_IP, trace=True, node_ip=NODE_IP,
                         nat={"nat_port_min": PORT_MIN, "nat_port_max": PORT_MAX})
    _, res = run_out(snat, route_ns, out_pkt(TCP(sport=40000, dport=80, flags="S", seq=1)))
    port = Ether(res.data_out)[TCP].sport
    run_in(snat, route_ns, in_pkt(TCP(sport=80, dport=port, flags="SA", seq=500, ack=2)))
    from datapath import nat_table as nt
    (flow,) = nt.flows(snat.maps)
    assert flow.state == "established" and flow.expires_in_s > 7200 + 60
    # (the monotonic clock of a freshly booted VM cannot be set 2 h back: the datapath's
    # side of the same rule, idle <= timeout, is what the sweep and flows() mirror)
    assert nt.alive(snat.maps.config(), st.NatKey(SRC, EXT, 40000, 80, TCP_PROTO, "out"),
                    dataclasses.replace(snat.maps.nat_entries()[0][1], last_seen_ns=0,
                                        state=st.NAT_STATE_BITS["seen_reply"]),
                    None, (7200 + 60) * 10**9)


# -- fragments through SNAT (issue 17, frag.h) --------------------------------------------------

def fragments(ip_pkt, eth_src=POD_MAC, eth_dst=HIN_MAC, size=1480):
    """The frames a sender with a 1500-byte MTU sends for one datagram (3 for 4,000 bytes)."""
    return [Ether(src=eth_src, dst=eth_dst) / f for f in fragment(ip_pkt, fragsize=size)]


def reassemble(frames: list[bytes]) -> bytes:
    """The IPv4 datagram (header of the first fragment, no MF) the fragments make up."""
    parts = {}
    for f in frames:
        ip = f[14:]
        ihl = (ip[0] & 0xf) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        parts[(struct.unpack("!H", ip[6:8])[0] & 0x1fff) * 8] = (ip[:ihl], ip[ihl:total])
    data, hdr = b"", parts[0][0]
    for off in sorted(parts):
        assert off == len(data), "a hole between fragments"
        data += parts[off][1]
    hdr = bytearray(hdr)
    hdr[2:4] = struct.pack("!H", len(hdr) + len(data))
    hdr[6:8] = b"\0\0"
    return bytes(hdr) + data


def check_datagram(ip_bytes: bytes) -> None:
    """The L4 checksum of a reassembled datagram (its header checksum is not the wire's)."""
    hdr = bytearray(ip_bytes[:20])
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", 0xffff - ones_sum(bytes(hdr)))
    check_ip_and_l4(bytes(hdr) + ip_bytes[20:])


def frag_records(dp) -> list[bytes]:
    return list(libbpf.map_keys(dp.maps.fd("nat_frags"), SIZEOF_FRAG_KEY))


@pytest.mark.parametrize("proto", ["udp", "icmp"])
def test_a_fragmented_datagram_leaves_from_the_node_ip_and_a_fragmented_reply_comes_back(
        snat, route_ns, proto):
    """4,000 bytes in 3 fragments each way: the first is translated by its L4 header, the
    others by the fragment map; every fragment is redirected (none dropped, none to the stack,
    where the node would reassemble it for itself), and the datagrams stay whole and valid."""
    payload = bytes(range(256)) * 15 + b"z" * 160                      # 4,000 bytes
    l4 = UDP(sport=40000, dport=5353) if proto == "udp" else ICMP(type=8, id=0x1234, seq=3)
    frames = fragments(IP(src=SRC, dst=EXT, id=0x4242) / l4 / payload)
    assert len(frames) == 3
    outs = []
    for f in frames:
        data, res = run_out(snat, route_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters(snat)
        ip = ip_of(res.data_out)
        assert ones_sum(ip[:20]) == 0xffff, "IPv4 header checksum"
        assert ip[12:16] == bytes(map(int, NODE_IP.split("."))) and ip[22 - 14] == 63
        # a later fragment: only its IPv4 header changes; the first: its L4 header too
        skip = 8 if f is frames[0] else 0
        assert ip[20 + skip:] == data[34 + skip:]
        outs.append(res.data_out)
    dgram = IP(reassemble(outs))
    check_datagram(reassemble(outs))
    nat_port = dgram[UDP].sport if proto == "udp" else dgram[ICMP].id
    assert PORT_MIN <= nat_port <= PORT_MAX and dgram.src == NODE_IP and dgram.id == 0x4242
    assert bytes(dgram[IP].payload.payload) == payload
    assert counters(snat) == {"snat_fragment": 3}
    assert len(frag_records(snat)) == 1

    reply_l4 = UDP(sport=5353, dport=nat_port) if proto == "udp" else ICMP(type=0, id=nat_port,
                                                                          seq=3)
    back = []
    for f in fragments(IP(src=EXT, dst=NODE_IP, id=0x5151) / reply_l4 / payload[::-1],
                       eth_src=ROUTER_MAC, eth_dst="02:00:00:00:00:01"):
        _, res = run_in(snat, route_ns, f)
        assert res.retval == TC_ACT_REDIRECT, counters(snat)
        assert Ether(res.data_out).dst == POD_MAC and ones_sum(ip_of(res.data_out)[:20]) == 0xffff
        back.append(res.data_out)
    dgram = IP(reassemble(back))
    check_datagram(reassemble(back))
    assert dgram.src == EXT and dgram.dst == SRC
    if proto == "udp":
        assert (dgram[UDP].sport, dgram[UDP].dport) == (5353, 40000)
    else:
        assert (dgram[ICMP].type, dgram[ICMP].id) == (0, 0x1234)
    assert bytes(dgram[IP].payload.payload) == payload[::-1]
    assert counters(snat) == {"snat_fragment": 3, "rnat_fragment": 3}
    assert len(frag_records(snat)) == 2
    entry = nat_table(snat)[st.NatKey(EXT, NODE_IP, l4.dport if proto == "udp" else 0, nat_port,
                                      UDP_PROTO if proto == "udp" else ICMP_PROTO, "in")]
    assert entry.packets == 3 and entry.state & st.NAT_STATE_BITS["seen_reply"]


def test_a_later_fragment_whose_first_was_not_seen_is_counted(snat, route_ns):
    """Out: it cannot leave with the pod's address, nor be NATed: dropped and counted. In: it
    may be the node's own datagram, so it goes to the stack untouched, and is counted."""
    first, middle, last = fragments(IP(src=SRC, dst=EXT, id=7) / UDP(sport=40000, dport=53) /
                                    (b"a" * 4000))
    for f in (middle, last):
        _, res = run_out(snat, route_ns, f)
        assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"drop_frag_untracked": 2}
    # the first fragment opens the flow; a later datagram with another id is still unknown
    _, res = run_out(snat, route_ns, first)
    assert res.retval == TC_ACT_REDIRECT
    other = fragments(IP(src=SRC, dst=EXT, id=8) / UDP(sport=40000, dport=53) / (b"b" * 4000))
    _, res = run_out(snat, route_ns, other[1])
    assert res.retval == TC_ACT_SHOT
    flow_port = [k.dport for k in nat_table(snat) if k.dir == "in"][0]
    inbound = fragments(IP(src=EXT, dst=NODE_IP, id=9) / UDP(sport=53, dport=flow_port) /
                        (b"c" * 4000), eth_src=ROUTER_MAC, eth_dst="02:00:00:00:00:01")
    data, res = run_in(snat, route_ns, inbound[2])
    assert res.retval == TC_ACT_OK and res.data_out == bytes(inbound[2])
    assert counters(snat) == {"drop_frag_untracked": 3, "snat_fragment": 1,
                              "pass_frag_untracked": 1}


def test_a_fragment_record_older_than_the_reassembly_timeout_is_not_used(snat, route_ns):
    """A datagram reusing an old IP id must not go by the ports an older one recorded."""
    first, middle, _ = fragments(IP(src=SRC, dst=EXT, id=77) / UDP(sport=40000, dport=53) /
                                 (b"a" * 4000))
    _, res = run_out(snat, route_ns, first)
    assert res.retval == TC_ACT_REDIRECT
    (key,) = frag_records(snat)
    raw = bytearray(libbpf.map_lookup(snat.maps.fd("nat_frags"), key, SIZEOF_FRAG_ENTRY))
    raw[0:8] = (1).to_bytes(8, "little")            # recorded at boot: long past 30 s
    libbpf.map_update(snat.maps.fd("nat_frags"), key, bytes(raw))
    _, res = run_out(snat, route_ns, middle)
    assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"snat_fragment": 1, "drop_frag_untracked": 1}


def test_a_fragment_of_an_unknown_flow_to_the_node_ip_stays_with_the_node(snat, route_ns):
    """The node's own fragmented datagrams: the first is a NAT miss, the rest untracked."""
    frames = fragments(IP(src=EXT, dst=NODE_IP, id=5) / UDP(sport=53, dport=33333) / (b"d" * 4000),
                       eth_src=ROUTER_MAC, eth_dst="02:00:00:00:00:01")
    for f in frames:
        _, res = run_in(snat, route_ns, f)
        assert res.retval == TC_ACT_OK and res.data_out == bytes(f)
    assert counters(snat) == {"pass_nat_miss": 1, "pass_frag_untracked": 2}
    assert frag_records(snat) == [] and nat_table(snat) == {}


# -- the IPv4 header checksum (issue 17: the fuzzer's finding) ----------------------------------

def with_bad_checksum(frame, word: int = 0) -> bytes:
    """The frame with its IPv4 header checksum wrong (a bit flipped in header word `word`)."""
    raw = bytearray(bytes(frame))
    raw[14 + 4 * word + 1] ^= 0x01 if word != 2 else 0    # word 2 holds TTL, proto, checksum
    if word == 2:
        raw[14 + 10] ^= 0x01
    return bytes(raw)


@pytest.mark.parametrize("options", [[], [IPOption_NOP()] * 4, [IPOption_RR()]])
def test_a_bad_ipv4_header_checksum_is_dropped_before_routing_in_both_programs(snat, route_ns,
                                                                               options):
    """As ip_rcv() would: a corrupt header is neither routed, nor NATed, nor delivered."""
    out = Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=SRC, dst=EXT, options=options) / \
        UDP(sport=40000, dport=53) / b"hello"
    ihl_words = bytes(out[IP])[0] & 0xf
    words = sorted({0, 2, 4, ihl_words - 1})         # first, checksum, address, last option word
    for word in words:
        _, res = run_out(snat, route_ns, with_bad_checksum(out, word))
        assert res.retval == TC_ACT_SHOT, word
    assert counters(snat) == {"drop_bad_checksum": len(words)}
    assert nat_table(snat) == {}
    _, res = run_out(snat, route_ns, out)             # the same, intact: NATed and routed
    assert res.retval == TC_ACT_REDIRECT
    nat_port = Ether(res.data_out)[UDP].sport

    reply = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / \
        IP(src=EXT, dst=NODE_IP, options=options) / UDP(sport=53, dport=nat_port) / b"world"
    for word in words:
        _, res = run_in(snat, route_ns, with_bad_checksum(reply, word))
        assert res.retval == TC_ACT_SHOT, word
    _, res = run_in(snat, route_ns, reply)
    assert res.retval == TC_ACT_REDIRECT
    assert counters(snat) == {"drop_bad_checksum": 2 * len(words), "snat_redirect_neigh": 1,
                              "rnat_redirect_peer": 1}


def test_a_bad_header_checksum_is_dropped_inside_the_cluster_too(snat, route_ns):
    """Pod to pod and node to pod (no NAT involved): the same check comes first."""
    add_local_pod(snat)
    to_pod = Ether(src=POD_MAC, dst=HIN_MAC) / IP(src=SRC, dst=LOCAL_DST) / UDP() / b"x"
    from_other_node = Ether(src=ROUTER_MAC, dst="02:00:00:00:00:01") / \
        IP(src="198.18.2.20", dst=LOCAL_DST) / UDP() / b"x"
    _, res = run_out(snat, route_ns, with_bad_checksum(to_pod))
    assert res.retval == TC_ACT_SHOT
    _, res = run_in(snat, route_ns, with_bad_checksum(from_other_node))
    assert res.retval == TC_ACT_SHOT
    assert counters(snat) == {"drop_bad_checksum": 2}
    for run, pkt in ((run_out, to_pod), (run_in, from_other_node)):
        _, res = run(snat, route_ns, pkt)
        assert res.retval == TC_ACT_REDIRECT
