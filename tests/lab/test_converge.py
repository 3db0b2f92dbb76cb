"""The control plane converges (issue 16): kills at any kernel call, and drift by hand.

Fault injection: every call that changes the kernel passes
``netns_lab.faults.point``; with ``HOSTROUTING_FAULT_AT=k`` the CLI SIGKILLs
itself at the k-th. For each command (``lab up``, ``enable``, ``disable``,
``lab down``) the points are counted once (``HOSTROUTING_FAULT_TRACE``), and
for sampled k over the whole range (every k with ``HOSTROUTING_FAULT_EVERY=1``)
the command is killed there, the next command is run, and then: observed ==
desired (``status`` exits 0), pods reach each other and the external host,
and nothing leaked (exactly one guard in eBPF mode, none in legacy; no clsact
left in legacy; after ``lab down`` no namespace and no file of the lab).

Drift: a namespace, a veth, a filter deleted by hand, the guard killed, the
state directory wiped, a stale lock, the guard's pid reused by an unrelated
process: each ends with one command that repairs or removes, named by
``status`` or by the error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from datapath import rule_guard
from netns_lab import netns, procs
from netns_lab.builder import lab_namespaces
from netns_lab.state import guard_pidfile, lab_files, load_state
from netns_lab.topology import Topology
from tests.labtools import fresh_lab_name, ping

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "datapath.cli"]
EVERY = os.environ.get("HOSTROUTING_FAULT_EVERY") == "1"


def cli(*argv: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def fault_points(tmp_path, *argv: str) -> int:
    """Run the command once, counting the points it passes."""
    trace = tmp_path / "trace"
    trace.unlink(missing_ok=True)
    proc = cli(*argv, env={"HOSTROUTING_FAULT_TRACE": str(trace)})
    assert proc.returncode == 0, proc.stderr
    return len(trace.read_text().splitlines())


def killed_at(k: int, *argv: str) -> None:
    proc = cli(*argv, env={"HOSTROUTING_FAULT_AT": str(k)})
    assert proc.returncode == -signal.SIGKILL, (k, proc.returncode, proc.stderr)


def sample(n: int, count: int) -> list[int]:
    """count points spread evenly over 1..n, first and last included (all with EVERY)."""
    if EVERY or n <= count:
        return list(range(1, n + 1))
    return sorted({1 + round(i * (n - 1) / (count - 1)) for i in range(count)})


def guards(lab: str) -> list[procs.Process]:
    found = rule_guard.find(lab)
    return ([found.guard] if found.guard else []) + found.orphans


def topology(lab: str) -> Topology:
    return Topology.from_dict(load_state(lab).topology)


def assert_converged(lab: str, mode: str) -> None:
    """status says observed == desired, pods reach each other and the outside, and nothing
    of the other mode is left (guards, clsact qdiscs)."""
    proc = cli("status", "--lab", lab, "--json")
    status = json.loads(proc.stdout)
    assert proc.returncode == 0 and status["converged"], (proc.stderr, status)
    assert {n["mode"] for n in status["nodes"]} == {mode}
    assert len(guards(lab)) == (1 if mode == "ebpf" else 0)
    topo = topology(lab)
    a, b = topo.nodes[0].pods[0], topo.nodes[1].pods[0]
    for src, dst in ((a.netns, b.ip), (b.netns, a.ip), (a.netns, topo.external.ip)):
        assert ping(src, dst).returncode == 0, (src, dst)
    if mode == "legacy":
        for node in topo.nodes:
            assert "clsact" not in netns.run(node.netns, ["tc", "qdisc", "show"]).stdout


def assert_gone(lab: str) -> None:
    assert lab_namespaces(lab) == []
    assert lab_files(lab) == []
    assert procs.find(str(guard_pidfile(lab))) == []


@pytest.fixture
def small_lab(lab_name):
    proc = cli("lab", "up", "--lab", lab_name, "--pods-per-node", "1")
    assert proc.returncode == 0, proc.stderr
    return lab_name


def test_killed_enable_or_disable_at_any_call_then_the_next_one_converges(small_lab, tmp_path):
    """Pairs: enable killed at k, enable again (ebpf, traffic, one guard); disable killed at
    k', disable again (legacy, traffic, no guard, no clsact)."""
    lab = small_lab
    n_enable = fault_points(tmp_path, "enable", "--lab", lab)
    n_disable = fault_points(tmp_path, "disable", "--lab", lab)
    ks_enable, ks_disable = sample(n_enable, 4), sample(n_disable, 4)
    for k_en, k_dis in zip(ks_enable, ks_disable + ks_disable[-1:] * len(ks_enable)):
        killed_at(k_en, "enable", "--lab", lab)
        assert cli("enable", "--lab", lab).returncode == 0
        assert_converged(lab, "ebpf")
        killed_at(k_dis, "disable", "--lab", lab)
        assert cli("disable", "--lab", lab).returncode == 0
        assert_converged(lab, "legacy")
    print(f"enable: {n_enable} points, killed at {ks_enable}; "
          f"disable: {n_disable} points, killed at {ks_disable}")


def test_killed_lab_up_or_down_at_any_call_then_lab_down_leaves_nothing(tmp_path):
    lab = fresh_lab_name()
    up = ("lab", "up", "--lab", lab, "--pods-per-node", "1", "--mode", "ebpf")
    try:
        n_up = fault_points(tmp_path, *up)
        n_down = fault_points(tmp_path, "lab", "down", "--lab", lab)
        assert_gone(lab)
        ks_up, ks_down = sample(n_up, 6), sample(n_down, 3)
        for k in ks_up:
            killed_at(k, *up)
            proc = cli(*up)           # a killed lab up is named, not built over
            assert proc.returncode == 1 and "lab down --lab" in proc.stderr, proc.stderr
            assert cli("lab", "down", "--lab", lab).returncode == 0
            assert_gone(lab)
        for k in ks_down:
            assert cli(*up).returncode == 0
            killed_at(k, "lab", "down", "--lab", lab)
            proc = cli("enable", "--lab", lab)    # half removed: only lab down goes on
            assert proc.returncode == 1 and f"lab down --lab {lab}" in proc.stderr, proc.stderr
            assert cli("lab", "down", "--lab", lab).returncode == 0
            assert_gone(lab)
        print(f"lab up: {n_up} points, killed at {ks_up}; lab down: {n_down} points, "
              f"killed at {ks_down}")
    finally:
        cli("lab", "down", "--lab", lab)
