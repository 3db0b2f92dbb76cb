"""Switching a lab between legacy routing and eBPF host routing.

Enabling loads the programs of bpf_c/host_routing.c once per node (each node
has its own maps: its endpoints, its counters), fills the endpoint map from the
lab's pods, and only then attaches ``from_pod`` to every host-side veth and
``from_underlay`` to the uplink, so the first redirected packet already sees
every endpoint. What was attached, and whether a clsact qdisc was created for
it, is recorded in the lab's state after each step, so disabling restores the
devices exactly, even after a crash half-way.

Traffic leaving the cluster is then source-NATed by BPF to the node IP, so
the legacy MASQUERADE rule of each node is removed once its programs are
attached (and put back on disable): nothing in the node's netfilter applies
to pod traffic any more. Flows to the outside that are open across a switch
carry on with their NAT port (datapath/nat_handover.py): ``enable`` imports
the node's masqueraded conntrack entries into the BPF SNAT table before the
programs are attached, ``disable`` writes the live BPF flows into conntrack
before MASQUERADE is restored and the programs are detached.

Pod-to-pod packets are the same bytes on either path, so TCP connections that
are open across a switch carry on.
"""

from __future__ import annotations

from netns_lab import legacy, netns
from netns_lab.state import LabState
from netns_lab.topology import Node, Topology

from . import (events, host_routing, iptables_rules, nat_handover, rule_guard,
               shared_types as st, tc_attach)

FROM_POD = "from_pod"
FROM_UNDERLAY = "from_underlay"


def configure_mode(mode: str):
    """The step ``lab_up`` runs once the namespaces exist: legacy routing in
    every node, then eBPF host routing over it when ``mode`` is "ebpf"."""
    def configure(state: LabState, topo: Topology) -> None:
        legacy.enable_legacy(topo)
        state.mode = "legacy"
        if mode == "ebpf":
            enable_ebpf(state, topo)
    return configure


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


def _accept_local(node: Node, value: int) -> dict[str, int]:
    return {f"net.ipv4.conf.{pod.host_ifname}.accept_local": value for pod in node.pods}


def _attach_points(topo: Topology, node: Node) -> list[tuple[str, str]]:
    return [(pod.host_ifname, FROM_POD) for pod in node.pods] + \
        [(topo.uplink_ifname, FROM_UNDERLAY)]


def _enable_node(state: LabState, topo: Topology, node: Node) -> tuple[int, int]:
    loaded = host_routing.load(router_ip=node.gateway, node_ip=node.ip,
                               nat=topo.nat.datapath_config(), nat_max_flows=topo.nat.max_flows)
    try:
        maps = loaded.maps
        for ip, ifindex, mac, node_mac in _endpoints(node):
            maps.set_endpoint(ip, ifindex, mac, node_mac)
        for cidr in topo.non_masquerade_cidrs:
            maps.set_cluster_cidr(cidr)
        if not topo.pods_reach_nodes:
            for other in topo.nodes:
                if other is not node:
                    maps.set_cluster_cidr(f"{other.ip}/32", deny_from_pod=True)
        with netns.ipr(node.netns) as nsock:
            uplink = netns.ifindex(nsock, topo.uplink_ifname)
        for other in topo.nodes:
            if other is not node:
                maps.set_node_route(other.pod_cidr, other.ip, uplink)
        # the outside, for when forwarding is off in the node (the FIB lookup is refused)
        maps.set_node_route("0.0.0.0/0", topo.router_ip, uplink)
        # the flows MASQUERADE translates now, with their ports: the first packet BPF
        # translates (once attached, below) finds its flow
        handed = nat_handover.import_conntrack(topo, node, maps)
        record = state.datapath.setdefault(node.name, {"attached": []})
        record["programs"] = {name: loaded.prog_ids[name] for name in (FROM_POD, FROM_UNDERLAY)}
        for ifname, prog in _attach_points(topo, node):
            created = tc_attach.attach(node.netns, ifname, loaded.programs[prog].fd, prog, "ingress")
            record["attached"].append({"ifname": ifname, "program": prog,
                                       "created_qdisc": created})
            state.save()
    finally:
        loaded.close()
    return handed


def _user_rules(topo: Topology) -> list[iptables_rules.Rule]:
    return [rule for node in topo.nodes for rule in iptables_rules.user_rules(node.netns)]


def _listing(rules: list[iptables_rules.Rule]) -> list[dict]:
    return [{"netns": r.netns, "backend": r.backend, "table": r.table, "chain": r.chain,
             "rule": r.text} for r in rules]


def _refuse(topo: Topology, found: list[iptables_rules.Rule], when: str = "") -> None:
    events.record(topo.lab, events.WARNING, "EnableRefused", f"lab/{topo.lab}",
                  f"refused: {len(found)} user firewall rule(s) in node namespaces would be "
                  f"bypassed by eBPF host routing{when}", rules=_listing(found))
    lines = "\n".join(f"  {r.describe()}\n    remove: {r.remove}" for r in found)
    raise SwitchError(f"lab {topo.lab}: refusing to enable eBPF host routing: {len(found)} "
                      f"user firewall rule(s) in node namespaces{when} would silently stop "
                      f"applying to pod traffic:\n{lines}\nremove them, or enable with --force")


def _refuse_late_rules(topo: Topology, accepted: list[iptables_rules.Rule]) -> None:
    """Rules added while enable ran, before the guard took its baseline, would be frozen in
    as if forced: check again once the guard blocks, and refuse (the caller rolls back)."""
    known = {r.describe() for r in accepted}
    late = [r for r in _user_rules(topo) if r.describe() not in known]
    if late:
        _refuse(topo, late, " (added while enable ran)")


def _refuse_or_force(state: LabState, topo: Topology, force: bool) -> list:
    """AKS's pre-enable check: user firewall rules in a node would be bypassed silently.
    Returns the rules accepted with --force."""
    found = _user_rules(topo)
    if not found:
        return []
    if force:
        events.record(topo.lab, events.WARNING, "ForcedEnable", f"lab/{topo.lab}",
                      f"enabled with --force: {len(found)} user firewall rule(s) in node "
                      "namespaces no longer apply to pod traffic: "
                      + "; ".join(r.describe() for r in found), rules=_listing(found))
        return found
    _refuse(topo, found)


def enable_ebpf(state: LabState, topo: Topology, force: bool = False) -> None:
    if state.mode == "ebpf":
        raise SwitchError(f"lab {topo.lab}: eBPF host routing is enabled already")
    accepted = _refuse_or_force(state, topo, force)
    state.mode = "switching"
    state.save()
    try:
        for node in topo.nodes:
            imported, skipped = _enable_node(state, topo, node)
            progs = state.datapath[node.name]["programs"]
            events.record(topo.lab, events.NORMAL, "ProgramsAttached", f"node/{node.name}",
                          f"from_pod (id {progs[FROM_POD]}) on {len(node.pods)} pod veth(s), "
                          f"from_underlay (id {progs[FROM_UNDERLAY]}) on {topo.uplink_ifname}")
            if imported or skipped:
                events.record(topo.lab, events.WARNING if skipped else events.NORMAL,
                              "NatFlowsImported", f"node/{node.name}",
                              f"{imported} masqueraded flow(s) carried into the BPF SNAT table "
                              "with their ports" + (f"; {skipped} could not be (table full or "
                                                    "key taken)" if skipped else ""),
                              imported=imported, skipped=skipped)
            # A packet BPF has NATed and hands to the stack (to fragment it) carries the
            # node IP as its source: the stack takes it only with accept_local. Pods cannot
            # abuse it: from_pod drops any source but the pod's own.
            netns.sysctl(node.netns, _accept_local(node, 1))
            if legacy.masquerade_installed(topo, node):
                state.datapath[node.name]["masquerade_removed"] = True
                state.save()
                legacy.remove_masquerade(topo, node)
                events.record(topo.lab, events.NORMAL, "MasqueradeReplaced", f"node/{node.name}",
                              f"BPF SNAT to {node.ip} (ports {topo.nat.port_min}-"
                              f"{topo.nat.port_max}, up to {topo.nat.max_flows} flows) replaces "
                              f"the iptables MASQUERADE rule")
        state.guard_pid, state.guard_backends = rule_guard.start(
            topo.lab, {n.name: n.netns for n in topo.nodes},
            {n.name: state.datapath[n.name]["programs"][FROM_UNDERLAY] for n in topo.nodes})
        _refuse_late_rules(topo, accepted)
    except BaseException:
        _detach_all(state, topo)
        state.mode = "legacy"
        state.save()
        raise
    state.mode = "ebpf"
    state.save()
    events.record(topo.lab, events.NORMAL, "Enabled", f"lab/{topo.lab}",
                  f"eBPF host routing enabled on {len(topo.nodes)} node(s); new firewall rules "
                  "in node namespaces are blocked")


def _detach_all(state: LabState, topo: Topology) -> None:
    rule_guard.stop(state.guard_pid)
    state.guard_pid, state.guard_backends = 0, {}
    for node in topo.nodes:
        record = state.datapath.get(node.name, {"attached": []})
        # While the programs are attached no pod packet meets netfilter: conntrack learns the
        # BPF flows and MASQUERADE comes back first, then the stack takes over the packets.
        if record.get("masquerade_removed") and netns.exists(node.netns):
            if record["attached"]:
                _export_flows(topo, node, record)
            if not legacy.masquerade_installed(topo, node):
                legacy.install_masquerade(topo, node)
            events.record(topo.lab, events.NORMAL, "MasqueradeRestored", f"node/{node.name}",
                          "the iptables MASQUERADE rule masquerades traffic leaving the cluster "
                          "again")
        for att in reversed(record["attached"]):
            if netns.exists(node.netns):
                tc_attach.detach(node.netns, att["ifname"], "ingress", att["created_qdisc"])
        if record["attached"]:
            events.record(topo.lab, events.NORMAL, "ProgramsDetached", f"node/{node.name}",
                          f"detached from {len(record['attached'])} device(s)")
        if record["attached"] and netns.exists(node.netns):
            netns.sysctl(node.netns, _accept_local(node, 0))
        state.datapath.pop(node.name, None)
        state.save()


def _export_flows(topo: Topology, node: Node, record: dict) -> None:
    """The node's live BPF SNAT flows into its conntrack (never stops a disable)."""
    try:
        with host_routing.DatapathMaps.from_prog_id(record["programs"][FROM_UNDERLAY]) as maps:
            written, failed = nat_handover.export_to_conntrack(topo, node, maps)
    except Exception as e:      # programs gone half-way (a crash): nothing to carry over
        events.record(topo.lab, events.WARNING, "NatFlowsLost", f"node/{node.name}",
                      f"BPF SNAT flows not carried into conntrack: {e}")
        return
    if written or failed:
        events.record(topo.lab, events.WARNING if failed else events.NORMAL,
                      "NatFlowsExported", f"node/{node.name}",
                      f"{written} BPF SNAT flow(s) carried into conntrack with their ports"
                      + (f"; {failed} refused or given another port" if failed else ""),
                      written=written, failed=failed)


def disable_ebpf(state: LabState, topo: Topology) -> None:
    if state.mode == "legacy" and not state.datapath:
        raise SwitchError(f"lab {topo.lab}: eBPF host routing is not enabled")
    _detach_all(state, topo)
    state.mode = "legacy"
    state.save()
    events.record(topo.lab, events.NORMAL, "Disabled", f"lab/{topo.lab}",
                  "back to legacy routing; firewall rules can be added again")


def node_maps(state: LabState, node: Node):
    # from_underlay: always attached (from_pod is not, on a node without pods)
    prog_id = state.datapath[node.name]["programs"][FROM_UNDERLAY]
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
    return {"lab": topo.lab, "mode": state.mode, "nodes": nodes,
            "rule_blocking": rule_guard.mechanisms(state.guard_pid, state.guard_backends),
            "ebpf_support": _support()}


def _support() -> dict:
    """Whether this kernel can run eBPF host routing, and if not exactly why (probed once
    per boot: the kernel's features do not change while it runs)."""
    from . import features
    found = features.known()
    missing = [f.detail for f in found if not f.ok]
    return {"usable": not missing, "missing": missing, "checked": [f.name for f in found]}


def stats(state: LabState, topo: Topology) -> dict:
    if state.mode != "ebpf":
        raise SwitchError(f"lab {topo.lab}: no datapath counters in {state.mode} mode "
                          "(hostrouting enable first)")
    result = {"lab": topo.lab, "nodes": []}
    for node in topo.nodes:
        with node_maps(state, node) as maps:
            counters = maps.counters()
            # raw: a full table has half a million entries, and only their direction counts
            dirs = [st.ffi.from_buffer("struct hr_nat_key *", k).dir
                    for k, _ in maps.nat_raw_entries()]
            capacity = maps.nat_capacity()
        out_entries = sum(1 for d in dirs if d == st.NAT_DIR_VALUES["out"])
        result["nodes"].append({
            "name": node.name,
            "counters": {name: {"packets": p, "bytes": b} for name, (p, b) in counters.items()},
            "nat": {"entries": len(dirs), "capacity": capacity,
                    "out_entries": out_entries, "in_entries": len(dirs) - out_entries}})
    return result


def nat_flows(state: LabState, topo: Topology, node_name: str | None = None) -> dict:
    """{node name: [nat_table.Flow]} for every node (or one)."""
    from . import nat_table
    if state.mode != "ebpf":
        raise SwitchError(f"lab {topo.lab}: no BPF SNAT table in {state.mode} mode "
                          "(hostrouting enable first)")
    nodes = [n for n in topo.nodes if node_name in (None, n.name)]
    if not nodes:
        raise SwitchError(f"lab {topo.lab}: no node named {node_name!r} "
                          f"(known: {', '.join(n.name for n in topo.nodes)})")
    result = {}
    for node in nodes:
        with node_maps(state, node) as maps:
            result[node.name] = nat_table.flows(maps)
    return result
