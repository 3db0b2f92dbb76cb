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

import re
import shlex
import shutil
from dataclasses import dataclass

from datapath import nft_ruleset
from netns_lab import legacy, netns


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
    proc = netns.run(ns, [tool], check=False, changes=False)
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
    proc = netns.run(ns, ["nft", "-a", "list", "chain", family, table, chain], check=False,
                     changes=False)
    texts = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"^\s*(.*\S)\s+# handle (\d+)$", line):
            texts[int(m.group(2))] = m.group(1)
    return texts


def _nft_rules(ns: str) -> list[Rule]:
    if shutil.which("nft") is None:
        return []
    try:
        items, unreadable = nft_ruleset.ruleset_items(ns)
    except nft_ruleset.NftError:
        return []
    rules = [Rule(ns, "nftables", f"{fam} {name}", "-",
                  "a table nft cannot list as JSON (flags owner?)",
                  f"ip netns exec {ns} nft delete table {fam} {name}")
             for fam, name in unreadable]
    texts = {}
    for item in items:
        for kind in ("rule", "chain"):
            obj = item.get(kind)
            if not obj or (obj["family"] in ("ip", "ip6")
                           and obj["table"] in nft_ruleset.XTABLES):
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
