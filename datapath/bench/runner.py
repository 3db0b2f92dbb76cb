"""The benchmark's labs and its sampling loop.

Every mode has a lab of its own, built side by side, so that one repetition
of a point runs every mode back to back (legacy, eBPF, limit, floor, in an
order that changes every repetition: a Williams square, see rotated()) with
no switching in between; the report pairs the modes within a repetition
(report.py). The labs:

- legacy: kernel routing, iptables MASQUERADE, conntrack (``<prefix>l``);
- ebpf: eBPF host routing over the same (``<prefix>e``);
- limit: a lab built with no mode at all, so no netfilter rule and no
  conntrack anywhere (``<prefix>c``). Same node: two namespaces joined by one
  veth; cross node: node to node over the bridge, the lab's own uplinks;
  pod to external: node to the external host, no NAT. A path the datapath
  cannot beat: eBPF above it beyond the noise is a bug in the bench;
- floor: a lab with no mode whose hooks hold only a constant redirect
  (floor.py), the redirect mechanism without the program's logic
  (``<prefix>f``).

After a point's repetitions, one more eBPF repetition runs with BPF run-time
stats on (a BPF_ENABLE_STATS fd held for that run only): what each program
costs per run on that path. It is not a sample: the stats' two clock reads per
program run stay out of the statistics, as perf does with ``--profile DIR``,
which adds one more repetition of every mode under perf record (perf.py).

``--ip-family 6`` builds every lab dual stack (the IPv6 plan of netns_lab/topology.py)
and runs the same matrix over IPv6: netperf -6 to the server's IPv6 address, the
same-node limit pair joined over LIMIT_IPS6 as well, the floor redirecting IPv6
(neighbour discovery left to the stack, as ARP is).

``--aa`` builds two identical legacy labs instead (``legacy`` and ``legacy-b``):
their ratio is the noise floor of the machine.

Nothing of ours runs during a sample but the path under test: the eBPF lab's
rule guard pauses its periodic work (rule_guard.pause) for each sample.
CPU cost is system + softirq time per CPU (/proc/stat, read every
``CPU_READ_S`` by a thread while netperf runs), taken over the part of the
run inside netperf's measurement (not its start, control connection or
teardown), and divided in report.py by what was transferred in that same
interval.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netns_lab import builder, netns
from netns_lab.state import load_state
from netns_lab.topology import load_topology

from . import netperf, node_profiles, tcp_counters

SCENARIOS = ("same-node", "cross-node", "pod-to-external")
MODES = ("legacy", "ebpf", "limit", "floor")
AA_MODES = ("legacy", "legacy-b")
LAB_SUFFIX = {"legacy": "l", "ebpf": "e", "limit": "c", "floor": "f", "legacy-b": "b"}
TESTS = netperf.WORKLOADS
SIZES = (64, 256, 1024, 4096, 16384, 65536)
QUICK = {"duration": 1.0, "repeat": 3, "sizes": (16384,),
         "tests": ("TCP_STREAM", "TCP_RR", "TCP_CRR")}
PINS = {"same-cpu": "0,0", "cross-cpu": "0,1"}   # netperf -T local,remote
# bench --cpu-pin: a PINS key, both of them, or none (the scheduler places them). Unpinned, the
# 2-core VMs this runs on put netperf and netserver on one CPU in some runs and on two in
# others, and a request/response test then measures the placement: TCP_RR 13,000-16,000
# trans/s on two CPUs (each wake-up of the other CPU costs tens of microseconds in a VM)
# against 90,000-200,000 on one, from one repetition to the next, in every mode alike.
PIN_CHOICES = (*PINS, "both", "none")


def default_pin() -> str:
    """Two CPUs where there are two, the way two pods of a node run; else none."""
    return "cross-cpu" if (os.cpu_count() or 1) >= 2 else "none"
LIMIT_IPS = ("198.18.255.1", "198.18.255.2")
LIMIT_IPS6 = ("2001:db8:ff::1", "2001:db8:ff::2")     # the same-node limit pair's, /64
IP_FAMILIES = (4, 6)
LAB_FAMILY = {4: None, 6: "dual"}   # --ip-family -> the labs' ip_family (None: the default)
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_READ_S = 0.1        # how often /proc/stat is read during a sample
START_EDGE_S = 0.15     # left out of the CPU window: netperf's start, control connection
END_EDGE_S = 0.05       # and the end of its measurement
GUARD_PAUSE_MARGIN_S = 60


@dataclass(frozen=True)
class Point:
    """One cell of the matrix; every mode is measured at it once per repetition."""
    rules: int
    scenario: str
    test: str
    size: int | None = None
    pin: str | None = None      # a PINS key: where netperf and netserver run

    def label(self) -> str:
        return " ".join(str(p) for p in (self.scenario, self.test, self.size and f"{self.size}B",
                                          self.pin) if p)


@dataclass
class BenchConfig:
    scenarios: tuple[str, ...] = SCENARIOS
    tests: tuple[str, ...] = TESTS
    sizes: tuple[int, ...] = SIZES
    duration: float = 5.0
    repeat: int = 10
    node_profile: str = "bare"      # node_profiles.parse: bare, kube-proxy:SxE, aks
    lab_prefix: str = "hrb"
    quick: bool = False
    aa: bool = False
    cpu_pin: str = field(default_factory=default_pin)    # a PIN_CHOICES value
    profile_dir: str | None = None  # bench --profile: a recording per point and mode there
    ip_family: int = 4              # 6: every lab dual stack, netperf over IPv6
    # bench --tcp-cc: every TCP test's congestion control (netperf -K, both ends), or
    # netperf.INHERIT_CC
    tcp_cc: str = netperf.DEFAULT_CC

    @property
    def congestion(self) -> str | None:
        """What netperf's -K gets: None leaves the namespaces' default."""
        return None if self.tcp_cc == netperf.INHERIT_CC else self.tcp_cc

    @property
    def modes(self) -> tuple[str, ...]:
        return AA_MODES if self.aa else MODES

    def workloads(self) -> list[tuple[str, int | None]]:
        """(test, size) of every workload, in run order."""
        return [(test, size) for test in self.tests
                for size in (self.sizes if test in netperf.SIZED
                             else (netperf.FIXED_SIZE.get(test),))]

    def points(self, rules: int = 0) -> list[Point]:
        """Every point in run order; ``rules``: the node profile's iptables rules per node."""
        pins = {"both": tuple(PINS), "none": (None,)}.get(self.cpu_pin, (self.cpu_pin,))
        return [Point(rules, scenario, test, size, pin) for scenario in self.scenarios
                for test, size in self.workloads() for pin in pins]

    def runs(self) -> int:
        """netperf runs of the whole matrix: the samples, the profiled repetitions and the
        program-cost run of each point."""
        per_point = len(self.modes) * (self.repeat + bool(self.profile_dir))
        return len(self.points()) * (per_point + ("ebpf" in self.modes))


def rotated(modes: tuple[str, ...], rep: int) -> tuple[str, ...]:
    """The order of the modes in repetition ``rep``, rotated by one each repetition so that
    each mode goes first in turn; a plain rotation keeps every mode behind the same one
    (eBPF always right after legacy), so the rows are a Williams square: over ``len(modes)``
    repetitions (twice that for an odd count) every mode also follows every other once,
    and what one mode leaves behind (a warm cache, a busy softirq) falls on all alike."""
    n = len(modes)
    first = [0]
    for i in range(1, n):               # 0, 1, n-1, 2, n-2, ...
        first.append((i + 1) // 2 if i % 2 else n - i // 2)
    order = [modes[(x + rep) % n] for x in first]
    if n % 2 and (rep // n) % 2:
        order.reverse()
    return tuple(order)


@dataclass
class Sample:
    rules: int
    scenario: str
    mode: str
    test: str
    size: int | None
    repeat: int
    values: dict[str, float]
    seconds: float              # wall time of the netperf run
    cpu_s: float                # system + softirq, all CPUs, over cpu_window_s
    cpu_window_s: float = 0.0   # the part of netperf's measurement CPU was read over
    cpu_by_cpu: list[float] = field(default_factory=list)
    steal_s: float = 0.0        # stolen by the hypervisor over the same window
    pin: str | None = None
    started_at: float = field(default_factory=time.time)     # when netperf was started
    # eBPF, the program-cost run only (Bench.record_program_costs): {"node/program":
    # prog_stats.figures()} over the netperf run (ns_per_run per packet)
    bpf_programs: dict = field(default_factory=dict)
    transactions: int | None = None     # a counted test's (netperf.COUNTED) count
    # TCP_STREAM (xN): the change of the client's sent and retransmitted segments and of
    # the server's out-of-order queued skbs over the run (tcp_counters)
    tcp: dict = field(default_factory=dict)
    congestion: str | None = None       # TCP tests: what both ends ran (netperf read it back)


# -- the machine -----------------------------------------------------------------------------

def read_proc_stat() -> tuple[list[int], int]:
    """(system + softirq jiffies per CPU, steal jiffies of all CPUs)."""
    per_cpu, steal = [], 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            fields = line.split()
            if fields[0] == "cpu":
                steal = int(fields[8])
            else:
                per_cpu.append(int(fields[3]) + int(fields[7]))
    return per_cpu, steal


class CpuReader:
    """/proc/stat every CPU_READ_S while a test runs, for ``between`` to cut a window from."""

    def __init__(self, interval: float = CPU_READ_S):
        self.interval = interval
        self.readings: list[tuple[float, list[int], int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while True:
            self.readings.append((time.monotonic(), *read_proc_stat()))
            if self.stop.wait(self.interval):
                break

    def __enter__(self) -> "CpuReader":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.readings.append((time.monotonic(), *read_proc_stat()))

    def between(self, start: float, end: float) -> tuple[float, list[float], float]:
        """(seconds, system + softirq per CPU, steal) between the first reading at or after
        ``start`` and the last at or before ``end``; all CPU figures in seconds."""
        inside = [r for r in self.readings if start <= r[0] <= end]
        if len(inside) < 2:     # a run too short for the interval: take it whole
            inside = [self.readings[0], self.readings[-1]]
        (t0, cpu0, st0), (t1, cpu1, st1) = inside[0], inside[-1]
        return (t1 - t0, [(b - a) / CLK_TCK for a, b in zip(cpu0, cpu1)],
                (st1 - st0) / CLK_TCK)


def _mitigations() -> dict[str, str]:
    d = Path("/sys/devices/system/cpu/vulnerabilities")
    try:
        return {p.name: p.read_text().strip() for p in sorted(d.iterdir())}
    except OSError:
        return {}


def environment(cfg: BenchConfig) -> dict:
    from datapath import prog_stats
    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    try:
        import bcc
        bcc_version = getattr(bcc, "__version__", None)
    except ImportError:
        bcc_version = None
    return {
        "kernel": platform.release(), "kernel_version": platform.version(), "cpu": cpu,
        "cores": os.cpu_count(), "mitigations": _mitigations(),
        "python": platform.python_version(), "bcc": bcc_version,
        "netperf": version(["netperf", "-V"]), "iptables": version(["iptables", "--version"]),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "modes": list(cfg.modes),
        # on: every sample's BPF programs paid the stats' clock reads (report.py says so)
        "bpf_stats_sysctl": prog_stats.stats_enabled(),
        "started_at": time.time(),
    }


def namespace_sysctls(ns: str) -> dict[str, str]:
    """The net.* sysctls of a namespace (those that are per namespace), as sysctl prints them."""
    proc = netns.run(ns, ["sysctl", "-a", "-r", r"^net\."], check=False)
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            out[key] = value.strip()
    return out


def _default_key(key: str) -> str:
    """A per-device key (net.ipv4.conf.eth0.x, net.ipv4.neigh.eth0.x) as its 'default' twin."""
    parts = key.split(".")
    if len(parts) > 4 and parts[2] in ("conf", "neigh") and parts[3] not in ("all", "default"):
        return ".".join(parts[:3] + ["default"] + parts[4:])
    return key


def sysctl_differences(values: dict[str, str], fresh: dict[str, str]) -> dict[str, str]:
    """What a namespace has that a fresh one has not (per-device keys against 'default';
    a device's IPv6 mtu is its link's MTU, recorded with the offloads' devices, not a setting)."""
    return {k: v for k, v in sorted(values.items())
            if (f := fresh.get(k, fresh.get(_default_key(k)))) is not None and f != v
            and not (k != _default_key(k) and k.endswith(".mtu"))}


def device_offloads(ns: str) -> dict[str, dict[str, str]]:
    """``ethtool -k`` of every device of a namespace: {device: {feature: on/off[ fixed]}}."""
    with netns.ipr(ns) as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    out = {}
    for dev in names:
        proc = netns.run(ns, ["ethtool", "-k", dev], check=False)
        feats = {}
        for line in proc.stdout.splitlines()[1:]:
            key, sep, value = line.strip().partition(": ")
            if sep:
                feats[key] = value.strip()
        out[dev] = feats
    return out


# -- the labs --------------------------------------------------------------------------------

class Bench:
    """The labs of one run (one per mode), the limit pair, the floor and the netservers."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.labs = {mode: f"{cfg.lab_prefix}{LAB_SUFFIX[mode]}" for mode in cfg.modes}
        self.topos: dict = {}
        self.servers: list[netperf.Netserver] = []
        self.floor = None
        self.limit_ns: tuple[str, str] | None = None
        self.retries: list[dict] = []      # runs that failed once and were repeated
        self.profile = node_profiles.parse(cfg.node_profile)
        self.profile_applied: dict[str, dict] = {}   # per lab, node_profiles.configure's record
        # the transaction count of each counted test (netperf.COUNTED) per point and mode
        self.counts: dict[tuple[Point, str], int] = {}

    def setup(self, say=print) -> None:
        netperf.require_netperf()
        if self.cfg.profile_dir:
            from . import perf
            perf.require_perf()
        family = self.cfg.ip_family
        for mode, lab in self.labs.items():
            topo = load_topology(lab, ip_family=LAB_FAMILY[family])
            # the legacy and eBPF labs get the node profile; limit, floor: no mode, no profile
            kind = {"ebpf": "ebpf", "legacy": "legacy", "legacy-b": "legacy"}.get(mode)
            configure = kind and node_profiles.configure(
                kind, self.profile, self.profile_applied.setdefault(lab, {}))
            builder.lab_up(topo, configure)
            self.topos[mode] = topo
            say(f"lab {lab} up ({mode})")
        if "limit" in self.labs:
            six = {"ip6": LIMIT_IPS6} if family == 6 else {}     # an IPv4 run: as before
            self.limit_ns = builder.add_veth_pair(self.labs["limit"], "lima", "limb", *LIMIT_IPS,
                                                  **six)
        if "floor" in self.labs:
            from .floor import Floor
            self.floor = Floor(self.topos["floor"], family)
            self.floor.route_replies()
            for scenario in self.cfg.scenarios:     # compiled now, not between two samples
                self.floor.load(scenario)
        server_ns = set()
        for scenario in self.cfg.scenarios:
            for mode in self.labs:
                server_ns.add(self.server_netns(scenario, mode))
        for ns in sorted(server_ns):
            self.servers.append(netperf.Netserver(ns, family=family))

    def ebpf_program_ids(self) -> dict[str, int]:
        """{"node/program": id} of the eBPF lab's datapath, read before each sample."""
        from datapath.switch import node_programs
        topo = self.topos["ebpf"]
        return {f"{node.name}/{name}": prog_id for node in topo.nodes
                for name, prog_id in node_programs(topo, node).items()}

    def teardown(self) -> None:
        for server in self.servers:
            server.close()
        if self.floor:
            self.floor.close()
        # only the labs this run built: a lab that was there already (lab up refused to
        # build over it) is someone else's, named like ours or not
        for topo in self.topos.values():
            builder.lab_down(topo.lab)

    def target(self, scenario: str, mode: str) -> tuple[str, str]:
        """(client namespace, server address) of a scenario in a mode: the server's IPv4
        address, or with --ip-family 6 its IPv6 one."""
        topo = self.topos[mode]
        (a1, a2), (b1, _) = topo.nodes[0].pods[:2], topo.nodes[1].pods[:2]
        six = self.cfg.ip_family == 6

        def addr(item) -> str:
            return item.ip6 if six else item.ip
        if mode == "limit":
            return {"same-node": (self.limit_ns[0], (LIMIT_IPS6 if six else LIMIT_IPS)[1]),
                    "cross-node": (topo.nodes[0].netns, addr(topo.nodes[1])),
                    "pod-to-external": (topo.nodes[0].netns, addr(topo.external))}[scenario]
        return {"same-node": (a1.netns, addr(a2)), "cross-node": (a1.netns, addr(b1)),
                "pod-to-external": (a1.netns, addr(topo.external))}[scenario]

    def server_netns(self, scenario: str, mode: str) -> str:
        topo = self.topos[mode]
        if mode == "limit":
            return {"same-node": self.limit_ns[1], "cross-node": topo.nodes[1].netns,
                    "pod-to-external": topo.external.netns}[scenario]
        return {"same-node": topo.nodes[0].pods[1].netns,
                "cross-node": topo.nodes[1].pods[0].netns,
                "pod-to-external": topo.external.netns}[scenario]

    def empty_connection_tables(self, mode: str) -> None:
        """Conntrack of a legacy lab's nodes, the BPF SNAT tables of the eBPF nodes.

        Each sample starts with empty tables. Without this a run of TCP_CRR
        samples (10,000 connections a second, each held 120 s in TIME_WAIT by
        conntrack) fills the legacy nodes' conntrack table (nf_conntrack_max,
        262,144 here) within half a minute, after which the kernel drops new
        connections ("nf_conntrack: table full") and netperf stalls: that
        measures the table's size, not the path. docs/benchmarks.md reports it.
        Only the bench's own flows go: a node profile's conntrack fill stays.
        The limit and floor labs track nothing.
        """
        from datapath import nat_table, switch
        topo = self.topos[mode]
        if mode in ("legacy", "legacy-b"):
            for node in topo.nodes:
                node_profiles.delete_bench_flows(node.netns, self.cfg.ip_family)
        elif mode == "ebpf":
            for node in topo.nodes:
                with switch.node_maps(load_state(topo.lab), node) as maps:
                    nat_table.flush(maps)

    def record_lab_settings(self) -> dict:
        """Every lab sysctl that differs from a fresh namespace's, and every device's offloads."""
        lab = next(iter(self.labs.values()))
        fresh = f"{lab}-fresh"
        state = load_state(lab)
        state.namespaces.append(fresh)       # recorded first: removed with the lab whatever happens
        state.save()
        netns.create(fresh)
        try:
            defaults = namespace_sysctls(fresh)
        finally:
            netns.remove(fresh)
        # a namespace's default congestion control is the host's, so a fresh one has it too:
        # recorded here, beside what the TCP tests ran with
        out = {"sysctls": {}, "offloads": {}, "tcp_congestion_control": {
            "tests": self.cfg.tcp_cc,
            "namespace_default": defaults.get("net.ipv4.tcp_congestion_control")}}
        for ns in sorted({n for topo in self.topos.values() for n in topo.namespaces}
                         | set(self.limit_ns or ())):
            diff = sysctl_differences(namespace_sysctls(ns), defaults)
            if diff:
                out["sysctls"][ns] = diff
            out["offloads"][ns] = device_offloads(ns)
        out["attach"] = self.attach_modes()
        return out

    def attach_modes(self) -> dict[str, str]:
        """{"node/device": "tcx" | "clsact"} of every attach point of the eBPF lab's
        datapath: how its programs hang on the hooks the samples go through."""
        if "ebpf" not in self.topos:
            return {}
        from datapath import observe, tc_attach
        topo = self.topos["ebpf"]
        return {f"{node.name}/{dev}": ",".join(sorted({a.mode for a in found})) or "none"
                for node in topo.nodes for dev, _ in observe.attach_points(topo, node)
                for found in [tc_attach.attached(node.netns, dev, "ingress")]}

    def transactions(self, point: Point, mode: str, ns: str, host: str) -> int | None:
        """The count of a counted test at a point in a mode: from a short first run (not a
        sample), what lasts the configured duration; the same count in every repetition."""
        if point.test not in netperf.COUNTED:
            return None
        if (point, mode) not in self.counts:
            first = netperf.run_test(ns, host, point.test, self.cfg.duration, point.size,
                                     cpus=PINS.get(point.pin),
                                     transactions=netperf.CALIBRATION_TRANSACTIONS,
                                     family=self.cfg.ip_family,
                                     congestion=self.cfg.congestion)
            self.counts[point, mode] = netperf.transactions_for(
                netperf.CALIBRATION_TRANSACTIONS / first.measured_s, self.cfg.duration)
        return self.counts[point, mode]

    def record_profile(self, point: Point, mode: str) -> dict:
        """One more repetition of a point in a mode, under perf record; not a sample. A
        failure of perf is recorded, and the run goes on."""
        from . import perf
        size = point.size if point.test in netperf.SIZED else None
        stem = perf.file_stem(point.scenario, point.test, size, point.pin, mode)
        path = Path(self.cfg.profile_dir) / f"{stem}.perf.data"
        entry = {**asdict(point), "mode": mode}
        try:
            with perf.Recording(path) as recording:
                sample = self.measure(point, mode, self.cfg.repeat, around=recording.enabled)
            entry["values"] = sample.values
            entry.update(perf.summarise(path, f"{point.label()}, {mode}"))
        except perf.ProfileError as e:
            entry["error"] = str(e)
        return entry

    def record_program_costs(self, point: Point) -> dict:
        """One more eBPF repetition of a point with BPF run-time stats on (through a
        BPF_ENABLE_STATS fd held for this run only; the sysctl is left alone): each program's
        runs and ns per run on the point's path. Not a sample: the price of the stats, two
        clock reads per program run (every BPF program on the machine pays it while the fd
        is open), stays out of the statistics."""
        from datapath import prog_stats
        with prog_stats.enable_stats():
            sample = self.measure(point, "ebpf", self.cfg.repeat, programs=True)
        return {**asdict(point), "values": sample.values, "seconds": sample.seconds,
                "bpf_programs": sample.bpf_programs}

    def measure(self, point: Point, mode: str, rep: int, around=None,
                programs: bool = False) -> Sample:
        """One sample; ``around``: a context manager factory wrapped round the netperf run
        (perf's recording); ``programs``: read the eBPF lab's program stats before and after
        (record_program_costs, which turns them on)."""
        ns, host = self.target(point.scenario, mode)
        if mode == "floor":
            self.floor.use(point.scenario)
        guard_labs = [lab for m, lab in self.labs.items() if m == "ebpf"]
        try:
            try:
                return self._measure_once(point, mode, rep, ns, host, guard_labs, around,
                                          programs)
            except (netperf.NetperfError, netns.NetnsError) as first:
                # one more try: a run that hangs or fails once should not cost the whole
                # bench; a second failure is real and ends it
                self.retries.append({"scenario": point.scenario, "mode": mode,
                                     "test": point.test, "size": point.size, "repeat": rep,
                                     "error": str(first)})
                return self._measure_once(point, mode, rep, ns, host, guard_labs, around,
                                          programs)
        finally:
            from datapath import rule_guard
            for lab in guard_labs:
                rule_guard.resume(lab)

    def _measure_once(self, point: Point, mode: str, rep: int, ns: str, host: str,
                      guard_labs: list[str], around=None, programs: bool = False) -> Sample:
        from datapath import prog_stats, rule_guard
        duration = self.cfg.duration
        count = self.transactions(point, mode, ns, host)
        self.empty_connection_tables(mode)
        progs = self.ebpf_program_ids() if programs and mode == "ebpf" else {}
        runs_before = prog_stats.read_programs(progs)
        tcp = (tcp_counters.Around(ns, self.server_netns(point.scenario, mode))
               if point.test.startswith("TCP_STREAM") else None)
        for lab in guard_labs:
            rule_guard.pause(lab, duration + GUARD_PAUSE_MARGIN_S)
        if tcp:
            tcp.before()
        started_at = time.time()
        with around() if around else contextlib.nullcontext(), CpuReader() as cpu:
            started = time.monotonic()
            result = netperf.run_test(ns, host, point.test, duration, point.size,
                                      cpus=PINS.get(point.pin), transactions=count,
                                      family=self.cfg.ip_family,
                                      congestion=self.cfg.congestion)
        if tcp:
            tcp.after()
        # netperf measures for `duration` (a counted run: its elapsed time) once its control
        # connection is up, a few ms after it starts; its report can come later, so the
        # window is counted from the start, its edges left out
        begin = started + max(START_EDGE_S, result.measured_from)
        window, by_cpu, steal = cpu.between(
            begin, started + result.measured_from + result.measured_s - END_EDGE_S)
        return Sample(point.rules, point.scenario, mode, point.test, point.size, rep,
                      result.values, result.seconds, sum(by_cpu), window, by_cpu, steal,
                      point.pin, started_at,
                      prog_stats.figures(progs, prog_stats.read_programs(progs), runs_before),
                      count, tcp.delta if tcp else {}, result.congestion)


def run_bench(cfg: BenchConfig, on_sample=None, progress=None) -> dict:
    """Run the whole matrix; returns {"environment", "lab_settings", "samples"} (the summary
    is added by the report). A congestion control the kernel lacks is a ValueError before
    any lab is built."""
    if cfg.congestion:
        netperf.check_congestion(cfg.congestion)
    bench = Bench(cfg)
    samples: list[Sample] = []
    profiles: list[dict] = []
    program_costs: list[dict] = []
    env = environment(cfg)
    settings: dict = {}
    _, steal_before = read_proc_stat()
    try:
        bench.setup(say=(progress.log if progress else print))
        settings = bench.record_lab_settings()
        task = progress.add_task("starting", total=cfg.runs()) if progress else None
        rules = max((a.get("rules_per_node", 0) for a in bench.profile_applied.values()),
                    default=0)
        for point in cfg.points(rules):
            for rep in range(cfg.repeat):
                for mode in rotated(cfg.modes, rep):
                    if progress:
                        progress.update(task, description=f"{point.label()} {mode} "
                                        f"({rep + 1}/{cfg.repeat})")
                    sample = bench.measure(point, mode, rep)
                    samples.append(sample)
                    if on_sample:
                        on_sample(sample)
                    if progress:
                        progress.advance(task)
            if "ebpf" in cfg.modes:
                if progress:
                    progress.update(task, description=f"{point.label()} ebpf (BPF stats)")
                program_costs.append(bench.record_program_costs(point))
                if progress:
                    progress.advance(task)
            if cfg.profile_dir:
                for mode in cfg.modes:
                    if progress:
                        progress.update(task, description=f"{point.label()} {mode} (perf record)")
                    profiles.append(bench.record_profile(point, mode))
                    if progress:
                        progress.advance(task)
            if progress and not progress.console.is_terminal:
                # a piped or logged run has no live bar: a line per point shows it moves
                progress.log(f"{point.label()}: {cfg.repeat} repetitions of "
                             f"{', '.join(cfg.modes)} done")
    finally:
        bench.teardown()
        env["finished_at"] = time.time()
        env["steal_s"] = (read_proc_stat()[1] - steal_before) / CLK_TCK
        env["retried_runs"] = bench.retries
        env["node_profile"] = {"name": bench.profile.name, "labs": bench.profile_applied}
    result = {"environment": env, "lab_settings": settings,
              "samples": [asdict(s) for s in samples], "program_costs": program_costs}
    if cfg.profile_dir:
        result["profiles"] = profiles
    return result
