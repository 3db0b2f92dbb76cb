"""AKS's safeguards: refuse to enable over user rules, block every ruleset change while
enabled (nf_tables changes reverted, x_tables writes refused in the kernel), record events."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from datapath import events, libbpf, rule_guard, switch
from netns_lab import netns, procs
from netns_lab.builder import lab_down, lab_up
from netns_lab.state import guard_pidfile, lab_names, load_state
from netns_lab.topology import load_topology
from tests.labtools import fresh_lab_name

pytestmark = pytest.mark.slow     # every test here builds a lab

REMOVED_WITHIN_S = 3.0  # the bound this test holds the guard to (legacy poll is 0.5 s)
CLI = [sys.executable, "-m", "datapath.cli"]


def cli(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())


def rules_text(ns: str) -> str:
    return "".join(netns.run(ns, [tool], check=False).stdout
                   for tool in ("iptables-nft-save", "iptables-legacy-save")) + \
        netns.run(ns, ["nft", "list", "ruleset"], check=False).stdout


def gone_within(ns: str, needle: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if needle not in rules_text(ns):
            return True
        time.sleep(0.05)
    return False


def reasons(lab: str) -> list[str]:
    return [e["reason"] for e in events.read(lab)]


# IPv6 rules the pre-enable check must find: (node index, command, what it lists)
IPV6_USER_RULES = [
    (0, ["ip6tables-nft", "-A", "FORWARD", "-s", "2001:db8:9::9", "-j", "DROP"],
     "ip6tables-nft table filter chain FORWARD: -A FORWARD -s 2001:db8:9::9/128 -j DROP"),
    (1, ["ip6tables-legacy", "-A", "FORWARD", "-d", "2001:db8:9::8", "-j", "DROP"],
     "ip6tables-legacy table filter chain FORWARD: -A FORWARD -d 2001:db8:9::8/128 -j DROP"),
    (1, ["nft", "add table ip6 user6; add chain ip6 user6 c { type filter hook forward "
         "priority 0; }; add rule ip6 user6 c ip6 saddr 2001:db8:9::7 drop"],
     "nftables table ip6 user6 chain c: ip6 saddr 2001:db8:9::7 drop"),
    (0, ["nft", "add table inet user; add chain inet user c { type filter hook forward "
         "priority 0; policy drop; }; add rule inet user c ip6 daddr 2001:db8:9::6 drop"],
     "nftables table inet user chain c: ip6 daddr 2001:db8:9::6 drop"),
    (0, [], "nftables table inet user chain c: policy drop"),
]


def test_enable_refuses_over_a_user_rule_then_blocks_new_ones(legacy_lab, make_lab):
    """Every backend and family: iptables-nft here, then IPv6 in ip6tables (both backends),
    an nft ip6 table and an nft inet table; each is listed with a command that removes it."""
    _, topo = legacy_lab
    node1, node2 = topo.nodes[0].netns, topo.nodes[1].netns
    netns.run(node1, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.9", "-j", "DROP"])
    for index, argv, _ in IPV6_USER_RULES:
        if argv:
            netns.run(topo.nodes[index].netns, argv)

    proc = cli("enable", "--lab", topo.lab)
    assert proc.returncode == 1
    assert "iptables-nft table filter chain FORWARD: -A FORWARD -s 198.18.9.9/32 -j DROP" in proc.stderr
    assert "iptables-nft -t filter -D FORWARD -s 198.18.9.9/32 -j DROP" in proc.stderr
    assert load_state(topo.lab).mode == "legacy"
    assert "clsact" not in netns.run(node1, ["tc", "qdisc", "show"]).stdout
    removals = []
    for index, _, listed in IPV6_USER_RULES:
        ns = topo.nodes[index].netns
        at = proc.stderr.find(f"  {ns}: {listed}\n    remove: ")
        assert at >= 0, f"{listed} not listed: {proc.stderr}"
        removals.append(proc.stderr[at:].splitlines()[1].removeprefix("    remove: "))
    assert len(re.findall(r"^    remove: ", proc.stderr, re.M)) == len(IPV6_USER_RULES) + 1

    netns.run(node1, ["iptables-nft", "-D", "FORWARD", "-s", "198.18.9.9", "-j", "DROP"])
    for command in removals:      # as printed: each removes what it was printed for
        subprocess.run(command, shell=True, check=True, timeout=30)
    proc = cli("enable", "--lab", topo.lab)
    assert proc.returncode == 0, proc.stderr

    _, other = make_lab("legacy")  # another lab's node: not ours to police
    netns.run(other.nodes[0].netns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.5",
                                     "-j", "DROP"])
    netns.run(node1, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.8", "-j", "DROP"])
    assert netns.run(node2, ["iptables-legacy", "-A", "INPUT", "-s", "198.18.9.7", "-j", "DROP"],
                     check=False).returncode != 0     # refused in the kernel
    netns.run(node2, ["nft", "add table inet user; add chain inet user c "
                      "{ type filter hook input priority 0; }; add rule inet user c ip saddr "
                      "198.18.9.6 drop"])
    assert gone_within(node1, "198.18.9.8", REMOVED_WITHIN_S)
    assert gone_within(node2, "198.18.9.7", REMOVED_WITHIN_S)
    assert gone_within(node2, "198.18.9.6", REMOVED_WITHIN_S)
    assert "198.18.9.5" in rules_text(other.nodes[0].netns)

    backends = {"iptables-nft", "iptables-legacy", "nftables"}
    blocked = _blocked_once(topo.lab, 0, lambda found: {
        e["details"]["backend"] for e in found} >= backends)
    assert {e["details"]["backend"] for e in blocked} == backends
    assert any("198.18.9.8" in e["message"] for e in blocked)
    proc = cli("events", "--lab", topo.lab, "--json")
    assert proc.returncode == 0
    recorded = [e["reason"] for e in json.loads(proc.stdout)]
    assert recorded.index("EnableRefused") < recorded.index("Enabled")
    assert events.read(topo.lab)[0]["details"]["rules"][0]["rule"].startswith("-A FORWARD")

    assert cli("disable", "--lab", topo.lab).returncode == 0
    netns.run(node1, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.4", "-j", "DROP"])
    time.sleep(REMOVED_WITHIN_S / 2)
    assert "198.18.9.4" in rules_text(node1)
    assert reasons(topo.lab)[-1] == "Disabled"


def test_force_enables_over_rules_keeps_them_and_warns(legacy_lab):
    _, topo = legacy_lab
    ns = topo.nodes[1].netns
    netns.run(ns, ["iptables-legacy", "-A", "FORWARD", "-d", "198.18.9.3", "-j", "DROP"])
    switch.enable_ebpf(load_state(topo.lab), topo, force=True)
    forced = [e for e in events.read(topo.lab) if e["reason"] == "ForcedEnable"]
    assert forced and forced[0]["type"] == "Warning" and "198.18.9.3" in forced[0]["message"]
    time.sleep(REMOVED_WITHIN_S / 2)  # several legacy polls: the forced rule must survive them
    assert "198.18.9.3" in rules_text(ns)


def test_status_names_the_blocking_mechanism(legacy_lab):
    state, topo = legacy_lab
    assert switch.status(load_state(topo.lab), topo)["rule_blocking"]["active"] == "none"
    switch.enable_ebpf(load_state(topo.lab), topo)
    blocking = switch.status(load_state(topo.lab), topo)["rule_blocking"]
    assert blocking["guard_pid"] > 0
    backends = blocking["backends"]
    for backend in ("iptables-nft", "ip6tables-nft", "nftables"):
        assert backends[backend].startswith("nf_tables watcher")
    for backend in ("iptables-legacy", "ip6tables-legacy"):
        assert backends[backend].startswith("kernel refusal (cgroup/setsockopt program id ")
    assert "kernel refusal" in blocking["active"] and "nf_tables watcher" in blocking["active"]
    prog_id = _refusal_prog_id(blocking)
    assert prog_id in libbpf.prog_ids()
    try:
        lsm = open("/sys/kernel/security/lsm").read()
        assert blocking["bpf_lsm"]["available"] == ("bpf" in lsm.split(","))
    except OSError:  # securityfs not mounted: the guard cannot claim BPF LSM
        assert blocking["bpf_lsm"]["available"] is False
    pid = blocking["guard_pid"]
    switch.disable_ebpf(load_state(topo.lab), topo)
    assert not os.path.exists(f"/proc/{pid}")
    assert prog_id not in libbpf.prog_ids()   # the refusal ends with its guard
    assert switch.status(load_state(topo.lab), topo)["rule_blocking"]["backends"] == {}


def test_lab_down_ends_the_guard_and_its_event_log(make_lab):
    from netns_lab.builder import lab_down
    state, topo = make_lab("ebpf")
    pid = rule_guard.find(topo.lab).guard.pid
    assert pid > 0 and os.path.exists(f"/proc/{pid}")
    assert events.log_path(topo.lab).exists()
    lab_down(topo.lab)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    status = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] \
        if os.path.exists(f"/proc/{pid}") else "gone"
    assert status in ("gone", "Z")
    assert not events.log_path(topo.lab).exists()


def _refusal_prog_id(blocking: dict) -> int:
    return int(re.search(r"program id (\d+)", blocking["backends"]["iptables-legacy"]).group(1))


def _nft_text(ns: str) -> str:
    return netns.run(ns, ["nft", "list", "ruleset"]).stdout


def _legacy_text(ns: str) -> str:
    """x_tables rules, user chains and policies other than ACCEPT (a table that is merely
    instantiated, with its empty built-in chains, filters nothing)."""
    lines = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        for line in netns.run(ns, [tool], check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line
            elif line.startswith("-") or (line.startswith(":") and line.split()[1] != "ACCEPT"):
                lines.append(f"{tool} {table} {line}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def frozen_lab():
    """One eBPF lab for the change-by-change tests: (topology, node namespace, its rulesets)."""
    from datapath.switch import configure_mode
    topo = load_topology(fresh_lab_name(), None, 2, 1)
    try:
        lab_up(topo, configure_mode("ebpf"))
        ns = topo.nodes[1].netns
        yield topo, ns, _nft_text(ns), _legacy_text(ns)
    finally:
        if topo.lab in lab_names():
            lab_down(topo.lab)


def _events_of(lab: str, since: int, reason: str) -> list[dict]:
    return [e for e in events.read(lab)[since:] if e["reason"] == reason]


def _events_once(lab: str, since: int, reason: str, done=bool, seconds: float = 10
                 ) -> list[dict]:
    """The events of this reason since `since`, once done(them) holds (by default: there are
    some) or time is up."""
    deadline = time.monotonic() + seconds
    while not done(found := _events_of(lab, since, reason)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _blocked_once(lab: str, since: int, done, seconds: float = REMOVED_WITHIN_S) -> list[dict]:
    """The BlockedRule events since `since`, once done(them) holds or time is up: the guard
    records each after its revert (or, for a refusal, after reading the kernel's report)."""
    return _events_once(lab, since, "BlockedRule", done, seconds)


def _back_to(ns: str, nft_before: str, seconds: float = REMOVED_WITHIN_S) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = _nft_text(ns)
        if now == nft_before:
            break
        time.sleep(0.05)
    return now


# (what it is, the commands, text the BlockedRule event must name)
NF_TABLES_CHANGES = [
    ("iptables-nft insert", [["iptables-nft", "-I", "INPUT", "-p", "tcp", "--dport", "3333",
                              "-j", "DROP"]], "insert rule ip filter INPUT tcp dport 3333"),
    ("iptables-nft append", [["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.8", "-j",
                              "DROP"]], "198.18.9.8"),
    ("iptables-nft insert into the lab's own chain",
     [["iptables-nft", "-t", "nat", "-I", "POSTROUTING", "-s", "198.18.9.9", "-j", "ACCEPT"]],
     "ip nat POSTROUTING ip saddr 198.18.9.9"),
    ("iptables-nft policy", [["iptables-nft", "-P", "FORWARD", "DROP"]], "policy drop"),
    ("iptables-nft new chain", [["iptables-nft", "-N", "USERCHAIN"]], "USERCHAIN"),
    ("ip6tables-nft append", [["ip6tables-nft", "-A", "INPUT", "-s", "2001:db8::1", "-j",
                               "DROP"]], "2001:db8::1"),
    ("ip6tables-nft policy", [["ip6tables-nft", "-P", "FORWARD", "DROP"]],
     "ip6 filter FORWARD"),
    ("nft ip6 table rule",
     [["nft", "add table ip6 user6; add chain ip6 user6 c { type filter hook forward "
       "priority 0; }; add rule ip6 user6 c ip6 saddr 2001:db8:9::5 drop"]], "2001:db8:9::5"),
    ("nft inet rule on IPv6 addresses",
     [["nft", "add table inet user; add chain inet user c { type filter hook forward "
       "priority 0; }; add rule inet user c ip6 daddr 2001:db8:9::6 drop"]], "2001:db8:9::6"),
    ("nft base chain with policy drop and no rules",
     [["nft", "add table inet user; add chain inet user c { type filter hook forward "
       "priority 0; policy drop; }"]], "policy drop"),
    ("nft set in the lab's table", [["nft", "add set ip nat blocked { type ipv4_addr; }"]],
     "add set ip nat blocked"),
    ("nft map in the lab's table",
     [["nft", "add map ip nat m { type ipv4_addr : verdict; }"]], "add map ip nat m"),
    ("nft rule with a set", [["nft", "add table ip t; add set ip t s { type ipv4_addr; "
                              "elements = { 198.18.9.5 } }; add chain ip t c { type filter hook "
                              "input priority 0; }; add rule ip t c ip saddr @s drop"]], "@s"),
    ("nft flush ruleset (removes the lab's chains)", [["nft", "flush", "ruleset"]],
     "delete table ip nat"),
    ("nft delete of the lab's base chain", [["nft", "delete", "chain", "ip", "nat",
                                             "POSTROUTING"]], "delete chain ip nat POSTROUTING"),
]


@pytest.mark.parametrize("what,commands,needle", NF_TABLES_CHANGES,
                         ids=[c[0] for c in NF_TABLES_CHANGES])
def test_every_nf_tables_change_is_reverted_with_an_event(frozen_lab, what, commands, needle):
    topo, ns, nft_before, legacy_before = frozen_lab
    since = len(events.read(topo.lab))
    for argv in commands:
        netns.run(ns, argv)
    assert _back_to(ns, nft_before) == nft_before, f"{what}: not reverted"
    _blocked_once(topo.lab, since, lambda found: len(found) >= len(commands))
    time.sleep(0.2)     # and no more than one each
    blocked = _events_of(topo.lab, since, "BlockedRule")
    assert len(blocked) == len(commands), blocked
    assert needle in blocked[0]["message"] and blocked[0]["details"]["blocked"] is True
    assert blocked[0]["message"].startswith("reverted ") and "[" in blocked[0]["details"]["writer"]
    assert _legacy_text(ns) == legacy_before


X_TABLES_WRITES = [
    ["iptables-legacy", "-I", "INPUT", "-s", "198.18.9.7", "-j", "DROP"],
    ["iptables-legacy", "-A", "FORWARD", "-s", "198.18.9.7", "-j", "DROP"],
    ["iptables-legacy", "-P", "FORWARD", "DROP"],
    ["iptables-legacy", "-N", "USERCHAIN"],
    ["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"],
    ["ip6tables-legacy", "-A", "INPUT", "-s", "2001:db8::7", "-j", "DROP"],
    ["ip6tables-legacy", "-P", "FORWARD", "DROP"],
]


@pytest.mark.parametrize("argv", X_TABLES_WRITES, ids=[" ".join(a[:3]) for a in X_TABLES_WRITES])
def test_every_x_tables_write_is_refused_by_the_kernel(frozen_lab, argv):
    topo, ns, nft_before, legacy_before = frozen_lab
    since = len(events.read(topo.lab))
    proc = netns.run(ns, argv, check=False)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc
    assert _legacy_text(ns) == legacy_before
    (blocked,) = _blocked_once(topo.lab, since, bool)
    table = argv[argv.index("-t") + 1] if "-t" in argv else "filter"
    assert blocked["message"].startswith(f"refused {argv[0]} change by ")
    assert f"load of table {table}" in blocked["message"]
    assert blocked["object"] == f"node/{topo.nodes[1].name}"
    assert _nft_text(ns) == nft_before


def test_the_refusal_touches_nothing_outside_the_lab_nodes(frozen_lab, make_lab):
    """A pod of the same lab and another lab's node still write x_tables, large tables too
    (a blob over a page, which the program passes without reading)."""
    topo, _, _, _ = frozen_lab
    _, other = make_lab("legacy")
    big = "*filter\n" + "".join(f"-A INPUT -s 198.18.{i // 250}.{i % 250 + 1}/32 -j ACCEPT\n"
                                for i in range(400)) + "COMMIT\n"
    for ns in (topo.nodes[0].pods[0].netns, other.nodes[0].netns):
        assert netns.run(ns, ["iptables-legacy", "-A", "INPUT", "-s", "198.18.9.2", "-j",
                              "DROP"], check=False).returncode == 0
        assert netns.run(ns, ["ip6tables-legacy", "-P", "FORWARD", "DROP"],
                         check=False).returncode == 0
        assert netns.run(ns, ["iptables-legacy-restore"], input=big,
                         check=False).returncode == 0
        saved = netns.run(ns, ["iptables-legacy-save"]).stdout
        assert saved.count("-j ACCEPT") == 400 and "198.18.9.2" not in saved  # restore flushed


def test_replacing_a_forced_rule_is_reverted_to_the_original(legacy_lab):
    """Replace (-R) and deletion of a rule accepted with --force: the table comes back whole."""
    _, topo = legacy_lab
    ns = topo.nodes[0].netns
    netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-d", "198.18.9.3", "-j", "DROP"])
    switch.enable_ebpf(load_state(topo.lab), topo, force=True)
    before = _nft_text(ns)
    netns.run(ns, ["iptables-nft", "-R", "FORWARD", "1", "-d", "198.18.9.30", "-j", "ACCEPT"])
    assert _back_to(ns, before) == before
    netns.run(ns, ["iptables-nft", "-D", "FORWARD", "-d", "198.18.9.3", "-j", "DROP"])
    assert _back_to(ns, before) == before
    assert "198.18.9.3 " in netns.run(ns, ["iptables-nft-save"]).stdout.replace("/32", " ")


def test_the_refusal_goes_with_a_killed_guard(ebpf_lab):
    _, topo = ebpf_lab
    blocking = switch.status(load_state(topo.lab), topo)["rule_blocking"]
    prog_id = _refusal_prog_id(blocking)
    os.killpg(blocking["guard_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while prog_id in libbpf.prog_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prog_id not in libbpf.prog_ids()
    assert netns.run(topo.nodes[0].netns, ["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"],
                     check=False).returncode == 0


def test_lab_down_removes_the_refusal(make_lab):
    _, topo = make_lab("ebpf")
    prog_id = _refusal_prog_id(switch.status(load_state(topo.lab), topo)["rule_blocking"])
    lab_down(topo.lab)
    deadline = time.monotonic() + 5
    while prog_id in libbpf.prog_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prog_id not in libbpf.prog_ids()


def test_polled_x_tables_are_restored_where_the_kernel_cannot_refuse(legacy_lab):
    """The fallback: without the cgroup program, x_tables are polled and restored."""
    _, topo = legacy_lab
    ns = topo.nodes[0].netns
    before = _legacy_text(ns)
    pid, backends = rule_guard.start(topo.lab, {n.name: n.netns for n in topo.nodes},
                                     refuse_xtables=False)
    try:
        assert backends["iptables-legacy"].startswith("poll every")
        since = len(events.read(topo.lab))
        netns.run(ns, ["iptables-legacy", "-I", "INPUT", "-s", "198.18.9.6", "-j", "DROP"])
        netns.run(ns, ["iptables-legacy", "-P", "FORWARD", "DROP"])
        netns.run(ns, ["ip6tables-legacy", "-N", "USERCHAIN"])
        deadline = time.monotonic() + REMOVED_WITHIN_S
        while _legacy_text(ns) != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _legacy_text(ns) == before
        named = ("198.18.9.6", "FORWARD", "USERCHAIN")
        blocked = " ".join(e["message"] for e in _blocked_once(
            topo.lab, since, lambda found: all(n in " ".join(e["message"] for e in found)
                                               for n in named)))
        assert all(n in blocked for n in named), blocked
    finally:
        rule_guard.stop(pid)


def _guard_children(guard_pid: int) -> dict[int, str]:
    """pid -> command line of the guard's processes."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                pgid = int(f.read().rsplit(")", 1)[1].split()[2])
            cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
        except (OSError, IndexError, ValueError):
            continue
        if pgid == guard_pid:
            found[int(pid)] = cmdline
    return found


def test_a_killed_monitor_is_restarted_and_what_changed_meanwhile_reverted(ebpf_lab):
    _, topo = ebpf_lab
    ns = topo.nodes[1].netns
    before = _nft_text(ns)
    guard = rule_guard.find(topo.lab).guard.pid
    monitor = _monitor_of(guard, ns)
    since = len(events.read(topo.lab))
    os.kill(monitor, signal.SIGKILL)
    netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.11", "-j", "DROP"])
    assert _back_to(ns, before) == before        # the change made while nobody listened
    netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.12", "-j", "DROP"])
    assert _back_to(ns, before) == before        # the restarted monitor's first change
    assert os.path.exists(f"/proc/{guard}")
    messages = " ".join(e["message"] for e in _blocked_once(
        topo.lab, since, lambda found: any("198.18.9.12" in e["message"] for e in found)))
    # .11 reverted by the restarted guard's comparison, or (if the restart was quicker than
    # iptables-nft) by its monitor, naming it
    assert ("changed meanwhile" in messages or "198.18.9.11" in messages) and \
        "198.18.9.12" in messages, messages


def test_the_monitor_is_waited_for_until_it_listens(legacy_lab):
    """Popen returns before `nft monitor` has subscribed; the guard takes its baseline (and,
    after a restart, compares the ruleset) only once it has, or a change made in between
    would be seen by neither. A change made the moment the wait returns must be printed."""
    _, topo = legacy_lab
    ns = topo.nodes[1].netns
    # a writer already running writes the moment it is told (a new nft process would take
    # as long to start as the monitor takes to subscribe)
    writer = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "-i"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        for attempt in range(5):
            monitor = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "-a", "monitor"],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
            try:
                assert rule_guard.monitor_subscribed(monitor)
                writer.stdin.write(f"add table ip hrprobe{attempt}\n"
                                   f"delete table ip hrprobe{attempt}\n")
                writer.stdin.flush()
            finally:
                time.sleep(0.3)
                monitor.terminate()
                printed = monitor.communicate(timeout=5)[0]
            assert f"hrprobe{attempt}" in printed, attempt
        # the writer holds a netfilter socket too, in no group: not subscribed
        assert not rule_guard.monitor_subscribed(writer, timeout=0.3)
    finally:
        writer.stdin.close()
        try:
            writer.wait(timeout=5)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait()
    asked = time.monotonic()
    assert not rule_guard.monitor_subscribed(writer)          # ended: answered at once
    assert time.monotonic() - asked < 1


def _monitor_of(guard: int, ns: str) -> int:
    """The guard's `nft monitor` in the namespace `ns` (it runs as ip netns exec ns nft ...)."""
    target = os.stat(f"/run/netns/{ns}").st_ino
    for pid, cmd in _guard_children(guard).items():
        if cmd.startswith("nft -a monitor") and \
                os.stat(f"/proc/{pid}/ns/net").st_ino == target:
            return pid
    raise AssertionError(f"no nft monitor of the guard in {ns}: {_guard_children(guard)}")


def test_a_table_owned_by_a_process_holds_back_only_itself(ebpf_lab):
    """A table with `flags owner` belongs to its creator's socket: nobody else can delete it
    (and nft 1.0.6 prints its JSON unparsably). It is reported as not blocked, and every
    other change is still reverted."""
    _, topo = ebpf_lab
    ns = topo.nodes[1].netns
    since = len(events.read(topo.lab))
    owner = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "-i"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        owner.stdin.write("add table ip own { flags owner; }\n")
        owner.stdin.flush()
        deadline = time.monotonic() + REMOVED_WITHIN_S
        while "table ip own" not in _nft_text(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.13", "-j", "DROP"])
        deadline = time.monotonic() + REMOVED_WITHIN_S
        while "198.18.9.13" in _nft_text(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "198.18.9.13" not in _nft_text(ns)
        blocked = _blocked_once(topo.lab, since, lambda found: any(
            "198.18.9.13" in e["message"] for e in found))
        own = [e for e in blocked if "add table ip own" in e["message"]]
        assert own and own[0]["details"]["blocked"] is False
        assert "Operation not permitted" in own[0]["message"]
        drop = [e for e in blocked if "198.18.9.13" in e["message"]]
        assert drop and drop[0]["details"]["blocked"] is True
    finally:
        owner.stdin.close()
        owner.wait(timeout=5)


def test_rules_added_while_enable_runs_make_it_refuse_and_roll_back(legacy_lab, monkeypatch):
    """A rule that lands after the pre-enable check but before the guard's baseline would be
    frozen in as if forced: enable checks again once the guard blocks."""
    _, topo = legacy_lab
    ns = topo.nodes[0].netns
    real_start = rule_guard.start

    def start_after_a_rule(*args, **kwargs):
        netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.14", "-j", "DROP"])
        return real_start(*args, **kwargs)

    monkeypatch.setattr(rule_guard, "start", start_after_a_rule)
    with pytest.raises(switch.SwitchError, match=r"(?s)added while enable ran.*198\.18\.9\.14"):
        switch.enable_ebpf(load_state(topo.lab), topo)
    assert load_state(topo.lab).mode == "legacy"
    status = switch.status(load_state(topo.lab), topo)
    assert status["converged"] and {n["mode"] for n in status["nodes"]} == {"legacy"}
    assert rule_guard.find(topo.lab).guard is None
    assert "clsact" not in netns.run(ns, ["tc", "qdisc", "show"]).stdout
    refused = [e for e in events.read(topo.lab) if e["reason"] == "EnableRefused"]
    assert refused and "198.18.9.14" in refused[-1]["details"]["rules"][0]["rule"]


def test_a_forced_rule_nft_cannot_print_back_is_restored_with_iptables_nft(legacy_lab):
    """`-m recent` lists as `xt match recent`, which nft -f cannot read: the table is put
    back with iptables-nft-restore instead."""
    _, topo = legacy_lab
    ns = topo.nodes[0].netns
    netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-m", "recent", "--name", "hr", "--set",
                   "-j", "ACCEPT"])
    assert "xt match" in _nft_text(ns)
    switch.enable_ebpf(load_state(topo.lab), topo, force=True)
    netns.run(ns, ["iptables-nft", "-P", "FORWARD", "DROP"])
    deadline = time.monotonic() + REMOVED_WITHIN_S
    while ":FORWARD DROP" in netns.run(ns, ["iptables-nft-save"]).stdout and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    saved = netns.run(ns, ["iptables-nft-save"]).stdout
    assert ":FORWARD ACCEPT" in saved and "-m recent --set --name hr" in saved


def _worker_gone(pid: int, seconds: float = 5) -> bool:
    proc = procs.Process.of(pid)
    deadline = time.monotonic() + seconds
    while proc is not None and proc.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc is None or not proc.alive()


def test_a_killed_worker_is_restarted_and_what_changed_meanwhile_reverted(ebpf_lab):
    """The guard's worker killed while its keeper is held (SIGSTOP), so that the gap stays
    open: an iptables-nft rule and an iptables-legacy rule (no kernel refusal without the
    worker) land. Once the keeper runs, a new worker with the first one's baseline reverts
    both, names them, and blocks again; the old worker's monitors are gone."""
    _, topo = ebpf_lab
    ns = topo.nodes[1].netns
    found = rule_guard.find(topo.lab)
    keeper, worker = found.guard, found.details["worker"]
    nft_before, legacy_before = _nft_text(ns), _legacy_text(ns)
    refusal = _refusal_prog_id(switch.status(load_state(topo.lab), topo)["rule_blocking"])
    since = len(events.read(topo.lab))
    os.kill(keeper.pid, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        assert _worker_gone(worker)
        deadline = time.monotonic() + 5     # the link goes with the worker's last fd, soon
        while refusal in libbpf.prog_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        gap = rule_guard.find(topo.lab)      # blocking nothing, and said so
        assert not gap.live and gap.describe().startswith("starting a new worker"), \
            gap.describe()
        assert switch.status(load_state(topo.lab), topo)["rule_blocking"]["active"] == "none"
        netns.run(ns, ["iptables-nft", "-I", "FORWARD", "-s", "198.18.9.14", "-j", "DROP"])
        assert netns.run(ns, ["iptables-legacy", "-I", "INPUT", "-s", "198.18.9.15", "-j",
                              "DROP"], check=False).returncode == 0     # the gap is real
    finally:
        os.kill(keeper.pid, signal.SIGCONT)
    restarted = _events_once(topo.lab, since, "GuardRestarted")
    assert restarted and f"pid {worker} was killed by SIGKILL" in restarted[0]["message"], \
        restarted
    assert _back_to(ns, nft_before) == nft_before
    deadline = time.monotonic() + REMOVED_WITHIN_S
    while _legacy_text(ns) != legacy_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _legacy_text(ns) == legacy_before
    blocked = _blocked_once(topo.lab, since, lambda found: len(found) >= 2)
    named = " ".join(e["message"] for e in blocked)
    assert "changed meanwhile (the rule guard's worker was restarted): table ip filter: " \
        in named and "+chain FORWARD: ip saddr 198.18.9.14 counter drop" in named, named
    assert "table filter: +-A INPUT -s 198.18.9.15/32 -j DROP (the rule guard's worker was " \
        "restarted)" in named, named
    assert "198.18.9.15" in named and "worker was restarted" in named, named
    assert all(e["details"]["blocked"] for e in blocked), blocked

    now = rule_guard.find(topo.lab)
    assert now.live and now.guard == keeper and now.orphans == []
    assert now.details["worker"] == restarted[0]["details"]["worker"] != worker
    monitors = [cmd for cmd in _guard_children(keeper.pid).values()
                if cmd.startswith("nft -a monitor")]
    assert len(monitors) == len(topo.nodes), _guard_children(keeper.pid)
    assert netns.run(ns, ["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"],
                     check=False).returncode != 0     # refused in the kernel again
    netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.16", "-j", "DROP"])
    assert _back_to(ns, nft_before) == nft_before


def test_a_worker_whose_keeper_is_killed_ends_and_says_so(ebpf_lab):
    _, topo = ebpf_lab
    found = rule_guard.find(topo.lab)
    keeper, worker = found.guard, found.details["worker"]
    since = len(events.read(topo.lab))
    os.kill(keeper.pid, signal.SIGKILL)
    assert _worker_gone(worker)
    failed = _events_once(topo.lab, since, "GuardFailed")
    assert failed and f"worker pid {worker}" in failed[0]["message"] and \
        "nothing blocks rule changes" in failed[0]["message"], failed
    def running():      # (a zombie's command line is empty: the keeper, unreaped)
        return {pid: cmd for pid, cmd in _guard_children(keeper.pid).items() if cmd}
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == {}          # its monitors went with it
    now = rule_guard.find(topo.lab)
    assert now.guard is None and now.orphans == []
    assert switch.status(load_state(topo.lab), topo)["rule_blocking"]["active"] == "none"


def test_a_worker_that_cannot_run_is_given_up_on(ebpf_lab):
    """Without the first worker's baseline no worker can start (it would freeze in what is
    there): the keeper tries RESTARTS_MAX times, then says so and ends."""
    _, topo = ebpf_lab
    found = rule_guard.find(topo.lab)
    keeper, worker = found.guard, found.details["worker"]
    since = len(events.read(topo.lab))
    rule_guard.baseline_path(guard_pidfile(topo.lab)).unlink()
    os.kill(worker, signal.SIGKILL)
    failed = _events_once(topo.lab, since, "GuardFailed", seconds=60)
    assert failed and "not started again" in failed[0]["message"] and \
        "before it blocked" in failed[0]["message"], failed
    assert _worker_gone(keeper.pid)
    assert not [e for e in events.read(topo.lab)[since:] if e["reason"] == "GuardRestarted"]


def test_a_baseline_reads_back_as_it_was_taken(legacy_lab):
    """The keeper's workers share the first one's nf_tables baseline through JSON."""
    from datapath import nft_ruleset
    _, topo = legacy_lab
    ns = topo.nodes[0].netns
    netns.run(ns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.17", "-m", "comment",
                   "--comment", "kept", "-j", "DROP"])
    snap = nft_ruleset.snapshot(ns, with_texts=True)
    assert snap.rules and snap.texts
    again = nft_ruleset.Snapshot.from_json(json.loads(json.dumps(snap.to_json())))
    assert again == snap
    assert nft_ruleset.revert_plan(nft_ruleset.snapshot(ns), again) == {}


def test_a_restarted_worker_whose_keeper_is_killed_while_it_starts_says_so(ebpf_lab):
    """The keeper killed the moment it has started a worker again: that worker, still on its
    way to blocking, must not end silently (nobody would restart it)."""
    _, topo = ebpf_lab
    found = rule_guard.find(topo.lab)
    keeper, worker = found.guard, found.details["worker"]
    since = len(events.read(topo.lab))
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (resumed := [pid for pid, cmd in _guard_children(keeper.pid).items()
                           if "--resume" in cmd.split()]):
        assert time.monotonic() < deadline, _guard_children(keeper.pid)
        time.sleep(0.005)
    os.kill(keeper.pid, signal.SIGKILL)
    assert _worker_gone(resumed[0], 30)
    failed = _events_once(topo.lab, since, "GuardFailed")
    assert failed and f"worker pid {resumed[0]}" in failed[0]["message"] and \
        "nothing blocks rule changes" in failed[0]["message"], failed
    assert rule_guard.find(topo.lab).guard is None
