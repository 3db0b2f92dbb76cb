"""bench --node-profile on real labs: pod traffic goes on under the AKS rules and a full
conntrack table, and eBPF host routing is enabled over kube-proxy's rules only with --force."""

from __future__ import annotations

import pytest

from datapath import events, switch
from datapath.bench import node_profiles
from netns_lab.builder import lab_up
from netns_lab.topology import load_topology
from tests.labtools import assert_ping, netperf, netserver, udp_echo, udp_request

pytestmark = pytest.mark.slow     # every test here builds a lab


def test_legacy_pod_traffic_under_the_aks_profile(legacy_lab):
    _, topo = legacy_lab
    profile = node_profiles.parse("aks")
    assert node_profiles.apply_rules(profile, topo)["rules_per_node"] > 11_000
    node_profiles.fill_conntrack(profile, topo)
    (a1, a2), (b1, _) = topo.nodes[0].pods[:2], topo.nodes[1].pods[:2]
    for node in topo.nodes:
        assert node_profiles.conntrack_count(node.netns) >= 100_000
    assert_ping(a1.netns, a2.ip)
    assert_ping(a1.netns, b1.ip)
    assert_ping(a1.netns, topo.external.ip)
    with udp_echo(b1.netns):      # ip-masq-agent leaves the lab's cluster CIDRs alone
        assert udp_request(a1.netns, b1.ip).endswith(f"from {a1.ip}")
    with udp_echo(topo.external.netns):
        assert udp_request(a1.netns, topo.external.ip).endswith(f"from {topo.nodes[0].ip}")
    with netserver(b1.netns):
        proc = netperf(a1.netns, b1.ip, "TCP_CRR", seconds=1)
        assert proc.returncode == 0 and float(proc.stdout.split()[-1]) > 0, proc.stderr
    node = topo.nodes[0].netns
    with_bench_flows = node_profiles.conntrack_count(node)
    assert with_bench_flows > 100_000
    node_profiles.delete_bench_flows(node)
    assert node_profiles.conntrack_count(node) == 100_000


def test_ebpf_is_enabled_over_kube_proxy_rules_with_force(lab_name):
    topo = load_topology(lab_name)
    applied = {}
    state, _ = lab_up(topo, node_profiles.configure("ebpf", node_profiles.parse(
        "kube-proxy:10x3"), applied))
    assert state.mode == "ebpf"
    assert applied["ebpf_forced"] and applied["rules_per_node"] > 100
    assert [e for e in events.read(topo.lab) if e["reason"] == "ForcedEnable"], \
        "the bypass of the node's rules was not recorded"
    (a1, a2), (b1, _) = topo.nodes[0].pods[:2], topo.nodes[1].pods[:2]
    assert_ping(a1.netns, a2.ip)
    assert_ping(a1.netns, b1.ip)
    assert_ping(a1.netns, topo.external.ip)


def test_without_force_enable_refuses_kube_proxy_rules(legacy_lab):
    state, topo = legacy_lab
    node_profiles.apply_rules(node_profiles.parse("kube-proxy:2x1"), topo)
    with pytest.raises(switch.SwitchError, match="refusing to enable"):
        switch.enable_ebpf(state, topo)
