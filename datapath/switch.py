"""Switching a lab between legacy routing and eBPF host routing.

``enable``, ``disable`` (and ``lab down``, netns_lab/builder.py) only change
what the lab's record wants, ``desired`` per node, and then run
``converge.converge``, which reads the kernel and takes the steps that are
missing, each safe to repeat (datapath/converge.py). Nothing else is
recorded, so a command killed at any point leaves a record that is still
true: running it again (or the opposite command) finishes the job.

Enabling loads the programs of bpf_c/host_routing.c once per node (each node
has its own maps: its endpoints, its counters), fills the endpoint map from the
lab's pods, and only then attaches ``from_pod`` to every host-side veth and
``from_underlay`` to the uplink, so the first redirected packet already sees
every endpoint.

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

from netns_lab import legacy
from netns_lab.state import LabState
from netns_lab.topology import Node, Topology

from . import converge as cv, events, host_routing, observe as ob, rule_guard, \
    shared_types as st, tc_attach
from .converge import ConvergeError, SwitchError  # noqa: F401 (part of this module's API)

FROM_POD = ob.FROM_POD
FROM_UNDERLAY = ob.FROM_UNDERLAY


def configure_mode(mode: str):
    """The step ``lab_up`` runs once the namespaces exist: legacy routing in
    every node, then eBPF host routing over it when ``mode`` is "ebpf"."""
    def configure(state: LabState, topo: Topology) -> None:
        state.desire("legacy")
        legacy.enable_legacy(topo)
        if mode == "ebpf":
            enable_ebpf(state, topo)
    return configure


def _refuse_removed(state: LabState, topo: Topology) -> None:
    if "absent" in state.desired.values():
        raise SwitchError(f"lab {topo.lab} is being removed (a lab down was interrupted); "
                          f"finish with: hostrouting lab down --lab {topo.lab}")


def enable_ebpf(state: LabState, topo: Topology, force: bool = False) -> list[str]:
    """Want eBPF on every node, and converge; returns what was done ([]: it was already).

    User firewall rules in a node would be bypassed silently: refused unless
    accepted with ``force`` (AKS's pre-enable check), before anything changes.
    Rules that land while enable runs, before the guard took its baseline, would
    be frozen in as if forced: checked again once the guard blocks, and refused
    with a rollback to legacy. Any other failure rolls back to legacy too.
    """
    _refuse_removed(state, topo)
    tc_attach.default_mode()                        # a bad HOSTROUTING_ATTACH changes nothing
    cv.check_repairable(topo, ob.observe(topo))     # a broken lab is not switched to eBPF
    found = cv.unaccepted_rules(state, topo, list(topo.nodes))
    if found and not force:
        cv.refuse(topo, found)
    if found:
        events.record(topo.lab, events.WARNING, "ForcedEnable", f"lab/{topo.lab}",
                      f"enabled with --force: {len(found)} user firewall rule(s) in node "
                      "namespaces no longer apply to pod traffic: "
                      + "; ".join(r.describe() for r in found), rules=cv._listing(found))
        state.forced_rules += [r.describe() for r in found]
    was = dict(state.desired)
    state.desire("ebpf")
    state.save()
    try:
        done = cv.converge(state, topo)
        late = cv.unaccepted_rules(state, topo, list(topo.nodes))
        if late:
            cv.refuse(topo, late, " (added while enable ran)")
    except ConvergeError:
        raise           # nothing to roll back to: the lab needs lab down
    except BaseException:
        if "ebpf" not in was.values():
            state.desired = was
            state.save()
            cv.converge(state, topo)
        raise
    if done:
        events.record(topo.lab, events.NORMAL, "Enabled", f"lab/{topo.lab}",
                      f"eBPF host routing enabled on {len(topo.nodes)} node(s); new firewall "
                      "rules in node namespaces are blocked")
    return done


def disable_ebpf(state: LabState, topo: Topology) -> list[str]:
    """Want legacy routing on every node, and converge; returns what was done."""
    _refuse_removed(state, topo)
    state.desire("legacy")
    state.forced_rules = []
    state.save()
    done = cv.converge(state, topo)
    if done:
        events.record(topo.lab, events.NORMAL, "Disabled", f"lab/{topo.lab}",
                      "back to legacy routing; firewall rules can be added again")
    return done


def node_programs(topo: Topology, node: Node) -> dict[str, int]:
    """{program name: id} of the datapath attached on the node now ({}: none, or not one)."""
    dp = ob.find_datapath(topo, node, {dev: tc_attach.attached(node.netns, dev, "ingress")
                                       for dev, _ in ob.attach_points(topo, node)})
    return dict(dp.programs) if dp else {}


def node_maps(state: LabState, node: Node) -> host_routing.DatapathMaps:
    """The maps of the datapath attached on the node; SwitchError (one line, with the
    command that repairs it) when there is none."""
    topo = Topology.from_dict(state.topology)
    try:
        programs = node_programs(topo, node)
    except tc_attach.TcError as e:
        programs, why = {}, str(e)
    else:
        why = "no datapath attached"
    if not programs:
        raise SwitchError(f"lab {topo.lab}: node {node.name}: {why} (the lab has drifted from "
                          f"its record; see: hostrouting status --lab {topo.lab})")
    # from_pod uses every map; from_underlay alone on a node without pods
    try:
        return host_routing.DatapathMaps.from_prog_id(programs.get(FROM_POD)
                                                      or programs[FROM_UNDERLAY])
    except (OSError, host_routing.DatapathError) as e:   # detached meanwhile
        raise SwitchError(f"lab {topo.lab}: node {node.name}: its datapath cannot be read: "
                          f"{e}") from None


def fix_command(state: LabState, topo: Topology) -> str:
    """The command that brings the lab to what its record wants."""
    mode = state.mode
    if mode == "absent":
        return f"hostrouting lab down --lab {topo.lab}"
    return f"hostrouting {'enable' if mode == 'ebpf' else 'disable'} --lab {topo.lab}"


def status(state: LabState, topo: Topology) -> dict:
    """What the kernel has per node, and how that differs from what the record wants
    (``converged``; ``fix``: the command that converges)."""
    view = ob.observe(topo)
    diffs = ob.differences(state, topo, view)
    broken = cv.unrepairable(topo, view)
    nodes = []
    for node in topo.nodes:
        nv = view.node(node.name)
        attached = [{"ifname": dev, "hook": _hook(nv.programs.get(dev, [])),
                     "programs": [{"id": a.prog_id, "name": a.name, "attach": a.mode}
                                  for a in nv.programs.get(dev, [])]}
                    for dev, _ in ob.attach_points(topo, node) if dev in nv.programs]
        nodes.append({"name": node.name, "netns": node.netns, "mode": nv.mode(topo),
                      "attach": nv.attach_mode,
                      "desired": state.desired.get(node.name, "legacy"),
                      "masquerade": nv.masquerade, "trace": nv.trace, "attached": attached,
                      "differences": diffs.get(node.name, [])})
    if state.phase != "ready":
        diffs.setdefault("lab", []).insert(0, f"lab up did not finish (phase {state.phase})")
    fix = None
    if diffs:
        fix = f"hostrouting lab down --lab {topo.lab}" if broken or state.phase != "ready" \
            else fix_command(state, topo)
    return {"lab": topo.lab, "mode": state.mode, "phase": state.phase, "nodes": nodes,
            "converged": not diffs, "differences": diffs.get("lab", []), "fix": fix,
            "rule_blocking": rule_guard.mechanisms(view.guard),
            "ebpf_support": _support()}


def _hook(found: list) -> str:
    """How the programs on a device hang there: "tcx ingress", "tc ingress" (a clsact
    filter), both, or "ingress" (none)."""
    return " ".join(["+".join(sorted({a.kind for a in found})), "ingress"]).strip()


def _support() -> dict:
    """Whether this kernel can run eBPF host routing, and if not exactly why (probed once
    per boot: the kernel's features do not change while it runs)."""
    from . import features
    found = features.known()
    missing = [f.detail for f in found if not f.ok]
    return {"usable": not missing, "missing": missing, "checked": [f.name for f in found]}


def stats(state: LabState, topo: Topology, bpf_stats_s: float = 0) -> dict:
    """Counters and NAT table use per node, read from the datapath attached now, and each
    program's run time and runs (prog_stats): totals counted while BPF stats were on, or
    with bpf_stats_s, what the next that many seconds add (stats held on meanwhile)."""
    from . import prog_stats
    if state.mode != "ebpf":
        raise SwitchError(f"lab {topo.lab}: no datapath counters in {state.mode} mode "
                          "(hostrouting enable first)")
    result = {"lab": topo.lab, "nodes": []}
    for node in topo.nodes:
        with node_maps(state, node) as maps:
            by_family = maps.counters_by_family()
            nat = {"nat": nat_table_use(maps, 4)}
            if topo.has_ipv6 and 6 in maps.nat_families():     # the IPv6 table: beside it
                nat["nat6"] = nat_table_use(maps, 6)
        result["nodes"].append({"name": node.name, **counter_tables(by_family), **nat})
    result["bpf_stats"] = {"sysctl": prog_stats.stats_enabled(), "window_s": bpf_stats_s or None}
    prog_ids = {(node.name, name): prog_id for node in topo.nodes
                for name, prog_id in node_programs(topo, node).items()}
    try:
        runs = (prog_stats.sample_programs(prog_ids, bpf_stats_s) if bpf_stats_s else
                prog_stats.figures(prog_ids, prog_stats.read_programs(prog_ids)))
    except OSError as e:
        raise SwitchError(f"cannot turn BPF stats on (BPF_ENABLE_STATS): {e.strerror}") from None
    for node in result["nodes"]:
        node["programs"] = {name: f for (n, name), f in sorted(runs.items()) if n == node["name"]}
    return result


def nat_table_use(maps, family: int) -> dict[str, int]:
    """How full a node's BPF SNAT table of one family is: entries (OUT and IN) of capacity."""
    # raw: a full table has half a million entries, and only their direction counts
    ctype = "struct hr_nat6_key *" if family == 6 else "struct hr_nat_key *"
    dirs = [st.ffi.from_buffer(ctype, k).dir for k, _ in maps.nat_raw_entries(family)]
    out_entries = sum(1 for d in dirs if d == st.NAT_DIR_VALUES["out"])
    return {"entries": len(dirs), "capacity": maps.nat_capacity(family),
            "out_entries": out_entries, "in_entries": len(dirs) - out_entries}


def counter_tables(by_family: dict[tuple[str, str], tuple[int, int]]) -> dict:
    """DatapathMaps.counters_by_family() as `stats` gives it: "counters", {reason: {packets,
    bytes}} of both families summed (what it gave before IPv6), and "counters_by_family",
    {family: {reason: {packets, bytes}}}, every family and reason present."""
    counters: dict[str, dict[str, int]] = {}
    families: dict[str, dict[str, dict[str, int]]] = {}
    for (family, reason), (packets, nbytes) in by_family.items():
        total = counters.setdefault(reason, {"packets": 0, "bytes": 0})
        total["packets"] += packets
        total["bytes"] += nbytes
        families.setdefault(family, {})[reason] = {"packets": packets, "bytes": nbytes}
    return {"counters": counters, "counters_by_family": families}


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
