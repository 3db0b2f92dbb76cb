"""Hardening: a hostile pod, an external host knocking, faults, leaks, bad input, load.

Each test would fail without the protection it names. The figures these
tests print (with -s) are the ones in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapath import libbpf, switch
from netns_lab import netns
from netns_lab.state import load_state
from tests.labtools import (SPOOF, lab_counters, background, conntrack_entries, netserver, udp_echo,
                            udp_request)

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "datapath.cli"]


counters = lab_counters


# -- a hostile pod ----------------------------------------------------------------------------

RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353)); s.settimeout(float(sys.argv[1]))
got = []
try:
    while True:
        got.append(s.recvfrom(100)[1][0])
except socket.timeout:
    pass
print(" ".join(got))
"""


@pytest.mark.slow
def test_a_pod_cannot_send_with_another_source_ip_or_mac(make_lab):
    _, topo = make_lab("ebpf")
    (a1, a2), (b1, _) = topo.nodes[0].pods, topo.nodes[1].pods
    with netns.ipr(a1.netns) as sock:
        own_mac = netns.link_mac(sock, netns.ifindex(sock, "eth0"))
    with netns.ipr(topo.nodes[0].netns) as sock:
        gw_mac = netns.link_mac(sock, netns.ifindex(sock, a1.host_ifname))
    before = counters(topo)["node1"]["drop_spoofed"]
    recv = subprocess.Popen(["ip", "netns", "exec", b1.netns, sys.executable, "-c", RECEIVER,
                             "5"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    cases = [f"{a2.ip},{own_mac}",                 # another pod's address
             f"198.18.77.7,{own_mac}",             # an address nobody has
             f"{a1.ip},02:66:66:66:66:66",         # its own address, another MAC
             f"{a1.ip},{own_mac}"]                 # honest: must arrive
    proc = netns.run(a1.netns, [sys.executable, "-c", SPOOF, b1.ip, gw_mac, "5", *cases],
                     check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = recv.communicate(timeout=10)[0].split()
    assert seen == [a1.ip] * 5, seen              # only the honest datagrams arrived
    assert counters(topo)["node1"]["drop_spoofed"] - before == 15


@pytest.mark.slow
def test_other_nodes_host_namespaces_are_closed_to_pods_unless_the_topology_allows(make_lab,
                                                                                   tmp_path):
    _, topo = make_lab("ebpf")
    a1, node2 = topo.nodes[0].pods[0], topo.nodes[1]
    with background(node2.netns, [sys.executable, "-m", "http.server", "8081", "--bind",
                                  node2.ip], port=8081):
        get = [sys.executable, "-c", "import urllib.request, sys; urllib.request.urlopen("
               f"'http://{node2.ip}:8081/', timeout=2)"]
        assert netns.run(a1.netns, get, check=False).returncode != 0
        assert netns.run(topo.nodes[0].netns, get, check=False).returncode == 0   # node to node
    assert counters(topo)["node1"]["drop_pod_to_node"] >= 1

    allowed = tmp_path / "allowed.toml"
    allowed.write_text("[lab]\npods_reach_nodes = true\n")
    _, topo2 = make_lab("ebpf", topology=str(allowed))
    a1, node2 = topo2.nodes[0].pods[0], topo2.nodes[1]
    with background(node2.netns, [sys.executable, "-m", "http.server", "8081", "--bind",
                                  node2.ip], port=8081):
        get = [sys.executable, "-c", "import urllib.request, sys; urllib.request.urlopen("
               f"'http://{node2.ip}:8081/', timeout=2)"]
        assert netns.run(a1.netns, get, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["legacy", "ebpf"])
def test_the_outside_reaches_pods_only_with_replies(make_lab, mode):
    """A fabric that routes pod CIDRs (a flat network): legacy lets the external host in,
    eBPF host routing drops it at the node, counted."""
    _, topo = make_lab(mode)
    node, pod, ext = topo.nodes[0], topo.nodes[0].pods[0], topo.external
    netns.run(topo.fabric_netns, ["ip", "route", "add", node.pod_cidr, "via", node.ip])
    recv = subprocess.Popen(["ip", "netns", "exec", pod.netns, sys.executable, "-c", RECEIVER,
                             "2"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    netns.run(ext.netns, [sys.executable, "-c", "import socket; s = socket.socket(socket.AF_INET,"
                          f" socket.SOCK_DGRAM); [s.sendto(b'knock', ('{pod.ip}', 5353)) "
                          "for _ in range(3)]"])
    seen = recv.communicate(timeout=10)[0].split()
    if mode == "legacy":
        assert seen == [ext.ip] * 3         # the route works: only the datapath can stop it
    else:
        assert seen == []
        assert counters(topo)["node1"]["drop_not_from_cluster"] == 3
        with udp_echo(ext.netns):           # while the pod's own flows still get replies
            assert udp_request(pod.netns, ext.ip) == f"hello from {node.ip}"


# -- faults: SIGKILL at random points, then lab down --all --------------------------------------

def _env(state_dir: Path) -> dict:
    return dict(os.environ, HOSTROUTING_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO))


def _lab_traces(lab: str, state_dir: Path) -> dict:
    """What could be left of a lab: namespaces, root-namespace links, state, pinned objects,
    programs and maps (identified by the lab's unique NAT table size)."""
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    pinned = [str(p) for p in Path("/sys/fs/bpf").rglob("*") if lab in p.name] \
        if Path("/sys/fs/bpf").exists() else []
    return {
        "netns": sorted(n for n in os.listdir("/run/netns") if n.startswith(lab + "-"))
        if os.path.isdir("/run/netns") else [],
        "links": sorted(link["ifname"] for link in links      # names, or aliases (long names)
                        if lab in link["ifname"] + link.get("ifalias", "")),
        "state": sorted(p.name for p in state_dir.rglob("*") if p.is_file() and lab in p.name),
        "pinned": pinned,
    }


def _marked_bpf_objects(nat_entries: int) -> tuple[list[int], list[int]]:
    """Programs and maps that belong to datapaths built with this NAT map size."""
    progs, maps = [], []
    for map_id in libbpf.map_ids():
        try:
            with libbpf.map_fd_by_id(map_id) as fd:
                info = libbpf.map_info(fd)
        except OSError:
            continue
        if info.name in ("nat", "nat6") and info.max_entries == nat_entries:
            maps.append(map_id)
    for prog_id in libbpf.prog_ids():
        try:
            with libbpf.prog_fd_by_id(prog_id) as fd:
                info = libbpf.prog_info(fd)
        except OSError:
            continue
        if set(info.map_ids) & set(maps):
            progs.append(prog_id)
    return progs, maps


def _wait_gone(nat_entries: int, timeout: float = 10) -> tuple[list[int], list[int]]:
    """Programs and maps are freed asynchronously (RCU) after their last reference."""
    deadline = time.monotonic() + timeout
    while True:
        left = _marked_bpf_objects(nat_entries)
        if left == ([], []) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _topology(tmp_path: Path, flows: int, family: str = "ipv4") -> Path:
    path = tmp_path / f"t{flows}.toml"
    path.write_text(f'[lab]\nip_family = "{family}"\n[nat]\nmax_flows = {flows}\n')
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["enable", "disable", "bench"])
def test_sigkill_at_random_points_then_down_all_leaves_nothing(tmp_path, command):
    from tests.labtools import fresh_lab_name
    rng = random.Random(f"sigkill-{command}")      # seeded: the same points every run
    state_dir = tmp_path / "state"
    env = _env(state_dir)
    points = [rng.uniform(0.05, 2.5) for _ in range(3)]
    for delay in points:
        lab = fresh_lab_name()
        flows = rng.randrange(5000, 9000)           # marks this lab's BPF objects
        topo = _topology(tmp_path, flows, "dual")   # its datapath pins progs6 too
        if command == "bench":
            argv = CLI + ["bench", "--quick", "--lab-prefix", lab[:5], "--tests", "TCP_RR",
                          "--scenarios", "same-node"]
            lab_names = [lab[:5] + suffix for suffix in "lecf"]     # legacy, eBPF, limit, floor
        else:
            up = subprocess.run(CLI + ["lab", "up", "--lab", lab, "--topology", str(topo),
                                       "--mode", "legacy" if command == "enable" else "ebpf"],
                                env=env, capture_output=True, text=True, timeout=120)
            assert up.returncode == 0, up.stderr
            argv = CLI + [command, "--lab", lab]
            lab_names = [lab]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)          # the CLI and everything it started
        proc.wait()
        down = subprocess.run(CLI + ["lab", "down", "--all"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        for name in lab_names:
            assert _lab_traces(name, state_dir) == {"netns": [], "links": [], "state": [],
                                                    "pinned": []}, (command, delay)
        if command != "bench":
            assert _wait_gone(2 * flows) == ([], []), (command, delay)
    print(f"SIGKILL during {command} at {', '.join(f'{p:.2f}s' for p in points)}: nothing left")


@pytest.mark.slow
def test_twenty_cycles_leak_no_fds_programs_or_maps(tmp_path):
    """lab up / enable / disable / down in this very process, 20 times (each compiles the
    programs, 3-4 s: a leak of one fd, program or map per cycle shows after one)."""
    from datapath.switch import configure_mode
    from netns_lab.builder import lab_down, lab_up
    from netns_lab.topology import load_topology
    from tests.labtools import fresh_lab_name

    flows = 4321
    topo_file = _topology(tmp_path, flows)

    def cycle():
        topo = load_topology(fresh_lab_name(), str(topo_file), 1, 1)
        lab_up(topo, configure_mode("legacy"))
        switch.enable_ebpf(load_state(topo.lab), topo)
        assert len(_marked_bpf_objects(2 * flows)[0]) == 2        # from_pod, from_underlay
        switch.disable_ebpf(load_state(topo.lab), topo)
        lab_down(topo.lab)

    cycle()         # warm-up: what the first use loads for good (bcc, libbpf, pyroute2)
    assert _wait_gone(2 * flows) == ([], [])
    fds_before = len(os.listdir("/proc/self/fd"))
    progs_before, maps_before = len(libbpf.prog_ids()), len(libbpf.map_ids())
    cycles = 20
    for _ in range(cycles):
        cycle()
    assert _wait_gone(2 * flows) == ([], [])
    fds_after = len(os.listdir("/proc/self/fd"))
    progs_after, maps_after = len(libbpf.prog_ids()), len(libbpf.map_ids())
    print(f"{cycles} cycles: fds {fds_before} -> {fds_after}, programs on the machine "
          f"{progs_before} -> {progs_after}, maps {maps_before} -> {maps_after}")
    assert fds_after <= fds_before


# -- bad input --------------------------------------------------------------------------------

def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hostrouting: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_without_root_every_command_says_so_in_one_line(tmp_path):
    env = _env(tmp_path)
    for argv in (["lab", "up", "--lab", "nr"], ["enable", "--lab", "nr"], ["bench", "--quick"],
                 ["nat", "list", "--lab", "nr"], ["lab", "down", "--all"]):
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               *CLI, *argv], env=env, capture_output=True, text=True, timeout=60,
                              cwd=REPO)
        assert "must run as root" in _one_line_error(proc), argv
    assert not [n for n in os.listdir("/run/netns") if n.startswith("nr-")]


def test_missing_netperf_is_one_line_and_builds_nothing(tmp_path):
    env = _env(tmp_path)
    env["PATH"] = "/nonexistent"                     # no netperf (nor anything else) on PATH
    proc = subprocess.run([*CLI, "bench", "--quick", "--lab-prefix", "nonp"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "netperf" in _one_line_error(proc)
    assert not [n for n in os.listdir("/run/netns") if n.startswith("nonp")]


def test_missing_kernel_headers_is_one_line_and_leaves_no_lab(tmp_path):
    """As on a machine without headers for the running kernel: bcc cannot compile."""
    script = ("import platform, sys; platform.release = lambda: '0.0.0-no-headers'; "
              "from datapath import cli; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "lab", "up", "--lab", "nohd",
                           "--mode", "ebpf"], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert "kernel headers for 0.0.0-no-headers are missing" in _one_line_error(proc)
    assert not [n for n in os.listdir("/run/netns") if n.startswith("nohd-")]


@pytest.mark.parametrize("argv", [
    ["lab", "up", "--nodes", "0"], ["lab", "up", "--nodes", "x"], ["lab", "up", "--lab", "BAD!"],
    ["bench", "--sizes", "a,b"], ["bench", "--duration", "-1"], ["bench", "--duration", "0.5"],
    ["bench", "--tcp-cc", "nosuch"],
    ["enable", "--lab", "nosuch"],
    ["nat", "list", "--lab", "nosuch"], ["monitor", "--lab", "nosuch"],
])
def test_invalid_arguments_are_one_line_and_create_nothing(tmp_path, argv):
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    proc = subprocess.run([*CLI, *argv], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("hostrouting: error: ", "usage: ")) or "error:" in last, proc.stderr
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    # under xdist other tests' namespaces come and go meanwhile: their labs (a letter and 3
    # hex digits), the BPF tests' (hrtest-) and the doctor's throwaway one (hrdoctor-); none of
    # the commands here could make one of those
    assert not {n for n in after - before
                if not re.match(r"^([a-z][0-9a-f]{3}|hrtest|hrdoctor)-", n)}


# -- load ---------------------------------------------------------------------------------------

def _link_packets(ns: str, ifname: str) -> tuple[int, int]:
    out = netns.run(ns, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["packets"], stats["tx"]["packets"]


@pytest.mark.slow
def test_sustained_load_every_packet_is_counted_and_the_nat_table_drains(make_lab, tmp_path):
    """netperf streams plus thousands of short SNAT flows (TCP_CRR) from several pods.

    Every packet that entered a program is counted under exactly one reason, so the counters
    add up to what the devices saw: the pods' eth0 transmitted (from_pod) plus what the
    uplink received (from_underlay). Drops are among them, each with its reason.
    """
    topo_file = tmp_path / "load.toml"
    topo_file.write_text("[nat]\ntimeout_tcp_closing = 2\ntimeout_tcp_syn = 5\n"
                         "timeout_udp = 5\ntimeout_icmp = 5\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    (a1, a2), (b1, b2) = topo.nodes[0].pods, topo.nodes[1].pods
    ext = topo.external
    devices = {n.name: [(p.netns, "eth0", "tx") for p in n.pods] +
               [(n.netns, topo.uplink_ifname, "rx")] for n in topo.nodes}

    def device_total(node):
        total = 0
        for ns, dev, way in devices[node]:
            rx, tx = _link_packets(ns, dev)
            total += tx if way == "tx" else rx
        return total

    def counter_total(node):
        return sum(counters(topo)[node].values())

    base = {n.name: (device_total(n.name), counter_total(n.name)) for n in topo.nodes}
    seconds = 8
    with netserver(ext.netns), netserver(b2.netns):
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, "netperf", "-H", host, "-t", test,
                                   "-l", str(seconds), "-P", "0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for ns, host, test in ((a1.netns, ext.ip, "TCP_CRR"),
                                        (a2.netns, ext.ip, "TCP_CRR"),
                                        (b1.netns, ext.ip, "TCP_CRR"),
                                        (a1.netns, b2.ip, "TCP_STREAM"),
                                        (b2.netns, ext.ip, "TCP_STREAM"))]
        results = [p.communicate(timeout=seconds + 30) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    connections = sum(float(out.splitlines()[0].split()[-1]) * seconds for out, _ in results[:3])
    time.sleep(0.5)
    peak = {n.name: len(switch.nat_flows(load_state(topo.lab), topo)[n.name]) for n in topo.nodes}
    for node in topo.nodes:
        seen = device_total(node.name) - base[node.name][0]
        counted = counter_total(node.name) - base[node.name][1]
        assert counted == seen, f"{node.name}: devices saw {seen} packets, counters {counted}"
    c = counters(topo)
    drops = {k: v for n in c.values() for k, v in n.items() if k.startswith("drop_") and v}
    # closing flows expire after 2 s, the guard sweeps every 5 s: the table drains
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = {n: len(f) for n, f in switch.nat_flows(load_state(topo.lab), topo).items()}
        if sum(left.values()) <= 4:          # netperf's control connections may linger
            break
        time.sleep(1)
    print(f"load: {connections:.0f} short TCP connections through BPF SNAT in {seconds}s "
          f"plus 2 streams; NAT flows at the end {peak}, after expiry {left}; drops {drops}; "
          "counters == device packets on every node")
    assert sum(left.values()) <= 4, left
    assert connections > 1000
    for node in topo.nodes:
        assert conntrack_entries(node.netns, "-d", ext.ip) == []
