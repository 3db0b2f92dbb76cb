"""The benchmark's labs and its sampling loop.

Two labs of the same shape are built side by side, one per mode, so modes
can be interleaved point by point (legacy, eBPF, limit; the order reversed
on every other repetition) with no switching in between; the machine's noise
then lands on every mode alike. The limit of each scenario is measured in the
same run: two namespaces joined by one veth pair (same node), node to node
over the underlay (cross node), node to the external host without NAT
(external).

CPU cost is the machine's system + softirq time (from /proc/stat) during each
test, divided by its transactions or gigabytes (in report.py): every namespace
shares the same cores, so this is what the packet path costs, whichever side
pays.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field

from netns_lab import builder, netns
from netns_lab.state import load_state
from netns_lab.topology import load_topology

from . import netperf

SCENARIOS = ("same-node", "cross-node", "pod-to-external")
MODES = ("legacy", "ebpf", "limit")
TESTS = ("TCP_STREAM", "TCP_RR", "TCP_CRR")
SIZES = (64, 256, 1024, 4096, 16384, 65536)
QUICK = {"duration": 1.0, "repeat": 2, "sizes": (64, 16384)}
LIMIT_IPS = ("198.18.255.1", "198.18.255.2")
SERVICE_NET = "198.18.240.0/20"  # where fake kube-proxy rules point, never matched
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class BenchConfig:
    scenarios: tuple[str, ...] = SCENARIOS
    tests: tuple[str, ...] = TESTS
    sizes: tuple[int, ...] = SIZES
    duration: float = 5.0
    repeat: int = 3
    iptables_rules: tuple[int, ...] = (0,)
    lab_prefix: str = "hrb"
    quick: bool = False

    def points(self) -> list[tuple[int, str, str, int | None]]:
        """(rules, scenario, test, size) in run order; modes are interleaved inside each."""
        pts = []
        for rules in self.iptables_rules:
            for scenario in self.scenarios:
                for test in self.tests:
                    for size in (self.sizes if test == "TCP_STREAM" else (None,)):
                        pts.append((rules, scenario, test, size))
        return pts

    def runs(self) -> int:
        return len(self.points()) * len(MODES) * self.repeat


@dataclass
class Sample:
    rules: int
    scenario: str
    mode: str
    test: str
    size: int | None
    repeat: int
    values: dict[str, float]
    seconds: float
    cpu_s: float
    started_at: float = field(default_factory=time.time)


def environment(cfg: BenchConfig) -> dict:
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
        "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "bcc": bcc_version,
        "netperf": version(["netperf", "-V"]), "iptables": version(["iptables", "--version"]),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "started_at": time.time(),
    }


def _cpu_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[3]) + int(fields[7])  # system + softirq


class Bench:
    """The two labs, the limit pair and the netservers, for one run."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.labs = {"legacy": f"{cfg.lab_prefix}l", "ebpf": f"{cfg.lab_prefix}e"}
        self.topos: dict = {}
        self.servers: list[netperf.Netserver] = []
        self.retries: list[dict] = []      # runs that failed once and were repeated

    def setup(self, say=print) -> None:
        from datapath.switch import configure_mode
        netperf.require_netperf()
        for mode, lab in self.labs.items():
            topo = load_topology(lab)
            builder.lab_up(topo, configure_mode(mode))
            self.topos[mode] = topo
            say(f"lab {lab} up ({mode})")
        self.limit_ns = builder.add_veth_pair(self.labs["legacy"], "lima", "limb", *LIMIT_IPS)
        server_ns = {self.limit_ns[1]}
        for topo in self.topos.values():
            server_ns |= {topo.nodes[0].pods[1].netns, topo.nodes[1].pods[0].netns,
                          topo.external.netns, topo.nodes[1].netns}
        for ns in sorted(server_ns):
            self.servers.append(netperf.Netserver(ns))

    def teardown(self) -> None:
        for server in self.servers:
            server.close()
        for lab in self.labs.values():
            try:
                builder.lab_down(lab)
            except Exception:  # not built: nothing to remove
                pass

    def target(self, scenario: str, mode: str) -> tuple[str, str]:
        """(client namespace, server address) of a scenario in a mode."""
        topo = self.topos["legacy" if mode == "limit" else mode]
        (a1, a2), (b1, _) = topo.nodes[0].pods[:2], topo.nodes[1].pods[:2]
        if mode == "limit":
            return {"same-node": (self.limit_ns[0], LIMIT_IPS[1]),
                    "cross-node": (topo.nodes[0].netns, topo.nodes[1].ip),
                    "pod-to-external": (topo.nodes[0].netns, topo.external.ip)}[scenario]
        return {"same-node": (a1.netns, a2.ip), "cross-node": (a1.netns, b1.ip),
                "pod-to-external": (a1.netns, topo.external.ip)}[scenario]

    def fill_iptables(self, count: int) -> None:
        """kube-proxy-like rule chains in every node namespace of both labs.

        The eBPF lab blocks new rules while enabled (as AKS does), so it goes
        back to legacy for the fill and is enabled again with --force, which
        is what an operator who accepts the bypass does.
        """
        from datapath import switch
        rules = iptables_rules(count)
        for mode, topo in self.topos.items():
            if mode == "ebpf":
                switch.disable_ebpf(load_state(topo.lab), topo)
            for node in topo.nodes:
                netns.run(node.netns, ["iptables-nft-restore", "--noflush"], input=rules,
                          timeout=120)
            if mode == "ebpf":
                switch.enable_ebpf(load_state(topo.lab), topo, force=True)

    def empty_connection_tables(self) -> None:
        """Conntrack of the legacy nodes, the BPF SNAT tables of the eBPF nodes.

        Each sample starts with empty tables. Without this a run of TCP_CRR
        samples (10,000 connections a second, each held 120 s in TIME_WAIT by
        conntrack) fills the legacy nodes' conntrack table (nf_conntrack_max,
        262,144 here) within half a minute, after which the kernel drops new
        connections ("nf_conntrack: table full") and netperf stalls: that
        measures the table's size, not the path. docs/benchmarks.md reports it.
        """
        from datapath import nat_table, switch
        for node in self.topos["legacy"].nodes:
            netns.run(node.netns, ["conntrack", "-F"], check=False)
        ebpf = self.topos["ebpf"]
        for node in ebpf.nodes:
            with switch.node_maps(load_state(ebpf.lab), node) as maps:
                nat_table.flush(maps)

    def measure(self, rules, scenario, mode, test, size, rep) -> Sample:
        ns, host = self.target(scenario, mode)
        self.empty_connection_tables()
        try:
            before = _cpu_jiffies()
            result = netperf.run_test(ns, host, test, self.cfg.duration, size)
        except (netperf.NetperfError, netns.NetnsError) as first:
            # one more try: a run that hangs or fails once should not cost the whole bench;
            # a second failure is real and ends it
            self.retries.append({"scenario": scenario, "mode": mode, "test": test,
                                 "size": size, "repeat": rep, "error": str(first)})
            before = _cpu_jiffies()
            result = netperf.run_test(ns, host, test, self.cfg.duration, size)
        cpu_s = (_cpu_jiffies() - before) / CLK_TCK
        return Sample(rules, scenario, mode, test, size, rep, result.values, result.seconds, cpu_s)


def iptables_rules(count: int) -> str:
    """An iptables-restore script: ``count`` service rules in nat and filter, like kube-proxy's.

    They point at a service range no lab traffic uses, so they never match and
    every packet that meets them walks all of them, as it does in a busy cluster.
    """
    import ipaddress
    net = ipaddress.IPv4Network(SERVICE_NET)
    # The node namespaces' PREROUTING and FORWARD hold nothing of the lab's own
    # (its MASQUERADE is in POSTROUTING), so they are rebuilt here wholesale.
    nat = ["*nat", ":KUBE-SERVICES - [0:0]", "-F KUBE-SERVICES", "-F PREROUTING"]
    flt = ["*filter", ":KUBE-FORWARD - [0:0]", "-F KUBE-FORWARD", "-F FORWARD"]
    for i in range(count):
        ip = net.network_address + (i % (net.num_addresses - 2)) + 1
        port = 1024 + i // (net.num_addresses - 2)
        nat.append(f"-A KUBE-SERVICES -d {ip}/32 -p tcp --dport {port} -j RETURN")
        flt.append(f"-A KUBE-FORWARD -d {ip}/32 -p tcp --dport {port} -j ACCEPT")
    if count:
        nat.append("-A PREROUTING -j KUBE-SERVICES")
        flt.append("-A FORWARD -j KUBE-FORWARD")
    nat.append("COMMIT")
    flt.append("COMMIT")
    return "\n".join(nat + flt) + "\n"


def run_bench(cfg: BenchConfig, on_sample=None, progress=None) -> dict:
    """Run the whole matrix; returns {"environment", "samples"} (summary added by the report)."""
    bench = Bench(cfg)
    samples: list[Sample] = []
    env = environment(cfg)
    try:
        bench.setup(say=(progress.log if progress else print))
        task = progress.add_task("starting", total=cfg.runs()) if progress else None
        filled = 0
        for rules, scenario, test, size in cfg.points():
            if rules != filled:  # outermost loop: filled once per count
                bench.fill_iptables(rules)
                filled = rules
            for rep in range(cfg.repeat):
                order = MODES if rep % 2 == 0 else tuple(reversed(MODES))
                for mode in order:
                    label = f"{scenario} {test}{'' if size is None else f' {size}B'} {mode}"
                    if progress:
                        progress.update(task, description=f"{label} ({rep + 1}/{cfg.repeat})")
                    sample = bench.measure(rules, scenario, mode, test, size, rep)
                    samples.append(sample)
                    if on_sample:
                        on_sample(sample)
                    if progress:
                        progress.advance(task)
    finally:
        bench.teardown()
        env["finished_at"] = time.time()
        env["retried_runs"] = bench.retries
    return {"environment": env, "samples": [asdict(s) for s in samples]}
