"""The lab: built fast, described as promised, removed completely, root netns untouched."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from netns_lab import netns
from netns_lab.builder import lab_down, lab_up
from netns_lab.state import load_state
from netns_lab.topology import load_topology
from tests import rootns

HOSTROUTING = [sys.executable, "-m", "datapath.cli"]


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in os.listdir(netns.NETNS_DIR) if n.startswith(prefix + "-")]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HOSTROUTING, *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_root_namespace_is_identical_after_lab_up_and_down(lab_name, family):
    """IPv4 and IPv6 (links, addresses, routes, rules, sysctls, iptables and ip6tables in
    both backends, nft): an ipv6 lab has IPv6 everywhere (its pods only IPv6) and its legacy
    mode masquerades with ip6tables too."""
    before = rootns.snapshot()
    topo = load_topology(lab_name, ip_family=family)
    from datapath.switch import configure_mode
    lab_up(topo, configure_mode("legacy"))
    if family == "ipv6":
        pod = topo.nodes[1].pods[0]
        # no IPv4 but loopback's: no address on eth0, no route in the main table
        assert netns.run(pod.netns, ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout == ""
        assert netns.run(pod.netns, ["ip", "-4", "route", "show"]).stdout == ""
        assert f"inet6 {pod.ip6}/128" in netns.run(pod.netns, ["ip", "-6", "addr"]).stdout
        from tests.labtools import assert_ping
        assert_ping(pod.netns, topo.nodes[0].pods[0].ip6)
        assert_ping(pod.netns, topo.external.ip6)
    during = rootns.snapshot()
    lab_down(lab_name)
    after = rootns.snapshot()
    assert rootns.diff(before, during) == []
    assert rootns.diff(before, after) == []
    assert lab_namespaces(lab_name) == []


@pytest.mark.slow
def test_lab_up_builds_every_namespace_quickly_and_down_removes_them(lab_name):
    topo = load_topology(lab_name)
    state, seconds = lab_up(topo)
    print(f"\n2x2 lab up in {seconds:.3f}s")
    assert sorted(lab_namespaces(lab_name)) == sorted(topo.namespaces)
    assert load_state(lab_name).phase == "ready"
    removed = lab_down(lab_name)
    assert sorted(removed) == sorted(topo.namespaces)
    assert lab_namespaces(lab_name) == []


def test_invalid_topology_creates_nothing(tmp_path, lab_name):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\n'
                   '[[nodes]]\nname = "b"\npod_cidr = "198.18.1.0/24"\n')
    proc = cli("lab", "up", "--lab", lab_name, "--topology", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.startswith("hostrouting: error: ")
    assert f"{bad}:6: nodes[1].pod_cidr" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert lab_namespaces(lab_name) == []


@pytest.mark.slow
def test_lab_up_refuses_an_existing_lab_and_keeps_it(legacy_lab):
    _, topo = legacy_lab
    with pytest.raises(Exception, match="exists already"):
        lab_up(load_topology(topo.lab))
    assert sorted(lab_namespaces(topo.lab)) == sorted(topo.namespaces)


@pytest.mark.slow
def test_failure_midway_removes_what_was_made(lab_name):
    topo = load_topology(lab_name)

    def explode(state, topo):
        raise RuntimeError("configure failed")

    with pytest.raises(RuntimeError, match="configure failed"):
        lab_up(topo, explode)
    assert lab_namespaces(lab_name) == []


@pytest.mark.slow
def test_show_json_has_the_documented_fields(legacy_lab):
    _, topo = legacy_lab
    proc = cli("lab", "show", "--lab", topo.lab, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["name"] == topo.lab and data["mode"] == "legacy"
    assert data["external"] == {"netns": f"{topo.lab}-ext", "ip": "203.0.113.10"}
    node = data["nodes"][0]
    assert {"name", "netns", "ip", "pod_cidr", "pods"} <= set(node)
    assert (node["name"], node["ip"], node["pod_cidr"]) == ("node1", "198.19.0.1", "198.18.1.0/24")
    assert {"name", "netns", "ip"} <= set(node["pods"][0])
    assert node["pods"][0]["ip"] == "198.18.1.10"
    # no IPv6 key in an IPv4-only lab: consumers of the IPv4 output keep working
    assert "ip6" not in json.dumps(data) and "ip_family" not in data


@pytest.mark.slow
def test_lab_exec_runs_in_the_pod(legacy_lab):
    _, topo = legacy_lab
    proc = cli("lab", "exec", "--lab", topo.lab, "node2-pod1", "--", "ip", "-4", "-o", "addr",
               "show", "dev", "eth0")
    assert proc.returncode == 0, proc.stderr
    assert "198.18.2.10/32" in proc.stdout


@pytest.mark.slow
def test_two_labs_coexist_with_the_same_addresses(make_lab):
    from tests.labtools import assert_ping
    _, a = make_lab()
    _, b = make_lab()
    lab_down(a.lab)
    assert_ping(b.nodes[0].pods[0].netns, b.nodes[1].pods[0].ip)
    assert sorted(lab_namespaces(b.lab)) == sorted(b.namespaces)


@pytest.mark.slow
def test_down_all_after_sigkill_during_lab_up(lab_name):
    """SIGKILL at random points of `lab up`; `lab down --all` leaves nothing."""
    rng = random.Random(1234)
    for _ in range(5):
        proc = subprocess.Popen([*HOSTROUTING, "lab", "up", "--lab", lab_name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        down = cli("lab", "down", "--all")
        assert down.returncode == 0, down.stderr
        assert lab_namespaces(lab_name) == []


def test_cli_errors_are_one_line(lab_name, tmp_path):
    dual = tmp_path / "dual.toml"
    dual.write_text('[lab]\nip_family = "dual"\n')
    for args in (["lab", "down", "--lab", lab_name], ["lab", "up", "--lab", "Bad!"],
                 ["lab", "up", "--lab", lab_name, "--nodes", "0"],
                 ["lab", "up", "--lab", lab_name, "--topology", str(dual), "--ip-family",
                  "ipv4"],
                 ["lab", "up", "--lab", lab_name, "--topology", "/nonexistent.toml"]):
        proc = cli(*args)
        assert proc.returncode == 1, args
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hostrouting: error:"), \
            proc.stderr
    assert lab_namespaces(lab_name) == []


@pytest.mark.slow
def test_longest_lab_name_with_ten_nodes_comes_up_routes_and_goes(private_state_dir):
    """An 8-character lab name and --nodes 10 (both allowed) gave 'node10' pods host veths
    of 20 characters; Linux allows 15. Interface names are now <lab>-<node #>-<pod #>, with
    the readable name as the interface's alias."""
    from tests.labtools import fresh_lab_name
    lab = fresh_lab_name() + "long"
    assert len(lab) == 8
    try:
        up = cli("lab", "up", "--lab", lab, "--nodes", "10", "--pods-per-node", "1",
                 timeout=120)
        assert up.returncode == 0, up.stderr
        assert f"lab {lab}: 10 nodes, 10 pods" in up.stdout
        from tests.labtools import assert_ping
        assert_ping(f"{lab}-node1-pod1", "198.18.10.10")
        assert_ping(f"{lab}-node10-pod1", "198.18.9.10")
        links = {link["ifname"]: link for link in json.loads(netns.run(
            f"{lab}-node10", ["ip", "-j", "link", "show"]).stdout)}
        assert links[f"{lab}-10-1"]["ifalias"] == f"{lab}-node10-pod1"
        assert f"{lab}-uplink" in links
        ports = {link["ifname"]: link.get("ifalias") for link in json.loads(netns.run(
            f"{lab}-fabric", ["ip", "-j", "link", "show", "master", "br0"]).stdout)}
        assert ports == {f"{lab}-{i}": f"{lab}-node{i}" for i in range(1, 11)}
    finally:
        down = cli("lab", "down", "--lab", lab)
    assert down.returncode == 0, down.stderr
    assert lab_namespaces(lab) == []
    assert [p.name for p in private_state_dir.rglob("*") if lab in p.name] == []
    root_links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                           text=True, check=True).stdout)
    assert [l["ifname"] for l in root_links if lab in l["ifname"] + l.get("ifalias", "")] == []


@pytest.mark.parametrize("args, expected", [
    (["lab", "up", "--nodes", "abc"], "lab up: argument --nodes: invalid int value: 'abc'"),
    (["lab", "up", "--pods-per-node"], "lab up: argument --pods-per-node: expected one argument"),
    (["lab", "up", "--mode", "fast"], "lab up: argument --mode: invalid choice: 'fast'"),
    (["lab", "up", "--ip-family", "ipv5"], "lab up: argument --ip-family: invalid choice"),
    (["lab", "up", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: COMMAND"),
    (["lab"], "lab: the following arguments are required: LAB_COMMAND"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    (["nat", "list", "--json", "extra"], "unrecognized arguments: extra"),
    (["monitor", "--count", "1.5"], "monitor: argument --count: invalid int value: '1.5'"),
    (["bench", "--sizes", "x,y"], "bench: argument --sizes: 'x,y': expected a comma-separated"),
    (["bench", "compare", "a.json"], "bench compare: the following arguments are required"),
])
def test_command_line_mistakes_are_one_line_errors(args, expected):
    """argparse printed its usage and then the error: four lines for `--nodes abc`."""
    proc = cli(*args)
    assert proc.returncode == 2, (args, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hostrouting: error: "), \
        proc.stderr
    assert expected in proc.stderr and "--help)" in proc.stderr, proc.stderr
