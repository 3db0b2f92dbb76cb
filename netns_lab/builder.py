"""Bring a lab up and down (see the drawing in netns_lab/__init__.py).

``lab_up`` records every namespace before creating any, and on any failure,
Ctrl-C included, removes what it made before re-raising. ``lab_down`` and
``lab_down_all`` remove a lab as the kernel has it, whether or not its record
survived: the namespaces the record lists and those named ``<lab>-<name>``
that carry the lab's marker (``lab_mark``, the alias of their loopback device:
a namespace merely named like the lab, a Kubernetes pod's ``cni-...``, is never
touched), its daemons (found by their pidfile, or by the lab file on their
command line), and every ``<lab>.*`` file of the state directory.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable

from . import netns, procs
from .state import (GUARD_MODULE, LabState, LabStateError, guard_pidfile, guard_pidfile_arg,
                    lab_files, lab_lock, lab_names, lab_pin_dir, labs_dir, load_state,
                    pinned_lab_names, remove_lab_pins, stray_lab_names)
from .topology import LAB_NAME_RE, NAME_RE, Topology

BRIDGE = "br0"
POD_IFNAME = "eth0"

# IPv4-only labs: IPv6 would add router solicitations and DAD to every veth (dual and ipv6
# labs turn IPv6 on, _NS_SYSCTLS6).
# tcp_tw_reuse=1 (the kernel's default, 2, allows it on loopback only): a client opening
# ~10,000 connections a second to one server port (netperf TCP_CRR) runs out of ephemeral
# ports within seconds while the closed ones sit in TIME_WAIT, and then stalls; busy
# Kubernetes nodes set it for the same reason. Every namespace of every mode gets it.
_NS_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
               "net.ipv4.tcp_tw_reuse": 1}
_ROUTER_SYSCTLS = {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                   "net.ipv4.conf.default.rp_filter": 0}
# Dual and ipv6 labs: IPv6 on, without duplicate address detection (addresses are usable at
# once; they are also added nodad) or router advertisements (routes are configured).
_NS_SYSCTLS6 = {**_NS_SYSCTLS, **{f"net.ipv6.conf.{dev}.{key}": value
                                  for dev in ("all", "default")
                                  for key, value in (("disable_ipv6", 0), ("accept_dad", 0),
                                                     ("accept_ra", 0))}}
_ROUTER_SYSCTLS6 = {"net.ipv6.conf.all.forwarding": 1}
NODAD = 0x02    # IFA_F_NODAD
HOST6 = 128     # a pod's address and its gateway, as IPv4's /32


def _node_sysctls(topo: Topology) -> dict[str, str]:
    """A node's own connections take their ports from a range the topology keeps disjoint
    from the BPF SNAT ports ([nat] port_min..port_max): the datapath does not track the node's
    flows, and a node connection on a pod's NAT port towards the same remote would have its
    replies translated to the pod."""
    low, high = topo.node_local_port_range
    return {"net.ipv4.ip_local_port_range": f"{low} {high}"}


def _ns_sysctls(topo: Topology) -> dict:
    return _NS_SYSCTLS6 if topo.has_ipv6 else _NS_SYSCTLS


def _router_sysctls(topo: Topology) -> dict:
    return {**_ROUTER_SYSCTLS, **_ROUTER_SYSCTLS6} if topo.has_ipv6 else _ROUTER_SYSCTLS


def _addr6(sock, index: int, address: str, prefixlen: int) -> None:
    sock.addr("add", index=index, address=address, prefixlen=prefixlen, flags=NODAD)


def _prefix(cidr: str) -> int:
    return ipaddress.ip_network(cidr).prefixlen


def _up(ipr, ifname: str, mtu: int | None = None, alias: str | None = None) -> int:
    index = netns.ifindex(ipr, ifname)
    if mtu:
        ipr.link("set", index=index, mtu=mtu)
    if alias:  # the readable name, as `ip link` shows it (interface names are short)
        ipr.link("set", index=index, ifalias=alias)
    ipr.link("set", index=index, state="up")
    return index


def _veth(ipr, ifname: str, peer_ns: str, peer_ifname: str) -> None:
    ipr.link("add", ifname=ifname, kind="veth",
             peer={"ifname": peer_ifname, "net_ns_fd": peer_ns})


def _build_fabric(topo: Topology, socks: dict) -> None:
    fab = socks[topo.fabric_netns]
    # IPv6: no MLD snooping, which could keep neighbour solicitations from a node that the
    # bridge has not heard join its solicited-node group (there is no querier)
    fab.link("add", ifname=BRIDGE, kind="bridge",
             **({"br_mcast_snooping": 0} if topo.has_ipv6 else {}))
    br = _up(fab, BRIDGE, topo.underlay_mtu)
    fab.addr("add", index=br, address=topo.router_ip, prefixlen=_prefix(topo.underlay_cidr))

    ext = topo.external
    ext_link = f"{topo.lab}-ext"
    _veth(fab, ext_link, ext.netns, POD_IFNAME)
    idx = _up(fab, ext_link, topo.external_mtu)
    fab.addr("add", index=idx, address=ext.router_ip, prefixlen=_prefix(ext.cidr))
    esock = socks[ext.netns]
    eidx = _up(esock, POD_IFNAME, topo.external_mtu)
    esock.addr("add", index=eidx, address=ext.ip, prefixlen=_prefix(ext.cidr))
    esock.route("add", dst="0.0.0.0/0", gateway=ext.router_ip)
    if topo.has_ipv6:
        _addr6(fab, br, topo.router_ip6, _prefix(topo.underlay_cidr6))
        _addr6(fab, idx, ext.router_ip6, _prefix(ext.cidr6))
        _addr6(esock, eidx, ext.ip6, _prefix(ext.cidr6))
        esock.route("add", dst="::/0", gateway=ext.router_ip6)


def _build_node(topo: Topology, node, socks: dict) -> None:
    fab, nsock = socks[topo.fabric_netns], socks[node.netns]
    port = node.fabric_ifname
    _veth(nsock, topo.uplink_ifname, topo.fabric_netns, port)
    pidx = _up(fab, port, topo.underlay_mtu, alias=node.netns)
    fab.link("set", index=pidx, master=netns.ifindex(fab, BRIDGE))

    up = _up(nsock, topo.uplink_ifname, topo.underlay_mtu)
    nsock.addr("add", index=up, address=node.ip, prefixlen=_prefix(topo.underlay_cidr))
    nsock.route("add", dst="0.0.0.0/0", gateway=topo.router_ip)
    for other in topo.nodes:
        if other is not node:
            nsock.route("add", dst=other.pod_cidr, gateway=other.ip)
    if topo.has_ipv6:
        _addr6(nsock, up, node.ip6, _prefix(topo.underlay_cidr6))
        nsock.route("add", dst="::/0", gateway=topo.router_ip6)
        for other in topo.nodes:
            if other is not node:
                nsock.route("add", dst=other.pod_cidr6, gateway=other.ip6)

    for pod in node.pods:
        psock = socks[pod.netns]
        _veth(nsock, pod.host_ifname, pod.netns, POD_IFNAME)
        hidx = _up(nsock, pod.host_ifname, alias=pod.netns)
        eidx = _up(psock, POD_IFNAME)
        if topo.has_ipv4:
            nsock.addr("add", index=hidx, address=node.gateway, prefixlen=32)
            nsock.route("add", dst=f"{pod.ip}/32", oif=hidx, scope=253, prefsrc=node.gateway)
            psock.addr("add", index=eidx, address=pod.ip, prefixlen=32)
            psock.route("add", dst=f"{node.gateway}/32", oif=eidx, scope=253)
            psock.route("add", dst="0.0.0.0/0", gateway=node.gateway, oif=eidx)
        if topo.has_ipv6:       # the gateway is found by neighbour discovery, as ARP for IPv4
            _addr6(nsock, hidx, node.gateway6, HOST6)
            nsock.route("add", dst=f"{pod.ip6}/{HOST6}", oif=hidx, prefsrc=node.gateway6)
            _addr6(psock, eidx, pod.ip6, HOST6)
            psock.route("add", dst=f"{node.gateway6}/{HOST6}", oif=eidx)
            psock.route("add", dst="::/0", gateway=node.gateway6, oif=eidx)


def lab_mark(lab: str) -> str:
    """The alias of the loopback device in every namespace of the lab, set as it is brought
    up: what tells the lab's namespaces from others that are merely named like them."""
    return f"hostrouting lab {lab}"


def _build(topo: Topology) -> None:
    for name in topo.namespaces:
        netns.create(name)
    socks = {name: netns.ipr(name) for name in topo.namespaces}
    try:
        for name, sock in socks.items():
            _up(sock, "lo", alias=lab_mark(topo.lab))
            netns.sysctl(name, _ns_sysctls(topo))
        netns.sysctl(topo.fabric_netns, _router_sysctls(topo))
        for node in topo.nodes:
            netns.sysctl(node.netns, {**_router_sysctls(topo), **_node_sysctls(topo)})
        _build_fabric(topo, socks)
        for node in topo.nodes:
            _build_node(topo, node, socks)
    finally:
        for sock in socks.values():
            sock.close()


def lab_up(topo: Topology, configure: Callable[[LabState, Topology], None] | None = None
           ) -> tuple[LabState, float]:
    """Create the lab, then ``configure`` it (a mode); returns state and seconds taken.

    Nothing is created when a namespace of the lab exists already. Whatever
    happens after the first namespace is made, including Ctrl-C, the lab is
    either complete or removed again; after a SIGKILL its record says
    ``phase: building`` and ``lab down`` removes it.
    """
    started = time.monotonic()
    with lab_lock(topo.lab):
        found = sorted(set(topo.namespaces) | set(lab_namespaces(topo.lab)))
        found = [n for n in found if netns.exists(n)]
        if topo.lab in lab_names():
            raise LabStateError(f"lab {topo.lab!r} exists already ({', '.join(found) or 'state file'})"
                                f"; remove it with: hostrouting lab down --lab {topo.lab}")
        if found:
            raise LabStateError(
                f"namespaces of lab {topo.lab!r} exist ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}) but it has no record in {labs_dir()} (the "
                "state directory was wiped, or HOSTROUTING_STATE_DIR differs from when it was "
                f"made); remove them with: hostrouting lab down --lab {topo.lab}")
        state = LabState(name=topo.lab, topology=topo.to_dict(), namespaces=topo.namespaces)
        state.desire("legacy")
        state.save()
        try:
            _build(topo)
            if configure:
                configure(state, topo)
            state.phase = "ready"
            state.save()
        except BaseException:
            _remove(topo.lab, state.namespaces)
            raise
    return state, time.monotonic() - started


def _named_like(name: str) -> list[str]:
    """The namespaces in /run/netns named ``<lab>-...`` (lab names have no dash)."""
    if not os.path.isdir(netns.NETNS_DIR):
        return []
    return sorted(n for n in os.listdir(netns.NETNS_DIR) if n.startswith(f"{name}-"))


def _marked(ns: str, lab: str) -> bool:
    try:
        with netns.ipr(ns) as sock:
            return any(link.get_attr("IFLA_IFALIAS") == lab_mark(lab)
                       for link in sock.get_links(*sock.link_lookup(ifname="lo")))
    except Exception:           # removed meanwhile, or not a namespace we can enter
        return False


def lab_namespaces(name: str) -> list[str]:
    """The lab's namespaces as the kernel has them: named as the lab names them
    (``<lab>-<node, pod, fabric or ext>``) and carrying its marker (``lab_mark``)."""
    return [n for n in _named_like(name)
            if NAME_RE.match(n[len(name) + 1:]) and _marked(n, name)]


def foreign_namespaces(name: str) -> list[str]:
    """Namespaces named ``<lab>-...`` that are not the lab's (no marker): never removed."""
    ours = set(lab_namespaces(name))
    return [n for n in _named_like(name) if n not in ours]


def lab_daemons(name: str) -> list[tuple[procs.Process, str]]:
    """The lab's long-lived processes (the rule guard), each with the pidfile on its command
    line: any guard of the lab (by the command line rule_guard.start gives it) whose pidfile
    is this state directory's or another's (one whose start was killed before it was
    recorded, or one started with another state directory: a lab's namespaces, and so its
    name, are the machine's, whatever the directory). A process that merely holds such a
    path among its words is not one."""
    pidfile = guard_pidfile(name)

    def ours(arg: str | None) -> bool:
        return arg is not None and (arg == str(pidfile) or arg.endswith(f"/labs/{pidfile.name}"))

    found = {}
    for proc in procs.find(where=lambda argv: ours(guard_pidfile_arg(argv, name))):
        arg = guard_pidfile_arg(procs.cmdline(proc.pid), name)
        if ours(arg):
            found[proc] = arg
    return sorted(((p, found[p]) for p in procs.outermost(list(found))),
                  key=lambda item: item[0].pid)


def _remove(name: str, namespaces: list[str]) -> list[str]:
    for daemon, pidfile in lab_daemons(name):
        daemon.stop("-m", GUARD_MODULE, "--pidfile", pidfile)
    wanted = sorted(set(namespaces) | set(lab_namespaces(name)))
    removed = [n for n in wanted if netns.remove(n)]
    remove_lab_pins(name)
    for path in lab_files(name):
        if path.suffix != ".lock":      # lab_lock removes it, holding it
            path.unlink(missing_ok=True)
    return removed


def lab_down(name: str) -> list[str]:
    """Remove a lab; returns the namespaces that were removed.

    Works from what the kernel has when the record is gone or unreadable;
    "no lab" only when nothing of it is left anywhere.
    """
    with lab_lock(name):
        try:
            state = load_state(name)
        except LabStateError:
            state = None
        if state is None and not lab_namespaces(name) and not lab_daemons(name) and \
                not [p for p in lab_files(name) if p.suffix != ".lock"] and \
                not lab_pin_dir(name).exists():
            foreign = foreign_namespaces(name)
            raise LabStateError(f"no lab named {name!r} (see: hostrouting lab show --all)" + (
                f"; not removing {', '.join(foreign)}: named like it, but without the lab's "
                f"marker (alias {lab_mark(name)!r} on lo)" if foreign else ""))
        if state is not None:
            state.desire("absent")
            state.save()
        return _remove(name, state.namespaces if state else [])


def lab_down_all() -> dict[str, list[str]]:
    """Every lab of this state directory, those with only stray files left included."""
    removed = {}
    for name in lab_names() + stray_lab_names():
        try:
            removed[name] = lab_down(name)
        except LabStateError:   # removed meanwhile by another command
            pass
    return removed


def lab_down_stray_pins() -> list[str]:
    """Remove the pins of labs no namespace of which is left, whatever state directory made
    them (a test session SIGKILLed with its temporary one leaves its labs' pins, and with
    them programs and maps, until reboot); returns those labs. A lab alive under another
    state directory keeps its pins: its namespaces carry its marker, and are made before
    anything is pinned. Directories not named as a lab names them are not looked at."""
    stray = []
    for name in pinned_lab_names():
        if LAB_NAME_RE.match(name) and not lab_namespaces(name):
            remove_lab_pins(name)
            stray.append(name)
    return stray


def add_veth_pair(lab: str, name_a: str, name_b: str, ip_a: str, ip_b: str,
                  prefixlen: int = 30, ip6: tuple[str, str] | None = None,
                  prefixlen6: int = 64) -> tuple[str, str]:
    """Two more namespaces in a lab, joined by one veth pair (``eth0`` on each side); with
    ``ip6`` (the two sides' IPv6 addresses), IPv6 too.

    The benchmark uses this as the same-node limit: a pod-to-pod path can be
    no faster than one veth between two namespaces. Recorded in the lab's
    state before it is created, and removed with the lab.
    """
    with lab_lock(lab):
        state = load_state(lab)
        names = (f"{lab}-{name_a}", f"{lab}-{name_b}")
        state.namespaces += [n for n in names if n not in state.namespaces]
        state.save()
        for name in names:
            netns.create(name)
            if ip6:     # before the veth exists, so that it has no DAD to do
                netns.sysctl(name, _NS_SYSCTLS6)
        with netns.ipr(names[0]) as a, netns.ipr(names[1]) as b:
            _veth(a, POD_IFNAME, names[1], "peer0")
            b.link("set", index=netns.ifindex(b, "peer0"), ifname=POD_IFNAME)
            for side, (sock, ip) in enumerate(((a, ip_a), (b, ip_b))):
                _up(sock, "lo", alias=lab_mark(lab))
                idx = _up(sock, POD_IFNAME)
                sock.addr("add", index=idx, address=ip, prefixlen=prefixlen)
                if ip6:
                    _addr6(sock, idx, ip6[side], prefixlen6)
        if not ip6:
            for name in names:
                netns.sysctl(name, _NS_SYSCTLS)
    return names
