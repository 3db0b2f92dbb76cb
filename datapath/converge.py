"""Bringing a lab to what its record wants, by steps that are each safe to repeat.

``converge(state, topo)`` reads the kernel (observe.py) and runs, per node,
the ensure-steps of the mode it should be in; a step whose outcome is there
already does nothing, so running converge twice, or after a kill at any
point, ends in the same place.

- legacy: the rule guard stopped (it would revert the next step), the live
  BPF SNAT flows written into conntrack and MASQUERADE restored in one
  ``iptables-restore --noflush`` transaction per family (ip6tables' too in a
  dual or ipv6 lab), only while programs are still attached and MASQUERADE is
  not whole, our programs removed, TCX or clsact filter (a missing one is
  done), and the clsact qdiscs the lab added with them, ``accept_local`` 0.
- ebpf: the programs attached where they are missing (a loaded datapath whose
  config, table size and endpoints are the lab's is kept, and with it its NAT
  table; a new one takes over the old one's NAT entries, or conntrack's while
  MASQUERADE still translates), ``accept_local`` 1, MASQUERADE removed (one
  transaction per family), then exactly one live rule guard serving these
  programs (orphans and stuck guards stopped; a new one only over firewall
  rules that are none or accepted with ``enable --force``), tracing off when
  no monitor runs.
- absent: netns_lab.builder.lab_down (guard, namespaces, every ``<lab>.*``).

What converge cannot repair (a namespace or device deleted by hand) it
reports at the end, after doing everything else, as ``ConvergeError`` naming
``hostrouting lab down``.
"""

from __future__ import annotations

from netns_lab import faults, legacy, netns
from netns_lab.state import LabState
from netns_lab.topology import Node, Topology

from . import events, host_routing, iptables_rules, libbpf, nat_handover, rule_guard, tc_attach
from .host_routing import DatapathError, DatapathMaps
from .observe import FROM_POD, FROM_UNDERLAY, NodeView, accept_local_keys, attach_points, \
    monitor_pidfiles, monitors, observe, progs6_pin


class SwitchError(RuntimeError):
    """The lab is not in a state where this switch makes sense."""


class ConvergeError(SwitchError):
    """Converged as far as possible; what is left cannot be repaired in place."""


# -- firewall rules a new guard would freeze in ----------------------------------------------

def user_rules(topo: Topology, nodes: list[Node] | None = None) -> list[iptables_rules.Rule]:
    return [rule for node in (topo.nodes if nodes is None else nodes)
            for rule in iptables_rules.user_rules(node.netns)]


def _listing(rules: list[iptables_rules.Rule]) -> list[dict]:
    return [{"netns": r.netns, "backend": r.backend, "table": r.table, "chain": r.chain,
             "rule": r.text} for r in rules]


def refuse(topo: Topology, found: list[iptables_rules.Rule], when: str = "") -> None:
    events.record(topo.lab, events.WARNING, "EnableRefused", f"lab/{topo.lab}",
                  f"refused: {len(found)} user firewall rule(s) in node namespaces would be "
                  f"bypassed by eBPF host routing{when}", rules=_listing(found))
    lines = "\n".join(f"  {r.describe()}\n    remove: {r.remove}" for r in found)
    raise SwitchError(f"lab {topo.lab}: refusing to enable eBPF host routing: {len(found)} "
                      f"user firewall rule(s) in node namespaces{when} would silently stop "
                      f"applying to pod traffic:\n{lines}\nremove them, or enable with --force")


def unaccepted_rules(state: LabState, topo: Topology, nodes: list[Node]) -> list:
    return [r for r in user_rules(topo, nodes) if r.describe() not in state.forced_rules]


# -- legacy ----------------------------------------------------------------------------------

def _sysctls(node: Node, view: NodeView, value: int) -> list[str]:
    """accept_local = value on the node's pod veths where it is not; returns the devices."""
    keys = accept_local_keys(node)
    wrong = [dev for dev, v in view.accept_local.items() if v != value]
    if wrong:
        netns.sysctl(node.netns, {keys[dev]: value for dev in wrong})
    return wrong


def _maps_of(view: NodeView) -> DatapathMaps | None:
    """The maps of a datapath attached on the node (any of its programs), if readable."""
    for found in view.programs.values():
        for a in found:
            try:
                return DatapathMaps.from_prog_id(a.prog_id)
            except (OSError, DatapathError):
                continue
    return None


def _export_flows(topo: Topology, node: Node, view: NodeView) -> None:
    """The node's live BPF SNAT flows into its conntrack (never stops a disable)."""
    maps = _maps_of(view)
    if maps is None:
        return
    try:
        with maps:
            written, failed = nat_handover.export_to_conntrack(topo, node, maps)
    except Exception as e:      # programs gone half-way: nothing to carry over
        events.record(topo.lab, events.WARNING, "NatFlowsLost", f"node/{node.name}",
                      f"BPF SNAT flows not carried into conntrack: {e}")
        return
    if written or failed:
        events.record(topo.lab, events.WARNING if failed else events.NORMAL,
                      "NatFlowsExported", f"node/{node.name}",
                      f"{written} BPF SNAT flow(s) carried into conntrack with their ports"
                      + (f"; {failed} refused or given another port" if failed else ""),
                      written=written, failed=failed)


def _masquerade_tables(topo: Topology) -> str:
    return "iptables and ip6tables" if topo.has_ipv6 else "iptables"


def ensure_legacy(state: LabState, topo: Topology, node: Node, view: NodeView) -> list[str]:
    done = []
    # While programs are attached no pod packet meets netfilter: conntrack learns the BPF
    # flows and MASQUERADE comes back first, then the stack takes over the packets.
    if view.masquerade != "present":
        if view.attached:
            _export_flows(topo, node, view)
        legacy.install_masquerade(topo, node)
        events.record(topo.lab, events.NORMAL, "MasqueradeRestored", f"node/{node.name}",
                      f"the {_masquerade_tables(topo)} MASQUERADE rule masquerades traffic "
                      "leaving the cluster again")
        done.append(f"{node.name}: MASQUERADE restored")
    detached = 0
    for dev, _ in attach_points(topo, node):
        if dev in view.missing_devices:
            continue
        claim = f"{node.netns}/{dev}"
        if view.programs.get(dev):
            tc_attach.detach(node.netns, dev, "ingress", remove_qdisc=claim in state.qdiscs)
            detached += 1
        elif claim in state.qdiscs and tc_attach.has_clsact(node.netns, dev) and \
                not tc_attach.attached_programs(node.netns, dev, "ingress"):
            tc_attach.detach(node.netns, dev, "ingress", remove_qdisc=True)
        if claim in state.qdiscs:
            state.qdiscs.remove(claim)
            state.save()
    progs6_pin(topo, node).unlink(missing_ok=True)     # the IPv6 programs go with them
    if detached:
        events.record(topo.lab, events.NORMAL, "ProgramsDetached", f"node/{node.name}",
                      f"detached from {detached} device(s)")
        done.append(f"{node.name}: programs detached from {detached} device(s)")
    if _sysctls(node, view, 0):
        done.append(f"{node.name}: accept_local 0")
    return done


# -- ebpf ------------------------------------------------------------------------------------

def _fill_maps(topo: Topology, node: Node, maps: DatapathMaps, view: NodeView) -> None:
    faults.point(f"fill the maps of {node.name}")
    with netns.ipr(node.netns) as nsock:
        for pod in node.pods:
            if pod.host_ifname in view.missing_devices:
                continue
            hidx = netns.ifindex(nsock, pod.host_ifname)
            with netns.ipr(pod.netns) as psock:
                pod_mac = netns.link_mac(psock, netns.ifindex(psock, "eth0"))
            maps.set_endpoint(pod.ip, hidx, pod_mac, netns.link_mac(nsock, hidx))
            if pod.ip6:
                maps.set_endpoint(pod.ip6, hidx, pod_mac, netns.link_mac(nsock, hidx))
        uplink = netns.ifindex(nsock, topo.uplink_ifname)
    for cidr in topo.non_masquerade_cidrs:
        maps.set_cluster_cidr(cidr)
    for cidr in topo.non_masquerade_cidrs6:
        maps.set_cluster_cidr6(cidr)
    others = [other for other in topo.nodes if other is not node]
    if not topo.pods_reach_nodes:
        for other in others:
            maps.set_cluster_cidr(f"{other.ip}/32", deny_from_pod=True)
            if other.ip6:
                maps.set_cluster_cidr6(f"{other.ip6}/128", deny_from_pod=True)
    for other in others:
        maps.set_node_route(other.pod_cidr, other.ip, uplink)
        if other.pod_cidr6:
            maps.set_node_route6(other.pod_cidr6, other.ip6, uplink)
    # the outside, for when forwarding is off in the node (the FIB lookup is refused)
    maps.set_node_route("0.0.0.0/0", topo.router_ip, uplink)
    if topo.has_ipv6:
        maps.set_node_route6("::/0", topo.router_ip6, uplink)


def _carry_nat(topo: Topology, node: Node, maps: DatapathMaps, view: NodeView) -> None:
    """The flows a new datapath must know before its first packet: the old datapath's NAT
    entries (a datapath replaced), or conntrack's while MASQUERADE translates (a switch)."""
    old = _maps_of(view)
    if old is not None:
        with old:
            try:
                entries = nat_handover.nat_snapshot(old)     # `nat` and `nat6`
            except (OSError, DatapathError):
                entries = []
        faults.point(f"copy {len(entries)} NAT entries of {node.name}")
        nat_handover.restore(maps, entries)
        if entries:
            events.record(topo.lab, events.NORMAL, "NatFlowsKept", f"node/{node.name}",
                          f"{len(entries) // 2} BPF SNAT flow(s) carried into the new datapath")
        return
    if view.masquerade == "absent":
        return
    imported, skipped = nat_handover.import_conntrack(topo, node, maps)
    if imported or skipped:
        events.record(topo.lab, events.WARNING if skipped else events.NORMAL,
                      "NatFlowsImported", f"node/{node.name}",
                      f"{imported} masqueraded flow(s) carried into the BPF SNAT table "
                      "with their ports" + (f"; {skipped} could not be (table full or "
                                            "key taken)" if skipped else ""),
                      imported=imported, skipped=skipped)


def _attach(state: LabState, node: Node, dev: str, fd: int, prog: str) -> None:
    """Attach (TCX where the kernel has it, tc_attach.default_mode); for a clsact filter,
    claiming the qdisc in the record before creating it (as namespaces are listed before
    they exist), so legacy removes exactly the qdiscs the lab added."""
    mode = tc_attach.default_mode()
    claim = f"{node.netns}/{dev}"
    if mode == "clsact" and claim not in state.qdiscs and \
            not tc_attach.has_clsact(node.netns, dev):
        state.qdiscs.append(claim)
        state.save()
    tc_attach.attach(node.netns, dev, fd, prog, "ingress", mode=mode)


def ensure_programs(state: LabState, topo: Topology, node: Node, view: NodeView) -> list[str]:
    points = [(dev, prog) for dev, prog in attach_points(topo, node)
              if dev not in view.missing_devices]
    wrong = [(dev, prog) for dev, prog in points
             if [a.name for a in view.programs.get(dev, [])] != [prog]]
    dp = view.datapath
    needed = {prog for _, prog in wrong}
    if dp is not None and (dp.matches or dp.unpinned) and needed <= set(dp.programs):
        done = []
        if dp.unpinned:         # the same load, its progs6 still full: pinned again
            with DatapathMaps.from_prog_id(next(iter(dp.programs.values()))) as maps:
                faults.point(f"pin progs6 of {node.name}")
                maps.pin_progs6(progs6_pin(topo, node))
            done.append(f"{node.name}: progs6 pinned again")
        for dev, prog in wrong:          # the same load: NAT table and counters stay
            with libbpf.prog_fd_by_id(dp.programs[prog]) as fd:
                _attach(state, node, dev, fd.fileno(), prog)
        if wrong:
            done.append(f"{node.name}: {len(wrong)} program(s) attached again")
        return done
    loaded = host_routing.load(router_ip=node.gateway, node_ip=node.ip,
                               nat=topo.nat.datapath_config(), nat_max_flows=topo.nat.max_flows,
                               router_ip6=node.gateway6, node_ip6=node.ip6,
                               nat6_max_flows=topo.nat.max_flows if topo.has_ipv6 else 0)
    try:
        _fill_maps(topo, node, loaded.maps, view)
        _carry_nat(topo, node, loaded.maps, view)
        for dev, prog in points:
            _attach(state, node, dev, loaded.programs[prog].fd, prog)
        # Only now, in one rename: until the last device has the new programs, the old pin
        # keeps the old progs6 full for the old programs (without it their IPv6 would go to
        # the stack: un-NATed, and the NATed flows' replies answered with resets), while
        # `loaded` keeps the new one full for the new programs.
        if topo.has_ipv6:
            faults.point(f"pin progs6 of {node.name}")
            loaded.maps.pin_progs6(progs6_pin(topo, node))
        ids = loaded.prog_ids
    finally:
        loaded.close()
    events.record(topo.lab, events.NORMAL, "ProgramsAttached", f"node/{node.name}",
                  f"from_pod (id {ids[FROM_POD]}) on {len(node.pods)} pod veth(s), "
                  f"from_underlay (id {ids[FROM_UNDERLAY]}) on {topo.uplink_ifname}")
    return [f"{node.name}: programs loaded and attached"]


def ensure_ebpf(state: LabState, topo: Topology, node: Node, view: NodeView) -> list[str]:
    done = ensure_programs(state, topo, node, view)
    # A packet BPF has NATed and hands to the stack (to fragment it) carries the node IP
    # as its source: the stack takes it only with accept_local. Pods cannot abuse it:
    # from_pod drops any source but the pod's own.
    if _sysctls(node, view, 1):
        done.append(f"{node.name}: accept_local 1")
    if view.masquerade != "absent":
        legacy.remove_masquerade(topo, node)
        events.record(topo.lab, events.NORMAL, "MasqueradeReplaced", f"node/{node.name}",
                      f"BPF SNAT to {node.ip} (ports {topo.nat.port_min}-{topo.nat.port_max}, "
                      f"up to {topo.nat.max_flows} flows) replaces the "
                      f"{_masquerade_tables(topo)} MASQUERADE rule")
        done.append(f"{node.name}: MASQUERADE removed")
    return done


def _trace_off(topo: Topology, node: Node, view: NodeView) -> list[str]:
    if not view.trace or monitors(topo.lab):
        return []
    maps = _maps_of(view)
    if maps is None:
        return []
    with maps:
        faults.point(f"trace off on {node.name}")
        maps.set_trace(False)
    return [f"{node.name}: tracing off (no monitor runs)"]


def collect_monitor_pidfiles(lab: str) -> list[str]:
    """Remove the pidfiles of monitors that no longer run (one killed leaves its own);
    returns their names. observe only reads them."""
    stale = [path for path, proc in monitor_pidfiles(lab).items() if proc is None]
    for path in stale:
        path.unlink(missing_ok=True)
    return [path.name for path in stale]


def ensure_guard(state: LabState, topo: Topology, nodes: list[Node]) -> list[str]:
    """Exactly one live guard, serving these nodes and their current programs."""
    found = rule_guard.find(topo.lab)
    done = []
    for orphan in found.orphans:
        if orphan.stop(rule_guard.MODULE):
            done.append(f"orphan rule guard pid {orphan.pid} stopped")
    want_nodes = {n.name: n.netns for n in nodes}
    want_nat = {n.name: a.prog_id for n in nodes
                for a in tc_attach.attached(n.netns, topo.uplink_ifname, "ingress")
                if a.name == FROM_UNDERLAY}
    if found.live and found.details.get("nodes") == want_nodes and \
            found.details.get("nat") == want_nat:
        return done
    late = unaccepted_rules(state, topo, nodes)     # refused before the old guard goes
    if late:
        refuse(topo, late)
    if found.guard is not None:
        found.guard.stop(rule_guard.MODULE)
        done.append(f"rule guard pid {found.guard.pid} ({found.describe()}) stopped")
    pid, _ = rule_guard.start(topo.lab, want_nodes, want_nat)
    done.append(f"rule guard started (pid {pid})")
    return done


# -- the loop ----------------------------------------------------------------------------------

def unrepairable(topo: Topology, view) -> list[str]:
    lines = [f"namespace {n} is gone" for n in view.missing_namespaces]
    lines += [f"{nv.name}: device {dev} is gone" for nv in view.nodes
              for dev in nv.missing_devices]
    return lines


def check_repairable(topo: Topology, view) -> None:
    broken = unrepairable(topo, view)
    if broken:
        raise ConvergeError(f"lab {topo.lab}: cannot be repaired in place: {'; '.join(broken)}"
                            f" (deleted by hand?); remove it with: hostrouting lab down "
                            f"--lab {topo.lab}")


def converge(state: LabState, topo: Topology) -> list[str]:
    """Run the ensure-steps of every node's desired mode; returns what was done."""
    collect_monitor_pidfiles(topo.lab)
    view = observe(topo)
    want = {n.name: state.desired.get(n.name, "legacy") for n in topo.nodes}
    ebpf_nodes = [n for n in topo.nodes if want[n.name] == "ebpf" and view.node(n.name).exists]
    done = []
    # the guard reverts every netfilter change: it goes before anything changes there
    netfilter_changes = any(
        view.node(n.name).masquerade != ("absent" if want[n.name] == "ebpf" else "present")
        for n in topo.nodes if view.node(n.name).exists)
    if (netfilter_changes or not ebpf_nodes) and \
            (view.guard.guard is not None or view.guard.orphans):
        stopped = rule_guard.stop_all(topo.lab)
        if stopped:
            done.append(f"{stopped} rule guard(s) stopped")
    for node in topo.nodes:
        nv = view.node(node.name)
        if not nv.exists or want[node.name] == "absent":
            continue
        if want[node.name] == "ebpf":
            done += ensure_ebpf(state, topo, node, nv)
        else:
            done += ensure_legacy(state, topo, node, nv)
    if ebpf_nodes:
        done += ensure_guard(state, topo, ebpf_nodes)
        for node in ebpf_nodes:
            done += _trace_off(topo, node, view.node(node.name))
    check_repairable(topo, view)
    return done
