"""Legacy host routing: the node's kernel routes, iptables masquerades.

This is the baseline eBPF host routing is measured against, as a legacy CNI
sets up a node: forwarding in the kernel, and traffic leaving the cluster
masqueraded to the node IP by an iptables MASQUERADE rule, which loads the
nat table and with it conntrack, so every routed flow is tracked. A dual or
ipv6 lab masquerades IPv6 the same way, to the node's IPv6 address, with the
same chain in ip6tables (same backend); the builder turns IPv6 forwarding on
in its nodes as it does IPv4's.

MASQUERADE takes its TCP and UDP ports from the topology's ``[nat]`` range, as
BPF SNAT does: a pod's source port is kept when it is in the range and free,
and a port it picks is never one of the node's own ephemeral ports
(``node_local_port_range``), so flows handed over to BPF at ``enable`` keep
that guarantee.

The rules live in a chain of their own, ``HOSTROUTING-MASQ``, jumped to from
POSTROUTING with a comment naming the project, so that they can be told apart
from user rules and removed exactly.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from . import netns
from .topology import Node, Topology

CHAIN = "HOSTROUTING-MASQ"
COMMENT = "ebpf-hostrouting: legacy masquerade"


def iptables_binary(family: int = 4) -> str:
    """iptables-nft where it exists (the distros' default), else plain iptables; family 6:
    ip6tables of the same backend."""
    tool = "iptables" if family == 4 else "ip6tables"
    return f"{tool}-nft" if shutil.which("iptables-nft") else tool


def families(topo: Topology) -> tuple[int, ...]:
    """The families a lab's nodes masquerade: 4, and 6 in a dual or ipv6 lab (nodes keep
    IPv4 in an ipv6 lab: their own traffic, and the IPv4 baseline, are unchanged)."""
    return (4, 6) if topo.has_ipv6 else (4,)


def _jump_rule(topo: Topology) -> list[str]:
    return ["POSTROUTING", "-o", topo.uplink_ifname, "-m", "comment", "--comment", COMMENT,
            "-j", CHAIN]


def _quoted(argv: list[str]) -> str:
    """A rule as iptables-save prints it (the comment in double quotes)."""
    return " ".join(f'"{a}"' if " " in a else a for a in argv)


def masquerade_rules(topo: Topology, node: Node, family: int = 4) -> list[str]:
    """The chain's rules, as iptables-save (ip6tables-save: family 6) prints them."""
    inside = topo.non_masquerade_cidrs if family == 4 else topo.non_masquerade_cidrs6
    pods = node.pod_cidr if family == 4 else node.pod_cidr6
    rules = [f"-A {CHAIN} -d {cidr} -j RETURN" for cidr in inside]
    ports = f"{topo.nat.port_min}-{topo.nat.port_max}"
    rules += [f"-A {CHAIN} -s {pods} -p {proto} -j MASQUERADE --to-ports {ports}"
              for proto in ("tcp", "udp")]      # --to-ports needs a protocol with ports
    rules.append(f"-A {CHAIN} -s {pods} -j MASQUERADE")
    return rules


@dataclass(frozen=True)
class Masquerade:
    """What a node's nat table holds of ours: the chain (None: no chain) and the jumps; in a
    dual or ipv6 lab, ``v6`` is ip6tables' (the same, for IPv6)."""
    chain: tuple[str, ...] | None
    jumps: int
    v6: Masquerade | None = None

    def family(self, family: int) -> Masquerade:
        return self if family == 4 else self.v6 or Masquerade(None, 0)

    def family_state(self, topo: Topology, node: Node, family: int) -> str:
        found = self.family(family)
        if found.chain is None and found.jumps == 0:
            return "absent"
        if found.jumps == 1 and found.chain == tuple(masquerade_rules(topo, node, family)):
            return "present"
        return "partial"

    def state(self, topo: Topology, node: Node) -> str:
        """'present' (exactly as installed, in every family of the lab), 'absent' (nothing of
        ours in any), or 'partial'."""
        states = {self.family_state(topo, node, f) for f in families(topo)}
        return states.pop() if len(states) == 1 else "partial"


def _read(topo: Topology, node: Node, family: int) -> Masquerade:
    saved = netns.run(node.netns, [iptables_binary(family) + "-save", "-t", "nat"],
                      changes=False).stdout.splitlines()
    jump = "-A " + _quoted(_jump_rule(topo))
    declared = any(line.startswith(f":{CHAIN} ") for line in saved)
    chain = tuple(line for line in saved if line.startswith(f"-A {CHAIN} ")) if declared else None
    return Masquerade(chain=chain, jumps=sum(1 for line in saved if line == jump))


def read_masquerade(topo: Topology, node: Node) -> Masquerade:
    found = _read(topo, node, 4)
    return Masquerade(found.chain, found.jumps, _read(topo, node, 6)) if topo.has_ipv6 else found


def _restore(node: Node, lines: list[str], family: int) -> None:
    """One iptables-restore transaction: all of it applies, or none of it."""
    netns.run(node.netns, [iptables_binary(family) + "-restore", "--noflush", "-w"],
              input="*nat\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n")


def install_masquerade(topo: Topology, node: Node, found: Masquerade | None = None) -> None:
    """The chain with exactly its rules and one jump to it, one transaction per family (a
    kill leaves all or nothing of a family); a no-op when they are there already."""
    found = found or read_masquerade(topo, node)
    for family in families(topo):
        if found.family_state(topo, node, family) == "present":
            continue
        jumps = found.family(family).jumps
        # with --noflush, declaring a chain that exists flushes it
        lines = [f":{CHAIN} - [0:0]", *masquerade_rules(topo, node, family)]
        lines += ["-D " + _quoted(_jump_rule(topo))] * max(0, jumps - 1)
        if jumps == 0:
            lines.append("-A " + _quoted(_jump_rule(topo)))
        _restore(node, lines, family)


def remove_masquerade(topo: Topology, node: Node, found: Masquerade | None = None) -> None:
    """Jumps, rules and chain gone, one transaction per family; a no-op when nothing is
    there."""
    found = found or read_masquerade(topo, node)
    for family in families(topo):
        part = found.family(family)
        lines = ["-D " + _quoted(_jump_rule(topo))] * part.jumps
        if part.chain is not None:
            lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
        if lines:
            _restore(node, lines, family)


def masquerade_installed(topo: Topology, node: Node) -> bool:
    return read_masquerade(topo, node).state(topo, node) == "present"


def enable_legacy(topo: Topology) -> None:
    for node in topo.nodes:
        install_masquerade(topo, node)
