"""Legacy host routing: the node's kernel routes, iptables masquerades.

This is the baseline eBPF host routing is measured against, as a legacy CNI
sets up a node: forwarding in the kernel, and traffic leaving the cluster
masqueraded to the node IP by an iptables MASQUERADE rule, which loads the
nat table and with it conntrack, so every routed flow is tracked.

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


def iptables_binary() -> str:
    """iptables-nft where it exists (the distros' default), else plain iptables."""
    return "iptables-nft" if shutil.which("iptables-nft") else "iptables"


def _jump_rule(topo: Topology) -> list[str]:
    return ["POSTROUTING", "-o", topo.uplink_ifname, "-m", "comment", "--comment", COMMENT,
            "-j", CHAIN]


def _quoted(argv: list[str]) -> str:
    """A rule as iptables-save prints it (the comment in double quotes)."""
    return " ".join(f'"{a}"' if " " in a else a for a in argv)


def masquerade_rules(topo: Topology, node: Node) -> list[str]:
    """The chain's rules, as iptables-save prints them."""
    rules = [f"-A {CHAIN} -d {cidr} -j RETURN" for cidr in topo.non_masquerade_cidrs]
    ports = f"{topo.nat.port_min}-{topo.nat.port_max}"
    rules += [f"-A {CHAIN} -s {node.pod_cidr} -p {proto} -j MASQUERADE --to-ports {ports}"
              for proto in ("tcp", "udp")]      # --to-ports needs a protocol with ports
    rules.append(f"-A {CHAIN} -s {node.pod_cidr} -j MASQUERADE")
    return rules


@dataclass(frozen=True)
class Masquerade:
    """What a node's nat table holds of ours: the chain (None: no chain) and the jumps."""
    chain: tuple[str, ...] | None
    jumps: int

    def state(self, topo: Topology, node: Node) -> str:
        """'present' (exactly as installed), 'absent' (nothing of ours), or 'partial'."""
        if self.chain is None and self.jumps == 0:
            return "absent"
        if self.jumps == 1 and self.chain == tuple(masquerade_rules(topo, node)):
            return "present"
        return "partial"


def read_masquerade(topo: Topology, node: Node) -> Masquerade:
    saved = netns.run(node.netns, [iptables_binary() + "-save", "-t", "nat"],
                      changes=False).stdout.splitlines()
    jump = "-A " + _quoted(_jump_rule(topo))
    declared = any(line.startswith(f":{CHAIN} ") for line in saved)
    chain = tuple(line for line in saved if line.startswith(f"-A {CHAIN} ")) if declared else None
    return Masquerade(chain=chain, jumps=sum(1 for line in saved if line == jump))


def _restore(node: Node, lines: list[str]) -> None:
    """One iptables-restore transaction: all of it applies, or none of it."""
    netns.run(node.netns, [iptables_binary() + "-restore", "--noflush", "-w"],
              input="*nat\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n")


def install_masquerade(topo: Topology, node: Node, found: Masquerade | None = None) -> None:
    """The chain with exactly its rules and one jump to it, in one transaction (a kill
    leaves all or nothing); a no-op when they are there already."""
    found = found or read_masquerade(topo, node)
    if found.state(topo, node) == "present":
        return
    # with --noflush, declaring a chain that exists flushes it
    lines = [f":{CHAIN} - [0:0]", *masquerade_rules(topo, node)]
    lines += ["-D " + _quoted(_jump_rule(topo))] * max(0, found.jumps - 1)
    if found.jumps == 0:
        lines.append("-A " + _quoted(_jump_rule(topo)))
    _restore(node, lines)


def remove_masquerade(topo: Topology, node: Node, found: Masquerade | None = None) -> None:
    """Jumps, rules and chain gone in one transaction; a no-op when nothing is there."""
    found = found or read_masquerade(topo, node)
    lines = ["-D " + _quoted(_jump_rule(topo))] * found.jumps
    if found.chain is not None:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    if lines:
        _restore(node, lines)


def masquerade_installed(topo: Topology, node: Node) -> bool:
    return read_masquerade(topo, node).state(topo, node) == "present"


def enable_legacy(topo: Topology) -> None:
    for node in topo.nodes:
        install_masquerade(topo, node)
