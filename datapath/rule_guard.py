"""Freezes the firewall of a lab's node namespaces while eBPF host routing is on.

A rule added to a node's netfilter hooks would not apply to pod traffic any
more, so while the lab is in eBPF mode every change to the node's rulesets is
refused or reverted, as AKS does. The strongest mechanism this kernel offers
is used for each backend, and ``status`` names it:

- BPF LSM (what AKS uses) refuses the change before it happens, but only where
  ``bpf`` is in the kernel's active LSM list. Not implemented: this project's
  kernels refuse LSM programs, so it could not be tested; ``status`` says so.
- iptables-legacy, ip6tables-legacy, arptables-legacy, ebtables-legacy: the
  x_tables tools load a whole table with one setsockopt(); a cgroup/setsockopt
  program on the cgroup v2 root refuses it with EPERM for sockets in the
  lab's node namespaces (datapath/xtables_refusal.py). Where that program
  cannot be loaded, the tables are polled every ``LEGACY_POLL_S`` instead and
  restored to what they were when the guard started.
- nf_tables (iptables-nft, ip6tables-nft, native nft): the kernel announces
  every committed transaction on nf_tables netlink with the writer's pid; a
  watcher per node namespace (``nft -a monitor``) reverts each foreign
  transaction at once, whatever it did: rules inserted, appended or replaced,
  new tables, chains, sets or maps, policy changes, flushes and deletions
  (datapath/nft_ruleset.py computes the revert).

What was there when the guard started stays: nothing (``enable`` refuses
otherwise), or the rules an operator accepted with ``enable --force``. Every
blocked change is one ``BlockedRule`` Warning event naming it and its writer.
The guard runs as a daemon inside the first node's namespace, so removing the
lab ends it with everything else; ``disable`` stops it. It is two processes: a
keeper, the one the pidfile names, and its worker, which does all of the above.
A worker that ends while the lab lives (a thread that died, a kill, the OOM
killer) is started again by the keeper within a second (a next one after 1,
2, 4, 8 s; a sixth end within a minute and the keeper gives up with
``GuardFailed``); the new one takes the
first one's baseline (``<lab>.guard-baseline``, written when the guard first
blocked) and reverts whatever changed while none ran, naming it in
``BlockedRule`` events, then a ``GuardRestarted`` event says so. A worker whose keeper
ends ends too, with a ``GuardFailed`` event: the lab is then unguarded until
``hostrouting enable`` starts another guard, as it is when both are killed.

The guard is known by its pidfile (``<lab>.guard`` in the state directory),
which its worker writes once it blocks: the keeper's pid and start time
(checked against /proc before it is trusted or signalled: pids are reused),
the worker's pid, the
mechanisms in force, the nodes and programs it serves, when its NAT sweep
last ran. Every ``HEARTBEAT_S`` it writes the file again (its mtime is the
heartbeat), as long as every one of its threads runs and each periodic one
(the x_tables refusal reader, the iptables-legacy poll, the NAT sweep) has
finished a pass within its period plus ``WORKER_STALL_S``; a guard with a
thread that died or hangs there says so in an event and exits, and ``find``
calls a guard whose heartbeat is older than ``HEARTBEAT_STALE_S`` stuck. An
nf_tables watcher waits for the kernel's notifications, as long as none
comes: it is checked to be alive, not to make progress. A guard not named by the
pidfile but carrying its path on its command line (one whose start was
killed) is an orphan; converge stops it.

Being the lab's one long-lived process while eBPF host routing is on, the
guard also keeps the BPF SNAT tables bounded: every ``NAT_SWEEP_S`` it
deletes expired flows (datapath/nat_table.py) and records a Warning event when
flows were dropped for want of a free NAT port (``NatPortsExhausted``) or a
table is nearly full or refused new flows (``NatTableFull``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import events, nft_ruleset, xtables_refusal
from netns_lab import faults, netns, procs
from netns_lab.state import GUARD_MODULE, guard_pidfile, guard_pidfile_arg

LEGACY_POLL_S = 0.5
NAT_SWEEP_S = 5.0
NAT_FULL_FRACTION = 0.9
REVERT_TRIES = 5
HEARTBEAT_S = 1.0
HEARTBEAT_STALE_S = 10.0
WORKER_STALL_S = 60.0   # beyond its period, before a periodic thread counts as hung
MODULE = GUARD_MODULE
LSM_LIST = Path("/sys/kernel/security/lsm")
LEGACY_TOOLS = ("iptables-legacy", "ip6tables-legacy")
NFT_BACKENDS = ("iptables-nft", "ip6tables-nft", "nftables")
SUBSCRIBE_WAIT_S = 5.0
_NETLINK_NETFILTER = 12     # linux/netlink.h
_NFNLGRP_NFTABLES = 7       # linux/netfilter/nfnetlink.h
RESTART_WAITS_S = (0.0, 1.0, 2.0, 4.0, 8.0)     # before the 1st, 2nd, ... restart
RESTARTS_MAX = len(RESTART_WAITS_S)  # restarts within RESTART_WINDOW_S before it gives up
RESTART_WINDOW_S = 60.0
READY_WAIT_S = 60.0
RESTARTED = "the rule guard's worker was restarted"
_PR_SET_CHILD_SUBREAPER = 36   # linux/prctl.h
_GENERATION = re.compile(r"^# new generation \d+ by process (\d+) \((.*)\)$")


def bpf_lsm_status() -> tuple[bool, str]:
    try:
        active = LSM_LIST.read_text().strip()
    except OSError as e:
        return False, f"cannot read {LSM_LIST} ({e.strerror})"
    if "bpf" in active.split(","):
        return True, (f"'bpf' is in the active LSM list ({active}), but LSM blocking is not "
                      "implemented: it could not be tested on a kernel that refuses LSM programs")
    return False, f"'bpf' is not in the active LSM list ({active or 'empty'}): boot with lsm=...,bpf"


@dataclass
class Found:
    """The lab's guards as /proc and the pidfile have them."""
    guard: procs.Process | None          # the one the pidfile names, when it runs
    details: dict                        # what it recorded: backends, nodes, nat
    heartbeat_age: float | None          # seconds since its last heartbeat
    orphans: list[procs.Process]         # other guards of the lab

    @property
    def worker_runs(self) -> bool:
        """The worker the pidfile names still runs (a keeper restarting it blocks nothing
        until the next one writes the file)."""
        if self.guard is None:
            return False
        if "worker" not in self.details:    # a guard from before keepers: one process
            return True
        return procs.Process(self.details["worker"], self.details["worker_start"]).alive()

    @property
    def live(self) -> bool:
        return self.guard is not None and self.heartbeat_age is not None and \
            self.heartbeat_age <= HEARTBEAT_STALE_S and self.worker_runs

    def describe(self) -> str:
        if self.guard is None:
            return "not running"
        if not self.worker_runs:
            return (f"starting a new worker (pid {self.guard.pid}; worker "
                    f"{self.details.get('worker')} ended)")
        if not self.live:
            return f"stuck (pid {self.guard.pid}, no heartbeat for {self.heartbeat_age:.0f}s)"
        worker = self.details.get("worker")
        return f"running (pid {self.guard.pid}" + (f", worker {worker})" if worker else ")")


def find(lab: str) -> Found:
    """The guard the pidfile names (only while pid, start time and command line match), and
    any other guard of the lab with this pidfile (by the command line start() gives it: a
    process that merely holds the path among its words is none)."""
    path = guard_pidfile(lab)

    def is_guard(argv: list[str]) -> bool:
        return guard_pidfile_arg(argv, lab) == str(path)

    recorded = procs.read_pidfile(path)
    guard, details, age = None, {}, None
    if recorded and recorded[0].alive() and is_guard(procs.cmdline(recorded[0].pid)):
        guard, details, age = recorded
    # a keeper's worker (its child) is part of that guard, not an orphan of its own
    orphans = [p for p in procs.outermost(procs.find(where=is_guard)) if p != guard]
    return Found(guard, details, age, orphans)


def mechanisms(found: Found) -> dict:
    """What blocks rule changes now: per backend, as the running guard reported it."""
    lsm_ok, lsm_detail = bpf_lsm_status()
    backends = dict(found.details.get("backends") or {}) if found.live else {}
    kinds = sorted(set(backends.values()))
    return {
        "active": " + ".join(kinds) if kinds else "none",
        "guard_pid": found.guard.pid if found.live else None,
        "guard_worker_pid": found.details.get("worker") if found.live else None,
        "guard": found.describe(),
        "orphans": [p.pid for p in found.orphans],
        "nat_sweep_age_s": round(time.time() - found.details["nat_swept_at"], 1)
        if found.live and found.details.get("nat_swept_at") else None,
        "backends": backends,
        "bpf_lsm": {"available": lsm_ok, "detail": lsm_detail},
    }


def start(lab: str, node_netns: dict[str, str], nat_progs: dict[str, int] | None = None,
          refuse_xtables: bool = True) -> tuple[int, dict[str, str]]:
    """Start the guard for these nodes ({node name: netns}) and wait until it blocks.

    Returns its pid and the mechanism in force per backend. nat_progs ({node
    name: id of a program of its datapath}, from_underlay: always attached) are
    the datapaths whose NAT tables it sweeps.
    refuse_xtables=False polls x_tables instead of refusing writes (the
    fallback, for its tests).
    """
    spec = ",".join(f"{name}={ns}" for name, ns in node_netns.items())
    nat_spec = ",".join(f"{name}={pid}" for name, pid in (nat_progs or {}).items())
    first_ns = next(iter(node_netns.values()))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for name in (faults.AT_ENV, faults.TRACE_ENV):  # the guard's own calls are not counted
        env.pop(name, None)
    faults.point(f"start the rule guard of {lab}")
    try:
        if not refuse_xtables:
            raise xtables_refusal.RefusalUnavailable("not asked for")
        cgroup_fd, no_cgroup = xtables_refusal.open_cgroup2_root(), ""
    except xtables_refusal.RefusalUnavailable as e:
        cgroup_fd, no_cgroup = -1, str(e)
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", first_ns, sys.executable, "-m",
                                 MODULE, "--lab", lab, "--pidfile", str(guard_pidfile(lab)),
                                 "--nodes", spec,
                                 "--nat", nat_spec, "--cgroup-fd", str(cgroup_fd),
                                 "--no-cgroup", no_cgroup],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True,
                                pass_fds=(cgroup_fd,) if cgroup_fd >= 0 else ())
    finally:
        if cgroup_fd >= 0:
            os.close(cgroup_fd)
    line = proc.stdout.readline()  # "ready {backend: mechanism}" once every watcher runs
    if not line.startswith("ready "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"rule guard did not start: {proc.stderr.read().strip()[-500:]}")
    proc.stdout.close()
    proc.stderr.close()
    return proc.pid, json.loads(line[len("ready "):])


def stop(pid: int, timeout: float = 5) -> None:
    """Stop the guard with this pid, if that pid still is a guard (never another process
    that got the number later)."""
    proc = procs.Process.of(pid) if pid > 0 else None
    if proc is not None:
        proc.stop(MODULE, timeout=timeout)


def stop_all(lab: str) -> int:
    """Stop every guard of the lab (the pidfile's and orphans); returns how many ran."""
    found = find(lab)
    stopped = sum(p.stop(MODULE, str(guard_pidfile(lab)))
                  for p in ([found.guard] if found.guard else []) + found.orphans)
    guard_pidfile(lab).unlink(missing_ok=True)
    baseline_path(guard_pidfile(lab)).unlink(missing_ok=True)
    return stopped


def baseline_path(pidfile: Path) -> Path:
    """Where a guard's first worker leaves what stays, for the workers after it."""
    return pidfile.with_name(pidfile.name + "-baseline")


def pause_file(lab: str) -> Path:
    """While this file holds a time still to come, the guard's periodic work waits: the
    bench writes it around each sample so that nothing of ours runs beside the measured
    path. A deadline, not a flag: a bench that dies mid-sample cannot leave the guard
    paused. The nf_tables watcher is not paused (it wakes only on a change)."""
    from netns_lab.state import labs_dir
    return labs_dir() / f"{lab}.guard-paused"


def pause(lab: str, seconds: float) -> None:
    """Pause the guard's NAT sweep and iptables-legacy poll for at most ``seconds``."""
    path = pause_file(lab)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{time.time() + seconds:.3f}\n")


def resume(lab: str) -> None:
    pause_file(lab).unlink(missing_ok=True)


def paused(lab: str) -> bool:
    try:
        return time.time() < float(pause_file(lab).read_text())
    except (OSError, ValueError):
        return False


class Guard:
    """The worker: what blocks, as one process. ``keeper``: the pid the pidfile names (the
    keeper that runs this worker; this process's own when it runs alone)."""

    def __init__(self, lab: str, nodes: dict[str, str], nat_progs: dict[str, int] | None = None,
                 pidfile: Path | None = None, keeper: int | None = None):
        self.lab, self.nodes, self.pidfile = lab, nodes, pidfile
        self.keeper = os.getpid() if keeper is None else keeper
        # what stays: per node its nf_tables ruleset, per (netns, tool) its x_tables tables;
        # taken by the keeper's first worker, read back by the ones it restarts
        self.nft_baselines: dict[str, nft_ruleset.Snapshot] = {}
        self.legacy_baseline: dict[tuple[str, str], dict] | None = None
        self.unrestored: set[tuple[str, str, str]] = set()     # (netns, tool, table) said so
        self.workers: list[threading.Thread] = []
        self.periods: dict[str, float] = {}     # periodic worker thread name -> its period
        self.passes: dict[str, float] = {}      # its last pass (time.monotonic())
        self.nat_swept_at: float | None = None     # the NAT sweep's last pass (time.time())
        self.nat_progs = nat_progs or {}
        self.stopping = threading.Event()
        self.watching = threading.Semaphore(0)   # released once per node watched
        self.monitors: dict[str, subprocess.Popen] = {}
        self.refusal: xtables_refusal.XtablesRefusal | None = None
        self.backends: dict[str, str] = {}
        self.node_by_cookie: dict[int, str] = {}

    def blocked(self, node: str, backend: str, change: str, blocked: bool, how: str,
                writer: str = "", detail: str = "") -> None:
        verb = how if blocked else "could not block"
        by = f" by {writer}" if writer else ""
        events.record(self.lab, events.WARNING, "BlockedRule", f"node/{node}",
                      f"{verb} {backend} change{by} while eBPF host routing is enabled: "
                      f"{change}" + (f" ({detail})" if detail else ""),
                      backend=backend, rule=change, writer=writer, blocked=blocked)

    # -- nf_tables: revert every foreign transaction ----------------------------------------

    def watch_nftables(self, node: str, ns: str) -> None:
        """Subscribe to the node's nf_tables transactions (again, if the monitor ends while
        the namespace lives) and revert every one that is not ours."""
        lock, ours = threading.Lock(), set()
        baseline = self.nft_baselines.get(node)     # a resumed worker's: its keeper's first
        resumed = baseline is not None
        while not self.stopping.is_set() and netns.exists(ns):
            proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "-a", "monitor"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    bufsize=1)
            self.monitors[node] = proc
            threading.Thread(target=self.watch_monitor_errors,
                             args=(node, ns, proc, lambda: baseline, lock, ours),
                             daemon=True).start()
            # Popen returns before nft has subscribed: a change made in between would be
            # missed by the snapshot or resync below and by the monitor alike
            if not monitor_subscribed(proc):
                _note(f"nft monitor in {ns} " + ("ended before it subscribed"
                      if proc.poll() is not None else
                      f"not subscribed after {SUBSCRIBE_WAIT_S:g} s") + ": going on")
            if baseline is None:
                # taken after subscribing, so no change falls between the two
                try:
                    baseline = nft_ruleset.snapshot(ns, with_texts=True)
                except Exception as e:  # no baseline, no guard: say so to start()
                    print(f"cannot read the nf_tables ruleset of {ns}: {e}", file=sys.stderr,
                          flush=True)
                    os._exit(1)
                self.nft_baselines[node] = baseline
                self.watching.release()
            else:   # what changed while nobody listened
                self.resync(node, ns, baseline, lock, ours, RESTARTED if resumed else
                            "the nf_tables monitor ended: restarted it")
                if resumed:
                    resumed = False
                    self.watching.release()
            self.read_monitor(node, ns, proc, baseline, lock, ours)
            proc.wait()
            self.stopping.wait(0.2)     # a monitor that cannot run is not restarted in a spin

    def read_monitor(self, node: str, ns: str, proc: subprocess.Popen,
                     baseline: nft_ruleset.Snapshot, lock: threading.Lock,
                     ours: set[int]) -> None:
        pending: list[str] = []
        for line in proc.stdout:
            line = line.strip()
            m = _GENERATION.match(line)
            if not m:
                if line and not line.startswith("#"):
                    pending.append(line)
                continue
            change, pending = pending, []
            pid, comm = int(m.group(1)), m.group(2)
            if pid in ours:
                ours.discard(pid)
                continue
            backend = comm if comm.startswith(("iptables", "ip6tables", "arptables",
                                              "ebtables")) else "nftables"
            _, failed = self.revert_nftables(ns, baseline, lock, ours)
            # judged by the tables this transaction touched: another table that cannot be
            # reverted (one owned by a process) does not make this change a failure
            touched = nft_ruleset.tables_of(change)
            mine = {t: err for t, err in failed.items() if t is None or touched is None
                    or t in touched}
            self.blocked(node, backend, nft_ruleset.summary(change) or "(no details)",
                         not mine, "reverted", f"{comm}[{pid}]", _failures(mine))

    def watch_monitor_errors(self, node: str, ns: str, proc: subprocess.Popen, baseline,
                             lock: threading.Lock, ours: set[int]) -> None:
        """nft monitor says when the kernel dropped notifications (a full socket buffer):
        then no transaction can be trusted to have been seen, so compare the whole ruleset."""
        for line in proc.stderr:
            if "lost" in line.lower() and baseline() is not None:
                self.resync(node, ns, baseline(), lock, ours,
                            "nf_tables notifications were lost")

    def resync(self, node: str, ns: str, baseline: nft_ruleset.Snapshot, lock: threading.Lock,
               ours: set[int], why: str) -> None:
        try:
            what = nft_ruleset.describe_changes(ns, baseline)
        except Exception:   # naming the change is worth less than reverting it
            what = ""
        changed, failed = self.revert_nftables(ns, baseline, lock, ours)
        if changed:
            self.blocked(node, "nftables", f"whatever changed meanwhile ({why})"
                         + (f": {what}" if what else ""), not failed, "reverted",
                         detail=_failures(failed))

    def revert_nftables(self, ns: str, baseline: nft_ruleset.Snapshot, lock: threading.Lock,
                        ours: set[int]) -> tuple[bool, dict]:
        """Bring the namespace's ruleset back to the baseline, table by table; returns
        whether it had changed, and {table: why not} for what could not be reverted
        ({None: why} for all of it). A guard that cannot revert must say so, never die."""
        try:
            with lock:
                return self._revert(ns, baseline, ours)
        except Exception as e:
            return True, {None: f"guard error: {type(e).__name__}: {e}"}

    def _revert(self, ns: str, baseline: nft_ruleset.Snapshot,
                ours: set[int]) -> tuple[bool, dict]:
        errors: dict = {}
        for attempt in range(REVERT_TRIES):   # another writer may race the revert: look again
            try:
                current = nft_ruleset.snapshot(ns)
            except nft_ruleset.NftError as e:
                return True, {None: str(e)}
            plan = nft_ruleset.revert_plan(current, baseline)
            if not plan:
                return attempt > 0, {}
            previous, errors = errors, {}
            for table, (argv, script) in plan.items():
                proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
                ours.add(proc.pid)
                _, err = proc.communicate(script)
                if proc.returncode != 0:
                    ours.discard(proc.pid)
                    errors[table] = (err.strip().splitlines() or [f"exit {proc.returncode}"])[0]
            if not errors or errors == previous:   # done, or nothing a retry would change
                return True, errors
        return True, errors

    # -- x_tables: refused in the kernel, or polled -----------------------------------------

    def start_refusal(self, cgroup_fd: int, before_attach=None) -> str:
        """Refuse x_tables writes with the cgroup/setsockopt program; '' or why not.
        ``before_attach()`` runs once the program is loaded, right before it refuses."""
        try:
            self.node_by_cookie = {
                xtables_refusal.netns_cookie(os.path.join(netns.NETNS_DIR, ns)): node
                for node, ns in self.nodes.items()}
            self.refusal = xtables_refusal.XtablesRefusal.start(
                cgroup_fd, list(self.node_by_cookie), before_attach)
        except (OSError, xtables_refusal.RefusalUnavailable) as e:
            return str(e)
        self.refusal.on_refusal(self.refused)
        self.worker(self.read_refusals, every=0.2)
        return ""

    def refused(self, ev) -> None:
        tool = xtables_refusal.WRITERS.get((ev.level, ev.optname), "x_tables")
        self.blocked(self.node_by_cookie.get(ev.netns_cookie, "?"), tool,
                     f"load of table {ev.table or '?'}", True, "refused",
                     f"{ev.comm}[{ev.pid}]")

    def read_refusals(self) -> None:
        while not self.stopping.is_set():
            self.stamp()
            self.refusal.poll(200)

    def poll_legacy(self) -> None:
        """Restore iptables-legacy tables to what they were when the guard started."""
        while not self.stopping.wait(LEGACY_POLL_S):
            self.stamp()
            if not paused(self.lab):
                self.restore_legacy_changes()

    def legacy_changes(self):
        """(node, netns, tool, its baseline tables, its tables now, the names of those that
        differ) for each x_tables tool of each node whose tables are not the baseline's."""
        for node, ns in self.nodes.items():
            for tool in LEGACY_TOOLS:
                baseline = self.legacy_baseline[(ns, tool)]
                current = _legacy_tables(ns, tool)
                changed = {t for t in current.keys() | baseline.keys()
                           if current.get(t) != baseline.get(t)}
                if changed:
                    yield node, ns, tool, baseline, current, changed

    def restore_legacy_changes(self, why: str = "") -> None:
        """Every iptables-legacy table that differs from the baseline, restored."""
        for change in self.legacy_changes():
            self.restore_legacy(*change, why)

    def report_legacy_changes(self, why: str) -> None:
        """Every iptables-legacy table that differs from the baseline, named, not restored."""
        for node, ns, tool, baseline, current, changed in self.legacy_changes():
            for table in sorted(t for t in changed if (ns, tool, t) not in self.unrestored):
                self.blocked(node, tool, f"table {table}: " + _table_diff(baseline, current,
                                                                          table),
                             False, "reverted", detail=why)

    def restore_legacy(self, node: str, ns: str, tool: str, baseline: dict, current: dict,
                       changed: set[str], why: str = "") -> None:
        script = "".join(_legacy_table_text(t, _was(baseline, current, t))
                         for t in sorted(changed))
        rm = netns.run(ns, [tool.replace("-legacy", "-legacy-restore")], check=False,
                       input=script)
        if rm.returncode != 0:      # (each BlockedRule below says so already)
            self.unrestored |= {(ns, tool, t) for t in changed}
        for table in sorted(changed):
            self.blocked(node, tool, f"table {table}: " + _table_diff(baseline, current, table),
                         rm.returncode == 0,
                         "reverted", detail="; ".join(filter(None, (why, rm.stderr.strip()))))

    def sweep_nat(self) -> None:
        from . import nat_table
        from .host_routing import DatapathMaps
        seen: dict[tuple[str, str], int] = {}
        full_warned: set[tuple[str, str]] = set()     # (node, family)
        while not self.stopping.wait(NAT_SWEEP_S):
            self.stamp()
            if paused(self.lab):
                continue
            self.nat_swept_at = time.time()
            for node, prog_id in self.nat_progs.items():
                try:
                    with DatapathMaps.from_prog_id(prog_id) as maps:
                        nat_table.sweep(maps)
                        counters = maps.counters_by_family()
                        tables = {_FAMILY[f]: (len(maps.nat_raw_entries(f)), maps.nat_capacity(f))
                                  for f in maps.nat_families()}
                except (OSError, RuntimeError):
                    continue    # the program is going away with the lab
                exhausted = self._counter_rise(seen, node, counters, "drop_nat_exhausted")
                refused = self._counter_rise(seen, node, counters, "drop_nat_table_full")
                if exhausted:
                    events.record(self.lab, events.WARNING, "NatPortsExhausted", f"node/{node}",
                                  f"{_packets_of_new_flows(exhausted)} dropped: no free "
                                  "NAT port towards their destination (widen [nat] port_min.."
                                  "port_max)", dropped=sum(exhausted.values()),
                                  families=exhausted)
                for family, (used, capacity) in tables.items():     # each table its own
                    self._table_fill(node, family, used, capacity, refused.get(family, 0),
                                     full_warned)

    def _table_fill(self, node: str, family: str, used: int, capacity: int, refused: int,
                    full_warned: set) -> None:
        """NatTableFull once a node's table of a family is 90% full or refused a new flow,
        and again only after it was under half that."""
        if (refused or used >= NAT_FULL_FRACTION * capacity) and (node, family) not in full_warned:
            full_warned.add((node, family))
            which = " (IPv6)" if family == "ipv6" else ""
            events.record(self.lab, events.WARNING, "NatTableFull", f"node/{node}",
                          f"BPF SNAT table{which} at {used} of {capacity} entries"
                          + (f", {_packets_of_new_flows({family: refused})} refused"
                             if refused else "")
                          + ": new flows are refused (drop_nat_table_full) until flows "
                          "expire (raise [nat] max_flows)", used=used, capacity=capacity,
                          family=family)
        elif not refused and used < NAT_FULL_FRACTION * capacity / 2:
            full_warned.discard((node, family))

    @staticmethod
    def _counter_rise(seen: dict, node: str, counters: dict, reason: str) -> dict[str, int]:
        """How much a drop counter rose since the last sweep, per family that it rose in
        ({"ipv6": 3}; {}: in none). `counters`: DatapathMaps.counters_by_family()."""
        rises = {}
        for (family, name), (now, _) in counters.items():
            if name != reason:
                continue
            before = seen.get((node, family, reason), 0)
            seen[(node, family, reason)] = now
            if now > before:
                rises[family] = now - before
        return rises

    def worker(self, target, *args, every: float | None = None) -> None:
        """A thread the guard cannot do without: its end ends the heartbeat and the guard.
        One that works ``every`` seconds calls stamp() each pass: a pass overdue by
        WORKER_STALL_S (a hung sweep) counts as its end."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        if every is not None:
            self.periods[thread.name] = every
            self.passes[thread.name] = time.monotonic()
        self.workers.append(thread)
        thread.start()

    def stamp(self) -> None:
        """The calling periodic worker finished a pass."""
        self.passes[threading.current_thread().name] = time.monotonic()

    def failed_workers(self) -> list[str]:
        """Worker threads that ended, or (periodic ones) whose last pass is overdue."""
        now = time.monotonic()
        return [t.name for t in self.workers if not t.is_alive() or (
            t.name in self.periods and
            now - self.passes[t.name] > self.periods[t.name] + WORKER_STALL_S)]

    def run(self, cgroup_fd: int, no_cgroup: str) -> int:
        resumed = self.legacy_baseline is not None
        for node, ns in self.nodes.items():
            self.worker(self.watch_nftables, node, ns)
        for _ in self.nodes:    # every monitor subscribed, every baseline taken (or compared)
            self.watching.acquire()
        if not resumed:
            self.legacy_baseline = {(ns, tool): _legacy_tables(ns, tool)
                                    for ns in self.nodes.values() for tool in LEGACY_TOOLS}
            self.save_baseline()
        watcher = "nf_tables watcher (reverts each change)"
        self.backends = {b: watcher for b in NFT_BACKENDS}
        # a resumed worker restores what changed in x_tables meanwhile right before the
        # kernel refuses writes again (it would refuse this process's restores too)
        restore = (lambda: self.restore_legacy_changes(RESTARTED)) if resumed else None
        why_not = self.start_refusal(cgroup_fd, restore) if cgroup_fd >= 0 else no_cgroup
        if self.refusal is not None:
            legacy = f"kernel refusal (cgroup/setsockopt program id {self.refusal.prog_id})"
            if resumed:     # what landed between the restore and the refusal: said, not hidden
                self.report_legacy_changes(RESTARTED + ", after its restore and before the "
                                           "kernel refused writes again; remove it by hand")
        else:
            legacy = f"poll every {LEGACY_POLL_S:g}s (no kernel refusal: {why_not})"
            if resumed:
                self.restore_legacy_changes(RESTARTED)
            self.worker(self.poll_legacy, every=LEGACY_POLL_S)
        self.backends.update({tool: legacy for tool in LEGACY_TOOLS})
        if self.nat_progs:
            self.worker(self.sweep_nat, every=NAT_SWEEP_S)
        time.sleep(0.2)  # let every monitor subscribe before saying so
        if self.keeper_gone():
            return 1
        if not resumed or self.names_keeper():  # (a guard replaced meanwhile keeps the file)
            self.record()
        try:
            print("ready " + json.dumps(self.backends), flush=True)
        except (BrokenPipeError, ValueError):   # nobody reads: the keeper is gone
            self.keeper_gone()
            return 1
        return self.keep_running()

    def lab_lives(self) -> bool:
        return all(netns.exists(ns) for ns in self.nodes.values())

    def keeper_gone(self) -> bool:
        """Whether the keeper this worker runs for has ended (then GuardFailed says so, while
        the lab lives, and the worker must end: nobody would restart it)."""
        if self.keeper == os.getpid() or os.getppid() == self.keeper:
            return False
        self.stopping.set()
        if self.lab_lives():
            events.record(self.lab, events.WARNING, "GuardFailed", f"lab/{self.lab}",
                          f"rule guard pid {self.keeper} ended, and with it its worker "
                          f"pid {os.getpid()}: nothing blocks rule changes "
                          f"(hostrouting enable --lab {self.lab} starts another guard)")
        return True

    def record(self) -> None:
        """The pidfile: who this guard is (its keeper, and this worker), what it does, when
        the NAT sweep last ran."""
        if self.pidfile:
            procs.write_pidfile(self.pidfile, pid=self.keeper, worker=os.getpid(),
                                worker_start=procs.start_time(os.getpid()), lab=self.lab,
                                backends=self.backends, nodes=self.nodes, nat=self.nat_progs,
                                nat_swept_at=self.nat_swept_at)

    def names_keeper(self) -> bool:
        recorded = procs.read_pidfile(self.pidfile) if self.pidfile else None
        return recorded is not None and recorded[0].pid == self.keeper

    def save_baseline(self) -> None:
        """What stays, for the workers the keeper may start after this one."""
        if self.pidfile is None:
            return
        path = baseline_path(self.pidfile)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({
            "nodes": self.nodes,
            "nft": {node: snap.to_json() for node, snap in self.nft_baselines.items()},
            "legacy": [[ns, tool, tables] for (ns, tool), tables
                       in self.legacy_baseline.items()]}))
        os.replace(tmp, path)

    def load_baseline(self) -> None:
        """The first worker's baseline (ValueError when it is not this guard's)."""
        data = json.loads(baseline_path(self.pidfile).read_text())
        if data["nodes"] != self.nodes:
            raise ValueError(f"the baseline is of nodes {data['nodes']}, not {self.nodes}")
        self.nft_baselines = {node: nft_ruleset.Snapshot.from_json(snap)
                              for node, snap in data["nft"].items()}
        self.legacy_baseline = {(ns, tool): tables for ns, tool, tables in data["legacy"]}

    def keep_running(self) -> int:
        """Until the lab goes (its namespaces are deleted) or SIGTERM; a monitor that ends
        while its namespace lives is started again by its watcher. The heartbeat goes on
        while every worker thread runs (and makes progress: failed_workers) and the pidfile
        still names this process."""
        beat = time.monotonic()
        while self.lab_lives():
            dead = self.failed_workers()
            if dead and self.lab_lives():
                self.stopping.set()
                events.record(self.lab, events.WARNING, "GuardFailed", f"lab/{self.lab}",
                              f"rule guard pid {self.keeper}: a thread of worker pid "
                              f"{os.getpid()} ended or hangs ({', '.join(dead)}); the worker "
                              "exits (its keeper starts another)")
                return 1
            if self.keeper_gone():
                return 1
            if self.pidfile and time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                if self.names_keeper():
                    self.record()       # the new mtime is the heartbeat
            time.sleep(0.2)
        self.stopping.set()
        return 0


_FAMILY = {4: "ipv4", 6: "ipv6"}       # DatapathMaps.nat_families() -> the counters' names


def _note(text: str) -> None:
    """A line on stderr, which start() reads until the guard is ready and then closes: a
    note written after that must not end the thread that writes it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def monitor_subscribed(proc: subprocess.Popen, timeout: float | None = None) -> bool:
    """Wait until the process holds a NETLINK_NETFILTER socket in the nf_tables group, as
    its namespace's /proc/<pid>/net/netlink shows it; False when it ends or time runs out."""
    deadline = time.monotonic() + (SUBSCRIBE_WAIT_S if timeout is None else timeout)
    while proc.poll() is None:
        if _in_netlink_group(proc.pid, _NETLINK_NETFILTER, _NFNLGRP_NFTABLES):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return False


def _in_netlink_group(pid: int, protocol: int, group: int) -> bool:
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{pid}/fd")}
        with open(f"/proc/{pid}/net/netlink") as f:
            rows = [line.split() for line in f][1:]
    except OSError:      # ended, or between fork and exec
        return False
    # sk Eth Pid Groups(hex, the first 32) Rmem Wmem Dump Locks Drops Inode
    return any(int(r[1]) == protocol and int(r[3], 16) & (1 << (group - 1))
               and f"socket:[{r[9]}]" in inodes for r in rows if len(r) >= 10)


def _packets_of_new_flows(rises: dict[str, int]) -> str:
    """Guard._counter_rise()'s {family: packets} in words: "3 packet(s) of new IPv6 flows",
    "5 packet(s) of new flows (IPv4 2, IPv6 3)"."""
    named = {family.replace("ip", "IP"): n for family, n in sorted(rises.items())}
    total = sum(named.values())
    if len(named) == 1:
        return f"{total} packet(s) of new {next(iter(named))} flows"
    return (f"{total} packet(s) of new flows ("
            + ", ".join(f"{family} {n}" for family, n in named.items()) + ")")


def _failures(failed: dict) -> str:
    return "; ".join(err if table is None else f"table {table[0]} {table[1]}: {err}"
                     for table, err in failed.items())


def _legacy_tables(ns: str, tool: str) -> dict[str, list[str]]:
    """{table: its chains and rules} as `<tool>-save` prints them, counters left out.

    A table with nothing but its built-in chains, ACCEPT, is left out: the
    kernel instantiates tables in a namespace when a tool first reads them.
    """
    proc = netns.run(ns, [f"{tool}-save"], check=False)
    tables: dict[str, list[str]] = {}
    table = None
    for line in proc.stdout.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], [])
        elif table is not None and line.startswith((":", "-")):
            table.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return {name: lines for name, lines in tables.items() if lines != _emptied(lines)}


def _was(baseline: dict, current: dict, table: str) -> list[str]:
    """A legacy table as the baseline has it; one it lacks was there empty."""
    return baseline.get(table) or _emptied(current.get(table, []))


def _table_diff(baseline: dict, current: dict, table: str) -> str:
    return "; ".join(nft_ruleset.line_diff(_was(baseline, current, table),
                                           current.get(table, []))
                     or ["the same lines in another order"])


def _emptied(lines: list[str]) -> list[str]:
    """A table as it is with nothing added: its built-in chains, ACCEPT."""
    return [f"{line.split()[0]} ACCEPT" for line in lines
            if line.startswith(":") and line.split()[1] != "-"]


def _legacy_table_text(table: str, lines: list[str]) -> str:
    return f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"


def keep(argv: list[str], lab: str, nodes: dict[str, str], cgroup_fd: int,
         resumable: bool = True) -> int:
    """The guard's own process, its keeper: runs the worker that blocks (this module with
    ``--worker``) and, whenever that ends while the lab lives and nobody stopped the guard,
    starts another with ``--resume``, which takes the first one's baseline: what changed
    while no worker ran is reverted, not frozen in. The first restart comes at once, each
    next one after twice the wait of the one before (RESTART_WAITS_S); after RESTARTS_MAX
    restarts within RESTART_WINDOW_S (a worker that cannot run) the keeper gives up with
    GuardFailed, as it does on an error of its own. Without a pidfile there is no baseline
    to share (``resumable`` False): a restarted worker takes its own. The first worker's
    "ready" line is this process's (start() waits for it); each restart is a GuardRestarted
    event once the new worker blocks, after the BlockedRule events of its reverts. As a
    child subreaper it inherits what a killed worker leaves running (its nft monitors) and
    ends it. A worker whose keeper ends ends too (Guard.keeper_gone)."""
    stopping, current = [], []

    def terminate(signum, frame):
        stopping.append(signum)
        if current and current[-1].poll() is None:
            current[-1].terminate()

    signal.signal(signal.SIGTERM, terminate)
    _set_child_subreaper()
    restarts: list[float] = []
    ended = ""      # how the last worker ended; "" before the first
    blocked = False     # the first worker got ready: from here on, failures are events
    try:
        while not stopping:
            try:
                worker = subprocess.Popen(
                    [sys.executable, "-m", MODULE, *argv, "--worker", "--keeper",
                     str(os.getpid())] + (["--resume"] if ended and resumable else []),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE if ended else None,  # the first's: start() reads it
                    text=True, pass_fds=(cgroup_fd,) if cgroup_fd >= 0 else ())
            except OSError as e:    # (no memory, no pids: what may have ended the last one)
                if not ended:
                    raise
                ended = f"could not be started again ({e})"
            else:
                current.append(worker)
                if stopping:
                    worker.terminate()
                line = _ready_line(worker)
                if not ended:
                    if line is None:
                        _end_worker(worker)
                        return 1
                    print(line, end="", flush=True)
                    blocked = True
                elif line is not None:
                    events.record(lab, events.WARNING, "GuardRestarted", f"lab/{lab}",
                                  f"rule guard pid {os.getpid()}: its worker {ended}; worker "
                                  f"pid {worker.pid} took the first one's baseline and blocks "
                                  "again (what changed meanwhile: the BlockedRule events "
                                  "before this one)", worker=worker.pid, restarts=len(restarts))
                why = _end_worker(worker) if line is None else ""
                for stream in (worker.stdout, worker.stderr):
                    if stream is not None:
                        stream.close()     # from here on a worker's prints must not block it
                code = worker.wait()
                _end_children()
                ended = f"pid {worker.pid} " + (f"was killed by {_signal_name(-code)}"
                                                if code < 0 else f"ended with exit status {code}")
                if line is None:
                    ended += " before it blocked" + (f" ({why})" if why else "")
            if stopping or not all(netns.exists(ns) for ns in nodes.values()):
                return 0
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(restarts) > RESTARTS_MAX:
                _keeper_failed(lab, f"its worker {ended}, the {len(restarts)}th end within "
                                    f"{RESTART_WINDOW_S:g} s: not started again")
                return 1
            deadline = time.monotonic() + RESTART_WAITS_S[len(restarts) - 1]
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.05)
    except Exception as e:      # a keeper that cannot go on must say so: nobody else will
        if blocked:
            _keeper_failed(lab, f"error: {type(e).__name__}: {e}")
        raise
    finally:
        if current and current[-1].poll() is None:
            current[-1].terminate()
    return 0


def _keeper_failed(lab: str, why: str) -> None:
    try:
        events.record(lab, events.WARNING, "GuardFailed", f"lab/{lab}",
                      f"rule guard pid {os.getpid()}: {why}; nothing blocks rule changes "
                      f"(hostrouting enable --lab {lab} starts another guard)")
    except OSError as e:
        _note(f"GuardFailed not recorded ({e}): {why}")


def _ready_line(worker: subprocess.Popen) -> str | None:
    """The worker's "ready ..." line, or None if it ends or says nothing in READY_WAIT_S."""
    ready, _, _ = select.select([worker.stdout], [], [], READY_WAIT_S)
    line = worker.stdout.readline() if ready else ""
    return line if line.startswith("ready ") else None


def _end_worker(worker: subprocess.Popen) -> str:
    """End a worker that did not get ready; the last line it wrote on a stderr we read."""
    worker.terminate()
    try:
        _, err = worker.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        worker.kill()
        return "did not end on SIGTERM"
    lines = (err or "").strip().splitlines()
    return lines[-1][-300:] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _set_child_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _note(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}: what a "
              "killed worker leaves running is left to init")


def _end_children() -> None:
    """End and reap every child of this process: once its worker has ended, only what that
    worker left running (its monitors, a revert under way), handed to this subreaper."""
    me = os.getpid()
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        if procs.parent_pid(pid) == me:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datapath.rule_guard")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--pidfile", help="where to record pid, start time and mechanisms")
    parser.add_argument("--nodes", required=True, help="node=netns,node=netns")
    parser.add_argument("--nat", default="", help="node=datapath program id,...")
    parser.add_argument("--cgroup-fd", type=int, default=-1,
                        help="an open fd of the cgroup v2 root (for the x_tables refusal)")
    parser.add_argument("--no-cgroup", default="", help="why there is no cgroup fd")
    parser.add_argument("--worker", action="store_true",
                        help="be the worker that blocks (its keeper, without, runs one)")
    parser.add_argument("--keeper", type=int, default=0,
                        help="the keeper's pid (a worker's parent, unless the keeper ended)")
    parser.add_argument("--resume", action="store_true",
                        help="a worker taking the baseline its keeper's first worker left")
    args = parser.parse_args(argv)
    nodes = dict(item.split("=", 1) for item in args.nodes.split(","))
    nat_progs = {name: int(pid) for name, pid in
                 (item.split("=", 1) for item in args.nat.split(",") if item)}
    if not args.worker:
        return keep(sys.argv[1:] if argv is None else argv, args.lab, nodes, args.cgroup_fd,
                    resumable=bool(args.pidfile))
    guard = Guard(args.lab, nodes, nat_progs, Path(args.pidfile) if args.pidfile else None,
                  keeper=args.keeper or os.getppid())
    if args.resume:
        try:
            guard.load_baseline()
        except (OSError, ValueError, KeyError, TypeError) as e:
            _note(f"cannot read the baseline of the guard's first worker: {e}")
            return 1

    def terminate(signum, frame):
        guard.stopping.set()
        for p in list(guard.monitors.values()):
            p.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, terminate)
    try:
        return guard.run(args.cgroup_fd, args.no_cgroup)
    finally:    # a worker that ends leaves no monitor behind
        for p in list(guard.monitors.values()):
            if p.poll() is None:
                p.terminate()


if __name__ == "__main__":
    sys.exit(main())
