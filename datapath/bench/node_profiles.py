"""What a real Kubernetes node carries, for the benchmark's node namespaces.

A legacy node is only as cheap as its netfilter state: kube-proxy's iptables
mode puts thousands of rules in nat and a few in filter, AKS adds
ip-masq-agent and the wireserver rules, and a busy node's conntrack table
holds tens of thousands of flows. ``bench --node-profile`` gives both labs'
node namespaces one of:

- ``bare``: nothing but the lab's own MASQUERADE;
- ``kube-proxy:SxE``: what kube-proxy (iptables mode) writes for S ClusterIP
  services of one TCP port with E endpoints each; every tenth service is also
  a NodePort;
- ``aks``: kube-proxy:1000x3, ip-masq-agent's chain, the wireserver DROP rules
  in FORWARD and a conntrack table filled with 100,000 established flows.

The rules are the shapes of kube-proxy's proxier (pkg/proxy/iptables): nat
KUBE-SERVICES with one rule per service port and, last, the
``--dst-type LOCAL`` jump to KUBE-NODEPORTS; KUBE-SVC-* chains that mark
off-cluster sources for masquerade and pick an endpoint with ``-m statistic
--mode random --probability 1/n``; KUBE-SEP-* chains (hairpin mark, DNAT);
KUBE-POSTROUTING's mark-based MASQUERADE; filter KUBE-FORWARD's three rules;
the jumps prepended to the built-in chains. Above 1,000 endpoints kube-proxy
drops the comments of the endpoint rules ("large cluster mode"), and so does
this. Chain names are kube-proxy's: a base32 SHA-256 of the service port.

ClusterIPs come from SERVICE_NET and endpoints from FAKE_POD_NET, addresses
no lab packet carries: no rule ever matches bench traffic, and every new
flow walks KUBE-SERVICES to its end, as a flow to a pod (not a service) does
on a real node. Everything a node gets is one iptables-restore transaction
and one ``conntrack -R`` batch, a few seconds for aks.

The filled flows carry conntrack mark FILL_MARK; the bench's own flows have
mark 0, so ``delete_bench_flows`` removes those (a kernel-side filter) and
leaves the fill in place.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import time
from dataclasses import dataclass

from netns_lab import legacy, netns
from netns_lab.topology import Topology

SERVICE_NET = "198.18.240.0/20"   # the bench's fake ClusterIPs (runner.SERVICE_NET)
FAKE_POD_NET = "10.244.0.0/16"    # the cluster CIDR of the fake endpoints: pods of no lab node
AKS_VNET = "10.224.0.0/12"        # AKS's default VNet, a non-masquerade CIDR
WIRESERVER = "168.63.129.16"
NODEPORT_EVERY = 10               # every tenth service is also a NodePort
NODEPORT_BASE = 30000
LARGE_CLUSTER_ENDPOINTS = 1000    # kube-proxy's largeClusterEndpointsThreshold
MASQ_MARK = "0x4000"              # kube-proxy's default masquerade bit (14)
AKS_SERVICES, AKS_ENDPOINTS, AKS_CONNTRACK = 1000, 3, 100_000
FILL_MARK = 0x1                   # conntrack mark of the filled flows
FILL_TIMEOUT_S = 432000           # conntrack's default for an established TCP flow (5 days)
MAX_SERVICES = ipaddress.IPv4Network(SERVICE_NET).num_addresses - 2
MAX_ENDPOINTS_PER_SERVICE = 100


@dataclass(frozen=True)
class NodeProfile:
    name: str
    services: int = 0
    endpoints: int = 0
    aks: bool = False
    conntrack_entries: int = 0

    @property
    def bare(self) -> bool:
        return self.services == 0 and not self.aks


def parse(text: str) -> NodeProfile:
    """``bare``, ``kube-proxy:SxE`` or ``aks``; ValueError with a one-line reason otherwise."""
    text = text.strip()
    if text == "bare":
        return NodeProfile("bare")
    if text == "aks":
        return NodeProfile("aks", AKS_SERVICES, AKS_ENDPOINTS, aks=True,
                           conntrack_entries=AKS_CONNTRACK)
    m = re.fullmatch(r"kube-proxy:(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"{text!r}: expected bare, kube-proxy:SxE (e.g. kube-proxy:1000x3) "
                         "or aks")
    services, endpoints = int(m.group(1)), int(m.group(2))
    if not 1 <= services <= MAX_SERVICES:
        raise ValueError(f"{text!r}: services must be 1 to {MAX_SERVICES} (ClusterIPs of "
                         f"{SERVICE_NET})")
    if not 1 <= endpoints <= MAX_ENDPOINTS_PER_SERVICE:
        raise ValueError(f"{text!r}: endpoints per service must be 1 to "
                         f"{MAX_ENDPOINTS_PER_SERVICE}")
    if services * endpoints > ipaddress.IPv4Network(FAKE_POD_NET).num_addresses - 2:
        raise ValueError(f"{text!r}: more endpoints than addresses in {FAKE_POD_NET}")
    return NodeProfile(text, services, endpoints)


# -- the rules ---------------------------------------------------------------------------------

class Tables:
    """iptables-restore input being built: per table, the chains to create and the rules."""

    def __init__(self):
        self.chains: dict[str, list[str]] = {}
        self.rules: dict[str, list[str]] = {}

    def chain(self, table: str, name: str) -> None:
        self.chains.setdefault(table, []).append(name)
        self.rules.setdefault(table, [])

    def append(self, table: str, chain: str, *args: str) -> None:
        self.rules.setdefault(table, []).append(" ".join(("-A", chain) + args))

    def prepend(self, table: str, chain: str, *jumps: tuple[str, ...]) -> None:
        """Rules that end up first in ``chain``, in the order given (kube-proxy's Prepend)."""
        for args in reversed(jumps):
            self.rules.setdefault(table, []).append(" ".join(("-I", chain, "1") + args))

    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.rules.values())

    def text(self) -> str:
        """One transaction per table, for ``iptables-restore --noflush``: new chains are
        declared (and so created empty), built-in chains keep their rules."""
        out = []
        for table in self.rules:
            out.append(f"*{table}")
            out += [f":{name} - [0:0]" for name in self.chains.get(table, [])]
            out += self.rules[table]
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _comment(text: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", f'"{text}"' if " " in text else text)


def kube_proxy(tables: Tables, services: int, endpoints: int) -> None:
    """The rules kube-proxy's iptables mode writes for ``services`` ClusterIP services (one
    TCP port each) with ``endpoints`` endpoints each."""
    svc_net = ipaddress.IPv4Network(SERVICE_NET)
    pod_net = ipaddress.IPv4Network(FAKE_POD_NET)
    large = services * endpoints > LARGE_CLUSTER_ENDPOINTS

    def maybe_comment(text: str) -> tuple[str, ...]:
        return () if large else _comment(text)

    for table, names in (("filter", ("KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                                     "KUBE-PROXY-CANARY", "KUBE-PROXY-FIREWALL",
                                     "KUBE-SERVICES")),
                         ("nat", ("KUBE-MARK-MASQ", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
                                  "KUBE-PROXY-CANARY", "KUBE-SERVICES")),
                         ("mangle", ("KUBE-IPTABLES-HINT", "KUBE-PROXY-CANARY"))):
        for name in names:
            tables.chain(table, name)
    new = ("-m", "conntrack", "--ctstate", "NEW")
    firewall = (*new, *_comment("kubernetes load balancer firewall"), "-j", "KUBE-PROXY-FIREWALL")
    portals = (*new, *_comment("kubernetes service portals"), "-j", "KUBE-SERVICES")
    external = (*new, *_comment("kubernetes externally-visible service portals"),
                "-j", "KUBE-EXTERNAL-SERVICES")
    tables.prepend("filter", "INPUT", firewall,
                   (*_comment("kubernetes health check service ports"), "-j", "KUBE-NODEPORTS"),
                   external)
    tables.prepend("filter", "FORWARD", firewall,
                   (*_comment("kubernetes forwarding rules"), "-j", "KUBE-FORWARD"),
                   portals, external)
    tables.prepend("filter", "OUTPUT", firewall, portals)
    tables.append("filter", "KUBE-FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    tables.append("filter", "KUBE-FORWARD", *_comment("kubernetes forwarding rules"),
                  "-m", "mark", "--mark", f"{MASQ_MARK}/{MASQ_MARK}", "-j", "ACCEPT")
    tables.append("filter", "KUBE-FORWARD", *_comment("kubernetes forwarding conntrack rule"),
                  "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")

    service_portals = (*_comment("kubernetes service portals"), "-j", "KUBE-SERVICES")
    tables.prepend("nat", "PREROUTING", service_portals)
    tables.prepend("nat", "OUTPUT", service_portals)
    tables.prepend("nat", "POSTROUTING", (*_comment("kubernetes postrouting rules"),
                                          "-j", "KUBE-POSTROUTING"))
    tables.append("nat", "KUBE-POSTROUTING", "-m", "mark", "!", "--mark",
                  f"{MASQ_MARK}/{MASQ_MARK}", "-j", "RETURN")
    tables.append("nat", "KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", MASQ_MARK)
    tables.append("nat", "KUBE-POSTROUTING",
                  *_comment("kubernetes service traffic requiring SNAT"),
                  "-j", "MASQUERADE", "--random-fully")
    tables.append("nat", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", MASQ_MARK)

    for i in range(services):
        name = f"bench-{i // 100}/svc-{i}:http"
        cluster_ip, port, target_port = svc_net.network_address + 1 + i, 80, 8080
        svc = "KUBE-SVC-" + _hash(name + "tcp")
        tables.chain("nat", svc)
        tables.append("nat", "KUBE-SERVICES", *_comment(f"{name} cluster IP"), "-m", "tcp",
                      "-p", "tcp", "-d", f"{cluster_ip}/32", "--dport", str(port), "-j", svc)
        if i % NODEPORT_EVERY == 0:
            ext = "KUBE-EXT-" + _hash(name + "tcp")
            tables.chain("nat", ext)
            tables.append("nat", "KUBE-NODEPORTS", *_comment(name), "-m", "tcp", "-p", "tcp",
                          "--dport", str(NODEPORT_BASE + i // NODEPORT_EVERY), "-j", ext)
            tables.append("nat", ext,
                          *_comment(f"masquerade traffic for {name} external destinations"),
                          "-j", "KUBE-MARK-MASQ")
            tables.append("nat", ext, "-j", svc)
        tables.append("nat", svc, *_comment(f"{name} cluster IP"), "-m", "tcp", "-p", "tcp",
                      "-d", f"{cluster_ip}/32", "--dport", str(port), "!", "-s", FAKE_POD_NET,
                      "-j", "KUBE-MARK-MASQ")
        for e in range(endpoints):
            ip = pod_net.network_address + 1 + i * endpoints + e
            endpoint = f"{ip}:{target_port}"
            sep = "KUBE-SEP-" + _hash(name + "tcp" + endpoint)
            tables.chain("nat", sep)
            left = endpoints - e
            pick = (("-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.10f}")
                    if left > 1 else ())
            tables.append("nat", svc, *maybe_comment(f"{name} -> {endpoint}"), *pick, "-j", sep)
            tables.append("nat", sep, *maybe_comment(name), "-s", f"{ip}/32",
                          "-j", "KUBE-MARK-MASQ")
            tables.append("nat", sep, *maybe_comment(name), "-m", "tcp", "-p", "tcp",
                          "-j", "DNAT", "--to-destination", endpoint)
    tables.append("nat", "KUBE-SERVICES",
                  *_comment("kubernetes service nodeports; NOTE: this must be the last rule in "
                            "this chain"), "-m", "addrtype", "--dst-type", "LOCAL",
                  "-j", "KUBE-NODEPORTS")


def aks_extras(tables: Tables, non_masquerade: list[str]) -> None:
    """ip-masq-agent's chain (link-local, then each non-masquerade CIDR, returned; the rest
    masqueraded) and the DROP rules that keep pods off the wireserver, both appended."""
    tables.chain("nat", "IP-MASQ-AGENT")
    tables.append("nat", "POSTROUTING",
                  *_comment("ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL "
                            "destination traffic to our custom IP-MASQ-AGENT chain"),
                  "-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", "IP-MASQ-AGENT")
    for cidr in ["169.254.0.0/16", *non_masquerade]:
        tables.append("nat", "IP-MASQ-AGENT", "-d", cidr,
                      *_comment("ip-masq-agent: local traffic is not subject to MASQUERADE"),
                      "-j", "RETURN")
    tables.append("nat", "IP-MASQ-AGENT",
                  *_comment("ip-masq-agent: outbound traffic is subject to MASQUERADE (must be "
                            "last in chain)"), "-j", "MASQUERADE")
    for port in (32526, 80):
        tables.append("filter", "FORWARD", "-d", f"{WIRESERVER}/32", "-p", "tcp", "-m", "tcp",
                      "--dport", str(port), "-j", "DROP")


def aks_non_masquerade(topo: Topology | None) -> list[str]:
    """AKS's default non-masquerade CIDRs (the pod CIDR, the VNet, the service CIDR) and the
    lab's own cluster CIDRs, so the lab's pod-to-pod traffic keeps its addresses."""
    lab = list(topo.non_masquerade_cidrs) if topo else []
    return [FAKE_POD_NET, AKS_VNET, SERVICE_NET, *lab]


def ruleset(profile: NodeProfile, topo: Topology | None = None) -> Tables:
    tables = Tables()
    if profile.services:
        kube_proxy(tables, profile.services, profile.endpoints)
    if profile.aks:
        aks_extras(tables, aks_non_masquerade(topo))
    return tables


# -- the conntrack fill ------------------------------------------------------------------------

def conntrack_fill(count: int) -> str:
    """``conntrack -R`` input: ``count`` established TCP flows from fake pods to fake VNet
    hosts, each a distinct tuple, marked FILL_MARK, expiring in FILL_TIMEOUT_S."""
    pods = ipaddress.IPv4Network(FAKE_POD_NET)
    vnet = ipaddress.IPv4Network(AKS_VNET)
    lines = []
    for i in range(count):
        src = pods.network_address + 1 + i % (pods.num_addresses - 2)
        dst = vnet.network_address + 1 + (i * 7919) % 65534
        sport = 32768 + i % 28232
        lines.append(f"-I -s {src} -d {dst} -p tcp --sport {sport} --dport 443 "
                     f"--state ESTABLISHED -u ASSURED -t {FILL_TIMEOUT_S} -m {FILL_MARK}")
    return "\n".join(lines) + "\n"


def conntrack_count(ns: str) -> int:
    return int(netns.run(ns, ["conntrack", "-C"], changes=False).stdout.strip() or 0)


def delete_bench_flows(ns: str, family: int = 4) -> None:
    """Every conntrack entry of the namespace but the fill (mark 0: the bench's own flows) of
    IP version ``family``; the kernel filters by mark, so this costs no walk of the fill in
    user space."""
    netns.run(ns, conntrack_delete_argv(family), check=False)


def conntrack_delete_argv(family: int = 4) -> list[str]:
    """The conntrack command that deletes the bench's flows of one family (conntrack's -f:
    it deletes IPv4 entries only when not told)."""
    return ["conntrack", "-D", "-f", f"ipv{family}", "--mark", "0"]


# -- applying a profile ------------------------------------------------------------------------

def apply_rules(profile: NodeProfile, topo: Topology) -> dict:
    """The profile's rules in every node namespace of a lab, one transaction per node."""
    tables = ruleset(profile, topo)
    started = time.monotonic()
    if tables.rules:
        text = tables.text()
        for node in topo.nodes:
            netns.run(node.netns, [legacy.iptables_binary() + "-restore", "--noflush", "-w"],
                      input=text, timeout=300)
    return {"rules_per_node": tables.rule_count(),
            "rules_seconds": round(time.monotonic() - started, 2)}


def fill_conntrack(profile: NodeProfile, topo: Topology) -> dict:
    """The profile's conntrack entries in every node namespace of a lab."""
    started = time.monotonic()
    if profile.conntrack_entries:
        fill = conntrack_fill(profile.conntrack_entries)
        for node in topo.nodes:
            netns.run(node.netns, ["conntrack", "-R", "-"], input=fill, timeout=300)
            found = conntrack_count(node.netns)
            if found < profile.conntrack_entries:
                raise RuntimeError(f"{node.netns}: conntrack holds {found} entries after "
                                   f"filling {profile.conntrack_entries} (nf_conntrack_max?)")
    return {"conntrack_per_node": profile.conntrack_entries,
            "conntrack_seconds": round(time.monotonic() - started, 2)}


def configure(mode: str, profile: NodeProfile, applied: dict | None = None):
    """``lab_up``'s configure step for a bench lab: legacy routing, the profile's rules, then
    (mode "ebpf") eBPF host routing enabled over them with --force, as an operator who
    accepts that they no longer apply to pod traffic does; the conntrack fill last (enable
    would read it all for flows to hand over). What was done goes into ``applied``."""
    from datapath import switch

    def step(state, topo: Topology) -> None:
        switch.configure_mode("legacy")(state, topo)
        record = {"profile": profile.name, **apply_rules(profile, topo)}
        if mode == "ebpf":
            started = time.monotonic()
            switch.enable_ebpf(state, topo, force=not profile.bare)
            record.update(ebpf_forced=not profile.bare,
                          enable_seconds=round(time.monotonic() - started, 2))
        record.update(fill_conntrack(profile, topo))
        if applied is not None:
            applied.update(record)
    return step
