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

Drift: a namespace, a veth, a program detached by hand (TCX or a clsact
filter), the guard killed, the state directory wiped, a stale lock, the
guard's pid reused by an unrelated process: each ends with one command that repairs or removes, named by
``status`` or by the error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from datapath import libbpf, rule_guard, tc_attach
from netns_lab import netns, procs
from netns_lab.builder import foreign_namespaces, lab_namespaces
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
    """count points spread evenly over 1..n, the last included (all of them with EVERY): the
    suite's time is bounded, a run with HOSTROUTING_FAULT_EVERY=1 tries every point."""
    if EVERY or n <= count:
        return list(range(1, n + 1))
    return sorted({round((i + 1) * n / count) for i in range(count)})


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
    assert {n["attach"] for n in status["nodes"]} == \
        ({tc_attach.default_mode()} if mode == "ebpf" else {None})
    assert len(guards(lab)) == (1 if mode == "ebpf" else 0)
    topo = topology(lab)
    a, b = topo.nodes[0].pods[0], topo.nodes[1].pods[0]
    for src, dst in ((a.netns, b.ip), (b.netns, a.ip), (a.netns, topo.external.ip)):
        assert ping(src, dst).returncode == 0, (src, dst)
    if mode == "legacy":
        for node in topo.nodes:
            assert "clsact" not in netns.run(node.netns, ["tc", "qdisc", "show"]).stdout


def assert_gone(lab: str) -> None:
    assert lab_namespaces(lab) + foreign_namespaces(lab) == []     # nothing named <lab>-*
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
    ks_enable, ks_disable = sample(n_enable, 2), sample(n_disable, 2)
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
        ks_up, ks_down = sample(n_up, 3), sample(n_down, 2)
        for k in ks_up:
            killed_at(k, *up)
            proc = cli(*up)           # a killed lab up is named, not built over
            assert proc.returncode == 1 and "lab down --lab" in proc.stderr, proc.stderr
            assert_one_line_error(cli("enable", "--lab", lab), "lab up has not finished",
                                  f"lab down --lab {lab}")
            assert cli("lab", "down", "--lab", lab).returncode == 0
            assert_gone(lab)
        for k in ks_down:
            assert cli(*up).returncode == 0
            killed_at(k, "lab", "down", "--lab", lab)
            # half removed: only lab down goes on
            assert_one_line_error(cli("enable", "--lab", lab), f"lab down --lab {lab}")
            assert cli("lab", "down", "--lab", lab).returncode == 0
            assert_gone(lab)
        print(f"lab up: {n_up} points, killed at {ks_up}; lab down: {n_down} points, "
              f"killed at {ks_down}")
    finally:
        cli("lab", "down", "--lab", lab)


# -- drift: changed by hand, each repaired or removed by one command --------------------------

@pytest.fixture(scope="module")
def drift_lab():
    """One eBPF lab for the drifts that enable repairs (each test leaves it converged)."""
    lab = fresh_lab_name()
    proc = cli("lab", "up", "--lab", lab, "--pods-per-node", "1", "--mode", "ebpf")
    assert proc.returncode == 0, proc.stderr
    yield lab
    cli("lab", "down", "--lab", lab)


def status_of(lab: str) -> tuple[int, dict, str]:
    proc = cli("status", "--lab", lab, "--json")
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def assert_drift_named(lab: str, words: str, fix: str) -> None:
    code, status, err = status_of(lab)
    found = status["differences"] + [d for n in status["nodes"] for d in n["differences"]]
    assert code == 3 and any(words in d for d in found), found
    assert status["fix"] == fix and f"converge with: {fix}" in err


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and \
        proc.stderr.startswith("hostrouting: error: "), proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr


def remove_by_hand(ns: str, dev: str) -> list[str]:
    """What an admin would do to our program on the device's ingress: a TCX program
    detached with BPF_PROG_DETACH (bpftool's way), a clsact filter with `tc filter del`.
    Returns how each was attached."""
    found = tc_attach.attached(ns, dev, "ingress")
    for a in found:
        if a.kind == "tcx":
            with libbpf.prog_fd_by_id(a.prog_id) as fd:
                assert netns.call_in(ns, lambda: libbpf.prog_detach(
                    fd, socket.if_nametoindex(dev), libbpf.BPF_TCX_INGRESS))
        else:
            netns.run(ns, ["tc", "filter", "del", "dev", dev, "ingress"])
    assert tc_attach.attached(ns, dev, "ingress") == []
    return [a.mode for a in found]


def test_a_deleted_filter_is_attached_again_and_the_nat_flows_stay(drift_lab):
    """node1's only pod program detached by hand (TCX, then a clsact filter: enable run with
    HOSTROUTING_ATTACH=clsact repairs with one): from_pod is gone with it, from_underlay (and
    the NAT table) stays; enable loads a new datapath that takes over the NAT entries. Then
    both programs removed: no datapath left, stats and nat list say so in one line."""
    lab = drift_lab
    topo = topology(lab)
    node, pod = topo.nodes[0], topo.nodes[0].pods[0]
    assert ping(pod.netns, topo.external.ip).returncode == 0
    before = json.loads(cli("nat", "list", "--lab", lab, "--json").stdout)["nodes"][node.name]
    assert before
    modes = []
    for repair in ("clsact", "auto"):
        modes += remove_by_hand(node.netns, pod.host_ifname)
        assert_drift_named(lab, f"{pod.host_ifname}: no program attached",
                           f"hostrouting enable --lab {lab}")
        proc = cli("enable", "--lab", lab, env={tc_attach.MODE_ENV: repair})
        assert proc.returncode == 0, proc.stderr
        assert [a.mode for a in tc_attach.attached(node.netns, pod.host_ifname)] == \
            [repair if repair != "auto" else tc_attach.default_mode()]
        after = json.loads(cli("nat", "list", "--lab", lab, "--json").stdout)["nodes"][node.name]
        assert {(f["pod"], f["nat"]) for f in before} <= {(f["pod"], f["nat"]) for f in after}
    assert modes == [tc_attach.default_mode(), "clsact"]
    assert_converged(lab, "ebpf")

    for dev in (pod.host_ifname, topo.uplink_ifname):
        remove_by_hand(node.netns, dev)
    for argv in (("stats",), ("nat", "list")):
        assert_one_line_error(cli(*argv, "--lab", lab), f"node {node.name}", "status --lab")
    assert cli("enable", "--lab", lab).returncode == 0
    assert_converged(lab, "ebpf")


def test_a_killed_guard_is_started_again(drift_lab):
    lab = drift_lab
    guard = rule_guard.find(lab).guard
    os.killpg(guard.pid, signal.SIGKILL)
    while guard.alive():
        time.sleep(0.05)
    assert_drift_named(lab, "rule guard not running", f"hostrouting enable --lab {lab}")
    assert cli("enable", "--lab", lab).returncode == 0
    assert_converged(lab, "ebpf")
    assert rule_guard.find(lab).guard.pid != guard.pid


def test_a_guard_to_replace_is_kept_when_user_rules_refuse_a_new_one(drift_lab, monkeypatch):
    """A guard that must be replaced (stuck: stopped, so a user rule stays), with a rule
    nobody accepted: enable refuses before it stops the old guard, never leaving eBPF on
    with none; once the guard runs again it reverts the rule."""
    from datapath import converge, iptables_rules
    lab = drift_lab
    state, topo = load_state(lab), topology(lab)
    node = topo.nodes[0]
    guard = rule_guard.find(lab).guard
    os.killpg(guard.pid, signal.SIGSTOP)      # keeper, worker and monitors
    try:
        for argv in (["add", "table", "inet", "zqt"],
                     ["add", "chain", "inet", "zqt", "c", "{ type filter hook forward "
                      "priority 0; }"], ["add", "rule", "inet", "zqt", "c", "counter"]):
            netns.run(node.netns, ["nft", *argv])
        monkeypatch.setattr(rule_guard, "HEARTBEAT_STALE_S", -1.0)     # stuck: to replace
        with pytest.raises(converge.SwitchError, match="refusing to enable"):
            converge.ensure_guard(state, topo, list(topo.nodes))
        assert rule_guard.find(lab).guard == guard and guard.alive()
    finally:
        os.killpg(guard.pid, signal.SIGCONT)
    monkeypatch.undo()
    deadline = time.monotonic() + 30
    while iptables_rules.user_rules(node.netns):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert_converged(lab, "ebpf")
    assert rule_guard.find(lab).guard == guard


def test_a_stale_endpoint_makes_the_datapath_one_to_replace(drift_lab):
    """An endpoint whose IP is the pod's but whose MAC or veth ifindex is not (what a veth
    recreated under the same name would leave): the datapath is not kept; enable loads one
    that reaches the pod again."""
    from datapath import switch
    from datapath.host_routing import DatapathMaps
    lab = drift_lab
    topo = topology(lab)
    node, pod = topo.nodes[0], topo.nodes[0].pods[0]
    with netns.ipr(node.netns) as sock:
        hidx = netns.ifindex(sock, pod.host_ifname)
        host_mac = netns.link_mac(sock, hidx)
    ids = switch.node_programs(topo, node)
    for ifindex, mac in ((hidx, "02:00:00:00:00:01"), (hidx + 1000, None)):
        with DatapathMaps.from_prog_id(ids["from_pod"]) as maps:
            ep = maps.endpoints()[pod.ip]
            maps.set_endpoint(pod.ip, ifindex, mac or ep.mac, host_mac)
        assert_drift_named(lab, f"its endpoint {pod.ip} is not the pod's veth",
                           f"hostrouting enable --lab {lab}")
        assert cli("enable", "--lab", lab).returncode == 0
        assert switch.node_programs(topo, node)["from_pod"] != ids["from_pod"]
        assert_converged(lab, "ebpf")
        ids = switch.node_programs(topo, node)


def test_a_pid_reused_by_another_process_is_never_signalled(drift_lab, tmp_path):
    """The pidfile names a process that is not (any more) the guard: another start time, or
    the same identity but another command. Neither is trusted, nor signalled; enable starts
    a guard of its own."""
    lab = drift_lab
    path = guard_pidfile(lab)
    found = rule_guard.find(lab)
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        me = procs.Process.of(stranger.pid)
        for start_time in (me.start_time + 1, me.start_time):     # then even its identity
            path.write_text(json.dumps(dict(found.details, pid=stranger.pid,
                                            start_time=start_time)))
            # the real guard, no longer named by the pidfile, is an orphan now
            assert_drift_named(lab, "rule guard not running", f"hostrouting enable --lab {lab}")
            assert cli("enable", "--lab", lab).returncode == 0
            assert stranger.poll() is None                  # never signalled
            assert_converged(lab, "ebpf")
            assert found.guard.alive() is False             # the orphan was stopped
            found = rule_guard.find(lab)
            assert found.guard.pid != stranger.pid
    finally:
        stranger.kill()
        stranger.wait()


def test_a_killed_monitor_leaves_tracing_on_until_enable(drift_lab):
    lab = drift_lab
    monitor = subprocess.Popen([*CLI, "monitor", "--lab", lab], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    topo = topology(lab)
    try:
        deadline = time.monotonic() + 60
        while not status_of(lab)[1]["nodes"][1]["trace"]:    # the monitor traces every node
            assert monitor.poll() is None and time.monotonic() < deadline, monitor.stderr.read()
            time.sleep(0.1)
        assert status_of(lab)[0] == 0           # a running monitor's tracing is wanted
    finally:
        os.killpg(monitor.pid, signal.SIGKILL)
        monitor.wait()
    assert_drift_named(lab, "tracing is on with no monitor running",
                       f"hostrouting enable --lab {lab}")
    assert cli("enable", "--lab", lab).returncode == 0
    assert_converged(lab, "ebpf")
    assert not any(n["trace"] for n in status_of(lab)[1]["nodes"])
    assert ping(topo.nodes[0].pods[0].netns, topo.nodes[1].pods[0].ip).returncode == 0


def test_a_stale_lock_is_taken_and_a_held_one_names_its_holder(drift_lab, tmp_path):
    lab = drift_lab
    lock = lab_files(lab)[0].parent / f"{lab}.lock"
    lock.write_text("pid 999999999 (a process long gone)\n")       # stale: nobody holds it
    assert cli("enable", "--lab", lab).returncode == 0
    holder = subprocess.Popen(["flock", str(lock), "sleep", "300"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock.write_text(f"pid {holder.pid} (flock sleep)\n")
        proc = cli("disable", "--lab", lab, env={"HOSTROUTING_LOCK_TIMEOUT": "0.5"})
        assert_one_line_error(proc, f"is locked by pid {holder.pid}", "gave up after 0.5s")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)      # flock and its sleep, which holds the lock
        holder.wait()
    assert_converged(lab, "ebpf")       # the refused disable changed nothing


def test_a_lock_file_removed_while_held_gives_the_lock_to_one_holder_at_a_time(lab_name,
                                                                                 monkeypatch):
    """A waits with the lock held by the lab's removal, which unlinks the file: the waiter
    then holds a lock on a file nobody else opens any more, while a newcomer locks a new
    file at the same path. After flock the file must still be the path's (same inode).
    The removal goes on only once the waiter has found the old file locked (flock, wrapped,
    says so), and the waiter must have taken the lock at least twice: the removed file's,
    then the path's."""
    import fcntl
    import threading
    from netns_lab.state import lab_lock, labs_dir
    inside, overlaps, events = [0], [], []
    released, waiting, waiter_locked = threading.Event(), threading.Event(), []
    real_flock = fcntl.flock

    def flock(fd, op):
        mine = threading.current_thread().name == "waiter" and op & fcntl.LOCK_EX
        try:
            real_flock(fd, op)
        except BlockingIOError:
            if mine:
                waiting.set()       # it holds the old file open and found it locked
            raise
        if mine:
            waiter_locked.append(fd)

    monkeypatch.setattr(fcntl, "flock", flock)

    def holder(name):
        with lab_lock(lab_name):
            inside[0] += 1
            overlaps.append(inside[0])
            events.append(name)
            time.sleep(0.3)
            inside[0] -= 1

    labs_dir().mkdir(parents=True, exist_ok=True)
    record = labs_dir() / f"{lab_name}.json"

    def remover():
        record.write_text("{}")
        with lab_lock(lab_name):
            events.append("remover")
            released.wait(5)
            record.unlink()         # the lab is gone: the lock file goes too, under the lock

    first = threading.Thread(target=remover)
    first.start()
    while "remover" not in events:
        time.sleep(0.01)
    waiter = threading.Thread(target=holder, args=("waiter",), name="waiter")
    waiter.start()
    assert waiting.wait(10)         # the waiter has opened the old file and waits on it
    released.set()
    first.join()
    newcomer = threading.Thread(target=holder, args=("newcomer",))
    newcomer.start()
    waiter.join()
    newcomer.join()
    assert sorted(events[1:]) == ["newcomer", "waiter"] and max(overlaps) == 1, overlaps
    # the removed file's lock, then the path's (again when the newcomer removed it too)
    assert len(waiter_locked) >= 2, waiter_locked


def test_a_deleted_namespace_or_veth_ends_in_lab_down(tmp_path):
    for what in ("namespace", "veth"):
        lab = fresh_lab_name()
        assert cli("lab", "up", "--lab", lab, "--pods-per-node", "1").returncode == 0
        topo = topology(lab)
        node, pod = topo.nodes[0], topo.nodes[0].pods[0]
        if what == "namespace":
            subprocess.run(["ip", "netns", "del", pod.netns], check=True)
            words = f"namespace {pod.netns} is gone"
        else:
            netns.run(node.netns, ["ip", "link", "del", pod.host_ifname])
            words = f"device {pod.host_ifname} is gone"
        assert_drift_named(lab, words, f"hostrouting lab down --lab {lab}")
        for command in ("enable", "disable"):   # each does what it can, then names lab down
            assert_one_line_error(cli(command, "--lab", lab), words,
                                  f"hostrouting lab down --lab {lab}")
        assert cli("lab", "down", "--lab", lab).returncode == 0
        assert_gone(lab)


def test_a_wiped_state_directory_ends_in_lab_down(lab_name, tmp_path):
    lab = lab_name
    assert cli("lab", "up", "--lab", lab, "--pods-per-node", "1", "--mode", "ebpf"
               ).returncode == 0
    wiped = {"HOSTROUTING_STATE_DIR": str(tmp_path / "wiped")}
    for argv in (("lab", "up"), ("status",), ("enable",)):
        assert_one_line_error(cli(*argv, "--lab", lab, env=wiped), "no record",
                              f"hostrouting lab down --lab {lab}")
    assert cli("lab", "down", "--lab", lab, env=wiped).returncode == 0
    assert lab_namespaces(lab) + foreign_namespaces(lab) == [] and \
        procs.find(str(guard_pidfile(lab))) == []
    # the first state directory still lists it: lab down there finds nothing left but files
    assert cli("lab", "down", "--lab", lab).returncode == 0
    assert_gone(lab)


def test_bench_tears_down_only_the_labs_it_built():
    """A lab named like one of the bench's own, there before the bench: lab up refuses to
    build over it, and the bench's teardown leaves it alone."""
    from datapath.bench.runner import Bench, BenchConfig
    from netns_lab.state import LabStateError
    bench = Bench(BenchConfig(lab_prefix=fresh_lab_name()[:4]))
    theirs = next(iter(bench.labs.values()))
    assert cli("lab", "up", "--lab", theirs, "--pods-per-node", "1").returncode == 0
    try:
        with pytest.raises(LabStateError, match="exists already"):
            bench.setup(say=lambda line: None)
        bench.teardown()
        assert_converged(theirs, "legacy")
    finally:
        cli("lab", "down", "--lab", theirs)


def test_a_half_masquerade_is_made_whole_in_one_transaction(lab_name):
    """What a kill between iptables -N and the jump used to leave (the chain, no jump), and
    a jump with an emptied chain: status names it, disable makes it whole, and pods reach
    the outside again."""
    from netns_lab import legacy
    assert cli("lab", "up", "--lab", lab_name, "--pods-per-node", "1").returncode == 0
    topo = topology(lab_name)
    node = topo.nodes[0]
    ipt = [legacy.iptables_binary(), "-t", "nat"]
    jump = ["-o", topo.uplink_ifname, "-m", "comment", "--comment", legacy.COMMENT,
            "-j", legacy.CHAIN]
    for damage in (["-D", "POSTROUTING", *jump], ["-F", legacy.CHAIN]):
        netns.run(node.netns, ipt + damage)
        assert ping(node.pods[0].netns, topo.external.ip).returncode != 0
        assert_drift_named(lab_name, "MASQUERADE partial (want present)",
                           f"hostrouting disable --lab {lab_name}")
        assert cli("disable", "--lab", lab_name).returncode == 0
        assert_converged(lab_name, "legacy")
