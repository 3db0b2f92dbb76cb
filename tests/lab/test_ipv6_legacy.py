"""Legacy routing of IPv6 in a dual-stack lab, with real packets: kernel forwarding, neighbour
discovery, ip6tables MASQUERADE to the node's IPv6 address, conntrack (issue 12).

One dual-stack lab (2 nodes x 2 pods, legacy mode) serves the whole module; every test
leaves it in legacy mode with its MASQUERADE whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from datapath import switch
from datapath.observe import observe_node
from netns_lab import legacy, netns
from netns_lab.state import load_state
from tests.labtools import (assert_ping, conntrack_entries, echo_request, echo_server, ping)

pytestmark = pytest.mark.slow     # every test here builds a lab


@pytest.fixture(scope="module")
def lab(make_module_lab):
    _, topo = make_module_lab("legacy", ip_family="dual")
    return topo


def pods(topo):
    (a1, a2), (b1, _) = topo.nodes[0].pods, topo.nodes[1].pods
    return a1, a2, b1


def test_pods_have_their_ipv6_plan_and_find_the_gateway_by_neighbour_discovery(lab):
    a1, _, b1 = pods(lab)
    node = lab.nodes[0]
    addrs = netns.run(a1.netns, ["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope",
                                 "global"]).stdout
    assert f"inet6 {a1.ip6}/128" in addrs and "tentative" not in addrs, addrs
    routes = netns.run(a1.netns, ["ip", "-6", "route", "show"]).stdout
    assert f"default via {node.gateway6} dev eth0" in routes, routes
    for key in ("net.ipv6.conf.all.forwarding", "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.default.accept_ra"):
        assert netns.read_sysctl(node.netns, key) == ("1" if "forwarding" in key else "0")
    assert netns.read_sysctl(a1.netns, "net.ipv6.conf.all.forwarding") == "0"
    assert_ping(a1.netns, b1.ip6)
    # the gateway's MAC was learned (not configured): a neighbour entry of the host veth's
    neigh = netns.run(a1.netns, ["ip", "-6", "neigh", "show", node.gateway6, "dev",
                                 "eth0"]).stdout
    with netns.ipr(node.netns) as sock:
        veth_mac = netns.link_mac(sock, netns.ifindex(sock, a1.host_ifname))
    assert f"lladdr {veth_mac}" in neigh and "PERMANENT" not in neigh, neigh


def test_ping6_same_node_cross_node_both_ways_and_external(lab):
    a1, a2, b1 = pods(lab)
    assert_ping(a1.netns, a2.ip6)
    assert_ping(a1.netns, b1.ip6)
    assert_ping(b1.netns, a1.ip6)
    assert_ping(a1.netns, lab.external.ip6)
    assert_ping(a1.netns, b1.ip)                # IPv4 beside it, as before


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("where", ["same-node", "cross-node"])
def test_pod_to_pod_tcp_and_udp_keep_the_pod_address_and_are_tracked(lab, proto, where):
    a1, a2, b1 = pods(lab)
    server = a2 if where == "same-node" else b1
    port = 5400 if proto == "tcp" else 5401
    with echo_server(server.netns, port, proto, family=6):
        assert echo_request(a1.netns, server.ip6, port, proto) == f"hello from {a1.ip6}"
    entries = conntrack_entries(lab.nodes[0].netns, "-f", "ipv6", "-p", proto,
                                "--orig-src", a1.ip6, "--orig-dst", server.ip6)
    assert entries and f"dport={port}" in entries[0], entries


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_the_external_host_sees_the_node_ipv6_address_and_conntrack_has_the_nat(lab, proto):
    a1, _, b1 = pods(lab)
    ext = lab.external
    port = 5402 if proto == "tcp" else 5403
    with echo_server(ext.netns, port, proto, family=6):
        for pod, node in ((a1, lab.nodes[0]), (b1, lab.nodes[1])):
            assert echo_request(pod.netns, ext.ip6, port, proto) == f"hello from {node.ip6}"
            entries = conntrack_entries(node.netns, "-f", "ipv6", "-p", proto,
                                        "--orig-src", pod.ip6, "--orig-dst", ext.ip6)
            # the reply tuple goes to the node: masqueraded
            assert any(e.count(f"dst={node.ip6}") == 1 and f"src={ext.ip6}" in e
                       for e in entries), entries


def test_without_the_ip6tables_masquerade_the_external_host_cannot_answer(lab):
    """The external host has no route to pods: IPv6 MASQUERADE is what makes it reachable;
    the lab's view sees a node with the IPv4 half only as partial."""
    node, a1 = lab.nodes[0], lab.nodes[0].pods[0]
    jump = ["-o", lab.uplink_ifname, "-m", "comment", "--comment", legacy.COMMENT,
            "-j", legacy.CHAIN]
    assert observe_node(lab, node).masquerade == "present"
    netns.run(node.netns, [legacy.iptables_binary(6), "-t", "nat", "-D", "POSTROUTING", *jump])
    try:
        assert observe_node(lab, node).masquerade == "partial"
        assert legacy.read_masquerade(lab, node).family_state(lab, node, 4) == "present"
        netns.run(node.netns, ["conntrack", "-D", "-f", "ipv6"], check=False)
        assert ping(a1.netns, lab.external.ip6).returncode != 0
        assert_ping(a1.netns, lab.external.ip)  # IPv4's is still there
    finally:
        legacy.install_masquerade(lab, node)
    assert observe_node(lab, node).masquerade == "present"
    assert_ping(a1.netns, lab.external.ip6)


def test_enable_removes_the_ip6tables_masquerade_and_disable_restores_it(lab):
    state = load_state(lab.lab)
    node = lab.nodes[0]
    rules = [legacy.iptables_binary(6) + "-save", "-t", "nat"]
    switch.enable_ebpf(state, lab)
    try:
        assert legacy.CHAIN not in netns.run(node.netns, rules).stdout
        assert observe_node(lab, node).masquerade == "absent"
    finally:
        switch.disable_ebpf(load_state(lab.lab), lab)
    saved = netns.run(node.netns, rules).stdout
    assert f"-A {legacy.CHAIN} -s {node.pod_cidr6} -j MASQUERADE" in saved, saved
    assert observe_node(lab, node).mode(lab) == "legacy"
    a1 = node.pods[0]
    with echo_server(lab.external.netns, 5404, "udp", family=6):
        assert echo_request(a1.netns, lab.external.ip6, 5404) == f"hello from {node.ip6}"


def test_lab_show_puts_ip6_beside_ip_for_nodes_pods_and_the_external_host(lab):
    proc = subprocess.run([sys.executable, "-m", "datapath.cli", "lab", "show", "--lab", lab.lab,
                           "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    node, pod = data["nodes"][1], data["nodes"][1]["pods"][0]
    assert list(node)[2:4] == ["ip", "ip6"] and list(pod)[2:4] == ["ip", "ip6"]
    assert (node["ip6"], pod["ip6"]) == ("2001:db8:1::2", "2001:db8:0:2::a")
    assert data["external"] == {"netns": lab.external.netns, "ip": "203.0.113.10",
                                "ip6": "2001:db8:2::a"}
    assert data["ip_family"] == "dual"
    table = subprocess.run([sys.executable, "-m", "datapath.cli", "lab", "show", "--lab",
                            lab.lab], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "200"}).stdout
    assert "pod ip6" in table and "2001:db8:0:2::a" in table, table
