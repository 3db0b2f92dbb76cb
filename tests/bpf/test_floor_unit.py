"""The bench's mechanism floor (bpf_c/redirect_floor.c) under BPF_PROG_TEST_RUN.

What each build redirects and what it leaves to the node, and that a bulk skb (GSO, several
segments), which floor_peer un-clones before the peer redirect as the datapath does, leaves
with the same verdict and bytes as a single one. The floor carrying real traffic in a lab:
tests/lab/test_bench_floor.py.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Ether

from datapath import bpf_build
from datapath.bench.floor import SOURCE
from tests.bpf.harness import BPF_FUNC_SKB_CHANGE_HEAD, helper_calls, run_prog
from tests.bpf.packets import LOCAL_DST, TC_ACT_OK, TC_ACT_REDIRECT, pod_packet
from tests.bpf.packets6 import LOCAL_DST6, pod6_packet

TARGET = 7       # the constant target ifindex; test_run never performs the redirect
BULK = b"b" * 2 * 1448


@pytest.fixture(scope="module", params=[4, 6], ids=["ipv4", "ipv6"])
def floor(request):
    """(family, the compiled module, {program name: fd}) of a floor build."""
    family = request.param
    module = bpf_build.compile_bpf(SOURCE, [f"-DFLOOR_IFINDEX={TARGET}",
                                            *(["-DFLOOR_IPV6"] if family == 6 else [])])
    try:
        yield family, module, {name: bpf_build.load_program(module, name)
                               for name in ("floor_peer", "floor_neigh")}
    finally:
        module.cleanup()


def _verdicts(progs, pkt, route_ns):
    return {name: run_prog(fd, bytes(pkt), route_ns.name, route_ns.hin)
            for name, fd in progs.items()}


def test_the_floor_redirects_its_family_and_leaves_the_rest_to_the_node(floor, route_ns):
    family, _, progs = floor
    v4, v6 = pod_packet(LOCAL_DST), pod6_packet(LOCAL_DST6)
    echo6 = Ether() / IPv6(dst=LOCAL_DST6) / ICMPv6EchoRequest()
    taken, left = ([v4], [v6, echo6]) if family == 4 else ([v6, echo6], [v4])
    left += [Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=LOCAL_DST),
             Ether() / IPv6(dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt=LOCAL_DST6)]
    for verdict, pkts in ((TC_ACT_REDIRECT, taken), (TC_ACT_OK, left)):
        for pkt in pkts:
            for name, res in _verdicts(progs, pkt, route_ns).items():
                assert (res.retval, res.data_out) == (verdict, bytes(pkt)), (name, pkt.summary())


def test_a_bulk_skb_leaves_the_floor_as_a_single_one_does(floor, route_ns):
    """floor_peer un-clones a skb of several segments (bpf_skb_change_head with no room, the
    one call of that helper; floor_neigh hands bulk skbs to a device, not a socket, and makes
    none). Whether a skb was a clone test_run cannot show (docs/benchmarks.md has the
    counters): the verdict and the bytes stay those of the skb alone."""
    family, module, progs = floor
    assert BPF_FUNC_SKB_CHANGE_HEAD in helper_calls(module, "floor_peer")
    assert BPF_FUNC_SKB_CHANGE_HEAD not in helper_calls(module, "floor_neigh")
    pkt = pod_packet(LOCAL_DST, payload=BULK) if family == 4 else pod6_packet(LOCAL_DST6,
                                                                               payload=BULK)
    data = bytes(pkt)
    for name, fd in progs.items():
        single = run_prog(fd, data, route_ns.name, route_ns.hin)
        bulk = run_prog(fd, data, route_ns.name, route_ns.hin, gso_size=1448, gso_segs=2)
        assert (bulk.retval, bulk.data_out) == (single.retval, single.data_out), name
        assert bulk.retval == TC_ACT_REDIRECT and bulk.data_out == data, name
