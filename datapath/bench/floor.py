"""The mechanism floor: a lab whose hooks hold only a constant redirect.

A lab built without any mode (no iptables rule, so no conntrack) gets
bpf_c/redirect_floor.c on the hooks eBPF host routing uses, each program
redirecting to one device fixed at load time. The path a scenario takes::

    same-node        pod1 host veth ingress  --peer-->  pod2's eth0
                     pod2 host veth ingress  --peer-->  pod1's eth0
    cross-node       pod1 host veth ingress  --neigh--> node1's uplink
                     node2 uplink ingress    --peer-->  node2-pod1's eth0
                     node2-pod1 host ingress --neigh--> node2's uplink
                     node1 uplink ingress    --peer-->  pod1's eth0
    pod-to-external  pod1 host veth ingress  --neigh--> node1's uplink
                     node1 uplink ingress    --peer-->  pod1's eth0

Same-node and the other two disagree on pod1's host veth, so the bench
attaches a scenario's programs (``use``) before its floor samples, never
during one. Nothing is NATed: the floor lab's fabric routes node1's pod CIDR
back to node1, so the external host's replies find the pod (SNAT is the
program's logic, not the mechanism). A peer redirect un-clones a skb of several
segments first, as eBPF host routing's does (bpf_c/include/unclone.h): with it
the floor is eBPF's path without its logic, a bound for every workload. With
family 6 (bench --ip-family 6, a dual stack lab) the programs redirect IPv6
instead of IPv4 (-DFLOOR_IPV6), and the fabric routes node1's IPv6 pod CIDR
back too.
"""

from __future__ import annotations

from datapath import tc_attach
from datapath.bpf_build import BPF_DIR, compile_bpf, load_program
from netns_lab import netns
from netns_lab.topology import Topology

SOURCE = BPF_DIR / "redirect_floor.c"


class Floor:
    """The floor programs of one lab, compiled per target ifindex, and what is attached."""

    def __init__(self, topo: Topology, family: int = 4):
        self.topo, self.family = topo, family
        self.modules: dict[int, object] = {}     # ifindex -> bcc.BPF built for it
        self.current: str | None = None
        (n1, n2) = topo.nodes[:2]
        self.pod1, self.pod2, self.remote = n1.pods[0], n1.pods[1], n2.pods[0]
        self.n1, self.n2 = n1, n2

    def route_replies(self) -> None:
        """The fabric routes node1's pod CIDR to node1 (no NAT on the floor's way out), and
        with family 6 its IPv6 pod CIDR too."""
        with netns.ipr(self.topo.fabric_netns) as fab:     # replace: a second floor may ask
            fab.route("replace", dst=self.n1.pod_cidr, gateway=self.n1.ip)
            if self.family == 6:
                fab.route("replace", dst=self.n1.pod_cidr6, gateway=self.n1.ip6)

    def cflags(self, ifindex: int) -> list[str]:
        """The build of the programs that redirect to ``ifindex``."""
        return [f"-DFLOOR_IFINDEX={ifindex}", *(["-DFLOOR_IPV6"] if self.family == 6 else [])]

    def _program(self, ifindex: int, kind: str) -> tuple[int, str]:
        if ifindex not in self.modules:
            self.modules[ifindex] = compile_bpf(SOURCE, self.cflags(ifindex))
        name = f"floor_{kind}"
        return load_program(self.modules[ifindex], name), name

    def hooks(self, scenario: str) -> list[tuple[str, str, str, str, str]]:
        """(netns, device, kind, target netns, target device) of every hook of a scenario."""
        up = self.topo.uplink_ifname
        n1, n2, p1, p2, r = self.n1, self.n2, self.pod1, self.pod2, self.remote
        if scenario == "same-node":
            return [(n1.netns, p1.host_ifname, "peer", n1.netns, p2.host_ifname),
                    (n1.netns, p2.host_ifname, "peer", n1.netns, p1.host_ifname)]
        out = [(n1.netns, p1.host_ifname, "neigh", n1.netns, up),
               (n1.netns, up, "peer", n1.netns, p1.host_ifname)]
        if scenario == "cross-node":
            out += [(n2.netns, up, "peer", n2.netns, r.host_ifname),
                    (n2.netns, r.host_ifname, "neigh", n2.netns, up)]
        return out

    def load(self, scenario: str) -> list[tuple[str, str, int, str]]:
        """Build and load the scenario's programs (a compile per new target): (netns, device,
        program fd, name) of each hook. The bench loads them all before its first sample."""
        out = []
        for ns, dev, kind, target_ns, target_dev in self.hooks(scenario):
            with netns.ipr(target_ns) as ipr:
                ifindex = netns.ifindex(ipr, target_dev)
            fd, name = self._program(ifindex, kind)
            out.append((ns, dev, fd, name))
        return out

    def use(self, scenario: str) -> None:
        """Attach the scenario's programs (replacing what the hooks held); a no-op when they are."""
        if self.current == scenario:
            return
        for ns, dev, fd, name in self.load(scenario):
            tc_attach.attach(ns, dev, fd, name, "ingress")
        self.current = scenario

    def close(self) -> None:
        for module in self.modules.values():
            module.cleanup()
        self.modules.clear()
