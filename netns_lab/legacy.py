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


def install_masquerade(topo: Topology, node: Node) -> None:
    ipt = [iptables_binary(), "-w", "-t", "nat"]
    netns.run(node.netns, ipt + ["-N", CHAIN])
    for cidr in topo.non_masquerade_cidrs:
        netns.run(node.netns, ipt + ["-A", CHAIN, "-d", cidr, "-j", "RETURN"])
    ports = f"{topo.nat.port_min}-{topo.nat.port_max}"
    for proto in ("tcp", "udp"):        # --to-ports needs a protocol with ports
        netns.run(node.netns, ipt + ["-A", CHAIN, "-s", node.pod_cidr, "-p", proto,
                                     "-j", "MASQUERADE", "--to-ports", ports])
    netns.run(node.netns, ipt + ["-A", CHAIN, "-s", node.pod_cidr, "-j", "MASQUERADE"])
    netns.run(node.netns, ipt + ["-A", *_jump_rule(topo)])


def remove_masquerade(topo: Topology, node: Node) -> None:
    ipt = [iptables_binary(), "-w", "-t", "nat"]
    if netns.run(node.netns, ipt + ["-C", *_jump_rule(topo)], check=False).returncode == 0:
        netns.run(node.netns, ipt + ["-D", *_jump_rule(topo)])
    if netns.run(node.netns, ipt + ["-L", CHAIN, "-n"], check=False).returncode == 0:
        netns.run(node.netns, ipt + ["-F", CHAIN])
        netns.run(node.netns, ipt + ["-X", CHAIN])


def masquerade_installed(topo: Topology, node: Node) -> bool:
    ipt = [iptables_binary(), "-w", "-t", "nat"]
    return netns.run(node.netns, ipt + ["-C", *_jump_rule(topo)], check=False).returncode == 0


def enable_legacy(topo: Topology) -> None:
    for node in topo.nodes:
        if not masquerade_installed(topo, node):
            install_masquerade(topo, node)
