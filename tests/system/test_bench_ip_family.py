"""bench --ip-family: the labs it asks for, the servers it targets, the command lines of
netperf, netserver and conntrack, the floor's build, and what the report says, for IPv4 and
IPv6, without a lab. (A real IPv6 run: `bench --quick --ip-family 6`.)"""

from __future__ import annotations

import io
import ipaddress
import subprocess
import sys

import pytest

from datapath.bench import netperf, node_profiles, report, runner
from datapath.bench.floor import Floor
from netns_lab.topology import load_topology

SCENARIOS = runner.SCENARIOS


def bench_with_topologies(family: int) -> runner.Bench:
    """A Bench whose labs are only planned (their topologies), as setup() would plan them."""
    bench = runner.Bench(runner.BenchConfig(ip_family=family))
    for mode, lab in bench.labs.items():
        bench.topos[mode] = load_topology(lab, ip_family=runner.LAB_FAMILY[family])
    bench.limit_ns = (f"{bench.labs['limit']}-lima", f"{bench.labs['limit']}-limb")
    return bench


def test_netperf_and_netserver_speak_the_family_asked_for():
    v6 = netperf.argv_for("2001:db8:0:1::b", "TCP_RR", 1, None, family=6)
    assert v6[:4] == ["netperf", "-6", "-H", "2001:db8:0:1::b"]      # global: control + data
    assert v6.index("-6") < v6.index("--")
    v4 = netperf.argv_for("198.18.1.11", "TCP_RR", 1, None)
    assert v4[:3] == ["netperf", "-H", "198.18.1.11"] and "-6" not in v4   # as before
    assert v6[4:] == v4[3:]                                    # nothing else differs
    flows = netperf.argv_for("2001:db8:2::a", "TCP_STREAM", 5, 16384, demo=True, family=6)
    assert flows[1] == "-6" and flows.index("-D") < flows.index("--")
    assert netperf.netserver_argv(family=6) == ["netserver", "-D", "-6", "-p", "12865"]
    assert netperf.netserver_argv() == ["netserver", "-D", "-4", "-p", "12865"]


def test_run_test_hands_the_family_to_every_netperf_it_starts(monkeypatch):
    seen = []

    def run(ns, argv, check=True, timeout=None):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, "12591.92,63,96,300,79.32,129528,bbr,bbr\n",
                                           "")

    monkeypatch.setattr(netperf.netns, "run", run)
    result = netperf.run_test("hrbe-node1-pod1", "2001:db8:0:2::a", "TCP_RR", 1, family=6)
    assert result.values["tps"] == 12591.92
    assert seen[0][:4] == ["netperf", "-6", "-H", "2001:db8:0:2::a"]


@pytest.mark.parametrize("family", [4, 6])
def test_conntrack_deletes_the_bench_flows_of_the_family(family):
    assert node_profiles.conntrack_delete_argv(family) == [
        "conntrack", "-D", "-f", f"ipv{family}", "--mark", "0"]


def test_ipv6_targets_are_the_servers_ipv6_addresses():
    bench = bench_with_topologies(6)
    for mode in ("legacy", "ebpf", "floor"):
        topo = bench.topos[mode]
        assert topo.ip_family == "dual"
        (a1, a2), (b1, _) = topo.nodes[0].pods[:2], topo.nodes[1].pods[:2]
        assert bench.target("same-node", mode) == (a1.netns, a2.ip6)
        assert bench.target("cross-node", mode) == (a1.netns, b1.ip6)
        assert bench.target("pod-to-external", mode) == (a1.netns, topo.external.ip6)
    limit = bench.topos["limit"]
    assert bench.target("same-node", "limit") == (bench.limit_ns[0], runner.LIMIT_IPS6[1])
    assert bench.target("cross-node", "limit") == (limit.nodes[0].netns, limit.nodes[1].ip6)
    assert bench.target("pod-to-external", "limit") == (limit.nodes[0].netns,
                                                         limit.external.ip6)
    for scenario in SCENARIOS:
        for mode in bench.labs:
            ns, host = bench.target(scenario, mode)
            assert ipaddress.ip_address(host).version == 6, (scenario, mode, host)
            # the server runs where the address is
            assert bench.server_netns(scenario, mode) != ns


def test_ipv4_targets_are_unchanged():
    bench = bench_with_topologies(4)
    topo = bench.topos["ebpf"]
    assert topo.ip_family == "ipv4" and topo.nodes[0].pods[1].ip6 is None
    assert bench.target("same-node", "ebpf")[1] == topo.nodes[0].pods[1].ip == "198.18.1.11"
    assert bench.target("same-node", "limit")[1] == runner.LIMIT_IPS[1]
    for scenario in SCENARIOS:
        for mode in bench.labs:
            assert ipaddress.ip_address(bench.target(scenario, mode)[1]).version == 4


def test_setup_builds_dual_stack_labs_for_ipv6(monkeypatch):
    """setup() with --ip-family 6: every lab planned dual stack, the limit pair with IPv6
    addresses, the floor for IPv6, every netserver listening on IPv6."""
    built, pairs, servers, floors = [], [], [], []

    class FakeFloor:
        def __init__(self, topo, family=4):
            floors.append(family)

        def route_replies(self):
            pass

        def load(self, scenario):
            pass

    class FakeServer:
        def __init__(self, ns, port=netperf.PORT, family=4):
            servers.append((ns, family))

    def add_veth_pair(lab, a, b, ip_a, ip_b, prefixlen=30, ip6=None, prefixlen6=64):
        pairs.append((ip_a, ip_b, ip6))
        return (f"{lab}-{a}", f"{lab}-{b}")

    from datapath import prog_stats
    from datapath.bench import floor
    monkeypatch.setattr(netperf, "require_netperf", lambda: None)
    monkeypatch.setattr(runner.builder, "lab_up", lambda topo, configure: built.append(topo))
    monkeypatch.setattr(runner.builder, "add_veth_pair", add_veth_pair)
    monkeypatch.setattr(floor, "Floor", FakeFloor)
    monkeypatch.setattr(netperf, "Netserver", FakeServer)
    monkeypatch.setattr(prog_stats, "enable_stats", lambda: None)
    bench = runner.Bench(runner.BenchConfig(ip_family=6))
    bench.setup(say=lambda line: None)
    assert [t.ip_family for t in built] == ["dual"] * len(runner.MODES)
    assert pairs == [(*runner.LIMIT_IPS, runner.LIMIT_IPS6)]
    assert floors == [6]
    assert servers and {family for _, family in servers} == {6}


def test_the_floor_is_built_for_the_family():
    topo = load_topology("hrbf", ip_family="dual")
    assert Floor(topo).cflags(7) == ["-DFLOOR_IFINDEX=7"]
    assert Floor(topo, 6).cflags(7) == ["-DFLOOR_IFINDEX=7", "-DFLOOR_IPV6"]


def test_the_report_names_the_family():
    from rich.console import Console
    samples = [{"rules": 0, "scenario": "same-node", "mode": mode, "test": "TCP_RR", "size": None,
                "repeat": rep, "values": {"tps": 1000.0 + rep}, "seconds": 1.0, "cpu_s": 0.5,
                "cpu_window_s": 1.0} for rep in range(3) for mode in runner.MODES]
    for family, config in ((6, {"ip_family": 6}), (4, {})):     # 4: a result from before
        result = {"environment": {"config": {"duration": 1.0, "repeat": 3, **config},
                                  "modes": list(runner.MODES), "kernel": "k", "cpu": "c",
                                  "cores": 2}, "samples": samples}
        out = io.StringIO()
        report.print_tables(report.with_summary(result), Console(file=out, width=200))
        assert f"2 cores; IPv{family}; 1s per test" in out.getvalue()


def test_the_cli_takes_4_or_6_only():
    cli = [sys.executable, "-m", "datapath.cli", "bench", "--ip-family"]
    bad = subprocess.run(cli + ["5"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "invalid choice: 5" in bad.stderr
    from datapath.cli import build_parser
    args = build_parser().parse_args(["bench", "--quick", "--ip-family", "6"])
    assert args.ip_family == 6
    assert build_parser().parse_args(["bench"]).ip_family == 4
