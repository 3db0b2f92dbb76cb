"""Prometheus metrics of the labs: datapath counters, NAT tables, program run time, mode,
rule guard and events, for ``hostrouting metrics serve`` and ``hostrouting metrics dump``.

A prometheus_client custom collector reads the lab states, the BPF maps and the event
logs when it is scraped: no polling loop, so /metrics shows what the maps hold at that
moment. The list of metrics and example queries are in docs/metrics.md.

Counters must never go down while the exporter lives (Prometheus reads a decrease as a
restart of the target), but the datapath's counters start from zero at every ``enable``
(new programs, new maps) and a program's run time with it. So every counter series keeps
an offset: when the series' source changes (another program id) or its value drops, the
last value read is added to the offset. In legacy mode a lab's datapath counters stay at
their last totals. A lab that goes away takes its series with it; one that appears (with
``--all-labs``, or the named lab made again) is read from the next scrape on.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

from netns_lab.state import LabStateError, events_path, lab_names, load_state
from netns_lab.topology import Topology

DEFAULT_LISTEN = "127.0.0.1:9962"     # Cilium's agent metrics port
FROM_POD, FROM_UNDERLAY = "from_pod", "from_underlay"
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}     # DatapathMaps.nat_families() -> the family label
MODES = ("legacy", "ebpf")
#: verdict kind (shared_types.reason_kind) -> what the metric's HELP says of the packets
_VERDICT_KINDS = {"forward": "forwarded by BPF (redirected, or answered: icmp_frag_needed)",
                  "drop": "dropped by BPF",
                  "stack": "handed to the kernel's stack by BPF"}


class MetricsError(RuntimeError):
    """The exporter cannot start as asked (address in use, not this machine's)."""


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as [ADDR]:PORT; PORT 0: any free port) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError
        if host != "localhost":
            ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT with an IP address and a port "
                         f"0-65535, e.g. {DEFAULT_LISTEN}") from None
    return host, int(port)


def _attached(topo: Topology, node) -> dict[str, int]:
    """{program: id} of the datapath attached on a node now ({}: none): from_underlay on
    the uplink (its maps are the node's), then from_pod on one pod's veth (all have the
    same). Read from the devices (TCX programs and clsact filters), as `status` does, not
    from the lab's record: a query of the kernel each, so the caller keeps the answer while
    those programs live."""
    from . import tc_attach
    found: dict[str, int] = {}
    for ifname, program in ((topo.uplink_ifname, FROM_UNDERLAY),
                            *((pod.host_ifname, FROM_POD) for pod in node.pods[:1])):
        try:
            attached = tc_attach.attached_programs(node.netns, ifname, "ingress")
        except tc_attach.TcError:   # the node is going away
            break
        ids = [prog_id for prog_id, name in attached if name == program]
        if not ids:
            break                   # legacy (one tc call), or half switched
        found[program] = ids[0]
    return found


def count_verdicts(totals: "Totals", node: str, counters: dict, source) -> None:
    """A node's DatapathMaps.counters_by_family_hook() into the verdict series of `totals`:
    (kind, "packets" / "bytes", node, family, hook, reason)."""
    from .shared_types import reason_kind
    for (family, hook, reason), (packets, nbytes) in counters.items():
        kind = reason_kind(reason)
        totals.update((kind, "packets", node, family, hook, reason), packets, source)
        totals.update((kind, "bytes", node, family, hook, reason), nbytes, source)


class Totals:
    """Counter series that never go down for the exporter's lifetime.

    A series is read as (raw value, source): when its source changes (the program id:
    new programs count from zero) or its raw value drops (maps reset), the last raw
    value moves into the series' offset.
    """

    def __init__(self):
        self._series: dict[tuple, list] = {}    # key -> [source, last raw, offset]

    def update(self, key: tuple, raw: int, source) -> None:
        seen = self._series.get(key)
        if seen is None:
            self._series[key] = [source, raw, 0]
            return
        if source != seen[0] or raw < seen[1]:
            seen[2] += seen[1]
        seen[0], seen[1] = source, raw

    def value(self, key: tuple) -> int:
        _, raw, offset = self._series[key]
        return raw + offset

    def keys(self) -> list[tuple]:
        return sorted(self._series, key=repr)


@dataclass
class _EventTally:
    """A lab's event log read as far as it has been, counted by (type, reason), and
    blocked firewall changes by (node, backend)."""
    offset: int = 0
    events: dict[tuple[str, str], int] = field(default_factory=dict)
    blocked: dict[tuple[str, str], int] = field(default_factory=dict)

    def read_new(self, lab: str) -> None:
        try:
            with open(events_path(lab), "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1         # a line still being written: next time
        self.offset += end
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            key = (str(event.get("type", "")), str(event.get("reason", "")))
            self.events[key] = self.events.get(key, 0) + 1
            details = event.get("details") or {}
            if key[1] == "BlockedRule" and details.get("blocked"):
                node = str(event.get("object", "")).removeprefix("node/")
                bkey = (node, str(details.get("backend", "")))
                self.blocked[bkey] = self.blocked.get(bkey, 0) + 1


@dataclass
class _Lab:
    """What the exporter remembers of one lab (dropped when the lab goes away)."""
    created_at: float
    totals: Totals = field(default_factory=Totals)
    tally: _EventTally = field(default_factory=_EventTally)
    # {node: {program: id}} as last found attached (kept while those programs live)
    programs: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class _Reading:
    """One scrape's view of one lab."""
    name: str
    mode: str
    guard_up: bool
    # (node, family) -> NAT table entries, capacity, ports
    nat: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)


class DatapathCollector:
    """The custom collector: `labs` names the labs to export (None: every lab)."""

    def __init__(self, labs: list[str] | None = None):
        self.labs = labs
        self._known: dict[str, _Lab] = {}
        self._lock = threading.Lock()    # scrapes may come in parallel

    def collect(self) -> Iterator:
        with self._lock:
            readings = self._read_all()
            families = self._families(readings)
        yield from families

    # reading --------------------------------------------------------------------------------

    def _read_all(self) -> list[_Reading]:
        present = set(lab_names())
        names = sorted(present) if self.labs is None else [n for n in self.labs if n in present]
        for gone in set(self._known) - set(names):
            del self._known[gone]
        readings = []
        for name in names:
            try:
                state = load_state(name)
            except LabStateError:       # removed meanwhile
                self._known.pop(name, None)
                continue
            readings.append(self._read_lab(state))
        return readings

    def _read_lab(self, state) -> _Reading:
        from . import rule_guard
        topo = Topology.from_dict(state.topology)
        lab = self._known.get(state.name)
        if lab is None or lab.created_at != state.created_at:   # new, or made again
            lab = self._known[state.name] = _Lab(created_at=state.created_at)
        reading = _Reading(name=state.name, mode=state.mode,
                           guard_up=rule_guard.find(state.name).live)
        for node in topo.nodes:
            known = lab.programs.get(node.name)
            if known and self._read_node(node, known, lab, reading, topo.has_ipv6):
                continue
            # not looked for yet, none attached at the last look, or replaced since
            found = lab.programs[node.name] = _attached(topo, node)
            if found:
                self._read_node(node, found, lab, reading, topo.has_ipv6)
        lab.tally.read_new(state.name)
        return reading

    @staticmethod
    def _read_node(node, programs: dict[str, int], lab: _Lab, reading: _Reading,
                   ipv6: bool = False) -> bool:
        """The node's counters, NAT tables (the IPv6 one too in a lab with IPv6) and program
        stats into `lab` and `reading`; False when the programs are gone."""
        from . import prog_stats
        from .host_routing import DatapathError, DatapathMaps
        source = programs[FROM_UNDERLAY]    # new with every enable, as the maps
        try:
            with DatapathMaps.from_prog_id(source) as maps:     # every map metrics need
                counters = maps.counters_by_family_hook()
                cfg = maps.config()
                ports = cfg.nat["nat_port_max"] - cfg.nat["nat_port_min"] + 1
                nat = {FAMILY_NAMES[f]: (len(maps.nat_raw_entries(f)), maps.nat_capacity(f), ports)
                       for f in maps.nat_families() if f == 4 or ipv6}
        except (OSError, DatapathError):
            return False
        count_verdicts(lab.totals, node.name, counters, source)
        for family, figures in nat.items():
            reading.nat[(node.name, family)] = figures
        for program, prog_id in programs.items():
            try:
                run_ns, runs = prog_stats.program_stats_by_id(prog_id)
            except OSError:
                continue
            lab.totals.update(("program", "run_ns", node.name, program), run_ns, prog_id)
            lab.totals.update(("program", "runs", node.name, program), runs, prog_id)
        return True

    # exposition -----------------------------------------------------------------------------

    def _families(self, readings: list[_Reading]) -> list:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from . import prog_stats
        verdicts = {(kind, unit): CounterMetricFamily(
                        f"hostrouting_{kind}_{unit}", f"{unit.capitalize()} {what}, by address "
                        "family, program (hook) and reason",
                        labels=["lab", "node", "family", "hook", "reason"])
                    for kind, what in _VERDICT_KINDS.items() for unit in ("packets", "bytes")}
        run_seconds = CounterMetricFamily(
            "hostrouting_program_run_seconds", "Time spent in each datapath program, counted "
            "while BPF stats are on (hostrouting_bpf_stats_enabled)",
            labels=["lab", "node", "program"])
        runs = CounterMetricFamily(
            "hostrouting_program_runs", "Runs of each datapath program, counted while BPF "
            "stats are on (hostrouting_bpf_stats_enabled)", labels=["lab", "node", "program"])
        nat_entries = GaugeMetricFamily("hostrouting_nat_entries", "Entries in the node's "
                                        "BPF SNAT table of a family (two per flow)",
                                        labels=["lab", "node", "family"])
        nat_capacity = GaugeMetricFamily("hostrouting_nat_capacity", "Entries the node's BPF "
                                         "SNAT table of a family can hold",
                                         labels=["lab", "node", "family"])
        nat_ports = GaugeMetricFamily("hostrouting_nat_port_range_size", "NAT ports per "
                                      "destination the node allocates from (each family)",
                                      labels=["lab", "node", "family"])
        mode = GaugeMetricFamily("hostrouting_mode", "1 for the routing mode the lab's record "
                                 "asks for (mixed: its nodes differ), 0 for the others; what "
                                 "the kernel has is hostrouting status", labels=["lab", "mode"])
        guard = GaugeMetricFamily("hostrouting_rule_guard_up", "1 while the lab's rule guard "
                                  "(firewall freeze, NAT sweep) runs", labels=["lab"])
        events = CounterMetricFamily("hostrouting_events", "Events recorded for the lab "
                                     "(hostrouting events)", labels=["lab", "type", "reason"])
        blocked = CounterMetricFamily("hostrouting_blocked_rules", "Firewall changes in node "
                                      "namespaces blocked while eBPF host routing is on",
                                      labels=["lab", "node", "backend"])
        stats_on = GaugeMetricFamily("hostrouting_bpf_stats_enabled", "1 when the sysctl "
                                     "kernel.bpf_stats_enabled is on (BPF_ENABLE_STATS fds held "
                                     "by other processes are not seen)")
        stats_on.add_metric([], 1 if prog_stats.stats_enabled() else 0)

        for r in readings:
            lab = self._known[r.name]
            for key in lab.totals.keys():
                value = lab.totals.value(key)
                if key[0] == "program":
                    _, what, node, program = key
                    if what == "run_ns":
                        run_seconds.add_metric([r.name, node, program], value / 1e9)
                    else:
                        runs.add_metric([r.name, node, program], value)
                else:
                    kind, unit, node, family, hook, reason = key
                    verdicts[(kind, unit)].add_metric([r.name, node, family, hook, reason],
                                                      value)
            for (node, family), (entries, capacity, ports) in r.nat.items():
                nat_entries.add_metric([r.name, node, family], entries)
                nat_capacity.add_metric([r.name, node, family], capacity)
                nat_ports.add_metric([r.name, node, family], ports)
            for m in dict.fromkeys((*MODES, r.mode)):
                mode.add_metric([r.name, m], 1 if m == r.mode else 0)
            guard.add_metric([r.name], 1 if r.guard_up else 0)
            for (type_, reason), n in sorted(lab.tally.events.items()):
                events.add_metric([r.name, type_, reason], n)
            for (node, backend), n in sorted(lab.tally.blocked.items()):
                blocked.add_metric([r.name, node, backend], n)
        return [*verdicts.values(), nat_entries, nat_capacity, nat_ports, run_seconds, runs,
                stats_on, mode, guard, events, blocked]


def _registry(labs: list[str] | None):
    from prometheus_client import CollectorRegistry
    for name in labs or []:
        load_state(name)        # an unknown lab: one clear error before anything starts
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatapathCollector(labs))
    return registry


def dump(labs: list[str] | None) -> str:
    """/metrics once, in the Prometheus text format."""
    from prometheus_client import generate_latest
    return generate_latest(_registry(labs)).decode()


def serve(labs: list[str] | None, listen: tuple[str, int],
          announce: Callable[[str], None] = print) -> int:
    """Serve /metrics until SIGTERM or Ctrl-C (the CLI turns both into KeyboardInterrupt)."""
    from prometheus_client import start_http_server
    registry = _registry(labs)
    host, port = listen
    shown = f"[{host}]" if ":" in host else host
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        why = {errno.EADDRINUSE: "the port is in use (another exporter? pick another port)",
               errno.EADDRNOTAVAIL: "not an address of this machine"}.get(e.errno, e.strerror)
        raise MetricsError(f"cannot listen on {shown}:{port}: {why}") from None
    what = "every lab" if labs is None else "lab " + ", ".join(labs)
    announce(f"serving metrics of {what} on http://{shown}:{server.server_port}/metrics")
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0
