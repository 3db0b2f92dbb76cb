"""The declarative lab description: nodes, pods, underlay, external host.

A topology comes from a TOML file, from command-line defaults, or both (the
command line fills what the file leaves out). ``Topology.build`` validates
everything before anything is created, and a ``TopologyError`` names the field
and, for a file, the line.

IPv6 (``ip_family`` "dual" or "ipv6") comes from the documentation prefix
2001:db8::/32 unless the file says otherwise (see netns_lab/__init__.py for
the drawing). Its networks are at most /120 and none is, or overlaps, the
unspecified, loopback, IPv4-mapped, link-local or multicast range; an
IPv4-only lab refuses every ``*6`` key.

File format::

    [lab]
    ip_family = "ipv4"                # "ipv4", "dual" (every pod, node, the fabric and the
                                      #   external host have both families) or "ipv6" (pods
                                      #   IPv6 only; nodes, fabric and external keep both)
    underlay_cidr = "198.19.0.0/24"   # node IPs are .1, .2, ...; the router .254
    underlay_cidr6 = "2001:db8:1::/64"  # dual/ipv6: node N is ::N (hex), the router ::fe
    underlay_mtu = 1500
    external_mtu = 1500               # the router <-> external link
    pods_reach_nodes = false          # eBPF mode: may pods reach other nodes' host namespaces?
    node_local_port_range = [61000, 65535]  # the nodes' ephemeral ports (their sysctl
                                      #   net.ipv4.ip_local_port_range), disjoint from [nat]'s

    [external]
    cidr = "203.0.113.0/24"           # router .1, external host .10
    ip = "203.0.113.10"
    cidr6 = "2001:db8:2::/64"         # dual/ipv6: router ::1, external host ip6 (default ::a);
    ip6 = "2001:db8:2::a"             #   it routes nothing to pods: they reach it NATed only

    [[nodes]]
    name = "node1"
    pod_cidr = "198.18.1.0/24"        # gateway .1, pods from .10
    pod_cidr6 = "2001:db8:0:1::/64"   # dual/ipv6 (default 2001:db8:0:N::/64, N in hex): gateway
                                      #   ::1, pods from ::a; prefix at most /120
    pods = 2                          # a count, or a list of pod names (at most 64)

    [nat]                             # BPF SNAT of traffic leaving the cluster (eBPF mode)
    max_flows = 262144                # per node (two entries each; a full table refuses new flows)
    port_min = 1024                   # NAT ports, per destination (5-tuple unique); must not
    port_max = 60999                  #   overlap node_local_port_range: a node's own connection
                                      #   would take a pod's NAT port towards the same remote
    exclude = []                      # more destinations never masqueraded (as
                                      #   ip-masq-agent's nonMasqueradeCIDRs), IPv4 or IPv6
    timeout_tcp_syn = 60              # seconds idle before an entry expires
    timeout_tcp_established = 7500    # > Linux's keepalive time (7200 s)
    timeout_tcp_closing = 10          # after RST, or FIN both ways
    timeout_udp = 60
    timeout_icmp = 30
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

IFNAMSIZ = 15  # usable characters in a Linux interface name
MAX_NAME = 63  # node and pod names (a DNS label's length)
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
RESERVED_NAMES = {"fabric", "ext", "uplink", "br0"}
DEFAULT_UNDERLAY = "198.19.0.0/24"
DEFAULT_EXTERNAL_CIDR = "203.0.113.0/24"
DEFAULT_EXTERNAL_IP = "203.0.113.10"
IP_FAMILIES = ("ipv4", "dual", "ipv6")
# IPv6 (dual and ipv6 labs), from the documentation prefix 2001:db8::/32
DEFAULT_UNDERLAY6 = "2001:db8:1::/64"
DEFAULT_EXTERNAL_CIDR6 = "2001:db8:2::/64"
ROUTER_HOST6 = 0xfe             # the fabric's address on the IPv6 underlay: ::fe
MAX_PREFIX6 = 120               # room for the router (::fe) and 64 pods from ::a
FIRST_POD_HOST = 10
MAX_NODES = 64
MAX_PODS_PER_NODE = 64
# The nodes' ephemeral ports (net.ipv4.ip_local_port_range, set in every node namespace):
# above Linux's default range (32768-60999), so that BPF SNAT keeps 1024-60999, the rest.
DEFAULT_NODE_LOCAL_PORTS = (61000, 65535)
MIN_LOCAL_PORT = 1024


class TopologyError(ValueError):
    """A topology that cannot be built; the message names the field (and line)."""


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str           # in an "ipv6" lab, planned but not configured (the pod has no IPv4)
    netns: str
    host_ifname: str  # the host-side veth, in the node's namespace: <lab>-<node #>-<pod #>
    ip6: str | None = None      # None in an IPv4-only lab, as every *6 name below


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    ip: str  # on the underlay
    pod_cidr: str
    gateway: str  # the pods' default gateway, on every host-side veth
    netns: str
    pods: tuple[Pod, ...]
    fabric_ifname: str = ""  # its uplink's peer, a bridge port in the fabric: <lab>-<node #>
    ip6: str | None = None          # on the IPv6 underlay
    pod_cidr6: str | None = None
    gateway6: str | None = None     # /128 on every host-side veth, as gateway


@dataclass(frozen=True)
class External:
    netns: str
    ip: str
    cidr: str
    router_ip: str  # the fabric's address on the external link
    ip6: str | None = None
    cidr6: str | None = None
    router_ip6: str | None = None


@dataclass(frozen=True)
class NatSettings:
    """The [nat] table: BPF SNAT sizing, port range, exclusions and idle timeouts."""
    max_flows: int = 262144
    port_min: int = 1024
    port_max: int = 60999
    exclude: tuple[str, ...] = ()
    timeout_tcp_syn: int = 60
    timeout_tcp_established: int = 7500
    timeout_tcp_closing: int = 10
    timeout_udp: int = 60
    timeout_icmp: int = 30

    def datapath_config(self) -> dict[str, int]:
        """The NAT fields of struct hr_config (see datapath/shared_types.py)."""
        return {"nat_port_min": self.port_min, "nat_port_max": self.port_max,
                **{f"nat_{k}": getattr(self, k) for k in _NAT_TIMEOUTS}}

    def to_dict(self) -> dict:
        return {"max_flows": self.max_flows, "port_min": self.port_min,
                "port_max": self.port_max, "exclude": list(self.exclude),
                **{k: getattr(self, k) for k in _NAT_TIMEOUTS}}


_NAT_TIMEOUTS = ("timeout_tcp_syn", "timeout_tcp_established", "timeout_tcp_closing",
                 "timeout_udp", "timeout_icmp")
MAX_NAT_FLOWS = 4 * 1024 * 1024
MAX_NAT_TIMEOUT = 7 * 24 * 3600


@dataclass(frozen=True)
class Topology:
    lab: str
    nodes: tuple[Node, ...]
    external: External
    underlay_cidr: str
    router_ip: str  # the fabric's address on the underlay
    underlay_mtu: int = 1500
    external_mtu: int = 1500
    fabric_netns: str = ""
    uplink_ifname: str = ""
    nat: NatSettings = field(default_factory=NatSettings)
    pods_reach_nodes: bool = False
    node_local_port_range: tuple[int, int] = DEFAULT_NODE_LOCAL_PORTS
    ip_family: str = "ipv4"         # ipv4 | dual | ipv6
    underlay_cidr6: str | None = None
    router_ip6: str | None = None   # the fabric's address on the IPv6 underlay

    @property
    def has_ipv4(self) -> bool:
        """Pods have IPv4 (nodes, fabric and external always do)."""
        return self.ip_family != "ipv6"

    @property
    def has_ipv6(self) -> bool:
        """Every part of the lab has IPv6 too (pods only IPv6 in an "ipv6" lab)."""
        return self.ip_family != "ipv4"

    @property
    def cluster_cidrs(self) -> list[str]:
        """Destinations that are inside the cluster."""
        return [n.pod_cidr for n in self.nodes] + [self.underlay_cidr]

    @property
    def cluster_cidrs6(self) -> list[str]:
        """IPv6 destinations inside the cluster ([] in an IPv4-only lab)."""
        if not self.has_ipv6:
            return []
        return [n.pod_cidr6 for n in self.nodes] + [self.underlay_cidr6]

    @property
    def non_masquerade_cidrs(self) -> list[str]:
        """IPv4 destinations never masqueraded: the cluster, and [nat] exclude's IPv4."""
        return self.cluster_cidrs + [c for c in self.nat.exclude if ":" not in c]

    @property
    def non_masquerade_cidrs6(self) -> list[str]:
        """IPv6 destinations never masqueraded: the cluster, and [nat] exclude's IPv6 ([] in
        an IPv4-only lab)."""
        if not self.has_ipv6:
            return []
        return self.cluster_cidrs6 + [c for c in self.nat.exclude if ":" in c]

    @property
    def namespaces(self) -> list[str]:
        names = [self.fabric_netns, self.external.netns]
        for node in self.nodes:
            names.append(node.netns)
            names.extend(p.netns for p in node.pods)
        return names

    def find_pod(self, name: str) -> tuple[Node, Pod]:
        for node in self.nodes:
            for pod in node.pods:
                if pod.name == name:
                    return node, pod
        raise KeyError(name)

    def netns_of(self, name: str) -> str:
        """The namespace of a pod, a node, 'external' or 'fabric', by name."""
        if name in ("external", "ext"):
            return self.external.netns
        if name == "fabric":
            return self.fabric_netns
        for node in self.nodes:
            if node.name == name:
                return node.netns
        try:
            return self.find_pod(name)[1].netns
        except KeyError:
            known = [n.name for n in self.nodes] + [p.name for n in self.nodes for p in n.pods]
            raise KeyError(f"no pod or node named {name!r} in lab {self.lab!r} "
                           f"(known: {', '.join(known)}, external, fabric)") from None

    def to_dict(self) -> dict:
        """The topology as its record keeps it; an IPv4-only lab's has no IPv6 key (as
        before IPv6 existed, so that older records and their readers still agree)."""
        data = {
            "lab": self.lab,
            "underlay_cidr": self.underlay_cidr,
            "router_ip": self.router_ip,
            "underlay_mtu": self.underlay_mtu,
            "external_mtu": self.external_mtu,
            "pods_reach_nodes": self.pods_reach_nodes,
            "node_local_port_range": list(self.node_local_port_range),
            "external": {"cidr": self.external.cidr, "ip": self.external.ip},
            "nodes": [{"name": n.name, "pod_cidr": n.pod_cidr,
                       "pods": [p.name for p in n.pods]} for n in self.nodes],
            "nat": self.nat.to_dict(),
        }
        if self.has_ipv6:
            data.update(ip_family=self.ip_family, underlay_cidr6=self.underlay_cidr6,
                        router_ip6=self.router_ip6)
            data["external"].update(cidr6=self.external.cidr6, ip6=self.external.ip6)
            for raw, node in zip(data["nodes"], self.nodes):
                raw["pod_cidr6"] = node.pod_cidr6
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        return build_topology(data["lab"], data, _Locator(None))


class _Locator:
    """Finds the line of a key in a TOML file, to name it in errors."""

    def __init__(self, text: str | None, path: str | None = None):
        self.path = path
        self.lines: dict[tuple[str, int, str], int] = {}
        self.tables: dict[tuple[str, int], int] = {}
        if text is None:
            return
        table, counts = "", {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if m := re.match(r"^\[\[\s*([\w.-]+)\s*\]\]$", line):
                table = m.group(1)
                counts[table] = counts.get(table, -1) + 1
                self.tables[(table, counts[table])] = lineno
            elif m := re.match(r"^\[\s*([\w.-]+)\s*\]$", line):
                table = m.group(1)
                counts[table] = 0
                self.tables[(table, 0)] = lineno
            elif m := re.match(r"^([\w-]+)\s*=", line):
                self.lines[(table, counts.get(table, 0), m.group(1))] = lineno

    def has(self, table: str, index: int, key: str) -> bool:
        """Whether the file sets this key (a default's has no line)."""
        return (table, index, key) in self.lines

    def where(self, table: str, index: int, key: str | None) -> str:
        label = table if table else "(top level)"
        if table == "nodes":
            label = f"nodes[{index}]"
        label = f"{label}.{key}" if key else label
        if self.path is None:
            return label
        lineno = self.lines.get((table, index, key)) if key else None
        if not lineno and key and not table:      # a top-level key that is a [table]
            lineno = self.tables.get((key, 0))
        lineno = lineno or self.tables.get((table, index)) or self.lines.get(("", 0, table))
        return f"{self.path}:{lineno}: {label}" if lineno else f"{self.path}: {label}"


# Ranges no lab address may come from: packets to or from them are never routed (loopback,
# "this network", link-local), or they are not unicast (multicast, 240/4 and broadcast).
RESERVED_RANGES = [(ipaddress.IPv4Network(net), what) for net, what in (
    ("0.0.0.0/8", "'this network'"), ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (240/4 and broadcast)"))]
RESERVED_RANGES6 = [(ipaddress.IPv6Network(net), what) for net, what in (
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("::ffff:0:0/96", "IPv4-mapped"),
    ("fe80::/10", "link-local"), ("ff00::/8", "multicast"))]


def _unreserved(net: ipaddress.IPv4Network | ipaddress.IPv6Network, value, where: str):
    for reserved, what in RESERVED_RANGES if net.version == 4 else RESERVED_RANGES6:
        if net.overlaps(reserved):
            verb = "is in" if net.subnet_of(reserved) else "overlaps"
            raise TopologyError(f"{where}: {value} {verb} the {what} range {reserved}, "
                                "which a lab cannot use")
    return net


_NETWORK = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}
_ADDRESS = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}
_MAX_PREFIX = {4: 29, 6: MAX_PREFIX6}


def _net(value, where: str, version: int = 4):
    try:
        net = _NETWORK[version](str(value), strict=True)
    except ValueError as e:
        raise TopologyError(f"{where}: {value!r} is not an IPv{version} network ({e})") from None
    _unreserved(net, value, where)
    if net.prefixlen > _MAX_PREFIX[version]:
        raise TopologyError(f"{where}: {value} is too small (at most /{_MAX_PREFIX[version]})")
    return net


def _addr(value, where: str, version: int = 4):
    try:
        addr = _ADDRESS[version](str(value))
    except ValueError:
        raise TopologyError(f"{where}: {value!r} is not an IPv{version} address") from None
    _unreserved(_NETWORK[version](addr), value, where)
    return addr


def _int(value, where: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise TopologyError(f"{where}: {value!r} must be an integer from {lo} to {hi}")
    return value


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > MAX_NAME:
        raise TopologyError(f"{where}: {value!r} must be 1 to {MAX_NAME} lowercase letters, "
                            "digits and '-', starting with a letter")
    if value in RESERVED_NAMES:
        raise TopologyError(f"{where}: {value!r} is reserved for the lab itself")
    return value


def _claim(names: dict[str, str], name: str, what: str, where: str) -> None:
    """Node and pod names share one namespace: each becomes a netns name."""
    if name in names:
        raise TopologyError(f"{where}: duplicate name {name!r} (already a {names[name]})")
    names[name] = what


def host_ifname(lab: str, node_index: int, pod_index: int) -> str:
    """A pod's host-side veth: <lab>-<node #>-<pod #>, at most 8+1+2+1+2 = 14 characters for
    every valid lab (64 nodes x 64 pods), whatever the node and pod names; the readable name
    (the pod's namespace) is the interface's alias."""
    return _fits(f"{lab}-{node_index}-{pod_index}")


def fabric_ifname(lab: str, node_index: int) -> str:
    """A node's bridge port in the fabric namespace (its uplink's peer): <lab>-<node #>."""
    return _fits(f"{lab}-{node_index}")


def _fits(ifname: str) -> str:
    if len(ifname) > IFNAMSIZ:  # cannot happen within LAB_NAME_RE, MAX_NODES, MAX_PODS_PER_NODE
        raise TopologyError(f"interface name {ifname!r} is longer than {IFNAMSIZ} characters")
    return ifname


def default_nodes(count: int, pods_per_node: int) -> list[dict]:
    return [{"name": f"node{i}", "pod_cidr": f"198.18.{i}.0/24", "pods": pods_per_node}
            for i in range(1, count + 1)]


def build_topology(lab: str, data: dict, loc: _Locator) -> Topology:
    """Validate a topology description and derive every name and address."""
    if not isinstance(lab, str) or not LAB_NAME_RE.match(lab):
        raise TopologyError(f"lab name {lab!r}: 1 to 8 lowercase letters and digits, "
                            "starting with a letter")
    known_top = {"lab", "external", "nodes", "underlay_cidr", "router_ip", "underlay_mtu",
                 "external_mtu", "nat", "pods_reach_nodes", "node_local_port_range",
                 "ip_family", "underlay_cidr6", "router_ip6"}
    for key in data:
        if key not in known_top:
            raise TopologyError(f"{loc.where('', 0, key)}: unknown key {key!r}")
    labsec = data.get("lab", {}) if isinstance(data.get("lab", {}), dict) else {}
    for key in labsec:
        if key not in ("underlay_cidr", "underlay_mtu", "external_mtu", "pods_reach_nodes",
                       "node_local_port_range", "ip_family", "underlay_cidr6"):
            raise TopologyError(f"{loc.where('lab', 0, key)}: unknown key {key!r}")

    def lab_value(key, default):
        if key in labsec:
            return labsec[key], loc.where("lab", 0, key)
        return data.get(key, default), loc.where("", 0, key)

    value, where = lab_value("underlay_cidr", DEFAULT_UNDERLAY)
    underlay = _net(value, where)
    underlay_at = ("lab" if "underlay_cidr" in labsec else "", 0, "underlay_cidr")
    value, where = lab_value("underlay_mtu", 1500)
    underlay_mtu = _int(value, where, 576, 9000)
    value, where = lab_value("external_mtu", 1500)
    external_mtu = _int(value, where, 576, 9000)
    value, where = lab_value("pods_reach_nodes", False)
    if not isinstance(value, bool):
        raise TopologyError(f"{where}: {value!r} must be true or false")
    pods_reach_nodes = value
    value, where = lab_value("node_local_port_range", list(DEFAULT_NODE_LOCAL_PORTS))
    node_ports, node_ports_where = _port_range(value, where), where
    value, where = lab_value("ip_family", "ipv4")
    if value not in IP_FAMILIES:
        raise TopologyError(f'{where}: {value!r} must be "ipv4", "dual" or "ipv6"')
    family = value
    v6 = _V6(loc, family != "ipv4")
    value, where = lab_value("underlay_cidr6", DEFAULT_UNDERLAY6)
    underlay6 = v6.net("underlay_cidr6", value, where, "underlay_cidr6" in labsec or
                       "underlay_cidr6" in data)

    ext = data.get("external", {})
    if not isinstance(ext, dict):
        raise TopologyError(f"{loc.where('external', 0, None)}: must be a table")
    for key in ext:
        if key not in ("cidr", "ip", "cidr6", "ip6"):
            raise TopologyError(f"{loc.where('external', 0, key)}: unknown key {key!r}")
    ext_net = _net(ext.get("cidr", DEFAULT_EXTERNAL_CIDR), loc.where("external", 0, "cidr"))
    ext_ip = _addr(ext.get("ip", DEFAULT_EXTERNAL_IP), loc.where("external", 0, "ip"))
    if ext_ip not in ext_net or ext_ip in (ext_net.network_address, ext_net.broadcast_address,
                                           ext_net.network_address + 1):
        raise TopologyError(f"{loc.where('external', 0, 'ip')}: {ext_ip} must be a host "
                            f"address of {ext_net} other than its first (the router's)")
    ext_net6 = v6.net("external.cidr6", ext.get("cidr6", DEFAULT_EXTERNAL_CIDR6),
                      loc.where("external", 0, "cidr6"), "cidr6" in ext)
    ext_ip6 = v6.host(ext_net6, ext.get("ip6"), loc.where("external", 0, "ip6"), "ip6" in ext)

    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise TopologyError(f"{loc.where('nodes', 0, None)}: at least one [[nodes]] table is needed")
    if len(raw_nodes) > MAX_NODES:
        raise TopologyError(f"nodes: {len(raw_nodes)} nodes, at most {MAX_NODES}")
    if len(raw_nodes) > underlay.num_addresses - 3:
        raise TopologyError(f"{loc.where(*underlay_at)}: {underlay} has no room "
                            f"for {len(raw_nodes)} nodes and the router")

    names: dict[str, str] = {}
    nodes_in_file = ("nodes", 0) in loc.tables or loc.has("", 0, "nodes")
    # every range a pod CIDR must avoid (_claim_range)
    cidrs = [(underlay, "underlay_cidr", loc.where(*underlay_at), loc.has(*underlay_at)),
             (ext_net, "external.cidr", loc.where("external", 0, "cidr"),
              loc.has("external", 0, "cidr"))]
    nodes = []
    for i, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise TopologyError(f"{loc.where('nodes', i, None)}: must be a table")
        for key in raw:
            if key not in ("name", "pod_cidr", "pods", "pod_cidr6"):
                raise TopologyError(f"{loc.where('nodes', i, key)}: unknown key {key!r}")
        for key in ("name", "pod_cidr"):
            if key not in raw:
                raise TopologyError(f"{loc.where('nodes', i, None)}: missing {key!r}")
        node_name = _name(raw["name"], loc.where("nodes", i, "name"))
        pod_net = _net(raw["pod_cidr"], loc.where("nodes", i, "pod_cidr"))
        pods_raw = raw.get("pods", 2)
        where = loc.where("nodes", i, "pods")
        if isinstance(pods_raw, list):
            if len(pods_raw) > MAX_PODS_PER_NODE:
                raise TopologyError(f"{where}: {len(pods_raw)} pods, at most {MAX_PODS_PER_NODE}")
            pod_names = [_name(p, where) for p in pods_raw]
        else:
            count = _int(pods_raw, where, 0, MAX_PODS_PER_NODE)
            pod_names = [f"{node_name}-pod{j}" for j in range(1, count + 1)]
        if len(pod_names) > pod_net.num_addresses - FIRST_POD_HOST - 1:
            raise TopologyError(f"{where}: {len(pod_names)} pods do not fit in {pod_net} "
                                f"(pods start at host .{FIRST_POD_HOST})")
        _claim_range(cidrs, pod_net, f"nodes[{i}].pod_cidr", loc.where("nodes", i, "pod_cidr"),
                     nodes_in_file)
        pod_net6 = v6.net(f"nodes[{i}].pod_cidr6", raw.get("pod_cidr6", default_pod_cidr6(i + 1)),
                          loc.where("nodes", i, "pod_cidr6"), "pod_cidr6" in raw)
        _claim(names, node_name, "node", loc.where("nodes", i, "name"))
        node_ns = f"{lab}-{node_name}"
        pods = []
        for j, pod_name in enumerate(pod_names):
            _claim(names, pod_name, "pod", where)
            pods.append(Pod(pod_name, str(pod_net.network_address + FIRST_POD_HOST + j),
                            f"{lab}-{pod_name}", host_ifname(lab, i + 1, j + 1),
                            _host(pod_net6, FIRST_POD_HOST + j)))
        nodes.append(Node(node_name, i + 1, str(underlay.network_address + i + 1), str(pod_net),
                          str(pod_net.network_address + 1), node_ns, tuple(pods),
                          fabric_ifname(lab, i + 1), ip6=_host(underlay6, i + 1),
                          pod_cidr6=_str(pod_net6), gateway6=_host(pod_net6, 1)))

    nat = _nat_settings(data.get("nat", {}), loc)
    if nat.port_min <= node_ports[1] and node_ports[0] <= nat.port_max:
        raw_nat = data.get("nat", {})
        # name what the file set: the NAT range if it is there, else the nodes' range
        key = next((k for k in ("port_max", "port_min") if k in raw_nat), None)
        where = loc.where("nat", 0, key) if key else node_ports_where
        named = "" if where == node_ports_where else " (lab.node_local_port_range)"
        raise TopologyError(f"{where}: NAT ports {nat.port_min}-{nat.port_max} overlap the "
                            f"nodes' local ports {node_ports[0]}-{node_ports[1]}{named}: a "
                            "node's own connection could take a pod's NAT port towards the same "
                            "remote; make the ranges disjoint")

    return Topology(
        lab=lab,
        nodes=tuple(nodes),
        external=External(f"{lab}-ext", str(ext_ip), str(ext_net), str(ext_net.network_address + 1),
                          ip6=_str(ext_ip6), cidr6=_str(ext_net6), router_ip6=_host(ext_net6, 1)),
        underlay_cidr=str(underlay),
        router_ip=str(underlay.broadcast_address - 1),
        underlay_mtu=underlay_mtu,
        external_mtu=external_mtu,
        fabric_netns=f"{lab}-fabric",
        uplink_ifname=_fits(f"{lab}-uplink"),
        nat=nat,
        pods_reach_nodes=pods_reach_nodes,
        node_local_port_range=node_ports,
        ip_family=family,
        underlay_cidr6=_str(underlay6),
        router_ip6=_host(underlay6, ROUTER_HOST6),
    )


def default_pod_cidr6(node_index: int) -> str:
    """Node N's (1-based) IPv6 pods: 2001:db8:0:N::/64, N in hex."""
    return f"2001:db8:0:{node_index:x}::/64"


def _str(value) -> str | None:
    return None if value is None else str(value)


def _host(net: ipaddress.IPv6Network | None, host: int) -> str | None:
    """The net's address number ``host`` (None: no IPv6 in the lab)."""
    return None if net is None else str(net.network_address + host)


def _claim_range(claimed: list, net, name: str, where: str, given: bool) -> None:
    """Refuse ``net`` if it overlaps a range claimed before, else claim it. ``claimed`` holds
    (range, name, where, given); ``given``: the file sets the value (else a default). The error
    names the file's line: the new range's, or the other's when only the other is the file's."""
    for other, other_name, other_where, other_given in claimed:
        if not net.overlaps(other):
            continue
        if other_given and not given:
            raise TopologyError(f"{other_where}: {other} overlaps {name} ({net}, the default)")
        raise TopologyError(f"{where}: {net} overlaps {other_name} ({other})")
    claimed.append((net, name, where, given))


class _V6:
    """The IPv6 values of a topology: validated in a dual or ipv6 lab (None in an IPv4 one,
    where a file may not set them), and their networks checked against each other."""

    def __init__(self, loc: _Locator, enabled: bool):
        self.loc, self.enabled = loc, enabled
        self.nets: list = []        # _claim_range's

    def _refuse(self, where: str) -> None:
        raise TopologyError(f'{where}: IPv6 needs [lab] ip_family = "dual" or "ipv6" '
                            '(this lab is IPv4 only)')

    def net(self, owner: str, value, where: str, given: bool) -> ipaddress.IPv6Network | None:
        if not self.enabled:
            if given:
                self._refuse(where)
            return None
        net = _net(value, where, 6)
        _claim_range(self.nets, net, owner, where, given)
        return net

    def host(self, net: ipaddress.IPv6Network | None, value, where: str, given: bool
             ) -> ipaddress.IPv6Address | None:
        """A host of ``net`` other than its first two (subnet-router anycast, the router);
        by default its address number FIRST_POD_HOST (::a)."""
        if net is None:
            if given:
                self._refuse(where)
            return None
        addr = _addr(net.network_address + FIRST_POD_HOST if value is None else value, where, 6)
        if addr not in net or addr in (net.network_address, net.network_address + 1):
            raise TopologyError(f"{where}: {addr} must be a host address of {net} other than "
                                "its first two (::0 and the router's ::1)")
        return addr


def _port_range(value, where: str) -> tuple[int, int]:
    """[low, high] of a node's ephemeral ports (net.ipv4.ip_local_port_range)."""
    if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value) or \
            not MIN_LOCAL_PORT <= value[0] <= value[1] <= 65535:
        raise TopologyError(f"{where}: {value!r} must be [low, high], two integers with "
                            f"{MIN_LOCAL_PORT} <= low <= high <= 65535")
    return value[0], value[1]


def _nat_settings(raw, loc: _Locator) -> NatSettings:
    if not isinstance(raw, dict):
        raise TopologyError(f"{loc.where('nat', 0, None)}: must be a table")
    defaults = NatSettings()
    known = set(defaults.to_dict())
    for key in raw:
        if key not in known:
            raise TopologyError(f"{loc.where('nat', 0, key)}: unknown key {key!r} "
                                f"(known: {', '.join(sorted(known))})")
    values: dict = {}
    values["max_flows"] = _int(raw.get("max_flows", defaults.max_flows),
                               loc.where("nat", 0, "max_flows"), 1, MAX_NAT_FLOWS)
    values["port_min"] = _int(raw.get("port_min", defaults.port_min),
                              loc.where("nat", 0, "port_min"), 1, 65535)
    values["port_max"] = _int(raw.get("port_max", defaults.port_max),
                              loc.where("nat", 0, "port_max"), 1, 65535)
    if values["port_max"] < values["port_min"]:
        raise TopologyError(f"{loc.where('nat', 0, 'port_max')}: {values['port_max']} is below "
                            f"port_min {values['port_min']}")
    for key in _NAT_TIMEOUTS:
        values[key] = _int(raw.get(key, getattr(defaults, key)), loc.where("nat", 0, key),
                           0, MAX_NAT_TIMEOUT)
    exclude = raw.get("exclude", [])
    where = loc.where("nat", 0, "exclude")
    if not isinstance(exclude, list):
        raise TopologyError(f"{where}: must be a list of IPv4 or IPv6 networks")
    nets = []
    for item in exclude:
        try:
            net = ipaddress.ip_network(str(item), strict=True)
        except ValueError as e:
            raise TopologyError(f"{where}: {item!r} is not an IPv4 or IPv6 network "
                                f"({e})") from None
        nets.append(str(_unreserved(net, item, where)))
    values["exclude"] = tuple(nets)
    return NatSettings(**values)


def load_topology(lab: str, path: str | Path | None = None, nodes: int | None = None,
                  pods_per_node: int | None = None, ip_family: str | None = None) -> Topology:
    """A topology from a file and/or the command line's node and pod counts and IP family."""
    data: dict = {}
    loc = _Locator(None)
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise TopologyError(f"{path}: cannot read ({e.strerror})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TopologyError(f"{path}: not valid TOML: {e}") from None
        loc = _Locator(text, str(path))
        if (nodes is not None or pods_per_node is not None) and "nodes" in data:
            raise TopologyError(f"{path}: defines [[nodes]]; --nodes/--pods-per-node "
                                "cannot be combined with it")
    if "nodes" not in data:
        n = 2 if nodes is None else nodes
        p = 2 if pods_per_node is None else pods_per_node
        if not 1 <= n <= MAX_NODES:
            raise TopologyError(f"--nodes: {n} must be from 1 to {MAX_NODES}")
        if not 0 <= p <= MAX_PODS_PER_NODE:
            raise TopologyError(f"--pods-per-node: {p} must be from 0 to {MAX_PODS_PER_NODE}")
        data["nodes"] = default_nodes(n, p)
    if ip_family is not None:
        labsec = data["lab"] if isinstance(data.get("lab"), dict) else data
        found = labsec.get("ip_family", data.get("ip_family"))
        if found is not None and found != ip_family:
            raise TopologyError(f"{path}: sets ip_family {found!r}; --ip-family {ip_family} "
                                "contradicts it")
        labsec["ip_family"] = ip_family
    return build_topology(lab, data, loc)
