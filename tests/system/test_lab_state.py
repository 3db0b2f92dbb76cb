"""The lab record and its files, without building a lab (issue 16).

A record holds intent only; a record this version cannot read is a one-line
error naming ``lab down``, which works anyway; every ``<lab>.*`` file goes
with the lab, including those of labs whose record is already gone; pidfiles
are trusted only while pid, start time and command line match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from netns_lab import procs
from netns_lab.builder import lab_down, lab_down_all
from netns_lab.state import (LabState, LabStateError, lab_files, lab_names, labs_dir,
                             load_state, remove_lab_pins, stray_lab_names)


SLEEPER = "import time; print(flush=True); time.sleep(60)"


@pytest.fixture
def labs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTROUTING_STATE_DIR", str(tmp_path))
    labs_dir().mkdir(parents=True)
    return labs_dir()


def test_a_record_holds_desired_modes_and_the_mode_follows_them(labs):
    state = LabState(name="zq1", topology={"nodes": [{"name": "node1"}, {"name": "node2"}]})
    state.desire("ebpf")
    state.save()
    loaded = load_state("zq1")
    assert loaded.desired == {"node1": "ebpf", "node2": "ebpf"} and loaded.mode == "ebpf"
    loaded.desired["node2"] = "legacy"
    assert loaded.mode == "mixed"
    with pytest.raises(ValueError, match="mode must be one of"):
        loaded.desire("switching")
    assert not {"datapath", "guard_pid", "guard_backends"} & set(json.loads(
        (labs / "zq1.json").read_text()))


@pytest.mark.parametrize("content", ['{"name": "zq2", "topology": {}, "mode": "ebpf", '
                                     '"datapath": {}, "guard_pid": 7}', "{not json", "[]"])
def test_a_record_this_version_cannot_read_is_one_line_and_lab_down_still_works(labs, content):
    (labs / "zq2.json").write_text(content)
    (labs / "zq2.events.jsonl").write_text("")
    with pytest.raises(LabStateError, match=r"zq2.*remove the lab with: hostrouting lab down "
                                            r"--lab zq2$") as err:
        load_state("zq2")
    assert "\n" not in str(err.value)
    assert lab_down("zq2") == []
    assert lab_files("zq2") == []


def test_files_of_removed_labs_are_collected_by_down_all(labs):
    """A lab down killed after the record went leaves its other files: down --all finds them."""
    for name in ("zq3.lock", "zq3.json.tmp", "zq3.events.jsonl", "zq3.guard", "zq3.monitor-1"):
        (labs / name).write_text("")
    assert lab_names() == [] and stray_lab_names() == ["zq3"]
    assert lab_down_all() == {"zq3": []}
    assert list(labs.iterdir()) == []
    with pytest.raises(LabStateError, match="no lab named 'zq3'"):
        lab_down("zq3")


def test_a_pidfile_is_trusted_only_while_pid_start_time_and_command_match(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()     # exec'd: /proc has its command line, not ours
        me = procs.Process.of(child.pid)
        assert me.alive() and me.runs("-c") and not me.runs("datapath.rule_guard")
        later = procs.Process(child.pid, me.start_time + 1)    # the pid, another process
        assert not later.alive()
        assert later.stop() is False and me.stop("datapath.rule_guard") is False
        assert child.poll() is None                              # never signalled
        path = tmp_path / "x.guard"
        path.write_text(json.dumps({"pid": child.pid, "start_time": me.start_time, "a": 1}))
        assert procs.read_pidfile(path)[:2] == (me, {"a": 1})
        path.write_text("garbage")
        assert procs.read_pidfile(path) is None
    finally:
        child.kill()
        child.wait()
    assert not me.alive()


def test_lab_down_removes_no_namespace_only_named_like_the_lab(labs):
    """A namespace <lab>-... without the lab's marker (a Kubernetes node's cni-..., the BPF
    harness's hrtest-...) survives lab down --lab and --all, and its processes run on; one
    with the marker is the lab's, with a record or without."""
    from netns_lab.builder import lab_mark
    from tests.labtools import fresh_lab_name
    lab = fresh_lab_name()
    foreign, ours = f"{lab}-notalab", f"{lab}-node1"
    for ns in (foreign, ours):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ours, "link", "set", "lo", "alias", lab_mark(lab)], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", foreign, "sleep", "60"])
    try:
        assert lab_down(lab) == [ours]              # no record: the marked one only
        with pytest.raises(LabStateError, match=rf"^no lab named '{lab}' .*; not removing "
                                                rf"{foreign}: named like it, but without"):
            lab_down(lab)
        (labs / f"{lab}.events.jsonl").write_text("")   # a stray file: down --all visits it
        assert lab_down_all() == {lab: []}
        LabState(name=lab, topology={"nodes": []}).save()
        assert lab_down_all() == {lab: []}              # with a record
        assert os.path.exists(f"/run/netns/{foreign}") and sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
        for ns in (foreign, ours):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_lab_down_signals_no_process_that_only_names_the_guard_pidfile(labs):
    """Only a rule guard's own command line (-m datapath.rule_guard --lab <lab> --pidfile
    <path>) makes a process the lab's guard: one holding the pidfile's path, or those words
    in another order, is never signalled, even when the pidfile names it."""
    from datapath import rule_guard
    from tests.labtools import fresh_lab_name
    lab = fresh_lab_name()
    pidfile = labs / f"{lab}.guard"
    tails = ([f"/x/labs/{lab}.guard"], [str(pidfile)],
             ["-m", "datapath.rule_guard", "--lab", lab, "--pidfile", str(pidfile)])
    impostors = [subprocess.Popen([sys.executable, "-c", SLEEPER, *tail], stdout=subprocess.PIPE,
                                  start_new_session=True) for tail in tails]
    try:
        for p in impostors:
            p.stdout.readline()     # exec'd: /proc has its command line, not ours
        me = procs.Process.of(impostors[-1].pid)
        pidfile.write_text(json.dumps({"pid": me.pid, "start_time": me.start_time}))
        found = rule_guard.find(lab)
        assert found.guard is None and found.orphans == []
        assert lab_down(lab) == [] and rule_guard.stop_all(lab) == 0
        assert [p.poll() for p in impostors] == [None] * len(impostors)
    finally:
        for p in impostors:
            p.kill()
            p.wait()


def test_observe_only_reads_monitor_pidfiles_and_converge_collects_stale_ones(labs):
    """status (observe) writes nothing: a stale monitor pidfile (its process gone, or its
    pid another process's) stays until converge removes it; a running monitor's stays."""
    from datapath import converge, observe
    me = procs.Process.of(os.getpid())
    running, stale = labs / f"zq5.monitor-{me.pid}", labs / "zq5.monitor-1"
    running.write_text(json.dumps({"pid": me.pid, "start_time": me.start_time}))
    stale.write_text(json.dumps({"pid": 1, "start_time": 1}))      # init, another start time
    assert observe.monitors("zq5") == [me]
    assert stale.exists() and running.exists()
    assert converge.collect_monitor_pidfiles("zq5") == [stale.name]
    assert not stale.exists() and running.exists()


def test_a_guard_whose_periodic_thread_hangs_stops_its_heartbeat_and_exits(labs, monkeypatch):
    """A NAT sweep stuck inside a pass (alive, no progress) ends the heartbeat like a thread
    that died: the guard records GuardFailed and exits, and enable starts another."""
    import threading
    from datapath import events, rule_guard
    monkeypatch.setattr(rule_guard, "WORKER_STALL_S", -rule_guard.NAT_SWEEP_S - 1,
                        raising=False)      # a pass is overdue at once
    guard = rule_guard.Guard("zq7", {}, pidfile=None)
    hung = threading.Event()
    try:
        guard.worker(hung.wait, every=rule_guard.NAT_SWEEP_S)   # one pass that never ends
        assert guard.keep_running() == 1
    finally:
        hung.set()
    found = [e for e in events.read("zq7") if e["reason"] == "GuardFailed"]
    assert len(found) == 1 and "ended or hangs" in found[0]["message"], found


def _pin_a_map(lab: str) -> int:
    """A map pinned in the lab's pin directory as converge pins progs6; returns its id."""
    from datapath import libbpf
    from netns_lab.state import lab_pin_dir
    lab_pin_dir(lab).mkdir(parents=True)
    with libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY, "hrpintest", 4, 4, 1) as fd:
        libbpf.obj_pin(fd, str(lab_pin_dir(lab) / "node1_progs6"))
        return libbpf.map_info(fd).id


def _map_exists(map_id: int) -> bool:
    from datapath import libbpf
    try:
        libbpf.map_fd_by_id(map_id).close()
        return True
    except OSError:
        return False


def test_lab_down_removes_the_pins_of_labs_whose_namespaces_are_gone(labs):
    """The pin root is the machine's: a session killed with its own state directory leaves its
    labs' pins (and what they hold) behind. lab down --all removes those of a lab no namespace
    of which is left, whatever directory made it, and the map goes; a lab alive under another
    state directory (a namespace with its marker) keeps its pins; lab down --lab removes a
    lab's pins without a record, and then the lab is gone."""
    from netns_lab.builder import lab_mark
    from netns_lab.state import lab_pin_dir
    from tests.bpf.harness import wait_for
    from tests.labtools import fresh_lab_name
    gone, alive = fresh_lab_name(), fresh_lab_name()
    while alive == gone:
        alive = fresh_lab_name()
    ns = f"{alive}-node1"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "alias", lab_mark(alive)],
                       check=True)
        ids = {lab: _pin_a_map(lab) for lab in (gone, alive)}
        down = subprocess.run([sys.executable, "-m", "datapath.cli", "lab", "down", "--all"],
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert f"lab {gone}: removed its pinned BPF objects (no namespace of it is left)" in \
            down.stdout.splitlines() and alive not in down.stdout
        assert not lab_pin_dir(gone).exists()
        assert wait_for(lambda: not _map_exists(ids[gone]), timeout=10)
        assert lab_pin_dir(alive).is_dir() and _map_exists(ids[alive])
        subprocess.run(["ip", "netns", "del", ns], check=True)
        assert lab_down(alive) == []                # no record, no namespace: its pins
        assert not lab_pin_dir(alive).exists()
        assert wait_for(lambda: not _map_exists(ids[alive]), timeout=10)
        with pytest.raises(LabStateError, match=f"no lab named '{alive}'"):
            lab_down(alive)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for lab in (gone, alive):
            remove_lab_pins(lab)
