"""The ``hostrouting`` command: labs, the datapath switch, status and checks.

Every error reaches the user as one line, ``hostrouting: error: ...``, and a
non-zero exit; Ctrl-C and SIGTERM unwind through the same clean-up paths as
an error, so nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from netns_lab.builder import foreign_namespaces, lab_down, lab_down_all, lab_down_stray_pins, \
    lab_up
from netns_lab.state import LabStateError, lab_lock, lab_names, load_state
from netns_lab.topology import IP_FAMILIES, Topology, TopologyError, load_topology

EPILOG = """examples:
  hostrouting doctor
  hostrouting lab up                          # 2 nodes x 2 pods, legacy routing
  hostrouting lab up --mode ebpf --nodes 3 --pods-per-node 4
  hostrouting lab exec node1-pod1 -- ping -c1 198.18.2.10
  hostrouting enable                          # switch the lab to eBPF host routing
  hostrouting status; hostrouting stats
  hostrouting nat list --json                 # BPF SNAT flows of every node
  hostrouting lab down --all
"""


class CliError(Exception):
    """An error for the user: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes are one line too (argparse prints its usage first), exit status 2;
    subparsers are made of the same class."""

    def error(self, message: str):
        command = self.prog.removeprefix("hostrouting").strip()
        self.exit(2, f"hostrouting: error: {command + ': ' if command else ''}"
                     f"{' '.join(message.split())} (see: {self.prog} --help)\n")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise CliError("must run as root (network namespaces and BPF need CAP_SYS_ADMIN and "
                       "CAP_NET_ADMIN): try sudo")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def _topology_of(lab: str) -> tuple:
    state = load_state(lab)
    return state, Topology.from_dict(state.topology)


def _with_ip6(entry: dict, ip6: str | None, **more) -> dict:
    """``ip6`` (and more IPv6 keys) right after ``ip``, only in a lab that has IPv6: an
    IPv4-only lab's JSON stays as it was."""
    if ip6 is None:
        return entry
    out = {}
    for key, value in entry.items():
        out[key] = value
        if key == "ip":
            out["ip6"] = ip6
    return {**out, **more}


def lab_json(state, topo: Topology) -> dict:
    data = {
        "name": topo.lab,
        "mode": state.mode,
        "phase": state.phase,
        "underlay_cidr": topo.underlay_cidr,
        "nodes": [_with_ip6({"name": n.name, "netns": n.netns, "ip": n.ip,
                             "pod_cidr": n.pod_cidr, "gateway": n.gateway,
                             "pods": [_with_ip6({"name": p.name, "netns": p.netns, "ip": p.ip,
                                                 "host_ifname": p.host_ifname}, p.ip6)
                                      for p in n.pods]},
                            n.ip6, pod_cidr6=n.pod_cidr6, gateway6=n.gateway6)
                  for n in topo.nodes],
        "external": _with_ip6({"netns": topo.external.netns, "ip": topo.external.ip},
                              topo.external.ip6),
        "fabric": {"netns": topo.fabric_netns, "router_ip": topo.router_ip},
    }
    if topo.has_ipv6:
        data.update(ip_family=topo.ip_family, underlay_cidr6=topo.underlay_cidr6)
        data["fabric"]["router_ip6"] = topo.router_ip6
    return data


def cmd_lab_up(args) -> int:
    _require_root()
    topo = load_topology(args.lab, args.topology, args.nodes, args.pods_per_node,
                         args.ip_family)
    from datapath import switch
    state, seconds = lab_up(topo, switch.configure_mode(args.mode))
    pods = sum(len(n.pods) for n in topo.nodes)
    family = "" if topo.ip_family == "ipv4" else f", {topo.ip_family}"
    print(f"lab {topo.lab}: {len(topo.nodes)} nodes, {pods} pods{family}, mode {state.mode}, "
          f"{len(topo.namespaces)} namespaces, up in {seconds:.2f}s")
    return 0


def cmd_lab_down(args) -> int:
    _require_root()
    if args.all:
        removed = lab_down_all()
        for name, namespaces in removed.items():
            print(f"lab {name}: removed {len(namespaces)} namespaces")
        pins = lab_down_stray_pins()     # of labs gone, whatever state directory made them
        for name in pins:
            print(f"lab {name}: removed its pinned BPF objects (no namespace of it is left)")
        if not removed and not pins:
            print("no labs")
        return 0
    namespaces = lab_down(args.lab)
    print(f"lab {args.lab}: removed {len(namespaces)} namespaces")
    foreign = foreign_namespaces(args.lab)
    if foreign:
        print(f"lab {args.lab}: left alone, named like it but without its marker: "
              f"{', '.join(foreign)}", file=sys.stderr)
    return 0


def cmd_lab_show(args) -> int:
    names = lab_names() if args.all else [args.lab]
    labs = [lab_json(*_topology_of(name)) for name in names]
    if args.json:
        _print_json(labs if args.all else labs[0])
        return 0
    from datapath import cli_output
    cli_output.print_labs(labs)
    return 0


def cmd_lab_exec(args) -> int:
    _require_root()
    _, topo = _topology_of(args.lab)
    try:
        ns = topo.netns_of(args.target)
    except KeyError as e:
        raise CliError(e.args[0]) from None
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("lab exec: no command given (hostrouting lab exec POD -- CMD...)")
    os.execvp("ip", ["ip", "netns", "exec", ns, *command])
    return 127  # not reached


def cmd_doctor(args) -> int:
    from datapath.doctor import run_doctor
    return run_doctor(args.json)


def _built(lab: str) -> tuple:
    """The lab's record and topology, for a command that changes a finished lab."""
    state, topo = _topology_of(lab)
    if state.phase != "ready":
        raise CliError(f"lab {lab}: lab up has not finished (phase {state.phase}: still "
                       f"running, or killed); remove it with: hostrouting lab down --lab {lab}")
    return state, topo


def cmd_enable(args) -> int:
    _require_root()
    from datapath import switch
    with lab_lock(args.lab):
        state, topo = _built(args.lab)
        done = switch.enable_ebpf(state, topo, force=args.force)
    print(f"lab {args.lab}: eBPF host routing enabled on {len(topo.nodes)} nodes" if done else
          f"lab {args.lab}: eBPF host routing is enabled already; nothing to do")
    return 0


def cmd_disable(args) -> int:
    _require_root()
    from datapath import switch
    with lab_lock(args.lab):
        state, topo = _built(args.lab)
        done = switch.disable_ebpf(state, topo)
    print(f"lab {args.lab}: back to legacy routing on {len(topo.nodes)} nodes" if done else
          f"lab {args.lab}: legacy routing already; nothing to do")
    return 0


def cmd_status(args) -> int:
    """Exit 0 when the kernel has what the record wants, 3 when they differ."""
    _require_root()
    from datapath import cli_output, switch
    state, topo = _topology_of(args.lab)
    status = switch.status(state, topo)
    if args.json:
        _print_json(status)
    else:
        cli_output.print_status(status)
    if not status["converged"]:
        print(f"hostrouting: lab {args.lab} differs from its record; converge with: "
              f"{status['fix']}", file=sys.stderr)
        return 3
    return 0


BPF_STATS_MAX_S = 3600


def cmd_stats(args) -> int:
    _require_root()
    from datapath import cli_output, switch
    if args.bpf_stats is not None and not 0 < args.bpf_stats <= BPF_STATS_MAX_S:
        raise CliError(f"--bpf-stats takes seconds, more than 0 and at most {BPF_STATS_MAX_S}")
    state, topo = _topology_of(args.lab)
    stats = switch.stats(state, topo, args.bpf_stats or 0)
    if args.json:
        _print_json(stats)
    else:
        cli_output.print_stats(stats)
    return 0


def cmd_nat(args) -> int:
    _require_root()
    from datapath import cli_output, switch
    state, topo = _topology_of(args.lab)
    per_node = switch.nat_flows(state, topo, args.node)
    if args.json:
        _print_json({"lab": topo.lab, "nodes": {name: [f.to_dict() for f in flows]
                                                for name, flows in per_node.items()}})
    else:
        cli_output.print_flows(topo.lab, per_node)
    return 0


def _csv(kind, choices=None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            items = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                             f"{kind.__name__}") from None
        bad = [t for t in items if choices and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, choices))}"
                                             if bad else "empty list")
        if kind is int and any(t < 0 for t in items):
            raise argparse.ArgumentTypeError(f"{text!r}: numbers must not be negative")
        return tuple(items)
    return parse


def _parsed(parse):
    """An argparse type from a parser whose ValueError message is shown as it is."""
    def check(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return check


def _profile_dir(path: str) -> str:
    """bench --profile DIR: perf can record, and DIR is (or is made) a directory."""
    from datapath.bench import perf
    try:
        perf.require_perf()
    except perf.ProfileError as e:
        raise CliError(f"--profile: {e}") from None
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--profile {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CliError(f"--profile {path}: {e.strerror}") from None
    return path


def cmd_bench(args) -> int:
    from datapath.bench import report
    if args.bench_command == "compare":
        try:
            a, b = report.load_result(args.a), report.load_result(args.b)
        except ValueError as e:
            raise CliError(str(e)) from None
        report.print_compare(report.compare(a, b))
        for note in report.compare_notes(a, b):
            print(f"note: {note}")
        return 0
    _require_root()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from datapath.bench import netperf, node_profiles
    from datapath.bench.runner import QUICK, BenchConfig, run_bench
    try:
        node_profiles.parse(args.node_profile)
    except ValueError as e:
        raise CliError(f"--node-profile {e}") from None
    if args.tcp_cc != netperf.INHERIT_CC:     # here, before the progress display (run_bench
        try:                                  # checks again for callers of its own)
            netperf.check_congestion(args.tcp_cc)
        except ValueError as e:
            raise CliError(f"--tcp-cc: {e}") from None
    cfg = BenchConfig(quick=args.quick, lab_prefix=args.lab_prefix, aa=args.aa,
                      node_profile=args.node_profile, ip_family=args.ip_family,
                      tcp_cc=args.tcp_cc)
    if args.cpu_pin is not None:
        cfg.cpu_pin = args.cpu_pin
    if args.quick:
        for name in ("duration", "repeat", "sizes", "tests"):
            setattr(cfg, name, QUICK[name])
    for name in ("duration", "repeat", "sizes", "tests", "scenarios"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.duration < 1 or cfg.duration != int(cfg.duration) or cfg.repeat < 1:
        # netperf's -l takes whole seconds: 1.5 runs 1 s (the CPU window would be misplaced)
        # and 0.5 had not ended when killed after 5 s
        raise CliError("--duration must be whole seconds, at least 1, and --repeat at least 1")
    if args.profile:
        cfg.profile_dir = _profile_dir(args.profile)
    console = report.console_for_output()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                  console=console) as progress:
        result = run_bench(cfg, progress=progress)
    report.with_summary(result)
    report.print_tables(result, console)
    if args.json:
        report.save(result, args.json)
        print(f"samples and summary written to {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_events(args) -> int:
    from datapath import events
    load_state(args.lab)  # a clear error for an unknown lab
    stream = events.follow(args.lab) if args.follow else iter(events.read(args.lab))
    if args.json and not args.follow:
        _print_json(list(stream))
        return 0
    for event in stream:
        print(json.dumps(event) if args.json else events.format_event(event), flush=True)
    return 0


def cmd_metrics(args) -> int:
    _require_root()
    from datapath import metrics
    labs = None if args.all_labs else [args.lab]
    if args.metrics_command == "dump":
        sys.stdout.write(metrics.dump(labs))
        return 0
    return metrics.serve(labs, args.listen, announce=lambda line: print(line, flush=True))


def cmd_monitor(args) -> int:
    _require_root()
    from datapath.monitor import run_monitor
    state, topo = _topology_of(args.lab)
    if state.mode != "ebpf":
        raise CliError(f"lab {args.lab}: nothing to monitor in {state.mode} mode "
                       "(hostrouting enable first)")
    if args.pod:
        try:
            topo.find_pod(args.pod)
        except KeyError:
            raise CliError(f"lab {args.lab}: no pod named {args.pod!r}") from None
    run_monitor(state, topo, args.type, args.pod, args.count, args.duration, args.json,
                emit=lambda line: print(line, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hostrouting", description="eBPF host routing in network-namespace labs, "
        "measured against legacy routing (iptables + conntrack).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_lab(p):
        p.add_argument("--lab", default="hr", help="lab name (default: hr)")
        return p

    p = sub.add_parser("doctor", help="check the kernel and tools this needs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    lab = sub.add_parser("lab", help="build, show, use and remove labs")
    labsub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    p = with_lab(labsub.add_parser("up", help="create a lab"))
    p.add_argument("--topology", metavar="FILE", help="TOML topology (see netns_lab/topology.py)")
    p.add_argument("--nodes", type=int, help="number of nodes (default 2)")
    p.add_argument("--pods-per-node", type=int, help="pods per node (default 2)")
    p.add_argument("--ip-family", choices=IP_FAMILIES,
                   help="ipv4 (default), dual (both everywhere) or ipv6 (IPv6-only pods)")
    p.add_argument("--mode", choices=("legacy", "ebpf"), default="legacy")
    p.set_defaults(func=cmd_lab_up)
    p = with_lab(labsub.add_parser("down", help="remove a lab (or --all)"))
    p.add_argument("--all", action="store_true", help="every lab, including crashed ones, and the "
                   "pinned BPF objects of labs whose namespaces are gone (any state directory)")
    p.set_defaults(func=cmd_lab_down)
    p = with_lab(labsub.add_parser("show", help="describe a lab"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="every lab")
    p.set_defaults(func=cmd_lab_show)
    p = with_lab(labsub.add_parser("exec", help="run a command in a pod, node or 'external'"))
    p.add_argument("target", metavar="POD")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    p.set_defaults(func=cmd_lab_exec)

    p = with_lab(sub.add_parser("enable", help="switch a lab to eBPF host routing"))
    p.add_argument("--force", action="store_true", help="enable although user firewall rules "
                   "in node namespaces would be bypassed (recorded as a Warning event)")
    p.set_defaults(func=cmd_enable)
    p = with_lab(sub.add_parser("disable", help="switch a lab back to legacy routing"))
    p.set_defaults(func=cmd_disable)
    p = with_lab(sub.add_parser("status", help="mode, programs and attach points per node"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = with_lab(sub.add_parser("stats", help="datapath counters per node, and each "
                                "program's ns per packet"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--bpf-stats", type=float, metavar="SECONDS",
                   help="turn BPF run-time stats on for this many seconds (a BPF_ENABLE_STATS "
                   "fd, the sysctl left alone) and show the programs' ns per packet over them")
    p.set_defaults(func=cmd_stats)
    nat = sub.add_parser("nat", help="the BPF SNAT table")
    natsub = nat.add_subparsers(dest="nat_command", required=True, metavar="NAT_COMMAND")
    p = with_lab(natsub.add_parser("list", help="translated flows per node: pod, remote, node "
                                   "IP:port, TCP state, idle and expiry, packets"))
    p.add_argument("--node", help="only this node")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_nat)
    p = with_lab(sub.add_parser("monitor", help="per-packet verdicts from the datapath"))
    p.add_argument("--type", choices=("trace", "drop"), default="trace",
                   help="every verdict, or drops only")
    p.add_argument("--pod", help="only packets from or to this pod")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.set_defaults(func=cmd_monitor)
    p = with_lab(sub.add_parser("events", help="what happened to a lab, as events"))
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="JSON (one object per line with -f)")
    p.set_defaults(func=cmd_events)

    from datapath.metrics import DEFAULT_LISTEN, parse_listen
    metrics = sub.add_parser("metrics", help="the counters as Prometheus metrics "
                             "(docs/metrics.md)")
    msub = metrics.add_subparsers(dest="metrics_command", required=True, metavar="METRICS_COMMAND")
    for name, text in (("serve", "serve /metrics until stopped"), ("dump", "print /metrics once")):
        p = msub.add_parser(name, help=text)
        which = p.add_mutually_exclusive_group()
        which.add_argument("--lab", default="hr", help="lab name (default: hr)")
        which.add_argument("--all-labs", action="store_true", help="every lab, as they come "
                           "and go")
        if name == "serve":
            p.add_argument("--listen", type=_parsed(parse_listen), default=DEFAULT_LISTEN,
                           metavar="ADDRESS:PORT", help=f"default {DEFAULT_LISTEN}; port 0: "
                           "any free one")
        p.set_defaults(func=cmd_metrics)

    from datapath.bench.netperf import DEFAULT_CC, INHERIT_CC
    from datapath.bench.runner import AA_MODES, LAB_SUFFIX, MODES, QUICK, SCENARIOS, TESTS
    from datapath.bench.runner import IP_FAMILIES as BENCH_FAMILIES, PIN_CHOICES
    p = sub.add_parser("bench", help="legacy vs eBPF vs the limit, with netperf",
                       description="Builds a lab per mode (legacy, eBPF, the limit: no "
                       "netfilter at all, the floor: a constant redirect), runs netperf over "
                       f"scenarios x modes ({', '.join(MODES)}) back to back, in an order that "
                       "changes every repetition (a Williams square), "
                       "and prints medians and paired ratios with 95% bootstrap intervals.")
    p.add_argument("--quick", action="store_true", help="about two to three minutes: 1s "
                   f"tests, {QUICK['repeat']} repetitions, {','.join(QUICK['tests'])}, "
                   f"TCP_STREAM size {','.join(map(str, QUICK['sizes']))}")
    p.add_argument("--duration", type=float, help="whole seconds per test, at least 1 "
                   "(default 5)")
    p.add_argument("--repeat", type=int, help="repetitions of every point (default 10)")
    p.add_argument("--sizes", type=_csv(int), help="TCP_STREAM message sizes, e.g. 64,1024")
    p.add_argument("--tests", type=_csv(str, TESTS), help=f"from {','.join(TESTS)} (default: "
                   "all; TCP_STREAMxN: N flows at once)")
    p.add_argument("--scenarios", type=_csv(str, SCENARIOS), help=f"from {','.join(SCENARIOS)}")
    p.add_argument("--node-profile", default="bare", metavar="bare|kube-proxy:SxE|aks",
                   help="what the legacy and eBPF labs' nodes carry: nothing (default), "
                   "kube-proxy's iptables rules for S services of E endpoints, or AKS's "
                   "(kube-proxy:1000x3, ip-masq-agent, wireserver rules, 100,000 conntrack "
                   "entries); eBPF is enabled over the rules with --force")
    p.add_argument("--ip-family", type=int, choices=BENCH_FAMILIES, default=4,
                   help="4 (default): IPv4-only labs; 6: every lab dual stack and "
                   "the same matrix over IPv6 (netperf -6 to the pods', nodes' and external "
                   "host's IPv6 addresses); a node profile's rules are IPv4 rules either way")
    p.add_argument("--tcp-cc", default=DEFAULT_CC, metavar=f"NAME|{INHERIT_CC}",
                   help="TCP congestion control of every TCP test, at both ends (netperf -K): "
                   f"{DEFAULT_CC} (default), any other the kernel has, or {INHERIT_CC}: "
                   "each namespace's default, which it takes from the host's (bbr on some "
                   "VMs, whose pacing reorders a bulk flow on two CPUs: docs/benchmarks.md)")
    p.add_argument("--aa", action="store_true", help="two identical legacy labs against each "
                   "other: the noise floor of this machine (the A/A ratio's interval)")
    p.add_argument("--cpu-pin", nargs="?", const="both", choices=PIN_CHOICES,
                   metavar="cross-cpu|same-cpu|both|none",
                   help="where netperf and netserver run (netperf -T): on two CPUs (cross-cpu, "
                   "the default where there are two), on one (same-cpu), every point in both "
                   "placements (both; --cpu-pin alone), or where the scheduler puts them (none: "
                   "on a 2-core VM a request/response test then measures the placement)")
    p.add_argument("--json", metavar="FILE", help="write every sample, the summary, the "
                   "machine and the labs' settings")
    p.add_argument("--plot", metavar="FILE.png", help="ratios with their intervals, then "
                   "throughput and latency")
    p.add_argument("--profile", metavar="DIR", help="after each point's repetitions, one more "
                   "of every mode under perf record -a -g (not a sample): DIR gets a "
                   ".perf.data, .folded and .top.txt per point and mode, and the report the "
                   "top kernel symbols of legacy and eBPF side by side (needs perf: Debian "
                   "package linux-perf)")
    p.add_argument("--lab-prefix", default="hrb", help="the labs it builds, one per mode: "
                   + ", ".join(f"PREFIX{LAB_SUFFIX[m]} ({m})" for m in MODES)
                   + "; with --aa: " + " and ".join(f"PREFIX{LAB_SUFFIX[m]}" for m in AA_MODES)
                   + " (default hrb)")
    p.set_defaults(func=cmd_bench, bench_command=None)
    bsub = p.add_subparsers(dest="bench_command", metavar="[compare A.json B.json]")
    c = bsub.add_parser("compare", help="what changed between two bench results")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    return parser


_MAIN_PID = os.getpid()


def _interrupted(signum, frame):
    """Ctrl-C and SIGTERM unwind the CLI through its clean-up paths, in this process only.

    pyroute2 forks short-lived children (a netlink socket inside a namespace)
    and stops them with SIGTERM; Ctrl-C reaches every process of the group.
    A forked child inherits this handler, and must exit on the spot instead
    of unwinding a copy of the CLI's stack, which would run the clean-up
    (removing labs) under the parent's feet while the parent waits for it.
    """
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("hostrouting: interrupted; cleaned up", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (stats --json | head): end quietly as other filters do; the
        # exit-time flush of what is still buffered would raise again, into /dev/null now
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, TopologyError, LabStateError) as e:
        print(f"hostrouting: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the remaining known failure types name themselves
        if type(e).__module__.startswith(("datapath", "netns_lab")):
            print(f"hostrouting: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # python -m datapath.cli
    sys.exit(main())
