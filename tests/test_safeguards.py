"""AKS's safeguards: refuse to enable over user rules, block new ones while enabled, record events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


from datapath import events, switch
from netns_lab import netns
from netns_lab.state import load_state

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


def test_enable_refuses_over_a_user_rule_then_blocks_new_ones(legacy_lab, make_lab):
    _, topo = legacy_lab
    node1, node2 = topo.nodes[0].netns, topo.nodes[1].netns
    netns.run(node1, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.9", "-j", "DROP"])

    proc = cli("enable", "--lab", topo.lab)
    assert proc.returncode == 1
    assert "iptables-nft table filter chain FORWARD: -A FORWARD -s 198.18.9.9/32 -j DROP" in proc.stderr
    assert "iptables-nft -t filter -D FORWARD -s 198.18.9.9/32 -j DROP" in proc.stderr
    assert load_state(topo.lab).mode == "legacy"
    assert "clsact" not in netns.run(node1, ["tc", "qdisc", "show"]).stdout

    netns.run(node1, ["iptables-nft", "-D", "FORWARD", "-s", "198.18.9.9", "-j", "DROP"])
    proc = cli("enable", "--lab", topo.lab)
    assert proc.returncode == 0, proc.stderr

    _, other = make_lab("legacy")  # another lab's node: not ours to police
    netns.run(other.nodes[0].netns, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.5",
                                     "-j", "DROP"])
    netns.run(node1, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.8", "-j", "DROP"])
    netns.run(node2, ["iptables-legacy", "-A", "INPUT", "-s", "198.18.9.7", "-j", "DROP"])
    netns.run(node2, ["nft", "add table inet user; add chain inet user c "
                      "{ type filter hook input priority 0; }; add rule inet user c ip saddr "
                      "198.18.9.6 drop"])
    assert gone_within(node1, "198.18.9.8", REMOVED_WITHIN_S)
    assert gone_within(node2, "198.18.9.7", REMOVED_WITHIN_S)
    assert gone_within(node2, "198.18.9.6", REMOVED_WITHIN_S)
    assert "198.18.9.5" in rules_text(other.nodes[0].netns)

    blocked = [e for e in events.read(topo.lab) if e["reason"] == "BlockedRule"]
    assert {e["details"]["backend"] for e in blocked} == {"nftables", "iptables-legacy"}
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
    assert "nf_tables netlink watcher" in blocking["active"] and blocking["guard_pid"] > 0
    try:
        lsm = open("/sys/kernel/security/lsm").read()
        assert blocking["bpf_lsm"]["available"] == ("bpf" in lsm.split(","))
    except OSError:  # securityfs not mounted: the guard cannot claim BPF LSM
        assert blocking["bpf_lsm"]["available"] is False
    pid = blocking["guard_pid"]
    switch.disable_ebpf(load_state(topo.lab), topo)
    assert not os.path.exists(f"/proc/{pid}")


def test_lab_down_ends_the_guard_and_its_event_log(make_lab):
    from netns_lab.builder import lab_down
    state, topo = make_lab("ebpf")
    pid = load_state(topo.lab).guard_pid
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
