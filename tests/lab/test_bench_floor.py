"""The bench's mechanism floor and limit labs, with real packets.

The floor lab's nodes stop forwarding, so only the floor's redirects can deliver a pod's
packets: each scenario's programs carry them (TCP through netperf, as the bench does), and
without them the same ping fails. The limit lab tracks nothing: no conntrack entry appears
for its traffic.
"""

from __future__ import annotations

import pytest

from datapath import tc_attach
from datapath.bench import netperf
from datapath.bench.floor import Floor
from netns_lab import netns
from netns_lab.builder import lab_up
from netns_lab.topology import load_topology
from tests.labtools import ping

pytestmark = pytest.mark.slow     # every test here builds a lab


def _server(topo, scenario, family=4):
    pod = {"same-node": topo.nodes[0].pods[1], "cross-node": topo.nodes[1].pods[0]}.get(scenario)
    where = pod or topo.external
    return where.netns, where.ip6 if family == 6 else where.ip


def test_floor_alone_delivers_every_scenario(lab_name):
    """In a dual-stack lab, the IPv4 floor and then the IPv6 one (bench --ip-family 6)."""
    topo = load_topology(lab_name, ip_family="dual")
    lab_up(topo, None)
    for node in topo.nodes:     # the stack cannot route pod traffic any more
        netns.sysctl(node.netns, {"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0})
    client = topo.nodes[0].pods[0].netns
    for family in (4, 6):
        floor = Floor(topo, family)
        try:
            floor.route_replies()
            for scenario in ("same-node", "cross-node", "pod-to-external"):
                server_ns, ip = _server(topo, scenario, family)
                what = f"{scenario} IPv{family}"
                floor.use(scenario)
                assert ping(client, ip).returncode == 0, what
                server = netperf.Netserver(server_ns, family=family)
                try:
                    result = netperf.run_test(client, ip, "TCP_RR", 1, family=family)
                finally:
                    server.close()
                assert result.values["tps"] > 0, what
                for ns, dev, *_ in floor.hooks(scenario):     # the control: no floor, no path
                    tc_attach.detach(ns, dev, "ingress")
                floor.current = None
                assert ping(client, ip).returncode != 0, what
        finally:
            floor.close()


def test_limit_lab_tracks_no_connection(lab_name):
    topo = load_topology(lab_name)
    lab_up(topo, None)
    n1, n2 = topo.nodes[:2]
    assert ping(n1.netns, n2.ip).returncode == 0
    assert ping(n1.netns, topo.external.ip).returncode == 0
    for ns in (n1.netns, n2.netns, topo.fabric_netns):
        listed = netns.run(ns, ["conntrack", "-L"], check=False)
        assert "icmp" not in listed.stdout, ns
