"""A snapshot of the root network namespace, to prove the lab never touches it."""

from __future__ import annotations

import os
import re
import subprocess

_VOLATILE = re.compile(r"expires \d+sec|\b(used|age) \d+\S*")


def _cmd(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if not l.startswith("#")]
    return _VOLATILE.sub("", "\n".join(lines))


def _sysctls() -> dict[str, str]:
    values = {}
    for top in ("/proc/sys/net/ipv4", "/proc/sys/net/ipv6", "/proc/sys/net/core"):
        for dirpath, _, files in os.walk(top):
            for f in files:
                path = os.path.join(dirpath, f)
                try:
                    with open(path) as fh:
                        values[path] = fh.read()
                except OSError:
                    pass  # write-only or refused: nothing to compare
    return values


def snapshot() -> dict:
    return {
        "links": _cmd(["ip", "-d", "link", "show"]),
        "addresses": _cmd(["ip", "addr", "show"]),
        "routes4": _cmd(["ip", "-4", "route", "show", "table", "all"]),
        "routes6": _cmd(["ip", "-6", "route", "show", "table", "all"]),
        "rules": _cmd(["ip", "rule", "show"]) + _cmd(["ip", "-6", "rule", "show"]),
        "neigh_proxy": _cmd(["ip", "neigh", "show", "proxy"]),
        "iptables_nft": _cmd(["iptables-nft-save"]),
        "iptables_legacy": _cmd(["iptables-legacy-save"]),
        "ip6tables_nft": _cmd(["ip6tables-nft-save"]),
        "ip6tables_legacy": _cmd(["ip6tables-legacy-save"]),
        "nft": _cmd(["nft", "list", "ruleset"]),
        "qdiscs": _cmd(["tc", "qdisc", "show"]),
        "sysctls": _sysctls(),
    }


def diff(before: dict, after: dict) -> list[str]:
    changes = []
    for key in before:
        if key == "sysctls":
            for path in sorted(set(before[key]) | set(after[key])):
                if before[key].get(path) != after[key].get(path):
                    changes.append(f"sysctl {path}: {before[key].get(path)!r} -> "
                                   f"{after[key].get(path)!r}")
        elif before[key] != after[key]:
            changes.append(f"{key} changed:\n--- before\n{before[key]}\n--- after\n{after[key]}")
    return changes
