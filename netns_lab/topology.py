"""The declarative lab description: nodes, pods, underlay, external host.

A topology comes from a TOML file, from command-line defaults, or both (the
command line fills what the file leaves out). ``Topology.build`` validates
everything before anything is created, and a ``TopologyError`` names the field
and, for a file, the line.

File format::

    [lab]
    underlay_cidr = "198.19.0.0/24"   # node IPs are .1, .2, ...; the router .254
    underlay_mtu = 1500
    external_mtu = 1500               # the router <-> external link
    pods_reach_nodes = false          # eBPF mode: may pods reach other nodes' host namespaces?
    node_local_port_range = [61000, 65535]  # the nodes' ephemeral ports (their sysctl
                                      #   net.ipv4.ip_local_port_range), disjoint from [nat]'s

    [external]
    cidr = "203.0.113.0/24"           # router .1, external host .10
    ip = "203.0.113.10"

    [[nodes]]
    name = "node1"
    pod_cidr = "198.18.1.0/24"        # gateway .1, pods from .10
    pods = 2                          # a count, or a list of pod names (at most 64)

    [nat]                             # BPF SNAT of traffic leaving the cluster (eBPF mode)
    max_flows = 262144                # per node (two entries each; a full table refuses new flows)
    port_min = 1024                   # NAT ports, per destination (5-tuple unique); must not
    port_max = 60999                  #   overlap node_local_port_range: a node's own connection
                                      #   would take a pod's NAT port towards the same remote
    exclude = []                      # more destinations never masqueraded (as
                                      #   ip-masq-agent's nonMasqueradeCIDRs)
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
    ip: str
    netns: str
    host_ifname: str  # the host-side veth, in the node's namespace: <lab>-<node #>-<pod #>


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


@dataclass(frozen=True)
class External:
    netns: str
    ip: str
    cidr: str
    router_ip: str  # the fabric's address on the external link


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

    @property
    def cluster_cidrs(self) -> list[str]:
        """Destinations that are inside the cluster."""
        return [n.pod_cidr for n in self.nodes] + [self.underlay_cidr]

    @property
    def non_masquerade_cidrs(self) -> list[str]:
        """Destinations never masqueraded: the cluster, and [nat] exclude."""
        return self.cluster_cidrs + list(self.nat.exclude)

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
        return {
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


def _unreserved(net: ipaddress.IPv4Network, value, where: str):
    for reserved, what in RESERVED_RANGES:
        if net.overlaps(reserved):
            verb = "is in" if net.subnet_of(reserved) else "overlaps"
            raise TopologyError(f"{where}: {value} {verb} the {what} range {reserved}, "
                                "which a lab cannot use")
    return net


def _net(value, where: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(str(value), strict=True)
    except ValueError as e:
        raise TopologyError(f"{where}: {value!r} is not an IPv4 network ({e})") from None
    _unreserved(net, value, where)
    if net.prefixlen > 29:
        raise TopologyError(f"{where}: {value} is too small (at most /29)")
    return net


def _addr(value, where: str) -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.IPv4Address(str(value))
    except ValueError:
        raise TopologyError(f"{where}: {value!r} is not an IPv4 address") from None
    _unreserved(ipaddress.IPv4Network(addr), value, where)
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
                 "external_mtu", "nat", "pods_reach_nodes", "node_local_port_range"}
    for key in data:
        if key not in known_top:
            raise TopologyError(f"{loc.where('', 0, key)}: unknown key {key!r}")
    labsec = data.get("lab", {}) if isinstance(data.get("lab", {}), dict) else {}
    for key in labsec:
        if key not in ("underlay_cidr", "underlay_mtu", "external_mtu", "pods_reach_nodes",
                       "node_local_port_range"):
            raise TopologyError(f"{loc.where('lab', 0, key)}: unknown key {key!r}")

    def lab_value(key, default):
        if key in labsec:
            return labsec[key], loc.where("lab", 0, key)
        return data.get(key, default), loc.where("", 0, key)

    value, where = lab_value("underlay_cidr", DEFAULT_UNDERLAY)
    underlay = _net(value, where)
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

    ext = data.get("external", {})
    if not isinstance(ext, dict):
        raise TopologyError(f"{loc.where('external', 0, None)}: must be a table")
    for key in ext:
        if key not in ("cidr", "ip"):
            raise TopologyError(f"{loc.where('external', 0, key)}: unknown key {key!r}")
    ext_net = _net(ext.get("cidr", DEFAULT_EXTERNAL_CIDR), loc.where("external", 0, "cidr"))
    ext_ip = _addr(ext.get("ip", DEFAULT_EXTERNAL_IP), loc.where("external", 0, "ip"))
    if ext_ip not in ext_net or ext_ip in (ext_net.network_address, ext_net.broadcast_address,
                                           ext_net.network_address + 1):
        raise TopologyError(f"{loc.where('external', 0, 'ip')}: {ext_ip} must be a host "
                            f"address of {ext_net} other than its first (the router's)")

    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise TopologyError(f"{loc.where('nodes', 0, None)}: at least one [[nodes]] table is needed")
    if len(raw_nodes) > MAX_NODES:
        raise TopologyError(f"nodes: {len(raw_nodes)} nodes, at most {MAX_NODES}")
    if len(raw_nodes) > underlay.num_addresses - 3:
        raise TopologyError(f"{loc.where('', 0, 'underlay_cidr')}: {underlay} has no room "
                            f"for {len(raw_nodes)} nodes and the router")

    names: dict[str, str] = {}
    cidrs: list[tuple[ipaddress.IPv4Network, str]] = [(underlay, "underlay_cidr"),
                                                      (ext_net, "external.cidr")]
    nodes = []
    for i, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise TopologyError(f"{loc.where('nodes', i, None)}: must be a table")
        for key in raw:
            if key not in ("name", "pod_cidr", "pods"):
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
        for net, owner in cidrs:
            if pod_net.overlaps(net):
                raise TopologyError(f"{loc.where('nodes', i, 'pod_cidr')}: {pod_net} overlaps "
                                    f"{owner} ({net})")
        cidrs.append((pod_net, f"nodes[{i}].pod_cidr"))
        _claim(names, node_name, "node", loc.where("nodes", i, "name"))
        node_ns = f"{lab}-{node_name}"
        pods = []
        for j, pod_name in enumerate(pod_names):
            _claim(names, pod_name, "pod", where)
            pods.append(Pod(pod_name, str(pod_net.network_address + FIRST_POD_HOST + j),
                            f"{lab}-{pod_name}", host_ifname(lab, i + 1, j + 1)))
        nodes.append(Node(node_name, i + 1, str(underlay.network_address + i + 1), str(pod_net),
                          str(pod_net.network_address + 1), node_ns, tuple(pods),
                          fabric_ifname(lab, i + 1)))

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
        external=External(f"{lab}-ext", str(ext_ip), str(ext_net), str(ext_net.network_address + 1)),
        underlay_cidr=str(underlay),
        router_ip=str(underlay.broadcast_address - 1),
        underlay_mtu=underlay_mtu,
        external_mtu=external_mtu,
        fabric_netns=f"{lab}-fabric",
        uplink_ifname=_fits(f"{lab}-uplink"),
        nat=nat,
        pods_reach_nodes=pods_reach_nodes,
        node_local_port_range=node_ports,
    )


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
        raise TopologyError(f"{where}: must be a list of IPv4 networks")
    nets = []
    for item in exclude:
        try:
            net = ipaddress.IPv4Network(str(item), strict=True)
        except ValueError as e:
            raise TopologyError(f"{where}: {item!r} is not an IPv4 network ({e})") from None
        nets.append(str(_unreserved(net, item, where)))
    values["exclude"] = tuple(nets)
    return NatSettings(**values)


def load_topology(lab: str, path: str | Path | None = None, nodes: int | None = None,
                  pods_per_node: int | None = None) -> Topology:
    """A topology from a file and/or the command line's node and pod counts."""
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
    return build_topology(lab, data, loc)
