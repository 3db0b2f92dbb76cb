"""What a lab is, read from the kernel: never from a record of what was done.

``observe(topo)`` reads, per node: whether its namespace and devices exist,
the program this project attached to every attach point (tc_attach.attached:
a TCX program or a clsact filter),
whether those programs are one consistent datapath with the lab's config (so
it can be kept, NAT table and all; with IPv6, its ``progs6`` full and the map pinned
for the node), the MASQUERADE chain and its jump (in
iptables, and in ip6tables too in a dual or ipv6 lab: "present" only when every
family has it whole, legacy.Masquerade.state), the ``accept_local`` sysctls and
the trace flag; and for the lab: every namespace
and the rule guard (rule_guard.find: pidfile checked against /proc, heartbeat).

``differences(state, view)`` compares that with what the record wants
(``desired`` per node), as one readable line per difference; converge.py
removes them, ``status`` prints them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from netns_lab import legacy, netns
from netns_lab.state import lab_pin_dir
from netns_lab.topology import Node, Topology

from . import host_routing, libbpf, rule_guard, tc_attach
from .host_routing import DatapathError, DatapathMaps

FROM_POD = "from_pod"
FROM_UNDERLAY = "from_underlay"


def attach_points(topo: Topology, node: Node) -> list[tuple[str, str]]:
    """(device, program) for every hook of a node: from_pod on each pod's host-side veth,
    from_underlay on the uplink."""
    return [(pod.host_ifname, FROM_POD) for pod in node.pods] + \
        [(topo.uplink_ifname, FROM_UNDERLAY)]


def progs6_pin(topo: Topology, node: Node) -> Path:
    """Where the node's `progs6` is pinned: the IPv6 programs stay in it only while a pin (or
    a file descriptor) of it exists (DatapathMaps.pin_progs6)."""
    return lab_pin_dir(topo.lab) / f"{node.name}_progs6"   # bpffs refuses dots


def pinned_map_id(path: Path) -> int | None:
    """The id of the map pinned at `path`; None when nothing (or no map) is pinned there."""
    try:
        with libbpf.obj_get(str(path)) as fd:
            return libbpf.map_info(fd).id
    except OSError:
        return None


@dataclass
class Datapath:
    """One load of the programs, found attached on a node."""
    programs: dict[str, int]            # name -> prog id
    matches: bool                       # config, table size and endpoints are the lab's
    mismatch: str = ""
    # all is the lab's but the pin of its (still full) progs6: pinning it again keeps it
    unpinned: bool = False


@dataclass
class NodeView:
    name: str
    netns: str
    exists: bool
    missing_devices: list[str] = field(default_factory=list)
    programs: dict[str, list[tc_attach.Attached]] = field(default_factory=dict)  # per device
    datapath: Datapath | None = None    # when every attached program is of one load
    masquerade: str = "absent"          # present | absent | partial
    accept_local: dict[str, int] = field(default_factory=dict)
    trace: bool = False

    @property
    def attached(self) -> int:
        return sum(len(p) for p in self.programs.values())

    @property
    def attach_mode(self) -> str | None:
        """tcx or clsact: how the node's programs are attached; "mixed"; None: none are."""
        modes = {a.mode for found in self.programs.values() for a in found}
        return modes.pop() if len(modes) == 1 else ("mixed" if modes else None)

    def mode(self, topo: Topology) -> str:
        """ebpf or legacy when the node is exactly that; absent; else "drifted"."""
        if not self.exists:
            return "absent"
        if self.missing_devices:
            return "drifted"
        points = attach_points(topo, next(n for n in topo.nodes if n.name == self.name))
        complete = self.datapath is not None and self.datapath.matches and all(
            [a.name for a in self.programs.get(dev, [])] == [prog] for dev, prog in points)
        if complete and self.masquerade == "absent" and \
                all(v == 1 for v in self.accept_local.values()):
            return "ebpf"
        if self.attached == 0 and self.masquerade == "present" and \
                all(v == 0 for v in self.accept_local.values()):
            return "legacy"
        return "drifted"


@dataclass
class LabView:
    lab: str
    missing_namespaces: list[str]
    nodes: list[NodeView]
    guard: rule_guard.Found

    def node(self, name: str) -> NodeView:
        return next(n for n in self.nodes if n.name == name)


def accept_local_keys(node: Node) -> dict[str, str]:
    return {pod.host_ifname: f"net.ipv4.conf.{pod.host_ifname}.accept_local" for pod in node.pods}


def _read_accept_local(node: Node, devices: list[str]) -> dict[str, int]:
    keys = {dev: key for dev, key in accept_local_keys(node).items() if dev in devices}
    if not keys:
        return {}
    out = netns.run(node.netns, ["sysctl", "-n", *keys.values()], changes=False).stdout.split()
    return {dev: int(v) for dev, v in zip(keys, out)}


def _devices(ns: str) -> list[str]:
    with netns.ipr(ns) as sock:
        return [link.get_attr("IFLA_IFNAME") for link in sock.get_links()]


def find_datapath(topo: Topology, node: Node, programs: dict[str, list[tc_attach.Attached]]
                  ) -> Datapath | None:
    """The programs attached on the node when they are one load (both programs share its
    maps), and whether that load is configured as the lab wants it."""
    ids: dict[str, set[int]] = {}
    for found in programs.values():
        for a in found:
            ids.setdefault(a.name, set()).add(a.prog_id)
    if not ids or set(ids) - {FROM_POD, FROM_UNDERLAY} or any(len(v) > 1 for v in ids.values()):
        return None
    progs = {name: next(iter(v)) for name, v in ids.items()}
    try:
        maps_of = {name: set(_map_ids(pid)) for name, pid in progs.items()}
        if len(progs) == 2 and not maps_of[FROM_POD] & maps_of[FROM_UNDERLAY]:
            return None     # two loads
        with DatapathMaps.from_prog_id(progs.get(FROM_POD) or progs[FROM_UNDERLAY]) as maps:
            why = _config_mismatch(topo, node, maps)
            progs6 = maps.ids.get("progs6")
    except (OSError, DatapathError) as e:      # freed meanwhile
        return Datapath(progs, False, f"unreadable: {e}")
    # progs6 full only while something holds it: a monitor's fd, or the lab's pin, which
    # alone outlives the commands (removed by hand, or by lab down of a same-named lab)
    pin = progs6_pin(topo, node)
    if not why and topo.has_ipv6 and pinned_map_id(pin) != progs6:
        return Datapath(progs, False, f"its progs6 (map id {progs6}) is not the one pinned "
                                      f"at {pin}", unpinned=True)
    return Datapath(progs, not why, why)


def _map_ids(prog_id: int) -> list[int]:
    with libbpf.prog_fd_by_id(prog_id) as fd:
        return list(libbpf.prog_info(fd).map_ids)


def _config_mismatch(topo: Topology, node: Node, maps: DatapathMaps) -> str:
    cfg = maps.config()
    want = topo.nat.datapath_config()
    if cfg.router_ip != node.gateway or cfg.node_ip != node.ip or \
            _ip6(cfg.router_ip6) != _ip6(node.gateway6) or _ip6(cfg.node_ip6) != _ip6(node.ip6) \
            or any(cfg.nat.get(k) != v for k, v in want.items()):
        return "its config is not the lab's"
    if maps.nat_capacity() != 2 * topo.nat.max_flows:
        return "its NAT table size is not the lab's"
    # a program array is emptied when its pin goes (the lab's pins removed by hand, say)
    if topo.has_ipv6 and len(maps.progs6_ids()) != len(host_routing.PROGRAMS6):
        return "its IPv6 programs are gone from progs6 (not pinned)"
    try:
        endpoints = maps.endpoints()
        if topo.has_ipv6:
            endpoints.update((_ip6(ip), ep) for ip, ep in maps.endpoints6().items())
    except DatapathError:       # from_underlay alone does not use the endpoint map
        return ""
    want_ips = {pod.ip for pod in node.pods}
    if topo.has_ipv6:
        want_ips |= {_ip6(pod.ip6) for pod in node.pods if pod.ip6}
    if set(endpoints) != want_ips:
        return "its endpoints are not the node's pods"
    for ip, (ifindex, mac, node_mac) in _pod_links(node).items():
        ep = endpoints[ip]
        if (ep.ifindex, ep.mac, ep.node_mac) != (ifindex, mac, node_mac):
            return f"its endpoint {ip} is not the pod's veth as it is now (ifindex or MAC)"
    return ""


def _ip6(ip: str | None) -> str | None:
    """An IPv6 address in one spelling (the topology's and the kernel's may differ)."""
    return str(ipaddress.IPv6Address(ip)) if ip else None


def _pod_links(node: Node) -> dict[str, tuple[int, str, str]]:
    """{pod IP (both, in a lab with IPv6): (host-side veth ifindex, the pod's eth0 MAC, the
    host veth's MAC)} as the kernel has them (what the endpoint maps must hold); pods whose
    veth is gone are left out."""
    out = {}
    with netns.ipr(node.netns) as nsock:
        for pod in node.pods:
            found = nsock.link_lookup(ifname=pod.host_ifname)
            if not found or not netns.exists(pod.netns):
                continue
            try:
                with netns.ipr(pod.netns) as psock:
                    pod_mac = netns.link_mac(psock, netns.ifindex(psock, "eth0"))
            except Exception:   # removed while we looked
                continue
            out[pod.ip] = (found[0], pod_mac, netns.link_mac(nsock, found[0]))
            if pod.ip6:
                out[_ip6(pod.ip6)] = out[pod.ip]
    return out


def observe_node(topo: Topology, node: Node) -> NodeView:
    view = NodeView(node.name, node.netns, netns.exists(node.netns))
    if not view.exists:
        return view
    try:
        devices = _devices(node.netns)
    except Exception:           # removed while we looked
        view.exists = False
        return view
    for dev, _ in attach_points(topo, node):
        if dev not in devices:
            view.missing_devices.append(dev)
            continue
        try:
            view.programs[dev] = tc_attach.attached(node.netns, dev, "ingress")
        except tc_attach.TcError:
            view.missing_devices.append(dev)
    view.datapath = find_datapath(topo, node, view.programs)
    if view.datapath:
        try:
            with DatapathMaps.from_prog_id(next(iter(view.datapath.programs.values()))) as maps:
                view.trace = maps.config().trace
        except (OSError, DatapathError):
            pass
    view.masquerade = legacy.read_masquerade(topo, node).state(topo, node)
    view.accept_local = _read_accept_local(node, devices)
    return view


def observe(topo: Topology) -> LabView:
    return LabView(lab=topo.lab,
                   missing_namespaces=[n for n in topo.namespaces if not netns.exists(n)],
                   nodes=[observe_node(topo, node) for node in topo.nodes],
                   guard=rule_guard.find(topo.lab))


def node_differences(topo: Topology, node: Node, view: NodeView, desired: str) -> list[str]:
    """What keeps the node from being as desired, one line each ([] when it is)."""
    if desired == "absent":
        return ["namespace exists"] if view.exists else []
    if not view.exists:
        return [f"namespace {node.netns} is gone"]
    diffs = [f"device {dev} is gone" for dev in view.missing_devices]
    points = attach_points(topo, node)
    for dev, prog in points:
        if dev in view.missing_devices:
            continue
        names = [a.name for a in view.programs.get(dev, [])]
        want = [prog] if desired == "ebpf" else []
        if names != want:
            diffs.append(f"{dev}: {', '.join(names) or 'no program'} attached "
                         f"(want {', '.join(want) or 'none'})")
    if desired == "ebpf" and view.datapath is None and view.attached:
        diffs.append("the attached programs are not one datapath")
    elif desired == "ebpf" and view.datapath is not None and not view.datapath.matches:
        diffs.append(f"the attached datapath does not match: {view.datapath.mismatch}")
    want_masq = "absent" if desired == "ebpf" else "present"
    if view.masquerade != want_masq:
        diffs.append(f"MASQUERADE {view.masquerade} (want {want_masq})")
    want_local = 1 if desired == "ebpf" else 0
    wrong = sorted(dev for dev, v in view.accept_local.items() if v != want_local)
    if wrong:
        diffs.append(f"accept_local is not {want_local} on {', '.join(wrong)}")
    if view.trace and desired == "ebpf" and not monitors(topo.lab):
        diffs.append("tracing is on with no monitor running")
    return diffs


def differences(state, topo: Topology, view: LabView) -> dict[str, list[str]]:
    """{"lab" or node name: [difference, ...]}, only those that have some."""
    out: dict[str, list[str]] = {}
    wants_ebpf = [n for n in topo.nodes if state.desired.get(n.name) == "ebpf"]
    lab = [f"namespace {n} is gone" for n in view.missing_namespaces
           if n not in {node.netns for node in topo.nodes}]
    guard = view.guard
    if wants_ebpf and not guard.live:
        lab.append(f"rule guard {guard.describe()}")
    elif not wants_ebpf and guard.guard is not None:
        lab.append(f"rule guard {guard.describe()} (want none)")
    if guard.orphans:
        lab.append("orphan rule guard(s): pid " + ", ".join(str(p.pid) for p in guard.orphans))
    if lab:
        out["lab"] = lab
    for node in topo.nodes:
        diffs = node_differences(topo, node, view.node(node.name),
                                 state.desired.get(node.name, "legacy"))
        if diffs:
            out[node.name] = diffs
    return out


def monitor_pidfile(lab: str, pid: int):
    from netns_lab.state import labs_dir
    return labs_dir() / f"{lab}.monitor-{pid}"


def monitor_pidfiles(lab: str) -> dict:
    """{pidfile: its process, or None when it no longer runs} of the lab's monitors."""
    from netns_lab import procs
    from netns_lab.state import labs_dir
    out = {}
    for path in labs_dir().glob(f"{lab}.monitor-*"):
        found = procs.read_pidfile(path)
        out[path] = found[0] if found and found[0].alive() else None
    return out


def monitors(lab: str) -> list:
    """Running `hostrouting monitor`s of the lab (each switches tracing on while it runs
    and keeps a pidfile <lab>.monitor-<pid>); read only: converge removes stale pidfiles."""
    return [proc for proc in monitor_pidfiles(lab).values() if proc is not None]
