"""eBPF host routing with real packets: it carries the traffic, and takes the BPF path.

Connectivity alone proves little (the kernel could be routing), so these
tests also switch the kernel's routing off (FORWARD DROP, nft drop, forwarding
disabled), check that conntrack saw nothing, and put a drop-everything
checker where only the slow path would pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from datapath import switch, tc_attach
from netns_lab import netns
from netns_lab.state import load_state
from tests.labtools import (lab_counters, assert_ping, background, conntrack_entries, netperf, netserver,
                            ping, udp_echo, udp_request)

pytestmark = pytest.mark.slow     # every test here builds a lab

DROP_ALL = r"""
#include <uapi/linux/pkt_cls.h>
int drop_all(struct __sk_buff *skb) { return TC_ACT_SHOT; }
"""


def pods(topo):
    (a1, a2), (b1, b2) = topo.nodes[0].pods, topo.nodes[1].pods
    return a1, a2, b1, b2


counters = lab_counters


def kernel_routing_off(topo) -> None:
    """FORWARD DROP in both iptables backends and nft, forwarding off: no slow path left."""
    for node in topo.nodes:
        netns.run(node.netns, ["iptables-nft", "-P", "FORWARD", "DROP"])
        netns.run(node.netns, ["iptables-legacy", "-P", "FORWARD", "DROP"])
        netns.run(node.netns, ["nft", "add table inet hrtest; "
                               "add chain inet hrtest forward_drop { type filter hook forward priority 0; "
                               "policy drop; }"])
        netns.sysctl(node.netns, {"net.ipv4.ip_forward": 0})


def test_lab_up_mode_ebpf_attaches_to_every_pod_and_uplink(ebpf_lab):
    state, topo = ebpf_lab
    assert state.mode == "ebpf"
    status = switch.status(load_state(topo.lab), topo)
    for node, topo_node in zip(status["nodes"], topo.nodes):
        names = {att["ifname"]: [p["name"] for p in att["programs"]] for att in node["attached"]}
        assert names[topo.uplink_ifname] == ["from_underlay"]
        assert all(names[p.host_ifname] == ["from_pod"] for p in topo_node.pods)
        assert len(names) == len(topo_node.pods) + 1
    assert status["ebpf_support"] == {"usable": True, "missing": [], "checked": [
        "sched_cls program loads", "bpf_redirect_peer", "bpf_redirect_neigh", "bpf_fib_lookup"]}


def kernel_routing_still_off(topo) -> bool:
    return all(":FORWARD DROP " in netns.run(node.netns, [tool]).stdout
               for node in topo.nodes for tool in ("iptables-nft-save", "iptables-legacy-save")) \
        and all("policy drop" in netns.run(node.netns, ["nft", "list", "table", "inet",
                                                        "hrtest"]).stdout for node in topo.nodes)


def test_ping_tcp_udp_both_ways_with_kernel_routing_off(legacy_lab):
    """The blocks go in before enable (the guard would refuse or revert them after), which
    then needs --force: an operator accepting that eBPF host routing bypasses them."""
    _, topo = legacy_lab
    a1, a2, b1, b2 = pods(topo)
    kernel_routing_off(topo)
    switch.enable_ebpf(load_state(topo.lab), topo, force=True)
    for src, dst in ((a1, a2), (a2, a1), (a1, b1), (b1, a1), (b2, a2)):
        assert_ping(src.netns, dst.ip)
    for server, client in ((a2, a1), (b1, a1), (a1, b2)):
        with netserver(server.netns):
            for test in ("TCP_RR", "TCP_STREAM"):
                proc = netperf(client.netns, server.ip, test, seconds=1)
                assert proc.returncode == 0, proc.stderr
                assert float(proc.stdout.split()[-1]) > 0, proc.stdout
        with udp_echo(server.netns):
            assert udp_request(client.netns, server.ip) == f"hello from {client.ip}"
    assert kernel_routing_still_off(topo)


def test_legacy_traffic_stops_when_kernel_routing_is_off(legacy_lab):
    """The control for the test above: the same blocks do stop the slow path."""
    _, topo = legacy_lab
    a1, a2, b1, _ = pods(topo)
    kernel_routing_off(topo)
    assert ping(a1.netns, a2.ip).returncode != 0
    assert ping(a1.netns, b1.ip).returncode != 0


def test_conntrack_sees_no_pod_to_pod_flow(ebpf_lab):
    _, topo = ebpf_lab
    a1, a2, b1, _ = pods(topo)
    for dst in (a2, b1):
        with udp_echo(dst.netns):
            udp_request(a1.netns, dst.ip)
        assert_ping(a1.netns, dst.ip)
    for node in topo.nodes:
        assert conntrack_entries(node.netns, "--orig-src", a1.ip) == []
        assert conntrack_entries(node.netns, "--reply-src", a1.ip) == []


def test_counters_show_peer_for_same_node_and_neigh_for_cross_node(ebpf_lab):
    _, topo = ebpf_lab
    a1, a2, b1, _ = pods(topo)
    before = counters(topo)
    assert_ping(a1.netns, a2.ip, count=3)
    mid = counters(topo)
    # 3 requests and 3 replies, each redirected to the peer on node1; nothing on node2.
    assert mid["node1"]["redirect_peer"] - before["node1"]["redirect_peer"] == 6
    assert mid["node1"]["redirect_neigh"] == before["node1"]["redirect_neigh"]
    assert mid["node2"] == before["node2"]
    assert_ping(a1.netns, b1.ip, count=3)
    after = counters(topo)
    for node in ("node1", "node2"):  # out by neigh, in by peer, on each side
        assert after[node]["redirect_neigh"] - mid[node]["redirect_neigh"] == 3
        assert after[node]["redirect_peer"] - mid[node]["redirect_peer"] == 3


ATTACH_MODES = [pytest.param("tcx", marks=pytest.mark.skipif(
    bool(tc_attach.tcx_missing()), reason=f"kernel without TCX: {tc_attach.tcx_missing()}")),
    "clsact"]


@pytest.mark.parametrize("attach", ATTACH_MODES)
@pytest.mark.parametrize("where", ["same-node", "cross-node"])
def test_path_skips_the_destination_host_veth(make_lab, monkeypatch, where, attach):
    """A drop-all checker on the destination's host-side veth egress: only the slow path
    meets it, whether the datapath hangs on its hooks with TCX or as clsact filters."""
    from datapath.bpf_build import compile_bpf, load_program
    monkeypatch.setenv(tc_attach.MODE_ENV, attach)
    checker = compile_bpf("drop_all.c", text=DROP_ALL)
    fd = load_program(checker, "drop_all")
    for mode in ("legacy", "ebpf"):
        _, topo = make_lab(mode)
        if mode == "ebpf":
            assert {n["attach"] for n in switch.status(load_state(topo.lab), topo)["nodes"]} \
                == {attach}
        a1, a2, b1, _ = pods(topo)
        dst = a2 if where == "same-node" else b1
        dst_node = topo.nodes[0] if where == "same-node" else topo.nodes[1]
        assert_ping(a1.netns, dst.ip)
        tc_attach.attach(dst_node.netns, dst.host_ifname, fd, "drop_all", "egress")
        reached = ping(a1.netns, dst.ip).returncode == 0
        assert reached == (mode == "ebpf"), f"{mode}: ping reached={reached}"


CHATTER = textwrap.dedent("""
    import os, socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    rounds = 0
    while not os.path.exists(sys.argv[3]):  # until the test says stop
        s.sendall(b"x" * 100)
        assert len(s.recv(100)) > 0
        rounds += 1
        time.sleep(0.01)
    print("done", rounds, flush=True)
""")

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    conn, _ = srv.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
""")


def test_open_tcp_connection_survives_enable_and_disable(make_lab, tmp_path):
    state, topo = make_lab("legacy")
    a1, _, b1, _ = pods(topo)
    stop = tmp_path / "stop"
    with background(b1.netns, [sys.executable, "-c", ECHO_SERVER, "7000"], port=7000):
        client = subprocess.Popen(["ip", "netns", "exec", a1.netns, sys.executable, "-c", CHATTER,
                                   b1.ip, "7000", str(stop)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
        switch.enable_ebpf(load_state(topo.lab), topo)
        time.sleep(0.3)
        switch.disable_ebpf(load_state(topo.lab), topo)
        time.sleep(0.3)
        switch.enable_ebpf(load_state(topo.lab), topo)
        time.sleep(0.3)
        assert client.poll() is None, client.communicate()
        assert counters(topo)["node1"]["redirect_neigh"] > 0
        stop.touch()
        out, err = client.communicate(timeout=30)
    assert client.returncode == 0 and out.startswith("done"), err


def qdiscs(ns: str) -> str:
    return netns.run(ns, ["tc", "qdisc", "show"]).stdout


@pytest.mark.parametrize("attach", ATTACH_MODES)
def test_disable_restores_every_device_exactly(legacy_lab, monkeypatch, attach):
    state, topo = legacy_lab
    node = topo.nodes[0]
    monkeypatch.setenv(tc_attach.MODE_ENV, attach)
    # A clsact the user had before must survive; the ones we add must go (TCX adds none).
    netns.run(node.netns, ["tc", "qdisc", "add", "dev", node.pods[0].host_ifname, "clsact"])
    before = {n.netns: qdiscs(n.netns) for n in topo.nodes}
    switch.enable_ebpf(load_state(topo.lab), topo)
    assert ("clsact" in qdiscs(topo.nodes[1].netns)) == (attach == "clsact")
    switch.disable_ebpf(load_state(topo.lab), topo)
    assert {n.netns: qdiscs(n.netns) for n in topo.nodes} == before
    for n in topo.nodes:
        for ifname in [p.host_ifname for p in n.pods] + [topo.uplink_ifname]:
            assert tc_attach.attached_programs(n.netns, ifname, "ingress") == []


def test_enable_and_disable_twice_change_nothing_the_second_time(legacy_lab):
    """Each is "make it so": a second run finds nothing to do and keeps the programs (and
    with them the NAT table and counters) it finds."""
    state, topo = legacy_lab
    assert switch.disable_ebpf(load_state(topo.lab), topo) == []
    assert switch.enable_ebpf(load_state(topo.lab), topo)
    ids = switch.status(load_state(topo.lab), topo)["nodes"]
    assert switch.enable_ebpf(load_state(topo.lab), topo) == []
    assert switch.status(load_state(topo.lab), topo)["nodes"] == ids


def test_path_mtu_frag_needed_and_tcp_completes(make_lab, tmp_path):
    topo_file = tmp_path / "mtu.toml"
    topo_file.write_text("[lab]\nunderlay_mtu = 1300\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    a1, _, b1, _ = pods(topo)
    proc = ping(a1.netns, b1.ip, size=1400, df=True)
    assert proc.returncode != 0
    assert "mtu = 1300" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert counters(topo)["node1"]["icmp_frag_needed"] >= 1
    assert_ping(a1.netns, b1.ip, size=1200, df=True)
    with netserver(b1.netns):
        proc = netperf(a1.netns, b1.ip, "TCP_STREAM", seconds=1)
        assert proc.returncode == 0, proc.stderr
        assert float(proc.stdout.split()[-1]) > 0


ZERO_POD_NODE = """
[[nodes]]
name = "node1"
pod_cidr = "198.18.1.0/24"
pods = 0
[[nodes]]
name = "node2"
pod_cidr = "198.18.2.0/24"
[[nodes]]
name = "node3"
pod_cidr = "198.18.3.0/24"
"""


def test_a_node_without_pods_runs_ebpf_and_the_others_still_route(make_lab, tmp_path):
    """A node with no pods has no per-pod sysctls to set: enabling (and rolling back) must not
    run an empty sysctl. The other nodes' pods route through it all, status and stats work."""
    path = tmp_path / "zero.toml"
    path.write_text(ZERO_POD_NODE)
    state, topo = make_lab("ebpf", topology=str(path))
    assert state.mode == "ebpf" and load_state(topo.lab).mode == "ebpf"
    empty, b, c = topo.nodes
    assert empty.pods == ()
    assert_ping(b.pods[0].netns, c.pods[1].ip)
    assert_ping(c.pods[0].netns, b.pods[1].ip)
    with udp_echo(topo.external.netns):                 # BPF SNAT on a node with pods
        assert udp_request(b.pods[0].netns, topo.external.ip) == f"hello from {b.ip}"
    status = switch.status(load_state(topo.lab), topo)
    assert status["mode"] == "ebpf"
    attached = {n["name"]: [(a["ifname"], [p["name"] for p in a["programs"]])
                            for a in n["attached"]] for n in status["nodes"]}
    assert attached[empty.name] == [(topo.uplink_ifname, ["from_underlay"])]
    per_node = lab_counters(topo)
    assert set(per_node) == {n.name for n in topo.nodes}
    assert per_node[c.name]["redirect_peer"] >= 1
    switch.disable_ebpf(load_state(topo.lab), topo)    # the path the failed rollback took
    assert load_state(topo.lab).mode == "legacy"
    switch.enable_ebpf(load_state(topo.lab), topo)
    assert load_state(topo.lab).mode == "ebpf"
    assert_ping(b.pods[0].netns, c.pods[0].ip)


def test_cli_pods_per_node_0_in_ebpf_mode(lab_name):
    proc = subprocess.run([sys.executable, "-m", "datapath.cli", "lab", "up", "--lab", lab_name,
                           "--pods-per-node", "0", "--mode", "ebpf"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0 pods, mode ebpf" in proc.stdout
    for command in ("status", "stats"):
        proc = subprocess.run([sys.executable, "-m", "datapath.cli", command, "--lab", lab_name,
                               "--json"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert load_state(lab_name).mode == "ebpf"


def test_stats_bpf_stats_gives_each_programs_ns_per_packet(ebpf_lab):
    """`stats --bpf-stats 2` holds BPF stats on (a BPF_ENABLE_STATS fd; the sysctl is left
    as it was) while a cross-node ping runs: both programs' runs, run time and ns per run
    over that window, as a table and in --json; without it, how to turn stats on."""
    _, topo = ebpf_lab
    a1, _, b1, _ = pods(topo)
    sysctl = "/proc/sys/kernel/bpf_stats_enabled"
    with open(sysctl) as f:
        before = f.read()
    cli = [sys.executable, "-m", "datapath.cli", "stats", "--lab", topo.lab]
    # pings every 0.05 s for as long as the command runs, so its 2 s window, which opens
    # whenever python and bcc have started, sees at least 20 of them whatever the load
    pinger = subprocess.Popen(["ip", "netns", "exec", a1.netns, "ping", "-n", "-q", "-i", "0.05",
                               b1.ip], stdout=subprocess.DEVNULL)
    try:
        proc = subprocess.run(cli + ["--json", "--bpf-stats", "2"], capture_output=True,
                              text=True, timeout=60)
    finally:
        pinger.terminate()
        pinger.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["bpf_stats"]["window_s"] == 2
    n1, n2 = stats["nodes"]
    for program in (n1["programs"]["from_pod"], n2["programs"]["from_underlay"]):
        assert program["run_cnt"] >= 20    # 40 pings sent in the window: requests out, replies in
        assert program["ns_per_run"] == program["run_time_ns"] / program["run_cnt"] > 0
    with open(sysctl) as f:
        assert f.read() == before
    text = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout
    if before.strip() == "0":
        assert "hostrouting stats --bpf-stats" in text
    bad = subprocess.run(cli + ["--bpf-stats", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "--bpf-stats" in bad.stderr


def _tcp_ext(ns: str, name: str) -> int:
    """A TcpExt counter of the namespace (/proc/net/netstat: a header line, then values)."""
    lines = [line.split() for line in netns.run(ns, ["cat", "/proc/net/netstat"]).stdout
             .splitlines() if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1]))[name])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs: the receiver copying on "
                    "one while the sender's softirq delivers on the other")
def test_a_bulk_flow_into_a_pod_is_coalesced_by_the_receiving_socket(ebpf_lab):
    """The sender's TSO skbs are clones of what its TCP keeps for retransmission, and a
    receiving socket cannot merge a clone into the skb before it. Un-cloned before the peer
    redirect (unclone_bulk), they are merged into the socket's backlog while netserver, on the
    other CPU, holds the socket: TcpExtTCPBacklogCoalesce counts tens of thousands in 4 s
    where, handed over as clones, it counted 0-14 (docs/benchmarks.md)."""
    _, topo = ebpf_lab
    a1, a2, _, _ = pods(topo)
    with netserver(a2.netns):
        before = _tcp_ext(a2.netns, "TCPBacklogCoalesce")
        # cubic, as the bench runs it, not the namespace's default (the host's: bbr here)
        proc = netns.run(a1.netns, ["netperf", "-H", a2.ip, "-t", "TCP_STREAM", "-l", "3",
                                    "-T", "0,1", "-P", "0", "--", "-D", "-m", "65536",
                                    "-K", "cubic,cubic"],
                         check=False, timeout=30)
        after = _tcp_ext(a2.netns, "TCPBacklogCoalesce")
    assert proc.returncode == 0, proc.stderr
    assert after - before > 1000, (before, after, proc.stdout)
