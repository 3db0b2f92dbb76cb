"""Switching a lab between legacy routing and eBPF host routing.

Enabling loads the programs of bpf_c/host_routing.c once per node (each node
has its own maps: its endpoints, its counters), fills the endpoint map from the
lab's pods, and only then attaches ``from_pod`` to every host-side veth and
``from_underlay`` to the uplink, so the first redirected packet already sees
every endpoint. What was attached, and whether a clsact qdisc was created for
it, is recorded in the lab's state after each step, so disabling restores the
devices exactly, even after a crash half-way.

Pod-to-pod packets are the same bytes on either path, so TCP connections that
are open across a switch carry on.
"""

from __future__ import annotations

from netns_lab import netns
from netns_lab.state import LabState
from netns_lab.topology import Node, Topology

from . import host_routing, tc_attach

FROM_POD = "from_pod"
FROM_UNDERLAY = "from_underlay"


class SwitchError(RuntimeError):
    """The lab is not in a state where this switch makes sense."""


def _endpoints(node: Node) -> list[tuple[str, int, str, str]]:
    """(pod IP, host-side ifindex, pod MAC, host-side MAC) for every pod of a node."""
    found = []
    with netns.ipr(node.netns) as nsock:
        for pod in node.pods:
            hidx = netns.ifindex(nsock, pod.host_ifname)
            host_mac = netns.link_mac(nsock, hidx)
            with netns.ipr(pod.netns) as psock:
                pod_mac = netns.link_mac(psock, netns.ifindex(psock, "eth0"))
            found.append((pod.ip, hidx, pod_mac, host_mac))
    return found


def _attach_points(topo: Topology, node: Node) -> list[tuple[str, str]]:
    return [(pod.host_ifname, FROM_POD) for pod in node.pods] + \
        [(topo.uplink_ifname, FROM_UNDERLAY)]


def _enable_node(state: LabState, topo: Topology, node: Node) -> None:
    loaded = host_routing.load(router_ip=node.gateway)
    try:
        maps = loaded.maps
        for ip, ifindex, mac, node_mac in _endpoints(node):
            maps.set_endpoint(ip, ifindex, mac, node_mac)
        record = state.datapath.setdefault(node.name, {"attached": []})
        record["programs"] = {name: loaded.prog_ids[name] for name in (FROM_POD, FROM_UNDERLAY)}
        for ifname, prog in _attach_points(topo, node):
            created = tc_attach.attach(node.netns, ifname, loaded.programs[prog].fd, prog, "ingress")
            record["attached"].append({"ifname": ifname, "program": prog,
                                       "created_qdisc": created})
            state.save()
    finally:
        loaded.close()


def enable_ebpf(state: LabState, topo: Topology) -> None:
    if state.mode == "ebpf":
        raise SwitchError(f"lab {topo.lab}: eBPF host routing is enabled already")
    state.mode = "switching"
    state.save()
    try:
        for node in topo.nodes:
            _enable_node(state, topo, node)
    except BaseException:
        _detach_all(state, topo)
        state.mode = "legacy"
        state.save()
        raise
    state.mode = "ebpf"
    state.save()


def _detach_all(state: LabState, topo: Topology) -> None:
    for node in topo.nodes:
        record = state.datapath.get(node.name, {"attached": []})
        for att in reversed(record["attached"]):
            if netns.exists(node.netns):
                tc_attach.detach(node.netns, att["ifname"], "ingress", att["created_qdisc"])
        state.datapath.pop(node.name, None)
        state.save()


def disable_ebpf(state: LabState, topo: Topology) -> None:
    if state.mode == "legacy" and not state.datapath:
        raise SwitchError(f"lab {topo.lab}: eBPF host routing is not enabled")
    _detach_all(state, topo)
    state.mode = "legacy"
    state.save()


def _node_maps(state: LabState, node: Node):
    prog_id = state.datapath[node.name]["programs"][FROM_POD]
    return host_routing.DatapathMaps.from_prog_id(prog_id)


def status(state: LabState, topo: Topology) -> dict:
    nodes = []
    for node in topo.nodes:
        attached = []
        for ifname, prog in _attach_points(topo, node):
            progs = tc_attach.attached_programs(node.netns, ifname, "ingress")
            attached.append({"ifname": ifname, "hook": "tc ingress",
                             "programs": [{"id": pid, "name": name} for pid, name in progs]})
        nodes.append({"name": node.name, "netns": node.netns, "mode": state.mode,
                      "attached": attached})
    return {"lab": topo.lab, "mode": state.mode, "nodes": nodes}


def stats(state: LabState, topo: Topology) -> dict:
    if state.mode != "ebpf":
        raise SwitchError(f"lab {topo.lab}: no datapath counters in {state.mode} mode "
                          "(hostrouting enable first)")
    result = {"lab": topo.lab, "nodes": []}
    for node in topo.nodes:
        with _node_maps(state, node) as maps:
            counters = maps.counters()
        result["nodes"].append({"name": node.name, "counters": {
            name: {"packets": p, "bytes": b} for name, (p, b) in counters.items()}})
    return result


def print_status(status_: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"lab {status_['lab']}: {status_['mode']} routing")
    for col in ("node", "device", "hook", "program", "id"):
        table.add_column(col)
    for node in status_["nodes"]:
        for att in node["attached"]:
            progs = att["programs"] or [{"name": "-", "id": "-"}]
            for p in progs:
                table.add_row(node["name"], att["ifname"], att["hook"], p["name"], str(p["id"]))
    Console().print(table)


def print_stats(stats_: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"lab {stats_['lab']}: datapath counters")
    table.add_column("node")
    table.add_column("verdict / reason")
    table.add_column("packets", justify="right")
    table.add_column("bytes", justify="right")
    for node in stats_["nodes"]:
        for name, c in node["counters"].items():
            if c["packets"]:
                table.add_row(node["name"], name, f"{c['packets']:,}", f"{c['bytes']:,}")
    Console().print(table)
