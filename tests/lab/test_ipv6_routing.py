"""eBPF host routing of IPv6 with real packets, in one dual-stack lab (issue 12): it carries pod
traffic with the kernel's IPv6 routing switched off, and takes the BPF path.

As tests/lab/test_ebpf_routing.py for IPv4: connectivity alone proves little, so the
kernel's IPv6 forwarding is blocked every way (ip6tables FORWARD DROP in both backends, an
nft inet drop chain, net.ipv6.conf.all.forwarding 0), conntrack must see no pod flow, and a
drop-everything checker sits where only the slow path passes. Each block is first shown to
stop legacy routing (the control). One lab serves the module; each test leaves it in
legacy mode without blocks.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from datapath import switch, tc_attach
from datapath.bpf_build import compile_bpf, load_program
from datapath.converge import progs6_pin
from datapath.host_routing import DatapathMaps
from netns_lab import netns
from netns_lab.state import load_state
from tests.bpf.harness import wait_for
from tests.labtools import (assert_ping, conntrack_entries, echo_request, echo_server, ping,
                            wait_port)

pytestmark = pytest.mark.slow     # every test here builds a lab

DROP_ALL = r"""
#include <uapi/linux/pkt_cls.h>
int drop_all(struct __sk_buff *skb) { return TC_ACT_SHOT; }
"""


@pytest.fixture(scope="module")
def lab(make_module_lab):
    _, topo = make_module_lab("legacy", ip_family="dual")
    return topo


@pytest.fixture(scope="module")
def drop_all():
    checker = compile_bpf("drop_all.c", text=DROP_ALL)
    try:
        yield load_program(checker, "drop_all")
    finally:
        checker.cleanup()


def ipv6_counters(topo) -> dict[str, dict[str, int]]:
    """{node: {reason: packets}} of the verdicts counted under the family ipv6."""
    stats = switch.stats(load_state(topo.lab), topo)
    return {n["name"]: {k: v["packets"] for k, v in n["counters_by_family"]["ipv6"].items()}
            for n in stats["nodes"]}


def progs6_ids(topo, node) -> list[int]:
    """The IPv6 programs in the node's progs6 (through its attached from_underlay)."""
    prog = next(a.prog_id for a in tc_attach.attached(node.netns, topo.uplink_ifname))
    with DatapathMaps.from_prog_id(prog) as maps:
        return maps.progs6_ids()


def pods(topo):
    (a1, a2), (b1, _) = topo.nodes[0].pods, topo.nodes[1].pods
    return a1, a2, b1


@contextlib.contextmanager
def kernel_ipv6_routing_off(topo):
    """FORWARD DROP in ip6tables (nft and legacy backends), an nft inet chain dropping what
    is forwarded, IPv6 forwarding off in every node; all undone after the block."""
    for node in topo.nodes:
        for tool in ("ip6tables-nft", "ip6tables-legacy"):
            netns.run(node.netns, [tool, "-P", "FORWARD", "DROP"])
        netns.run(node.netns, ["nft", "add table inet hr6test; add chain inet hr6test forward_drop "
                               "{ type filter hook forward priority 0; policy drop; }"])
        netns.sysctl(node.netns, {"net.ipv6.conf.all.forwarding": 0})
    try:
        yield
    finally:
        for node in topo.nodes:
            for tool in ("ip6tables-nft", "ip6tables-legacy"):
                netns.run(node.netns, [tool, "-P", "FORWARD", "ACCEPT"])
            netns.run(node.netns, ["nft", "delete table inet hr6test"])
            netns.sysctl(node.netns, {"net.ipv6.conf.all.forwarding": 1})


def kernel_ipv6_routing_still_off(topo) -> bool:
    return all(":FORWARD DROP " in netns.run(node.netns, [tool]).stdout
               for node in topo.nodes for tool in ("ip6tables-nft-save", "ip6tables-legacy-save")) \
        and all("policy drop" in netns.run(node.netns, ["nft", "list", "table", "inet",
                                                        "hr6test"]).stdout
                and netns.read_sysctl(node.netns, "net.ipv6.conf.all.forwarding") == "0"
                for node in topo.nodes)


@contextlib.contextmanager
def checker_on(topo, pod, fd):
    """The drop-all program at egress of the pod's host-side veth, which only the stack's
    forwarding path crosses (a peer redirect goes straight into the pod's eth0)."""
    node = next(n for n in topo.nodes if pod in n.pods)
    tc_attach.attach(node.netns, pod.host_ifname, fd, "drop_all", "egress")
    try:
        yield
    finally:
        tc_attach.detach(node.netns, pod.host_ifname, "egress")


def test_the_blocks_and_the_checker_stop_legacy_ipv6(lab, drop_all):
    """The control: each block, and the checker, stops legacy IPv6 between pods."""
    a1, a2, b1 = pods(lab)
    for dst in (a2, b1):
        assert_ping(a1.netns, dst.ip6)
        with checker_on(lab, dst, drop_all):
            assert ping(a1.netns, dst.ip6, timeout=1).returncode != 0, \
                f"legacy passed {dst.name}'s checker"
    assert_ping(a1.netns, lab.external.ip6)     # masqueraded by ip6tables
    with kernel_ipv6_routing_off(lab):
        for dst in (a2.ip6, b1.ip6, lab.external.ip6):
            assert ping(a1.netns, dst, timeout=1).returncode != 0, dst
    assert_ping(a1.netns, b1.ip6)           # unblocked again


def test_ebpf_routes_ipv6_with_kernel_routing_off_and_without_conntrack(lab, drop_all):
    """ping -6, TCP and UDP between pods, same node and across nodes, both ways, and from a
    pod of each node to the external host (BPF SNAT), with every block in (enable --force:
    the operator accepts that eBPF bypasses them), past the drop-all checker on the
    destination's veth; conntrack never sees the flows; spoofed sources and another node's
    host namespace are refused."""
    a1, a2, b1 = pods(lab)
    with kernel_ipv6_routing_off(lab):
        switch.enable_ebpf(load_state(lab.lab), lab, force=True)
        for node in lab.nodes:      # what legacy mode tracked before
            netns.run(node.netns, ["conntrack", "-F"], check=False)
        try:
            # the IPv6 programs stay reachable after converge is done: progs6 is pinned
            assert all(progs6_pin(lab, node).exists() for node in lab.nodes)
            # and the datapath is the lab's (IPv6 config, endpoints6, progs6): kept as it is
            assert switch.enable_ebpf(load_state(lab.lab), lab, force=True) == []
            # a pin removed by hand empties progs6: converge sees it and loads node1 anew
            progs6_pin(lab, lab.nodes[0]).unlink()
            assert wait_for(lambda: progs6_ids(lab, lab.nodes[0]) == [])    # a kernel worker
            done = switch.enable_ebpf(load_state(lab.lab), lab, force=True)
            assert any("node1: programs loaded" in line for line in done), done
            assert all(progs6_pin(lab, node).exists() for node in lab.nodes)
            before = ipv6_counters(lab)
            for src, dst in ((a1, a2), (a2, a1), (a1, b1), (b1, a1)):
                assert_ping(src.netns, dst.ip6, count=2)
            for server, client in ((a2, a1), (b1, a1), (a1, b1)):
                for proto in ("udp", "tcp"):
                    with echo_server(server.netns, 5353, proto, family=6):
                        reply = echo_request(client.netns, server.ip6, 5353, proto)
                    assert reply == f"hello from {client.ip6}", (proto, reply)
            for dst in (a2, b1):
                with checker_on(lab, dst, drop_all):
                    assert_ping(a1.netns, dst.ip6)
            # to the outside: BPF SNAT to the node's IPv6 address, past the same blocks
            ext = lab.external
            for pod, node in ((a1, lab.nodes[0]), (b1, lab.nodes[1])):
                assert_ping(pod.netns, ext.ip6, count=2)
                for proto in ("udp", "tcp"):
                    with echo_server(ext.netns, 5353, proto, family=6):
                        reply = echo_request(pod.netns, ext.ip6, 5353, proto)
                    assert reply == f"hello from {node.ip6}", (proto, reply)
            check_spoofing_and_pods_to_nodes(lab)
            assert kernel_ipv6_routing_still_off(lab)
            for node in lab.nodes:
                for pod in (a1, a2, b1):
                    for way in ("--orig-src", "--reply-src"):
                        assert conntrack_entries(node.netns, "-f", "ipv6", way, pod.ip6) == []
            after = ipv6_counters(lab)
            grown = {node: {k: after[node][k] - before[node][k] for k in after[node]}
                     for node in after}
            # same node by peer redirect, across by neighbour redirect out and peer in
            assert grown["node1"]["redirect_peer"] >= 8 and grown["node2"]["redirect_peer"] >= 4
            assert grown["node1"]["redirect_neigh"] >= 4 and grown["node2"]["redirect_neigh"] >= 4
        finally:
            switch.disable_ebpf(load_state(lab.lab), lab)
    assert not any(progs6_pin(lab, node).exists() for node in lab.nodes)
    assert_ping(a1.netns, b1.ip6)           # legacy again, unblocked


# In a pod: UDP datagrams to argv[1] (port 5353) through the gateway MAC argv[2], each of the
# cases "ip6,mac" (argv[3:]) three times.
SPOOF6 = """
import sys
from scapy.all import Ether, IPv6, UDP, sendp, conf
conf.verb = 0
for case in sys.argv[3:]:
    ip6, mac = case.split(",")
    sendp(Ether(src=mac, dst=sys.argv[2]) / IPv6(src=ip6, dst=sys.argv[1])
          / UDP(sport=4444, dport=5353) / b"x", iface="eth0", count=3)
"""

# The sources of the datagrams that arrive on [::]:5353: the first within 20 s, each other
# within argv[1] seconds of the one before.
RECEIVER6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 5353)); s.settimeout(20)
got = []
try:
    while True:
        got.append(s.recvfrom(100)[1][0])
        s.settimeout(float(sys.argv[1]))
except socket.timeout:
    pass
print(" ".join(got))
"""


def check_spoofing_and_pods_to_nodes(topo) -> None:
    """A pod sends from its own IPv6 address and MAC only (another pod's address, one nobody
    has, its own with another MAC: dropped, counted); another node's host namespace is closed
    to pods (pods_reach_nodes false), not to the node."""
    a1, a2, b1 = pods(topo)
    node1, node2 = topo.nodes
    with netns.ipr(a1.netns) as sock:
        own_mac = netns.link_mac(sock, netns.ifindex(sock, "eth0"))
    with netns.ipr(node1.netns) as sock:
        gw_mac = netns.link_mac(sock, netns.ifindex(sock, a1.host_ifname))
    before = ipv6_counters(topo)["node1"]
    recv = subprocess.Popen(["ip", "netns", "exec", b1.netns, sys.executable, "-c", RECEIVER6,
                             "1"], stdout=subprocess.PIPE, text=True)
    wait_port(b1.netns, 5353, "udp")
    cases = [f"{a2.ip6},{own_mac}", f"2001:db8:0:1::77,{own_mac}",
             f"{a1.ip6},02:66:66:66:66:66", f"{a1.ip6},{own_mac}"]
    sent = netns.run(a1.netns, [sys.executable, "-c", SPOOF6, b1.ip6, gw_mac, *cases],
                     check=False, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert recv.communicate(timeout=30)[0].split() == [a1.ip6] * 3     # the honest ones
    assert ping(a1.netns, node2.ip6, timeout=1).returncode != 0
    assert_ping(node1.netns, node2.ip6)
    after = ipv6_counters(topo)["node1"]
    assert after["drop_spoofed"] - before["drop_spoofed"] == 9
    assert after["drop_pod_to_node"] - before["drop_pod_to_node"] == 1
