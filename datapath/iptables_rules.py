"""User-defined firewall rules in a node namespace, in every backend.

eBPF host routing bypasses the node's netfilter hooks for pod traffic, so a
rule there silently stops applying to it. Before enabling, every node
namespace is inspected in both iptables backends (iptables-nft, which shares
the kernel's nf_tables with native nft rules, and iptables-legacy's x_tables),
for IPv4 and IPv6,
and in native nftables tables; what is found is listed with the command that
removes it. The lab's own legacy MASQUERADE chain is not a user rule, nor is
an empty built-in chain with an ACCEPT policy.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass

from netns_lab import legacy, netns

# Tables iptables-nft creates in nf_tables; their rules are listed by iptables-nft-save.
XTABLES = {"filter", "nat", "mangle", "raw", "security"}


@dataclass(frozen=True)
class Rule:
    netns: str
    backend: str  # iptables-nft | iptables-legacy | nftables
    table: str
    chain: str
    text: str
    remove: str  # the command that removes it, runnable as printed

    def describe(self) -> str:
        return f"{self.netns}: {self.backend} table {self.table} chain {self.chain}: {self.text}"


def _ours(table: str, line: str) -> bool:
    return table == "nat" and (f"-A {legacy.CHAIN} " in line or line == f"-A {legacy.CHAIN}"
                               or legacy.COMMENT in line)


def saved_rules(ns: str, backend: str) -> list[Rule]:
    tool = f"{backend}-save"
    if shutil.which(tool) is None:
        return []
    proc = netns.run(ns, [tool], check=False)
    rules, table = [], ""
    for line in proc.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain, policy = line[1:].split()[:2]
            if policy not in ("-", "ACCEPT"):
                rules.append(Rule(ns, backend, table, chain, f"policy {policy}",
                                  f"ip netns exec {ns} {backend} -t {table} -P {chain} ACCEPT"))
        elif line.startswith("-A ") and not _ours(table, line):
            chain = line.split()[1]
            delete = shlex.join(["ip", "netns", "exec", ns, backend, "-t", table]) + \
                " -D" + line[2:]
            rules.append(Rule(ns, backend, table, chain, line, delete))
    return rules


def _nft_rule_texts(ns: str, family: str, table: str, chain: str) -> dict[int, str]:
    """handle -> the rule in nft syntax, as `nft -a list chain` prints it."""
    proc = netns.run(ns, ["nft", "-a", "list", "chain", family, table, chain], check=False)
    texts = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"^\s*(.*\S)\s+# handle (\d+)$", line):
            texts[int(m.group(2))] = m.group(1)
    return texts


def _nft_items(ns: str) -> tuple[list[dict], list[Rule]]:
    """`nft -j list ruleset` items, read table by table where nft prints JSON it cannot
    parse back (nft 1.0.6 does for a table with ``flags owner``); such a table is itself
    reported, so that it is never taken for an empty ruleset."""
    proc = netns.run(ns, ["nft", "-j", "list", "ruleset"], check=False)
    try:
        return json.loads(proc.stdout or "{}").get("nftables", []), []
    except ValueError:
        pass
    items, unreadable = [], []
    for line in netns.run(ns, ["nft", "list", "tables"], check=False).stdout.splitlines():
        _, fam, name = line.split()
        one = netns.run(ns, ["nft", "-j", "list", "table", fam, name], check=False)
        try:
            items += json.loads(one.stdout or "{}").get("nftables", [])
        except ValueError:
            unreadable.append(Rule(ns, "nftables", f"{fam} {name}", "-",
                                   "a table nft cannot list as JSON (flags owner?)",
                                   f"ip netns exec {ns} nft delete table {fam} {name}"))
    return items, unreadable


def _nft_rules(ns: str) -> list[Rule]:
    if shutil.which("nft") is None:
        return []
    items, rules = _nft_items(ns)
    texts = {}
    for item in items:
        for kind in ("rule", "chain"):
            obj = item.get(kind)
            if not obj or (obj["family"] in ("ip", "ip6") and obj["table"] in XTABLES):
                continue  # iptables-nft's own tables: reported from iptables-nft-save
            where = f"{obj['family']} {obj['table']}"
            if kind == "rule":
                key = (obj["family"], obj["table"], obj["chain"])
                if key not in texts:
                    texts[key] = _nft_rule_texts(ns, *key)
                rules.append(Rule(ns, "nftables", where, obj["chain"],
                                  texts[key].get(obj["handle"], f"handle {obj['handle']}"),
                                  f"ip netns exec {ns} nft delete rule {where} {obj['chain']} "
                                  f"handle {obj['handle']}"))
            elif obj.get("policy", "accept") != "accept":
                rules.append(Rule(ns, "nftables", where, obj["name"], f"policy {obj['policy']}",
                                  f"ip netns exec {ns} nft chain {where} {obj['name']} "
                                  "'{ policy accept; }'"))
    return rules


BACKENDS = ("iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy")


def user_rules(ns: str) -> list[Rule]:
    """Every user-defined rule (or non-ACCEPT policy) in a namespace, all backends, both families."""
    return [rule for backend in BACKENDS for rule in saved_rules(ns, backend)] + _nft_rules(ns)
