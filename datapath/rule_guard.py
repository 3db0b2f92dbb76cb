"""Blocks new firewall rules in a lab's node namespaces while eBPF host routing is on.

A rule added to a node's netfilter hooks would not apply to pod traffic any
more, so while the lab is in eBPF mode new rules are refused, as AKS does.
The strongest mechanism this kernel offers is used, and ``status`` names it:

- BPF LSM (what AKS uses) refuses the change before it happens, but only where
  ``bpf`` is in the kernel's active LSM list; this module reports whether it is
  and does not load LSM programs (not implemented yet).
- nf_tables (iptables-nft and native nft): the kernel announces every new rule
  on nf_tables netlink; a watcher per node namespace (``nft -a monitor
  rules``) deletes each one as soon as it is announced.
- iptables-legacy's x_tables announce nothing: its rules are polled every
  ``LEGACY_POLL_S`` and deleted when found.

Every removal is recorded as a ``BlockedRule`` Warning event. The guard runs
as a daemon inside the first node's namespace, so removing the lab ends it
with everything else; ``disable`` stops it.

Being the lab's one long-lived process while eBPF host routing is on, the
guard also keeps the BPF SNAT tables bounded: every ``NAT_SWEEP_S`` it
deletes expired flows (datapath/nat_table.py) and records a Warning event when
flows were dropped for want of a free NAT port (``NatPortsExhausted``) or a
table is nearly full, so that LRU eviction starts (``NatTableFull``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import events
from .iptables_rules import saved_rules

LEGACY_POLL_S = 0.5
NAT_SWEEP_S = 5.0
NAT_FULL_FRACTION = 0.9
LSM_LIST = Path("/sys/kernel/security/lsm")
_NFT_ADD = re.compile(r"^add rule (\S+) (\S+) (\S+) (.*?)\s*# handle (\d+)$")


def bpf_lsm_status() -> tuple[bool, str]:
    try:
        active = LSM_LIST.read_text().strip()
    except OSError as e:
        return False, f"cannot read {LSM_LIST} ({e.strerror})"
    if "bpf" in active.split(","):
        return True, f"'bpf' is in the active LSM list ({active}); LSM blocking not implemented yet"
    return False, f"'bpf' is not in the active LSM list ({active or 'empty'}): boot with lsm=...,bpf"


def mechanisms(guard_pid: int) -> dict:
    running = guard_pid > 0 and _alive(guard_pid)
    lsm_ok, lsm_detail = bpf_lsm_status()
    return {
        "active": ("nf_tables netlink watcher (iptables-nft, nft) + iptables-legacy poll "
                   f"every {LEGACY_POLL_S:g}s") if running else "none",
        "guard_pid": guard_pid if running else None,
        "bpf_lsm": {"available": lsm_ok, "detail": lsm_detail},
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not a guard
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start(lab: str, node_netns: dict[str, str], nat_progs: dict[str, int] | None = None,
          timeout: float = 10) -> int:
    """Start the guard for these nodes ({node name: netns}); returns its pid once it watches.

    nat_progs ({node name: from_pod program id}) are the datapaths whose NAT
    tables it sweeps.
    """
    spec = ",".join(f"{name}={ns}" for name, ns in node_netns.items())
    nat_spec = ",".join(f"{name}={pid}" for name, pid in (nat_progs or {}).items())
    first_ns = next(iter(node_netns.values()))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(["ip", "netns", "exec", first_ns, sys.executable, "-m",
                             "datapath.rule_guard", "--lab", lab, "--nodes", spec,
                             "--nat", nat_spec],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    line = proc.stdout.readline()  # "ready" once every watcher runs
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"rule guard did not start: {proc.stderr.read().strip()[-500:]}")
    proc.stdout.close()
    proc.stderr.close()
    return proc.pid


def stop(pid: int, timeout: float = 5) -> None:
    if pid <= 0 or not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class Guard:
    def __init__(self, lab: str, nodes: dict[str, str], nat_progs: dict[str, int] | None = None):
        self.lab, self.nodes = lab, nodes
        self.nat_progs = nat_progs or {}
        self.stopping = threading.Event()
        self.monitors: list[subprocess.Popen] = []

    def blocked(self, node: str, backend: str, text: str, removed: bool, detail: str = "") -> None:
        verb = "removed" if removed else "could not remove"
        events.record(self.lab, events.WARNING, "BlockedRule", f"node/{node}",
                      f"{verb} a new {backend} rule while eBPF host routing is enabled: {text}"
                      + (f" ({detail})" if detail else ""), backend=backend, rule=text)

    def watch_nftables(self, node: str, ns: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            m = _NFT_ADD.match(line.strip())
            if not m:
                continue
            family, table, chain, text, handle = m.groups()
            rm = subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "rule", family,
                                 table, chain, "handle", handle], capture_output=True, text=True)
            self.blocked(node, "nftables", f"{family} {table} {chain}: {text}",
                         rm.returncode == 0, rm.stderr.strip())

    def poll_legacy(self) -> None:
        """Remove iptables-legacy rules that were not there when the guard started.

        Rules present at the start were either none (enable refuses otherwise)
        or accepted with ``enable --force``: those stay.
        """
        baseline = {ns: {r.text for r in saved_rules(ns, "iptables-legacy")}
                    for ns in self.nodes.values()}
        while not self.stopping.wait(LEGACY_POLL_S):
            for node, ns in self.nodes.items():
                for rule in saved_rules(ns, "iptables-legacy"):
                    if rule.text in baseline[ns] or not rule.text.startswith("-A "):
                        continue
                    rm = subprocess.run(shlex.split(rule.remove), capture_output=True, text=True)
                    self.blocked(node, rule.backend, f"{rule.table} {rule.chain}: {rule.text}",
                                 rm.returncode == 0, rm.stderr.strip())

    def sweep_nat(self) -> None:
        from . import nat_table
        from .host_routing import DatapathMaps
        exhausted_seen: dict[str, int] = {}
        full_warned: set[str] = set()
        while not self.stopping.wait(NAT_SWEEP_S):
            for node, prog_id in self.nat_progs.items():
                try:
                    with DatapathMaps.from_prog_id(prog_id) as maps:
                        nat_table.sweep(maps)
                        exhausted = maps.counters()["drop_nat_exhausted"][0]
                        used, capacity = len(maps.nat_raw_entries()), maps.nat_capacity()
                except (OSError, RuntimeError):
                    continue    # the program is going away with the lab
                before = exhausted_seen.get(node, 0)
                exhausted_seen[node] = exhausted
                if exhausted > before:
                    events.record(self.lab, events.WARNING, "NatPortsExhausted", f"node/{node}",
                                  f"{exhausted - before} packet(s) of new flows dropped: no free "
                                  "NAT port towards their destination (widen [nat] port_min.."
                                  "port_max)", dropped=exhausted - before)
                if used >= NAT_FULL_FRACTION * capacity and node not in full_warned:
                    full_warned.add(node)
                    events.record(self.lab, events.WARNING, "NatTableFull", f"node/{node}",
                                  f"BPF SNAT table at {used} of {capacity} entries: the least "
                                  "recently used flows are evicted (raise [nat] max_flows)")
                elif used < NAT_FULL_FRACTION * capacity / 2:
                    full_warned.discard(node)

    def run(self) -> int:
        for node, ns in self.nodes.items():
            proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "-a", "monitor", "rules"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    bufsize=1)
            self.monitors.append(proc)
            threading.Thread(target=self.watch_nftables, args=(node, ns, proc),
                             daemon=True).start()
        threading.Thread(target=self.poll_legacy, daemon=True).start()
        if self.nat_progs:
            threading.Thread(target=self.sweep_nat, daemon=True).start()
        time.sleep(0.2)  # let every monitor subscribe before saying so
        print("ready", flush=True)
        # Ends when the lab goes (its namespaces' processes are killed) or on SIGTERM.
        while all(p.poll() is None for p in self.monitors):
            time.sleep(0.2)
        self.stopping.set()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datapath.rule_guard")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--nodes", required=True, help="node=netns,node=netns")
    parser.add_argument("--nat", default="", help="node=from_pod program id,...")
    args = parser.parse_args(argv)
    nodes = dict(item.split("=", 1) for item in args.nodes.split(","))
    nat_progs = {name: int(pid) for name, pid in
                 (item.split("=", 1) for item in args.nat.split(",") if item)}
    guard = Guard(args.lab, nodes, nat_progs)

    def terminate(signum, frame):
        for p in guard.monitors:
            p.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, terminate)
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())
