"""The bench's statistics and bookkeeping, without labs: paired ratios, bootstrap intervals,
rotated order, the CPU window, the sysctl comparison, the guard's pause, readable output."""

from __future__ import annotations

import io
import re
import threading
from collections import Counter

import numpy as np
import pytest

from datapath import rule_guard
from datapath.bench import report, runner


def _sample(mode, rep, tps, cpu_s=1.0, test="TCP_RR", scenario="same-node", size=None):
    return {"rules": 0, "scenario": scenario, "mode": mode, "test": test, "size": size,
            "repeat": rep, "values": {"tps": tps}, "seconds": 1.0, "cpu_s": cpu_s,
            "cpu_window_s": 1.0}


def _result(samples, modes=runner.MODES):
    return {"environment": {"config": {"duration": 1.0, "repeat": 3}, "modes": list(modes),
                            "kernel": "k", "cpu": "c", "cores": 2},
            "samples": samples}


def test_bootstrap_ci_is_deterministic_and_brackets_the_median():
    values = [1.10, 1.02, 1.15, 0.98, 1.12, 1.08, 1.11, 1.05, 1.20, 1.09]
    median, low, high = report.bootstrap_ci(values)
    assert median == pytest.approx(1.095)
    assert min(values) <= low <= median <= high <= max(values)
    assert report.bootstrap_ci(values) == (median, low, high)      # fixed seed
    assert report.bootstrap_ci([1.3]) == (1.3, 1.3, 1.3)
    with pytest.raises(ValueError):
        report.bootstrap_ci([])


def test_bootstrap_ci_narrows_with_more_repetitions():
    import random
    rng = random.Random(1)
    few = [rng.gauss(1.0, 0.1) for _ in range(5)]
    many = [rng.gauss(1.0, 0.1) for _ in range(200)]
    _, lo_few, hi_few = report.bootstrap_ci(few)
    _, lo_many, hi_many = report.bootstrap_ci(many)
    assert hi_many - lo_many < hi_few - lo_few
    assert lo_many < 1.0 < hi_many


@pytest.mark.parametrize("modes", [runner.MODES, runner.AA_MODES, ("a", "b", "c")])
def test_rotated_order_balances_first_place_and_predecessors(modes):
    n = len(modes)
    cycle = 2 * n if n % 2 else n
    orders = [runner.rotated(modes, rep) for rep in range(cycle)]
    assert all(sorted(o) == sorted(modes) for o in orders)
    assert sorted(o[0] for o in orders[:n]) == sorted(modes)      # each first once per n
    pairs = [(o[i], o[i + 1]) for o in orders for i in range(n - 1)]
    # each mode right after each other mode, equally often
    assert Counter(pairs) == {(a, b): cycle // n for a in modes for b in modes if a != b}
    assert runner.rotated(modes, cycle) == orders[0]


def test_ratios_are_paired_by_repetition_not_taken_of_medians():
    # the machine slows down in repetition 2 for every mode alike: pairing cancels it
    tps = {0: {"legacy": 100, "ebpf": 110}, 1: {"legacy": 200, "ebpf": 220},
           2: {"legacy": 50, "ebpf": 55}}
    samples = [_sample(mode, rep, v) for rep, modes in tps.items() for mode, v in modes.items()]
    row = next(r for r in report.summarise(_result(samples)) if r["metric"] == "tps")
    ratio = row["ratios"]["ebpf/legacy"]
    assert ratio["each"] == pytest.approx([1.1, 1.1, 1.1])
    assert ratio["median"] == pytest.approx(1.1) and ratio["ci"] == pytest.approx([1.1, 1.1])
    assert row["legacy"]["median"] == 100 and row["ebpf"]["median"] == 110
    assert "ebpf/limit" not in row["ratios"]        # limit not measured: no ratio


def test_pairing_skips_repetitions_that_lack_a_mode():
    by_rep = {0: {"legacy": 100, "ebpf": 120}, 1: {"ebpf": 130}, 2: {"legacy": 100, "ebpf": 90}}
    assert report.paired_ratios(by_rep, "ebpf", "legacy") == pytest.approx([1.2, 0.9])
    assert report.paired_ratios({0: {"legacy": 0, "ebpf": 1}}, "ebpf", "legacy") == []


def test_cpu_per_transaction_uses_the_window_it_was_read_over():
    s = _sample("ebpf", 0, tps=10_000, cpu_s=0.4)
    s["cpu_window_s"] = 0.8
    assert report.derived(s, duration=1.0)["cpu_us_per_trans"] == pytest.approx(50.0)
    del s["cpu_window_s"]           # an older result: the nominal duration
    assert report.derived(s, duration=1.0)["cpu_us_per_trans"] == pytest.approx(40.0)


def test_cpu_reader_cuts_the_window_from_its_readings():
    reader = runner.CpuReader()
    reader.readings = [(0.0, [0, 0], 0), (0.1, [10, 5], 1), (0.5, [30, 15], 1),
                       (0.9, [50, 25], 3), (1.0, [90, 25], 3)]
    seconds, by_cpu, steal = reader.between(0.05, 0.95)
    assert seconds == pytest.approx(0.8)
    assert by_cpu == pytest.approx([40 / runner.CLK_TCK, 20 / runner.CLK_TCK])
    assert steal == pytest.approx(2 / runner.CLK_TCK)


def test_read_proc_stat_has_one_figure_per_cpu():
    import os
    per_cpu, steal = runner.read_proc_stat()
    assert len(per_cpu) == os.cpu_count() and steal >= 0


def test_format_ratio():
    assert report.format_ratio({"median": 1.1234, "ci": [1.081, 1.149]}) == "1.12x [1.08-1.15]"
    assert report.format_ratio(None) == "-"


def test_sysctl_differences_compare_devices_with_default():
    fresh = {"net.ipv4.ip_forward": "0", "net.ipv4.conf.default.rp_filter": "2",
             "net.ipv6.conf.default.mtu": "1280", "net.ipv4.tcp_tw_reuse": "2"}
    lab = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.eth0.rp_filter": "0",
           "net.ipv4.conf.lo.rp_filter": "2", "net.ipv6.conf.eth0.mtu": "1500",
           "net.ipv4.tcp_tw_reuse": "2", "net.ipv4.only_here": "1"}
    assert runner.sysctl_differences(lab, fresh) == {"net.ipv4.conf.eth0.rp_filter": "0",
                                                     "net.ipv4.ip_forward": "1"}


def test_points_are_extended_by_placement():
    cfg = runner.BenchConfig(scenarios=("same-node",), tests=("TCP_RR", "TCP_STREAM"),
                             sizes=(64, 1024), cpu_pin="both")
    points = cfg.points()
    assert [(p.test, p.size) for p in points[::2]] == [("TCP_RR", None), ("TCP_STREAM", 64),
                                                       ("TCP_STREAM", 1024)]
    assert {p.pin for p in points} == set(runner.PINS)
    # every point: its samples and one program-cost run (eBPF, BPF stats on)
    assert cfg.runs() == len(points) * (len(runner.MODES) * cfg.repeat + 1)
    aa = runner.BenchConfig(aa=True)      # no eBPF lab: no program-cost run
    assert aa.runs() == len(aa.points()) * len(runner.AA_MODES) * aa.repeat
    assert runner.BenchConfig(aa=True).modes == runner.AA_MODES


@pytest.mark.parametrize("cpus, pin, pins", [(2, None, {"cross-cpu"}), (8, None, {"cross-cpu"}),
                                             (1, None, {None}), (2, "same-cpu", {"same-cpu"}),
                                             (2, "none", {None})])
def test_netperf_and_netserver_are_pinned_to_two_cpus_unless_asked(monkeypatch, cpus, pin, pins):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: cpus)
    cfg = runner.BenchConfig(scenarios=("same-node",), tests=("TCP_RR",))
    if pin:
        cfg.cpu_pin = pin
    assert {p.pin for p in cfg.points()} == pins
    assert all(runner.PINS.get(p.pin) in ("0,1", "0,0", None) for p in cfg.points())


@pytest.mark.parametrize("argv, pin", [([], None), (["--cpu-pin"], "both"),
                                       (["--cpu-pin", "same-cpu"], "same-cpu")])
def test_cpu_pin_on_the_command_line(argv, pin):
    from datapath import cli
    args = cli.build_parser().parse_args(["bench", *argv])
    assert args.cpu_pin == pin


def test_the_report_says_which_congestion_control_the_tcp_tests_ran():
    def result(cc):
        return {"lab_settings": {"tcp_congestion_control": cc} if cc else {}}
    named = result({"tests": "cubic", "namespace_default": "bbr"})
    inherited = result({"tests": "inherit", "namespace_default": "bbr"})
    assert report.congestion(named) == "cubic (netperf -K; the namespaces' default: bbr)"
    assert report.congestion(inherited) == "the namespaces' default, bbr (--tcp-cc inherit)"
    assert report.congestion(result(None)).startswith("not recorded")
    assert report.compare_notes(named, result({"tests": "cubic", "namespace_default": "bbr"})) \
        == []
    # what ran is what counts: cubic named on a bbr host is cubic inherited on a cubic one
    assert report.compare_notes(named, result({"tests": "inherit",
                                               "namespace_default": "cubic"})) == []
    note, = report.compare_notes(result(None), named)
    assert "B's cubic" in note and "unrecorded" in note
    from rich.console import Console
    samples = [_sample(m, rep, 100) for rep in range(3) for m in runner.MODES]
    out = io.StringIO()
    report.print_tables(report.with_summary({**_result(samples), **named}),
                        Console(file=out, width=200))
    assert "TCP congestion control: cubic (netperf -K; the namespaces' default: bbr)" \
        in out.getvalue()


def test_compare_says_noise_when_intervals_overlap():
    def run(ebpf_tps):
        samples = [_sample(m, rep, v) for rep, e in enumerate(ebpf_tps)
                   for m, v in (("legacy", 100), ("ebpf", e))]
        return report.with_summary(_result(samples))
    same, better = run([101, 99, 100, 102, 98]), run([130, 128, 131, 129, 132])
    rows = {r["what"]: r for r in report.compare(same, better)
            if r["key"][-1] == "tps"}
    assert not rows["ebpf/legacy"]["within_noise"]
    assert rows["ebpf/legacy"]["b"] == pytest.approx(1.30)
    assert rows["legacy"]["within_noise"]
    noisy = {r["what"]: r for r in report.compare(same, run([100, 103, 99, 101, 100]))}
    assert noisy["ebpf/legacy"]["within_noise"]


def test_aa_table_prints_the_noise_floor():
    from rich.console import Console
    samples = [_sample(m, rep, v) for rep, (a, b) in enumerate([(100, 103), (100, 97), (100, 101)])
               for m, v in (("legacy", a), ("legacy-b", b))]
    out = io.StringIO()
    report.print_tables(report.with_summary(_result(samples, runner.AA_MODES)),
                        Console(file=out, width=200))
    assert "legacy B/legacy" in out.getvalue()
    # ratios 1.03, 0.97, 1.01: the interval reaches 3% from 1.00x
    assert re.search(r"noise floor: the A/A intervals of throughput and transaction rates "
                     r"reach 3\.\d% from 1\.00x", out.getvalue())


def test_tables_are_not_cut_when_piped():
    # a pipe: rich would take 80 columns and squeeze the intervals onto two lines
    console = report.console_for_output()
    assert console.width == report.WIDE_CONSOLE
    samples = [_sample(m, rep, v) for rep in range(3)
               for m, v in (("legacy", 100), ("ebpf", 112), ("limit", 120), ("floor", 118))]
    out = io.StringIO()
    console.file = out
    report.print_tables(report.with_summary(_result(samples)), console)
    line = next(line for line in out.getvalue().splitlines() if "trans/s" in line)
    assert "1.12x [1.12-1.12]" in line and "0.93x [0.93-0.93]" in line
    # a row of over 200 characters: the longest scenario and label, five ratios, two of them
    # of two digits, eight-digit rates
    wide = [{**_sample(m, rep, 0, test="UDP_STREAM", scenario="pod-to-external"),
             "pin": "cross-cpu", "values": {"pps": v * (1 + rep / 7), "sent_pps": v}}
            for rep in range(3) for m, v in (("legacy", 1_000_000), ("ebpf", 12_345_678),
                                             ("limit", 13_000_000), ("floor", 1_100_000))]
    out = io.StringIO()
    console.file = out
    report.print_tables(report.with_summary(_result(wide)), console)
    text = out.getvalue()
    assert "…" not in text, text
    line = next(line for line in text.splitlines() if "packets/s received cross-cpu" in line)
    assert line.count("x [") == 5 and "14,109,346" in line, line
    assert len(line) > 200


def test_a_limit_beaten_beyond_its_interval_is_called_out():
    """eBPF above its bound (the better of limit and floor in each repetition) is a bug of the
    bench, called so; eBPF or the floor above the limit alone says the limit is no bound."""
    from rich.console import Console

    def printed(ebpf, floor, limit=110):
        samples = [_sample(m, rep, v) for rep in range(5)
                   for m, v in (("legacy", 100), ("ebpf", ebpf + rep % 2), ("limit", limit),
                                ("floor", floor + rep % 2))]
        out = io.StringIO()
        report.print_tables(report.with_summary(_result(samples)), Console(file=out, width=200))
        return [line for line in out.getvalue().splitlines() if line.startswith("limit ")]
    assert printed(ebpf=105, floor=108) == []            # below the limit
    assert printed(ebpf=110, floor=109) == []            # at it: the interval holds 1.00x
    lines = printed(ebpf=130, floor=120)                 # above the floor and the limit
    assert len(lines) == 1, lines
    assert lines[0].startswith("limit beaten: same-node TCP_RR trans/s: eBPF/bound 1.08x")
    assert "a bug in the bench" in lines[0]
    lines = printed(ebpf=128, floor=130)                 # above the limit, not the floor
    assert len(lines) == 1, lines
    assert lines[0].startswith("limit outrun: same-node TCP_RR trans/s: eBPF/limit 1.16x")
    assert "floor/limit 1.18x" in lines[0] and "eBPF/bound 0.98x" in lines[0]
    lines = printed(ebpf=108, floor=130)                 # only the floor above the limit
    assert len(lines) == 1 and lines[0].startswith("limit outrun:"), lines


def test_the_bound_is_the_better_of_limit_and_floor_in_each_repetition():
    """The higher rate, the lower latency or CPU cost; a ratio only, never a mode's row (the
    plot and `bench compare` take a row's modes for measured labs)."""
    reps = enumerate(((100, 120), (130, 110)))
    samples = [{**_sample(m, rep, v, test=test), "values": {key: v}}
               for rep, (limit, floor) in reps
               for test, key in (("TCP_RR", "tps"), ("UDP_STREAM", "sent_pps"))
               for m, v in (("legacy", 90), ("ebpf", 104), ("limit", limit), ("floor", floor))]
    rows = {r["metric"]: r for r in report.summarise(_result(samples))}
    assert rows["tps"]["ratios"]["ebpf/bound"]["each"] == [104 / 120, 104 / 130]
    assert rows["tps"]["ratios"]["ebpf/limit"]["each"] == [104 / 100, 104 / 130]
    assert rows["sent_pps"]["ratios"]["ebpf/bound"]["each"] == [104 / 120, 104 / 130]
    # CPU per transaction (1 s of CPU over the rate): the lower cost is the higher rate's
    assert rows["cpu_us_per_trans"]["ratios"]["ebpf/bound"]["each"] == pytest.approx(
        [120 / 104, 130 / 104])
    assert not any("bound" in r for r in rows.values())


def test_guard_legacy_poll_waits_while_paused(monkeypatch, tmp_path):
    """The pause stops the guard's periodic work (the NAT sweep checks it the same way); its
    deadline ends a pause nobody lifted."""
    lab = "pausetest"
    assert not rule_guard.paused(lab)
    rule_guard.pause(lab, 60)
    assert rule_guard.paused(lab)
    rule_guard.resume(lab)
    assert not rule_guard.paused(lab)
    rule_guard.pause(lab, -1)           # a deadline already past: not paused
    assert not rule_guard.paused(lab)

    guard = rule_guard.Guard(lab, {"n1": "no-such-netns"})
    reads, checks = [], []
    checked = threading.Event()
    real_paused = rule_guard.paused

    def counting_paused(name):
        checks.append(name)
        if len(checks) >= 5:
            checked.set()
        return real_paused(name)

    monkeypatch.setattr(rule_guard, "LEGACY_POLL_S", 0.001)
    monkeypatch.setattr(rule_guard, "paused", counting_paused)
    monkeypatch.setattr(rule_guard, "_legacy_tables", lambda ns, tool: reads.append(tool) or {})
    guard.legacy_baseline = {("no-such-netns", tool): {} for tool in rule_guard.LEGACY_TOOLS}
    rule_guard.pause(lab, 60)
    thread = threading.Thread(target=guard.poll_legacy, daemon=True)
    thread.start()
    assert checked.wait(10)
    baseline_reads = 0                          # (the baseline is run()'s)
    assert len(reads) == baseline_reads        # no poll while paused
    rule_guard.resume(lab)
    checks.clear()
    checked.clear()
    assert checked.wait(10)
    guard.stopping.set()
    thread.join(5)
    assert len(reads) > baseline_reads         # polling again once resumed


def test_bpf_stats_are_on_for_the_program_cost_run_only(monkeypatch, no_tcp_counters):
    """The stats' clock reads are a cost on the eBPF and floor paths only: no sample may pay
    them. One more eBPF run per point holds them on, and it alone reads the programs."""
    from datapath import prog_stats
    from datapath.bench import netperf
    held = []

    class StatsFd:      # prog_stats.enable_stats(): on while the fd is open
        def __enter__(self):
            held.append(self)
            return self

        def __exit__(self, *exc):
            held.remove(self)

    stats_on_during_runs = []
    congestions = []

    def run_test(ns, host, test, duration, size=None, port=None, cpus=None,
                 transactions=None, family=4, congestion=None):
        stats_on_during_runs.append(bool(held))
        congestions.append(congestion)
        return netperf.Result({"tps": 100.0}, 2.0, 2.0)

    readings = iter([{"node1/from_pod": (1_000, 10)}, {"node1/from_pod": (4_000, 30)}])
    monkeypatch.setattr(prog_stats, "enable_stats", StatsFd)
    monkeypatch.setattr(prog_stats, "read_programs", lambda ids: next(readings) if ids else {})
    monkeypatch.setattr(netperf, "run_test", run_test)
    monkeypatch.setattr(rule_guard, "pause", lambda lab, seconds: None)
    monkeypatch.setattr(rule_guard, "resume", lambda lab: None)
    monkeypatch.setattr(runner.Bench, "target", lambda self, scenario, mode: ("ns", "host"))
    monkeypatch.setattr(runner.Bench, "empty_connection_tables", lambda self, mode: None)
    monkeypatch.setattr(runner.Bench, "ebpf_program_ids", lambda self: {"node1/from_pod": 7})
    bench = runner.Bench(runner.BenchConfig(duration=2.0))
    point = runner.Point(0, "same-node", "TCP_RR", None, "cross-cpu")
    samples = [bench.measure(point, mode, 0) for mode in ("legacy", "ebpf")]
    cost = bench.record_program_costs(point)
    assert stats_on_during_runs == [False, False, True] and not held
    assert congestions == ["cubic"] * 3         # the samples and the program-cost run alike
    assert [s.bpf_programs for s in samples] == [{}, {}]
    assert cost["bpf_programs"] == {"node1/from_pod": {"id": 7, "run_cnt": 20,
                                                       "run_time_ns": 3_000, "ns_per_run": 150.0}}
    assert (cost["scenario"], cost["test"], cost["pin"]) == ("same-node", "TCP_RR", "cross-cpu")


def test_the_report_takes_program_costs_from_their_own_run():
    from rich.console import Console
    progs = {"node1/from_pod": {"id": 7, "run_cnt": 4000, "run_time_ns": 480_000,
                                "ns_per_run": 120.0}}
    result = _result([_sample(m, rep, 100.0) for rep in range(3) for m in runner.MODES])
    result["samples"][1]["bpf_programs"] = {"node1/from_pod": {"id": 7, "run_cnt": 1,
                                                               "run_time_ns": 999,
                                                               "ns_per_run": 999.0}}
    result["program_costs"] = [{"rules": 0, "scenario": "same-node", "test": "TCP_RR",
                                "size": None, "pin": None, "values": {"tps": 100.0},
                                "seconds": 2.0, "bpf_programs": progs}]
    [row] = report.program_costs(result)       # the samples' figures are not looked at
    assert (row["ns_per_run"], row["runs_per_s"], row["samples"]) == (120.0, 2000.0, 1)
    out = io.StringIO()
    report.print_tables(report.with_summary(result), Console(file=out, width=160))
    text = " ".join(out.getvalue().split())      # the title wraps over the narrow table
    assert "one more eBPF run per point, outside the samples" in text and " 120 " in text
    assert "bpf_stats_enabled was 1" not in text
    result["environment"]["bpf_stats_sysctl"] = True
    out = io.StringIO()
    report.print_tables(report.with_summary(result), Console(file=out, width=160))
    assert "kernel.bpf_stats_enabled was 1: every sample's BPF programs" in \
        " ".join(out.getvalue().split())


def test_the_report_gives_each_programs_ns_per_run_per_point():
    from rich.console import Console

    def sample(mode, rep, ns, runs):
        progs = {"node1/from_pod": {"id": 7, "run_cnt": runs, "run_time_ns": int(ns * runs),
                                    "ns_per_run": ns if runs else None},
                 "node2/from_pod": {"id": 8, "run_cnt": 0, "run_time_ns": 0, "ns_per_run": None}}
        return {"rules": 0, "scenario": "same-node", "mode": mode, "test": "TCP_RR", "size": None,
                "pin": "cross-cpu", "repeat": rep, "values": {"tps": 100.0}, "seconds": 2.0,
                "bpf_programs": progs if mode == "ebpf" else {}}
    # a result from before the program-cost run: the eBPF samples carried the stats
    result = {"samples": [sample(m, rep, ns, 1000) for rep, ns in enumerate((130.0, 90.0, 110.0))
                          for m in ("legacy", "ebpf")]}
    [row] = report.program_costs(result)
    assert row["program"] == "node1/from_pod" and row["ns_per_run"] == 110.0
    assert row["runs_per_s"] == 500.0 and row["samples"] == 3      # node2 never ran: left out
    out = io.StringIO()
    report.print_program_costs(result, Console(file=out, width=120))
    assert "same-node TCP_RR cross-cpu" in out.getvalue() and " 110 " in out.getvalue()


SNMP_TEXT = """Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm OutSegs RetransSegs
Tcp: 1 200000 500
TcpExt: SyncookiesSent TCPOFOQueue
TcpExt: 0 40
"""


def test_tcp_counters_are_read_by_section_and_name():
    from datapath.bench import tcp_counters
    counters = tcp_counters.parse(SNMP_TEXT)
    assert counters[("Tcp", "OutSegs")] == 200000 and counters[("TcpExt", "TCPOFOQueue")] == 40
    assert counters[("Ip", "DefaultTTL")] == 64
    with pytest.raises(ValueError, match="'Tcp' header followed by 'Udp' values"):
        tcp_counters.parse("Tcp: OutSegs\nUdp: 3\n")
    assert tcp_counters.figures({"sent_segs": 200000, "retrans_segs": 500,
                                 "ofo_queued": 40}) == {"retrans_pct": 0.25, "ofo_per_mseg": 200}
    assert tcp_counters.figures({"sent_segs": 200000, "retrans_segs": 500, "dsack_segs": 450,
                                 "ofo_queued": 40})["spurious_pct"] == 0.225
    assert tcp_counters.figures({"sent_segs": 0, "retrans_segs": 0, "ofo_queued": 0}) == {}
    assert tcp_counters.figures({}) == {}       # a result from before the counters


def test_a_tcp_sample_records_what_its_run_changed(monkeypatch):
    """The client's sent and retransmitted segments, the server's out-of-order skbs, read
    in their own namespaces before and after netperf; other tests read nothing."""
    from datapath.bench import netperf, tcp_counters
    reads = []
    counters = {"client-ns": {"sent_segs": 1000, "retrans_segs": 3, "dsack_segs": 1},
                "server-ns": {"ofo_queued": 10}}

    def read(ns, which):
        reads.append(ns)
        now = dict(counters[ns])
        for k in counters[ns]:          # each read a run later
            counters[ns][k] += {"sent_segs": 5000, "retrans_segs": 7, "dsack_segs": 5,
                                "ofo_queued": 2}[k]
        assert set(now) == set(which.values())
        return now
    monkeypatch.setattr(tcp_counters, "read", read)
    monkeypatch.setattr(runner.Bench, "server_netns", lambda self, scenario, mode: "server-ns")
    monkeypatch.setattr(runner.Bench, "empty_connection_tables", lambda self, mode: None)
    monkeypatch.setattr(netperf, "run_test", lambda *a, **k: netperf.Result(
        {"mbps": 900.0, "bytes": 5e8}, 1.0, 1.0))
    bench = runner.Bench(runner.BenchConfig(duration=1.0))
    sample = bench._measure_once(runner.Point(0, "same-node", "TCP_STREAM", 65536), "legacy",
                                 0, "client-ns", "h", [])
    assert sample.tcp == {"sent_segs": 5000, "retrans_segs": 7, "dsack_segs": 5, "ofo_queued": 2}
    assert reads == ["client-ns", "server-ns"] * 2
    reads.clear()
    monkeypatch.setattr(netperf, "run_test", lambda *a, **k: netperf.Result(
        {"tps": 900.0}, 1.0, 1.0))
    for test in ("TCP_RR", "UDP_RR"):
        sample = bench._measure_once(runner.Point(0, "same-node", test), "legacy", 0,
                                     "client-ns", "h", [])
        assert sample.tcp == {} and reads == [], test


def test_a_stream_point_shows_each_modes_retransmits_and_reordering():
    def stream(mode, rep, mbps, retrans, ofo):
        return {**_sample(mode, rep, 0, test="TCP_STREAM", size=65536), "pin": "cross-cpu",
                "values": {"mbps": mbps},
                "tcp": {"sent_segs": 1_000_000, "retrans_segs": retrans,
                        "dsack_segs": retrans - 400, "ofo_queued": ofo}}
    samples = [stream(m, rep, *v) for rep in range(3)
               for m, v in (("legacy", (33000, 2500, 200)), ("ebpf", (24000, 5800, 400 + rep)),
                            ("limit", (21000, 3000, 300)), ("floor", (24500, 6000, 420)))]
    samples.append({**_sample("legacy", 3, 0, test="TCP_STREAM", size=65536),
                    "pin": "cross-cpu", "values": {"mbps": 1.0}})  # from before the counters
    rows = {r["metric"]: r for r in report.summarise(_result(samples))
            if r["test"] == "TCP_STREAM"}
    assert rows["mbps"]["legacy"]["n"] == 4 and rows["retrans_pct"]["legacy"]["n"] == 3
    assert rows["retrans_pct"]["legacy"]["median"] == pytest.approx(0.25)
    assert rows["retrans_pct"]["ratios"]["ebpf/legacy"]["median"] == pytest.approx(2.32)
    assert rows["spurious_pct"]["legacy"]["median"] == pytest.approx(0.21)
    assert rows["ofo_per_mseg"]["ebpf"]["median"] == pytest.approx(401)
    # counts: eBPF against legacy only, no bound (the least reordered path limits nothing)
    assert all(set(rows[m]["ratios"]) == {"ebpf/legacy"} for m in report.TCP_COUNTS)
    assert "ebpf/bound" in rows["mbps"]["ratios"]
    from rich.console import Console
    out = io.StringIO()
    report.print_tables(report.with_summary(_result(samples)), Console(file=out, width=240))
    lines = out.getvalue().splitlines()
    line = next(line for line in lines if "retransmitted % cross-cpu" in line)
    assert "0.25" in line and "0.58" in line and "2.32x" in line, line
    assert line.count("x [") == 1, line
    line = next(line for line in lines if "spurious retransmitted % cross-cpu" in line)
    assert "0.21" in line and "0.54" in line and "2.57x" in line, line
    assert any("out of order /M segs" in line and "401" in line for line in lines)
    # the limit is judged by rates only: here the floor outruns it, and that is all
    assert [line.split(":")[1] for line in lines if line.startswith("limit ")] == [
        " same-node TCP_STREAM 65536 B Mbit/s cross-cpu"]


def test_a_count_that_is_zero_in_most_repetitions_gets_no_ratio():
    """Retransmissions at 64 B: legacy's were 0 in all but one of ten repetitions; a ratio
    over that one (a 64 B run printed 36.78x [36.78-36.78]) is none. Where the denominator
    is nonzero in most repetitions the ratio stays."""
    def stream(mode, rep, retrans, ofo):
        return {**_sample(mode, rep, 0, test="TCP_STREAM", size=64), "pin": "cross-cpu",
                "values": {"mbps": 200.0},
                "tcp": {"sent_segs": 1_000_000, "retrans_segs": retrans, "ofo_queued": ofo}}
    samples = [stream("legacy", rep, 1 if rep == 0 else 0, 2 if rep < 6 else 0)
               for rep in range(10)]
    samples += [stream("ebpf", rep, 37, 5) for rep in range(10)]
    rows = {r["metric"]: r for r in report.summarise(_result(samples))}
    assert rows["retrans_pct"]["ratios"] == {}
    assert rows["ofo_per_mseg"]["ratios"]["ebpf/legacy"]["n"] == 6
    assert rows["mbps"]["ratios"]["ebpf/legacy"]["median"] == pytest.approx(1.0)


def test_the_rate_at_equal_reordering_takes_one_slope_within_the_modes():
    """Rate against reordering: the slope within the modes (a mode that reorders more and runs
    faster at equal reordering does not tilt it), each mode's rate at the point's median
    reordering. Points without the counters, with one mode or too few samples get none."""
    def stream(mode, rep, ofo, offset, size=65536):
        return {**_sample(mode, rep, 0, test="TCP_STREAM", size=size), "pin": "cross-cpu",
                "values": {"mbps": 37000 - 22 * ofo + offset + (5 if rep % 2 else -5)},
                "tcp": {"sent_segs": 1_000_000, "retrans_segs": 10, "ofo_queued": ofo}}
    samples = [stream(m, rep, ofo + 10 * rep, off) for rep in range(5)
               for m, ofo, off in (("legacy", 350, -100), ("ebpf", 520, 300))]
    samples += [stream("legacy", rep, 300 + rep, 0, size=1024) for rep in range(9)]  # one mode
    samples += [{**_sample("ebpf", 5, 0, test="TCP_STREAM", size=65536), "pin": "cross-cpu",
                 "values": {"mbps": 9.0}}]          # from before the counters: not in the fit
    result = report.with_summary(_result(samples))
    (fit,) = result["reordering"]
    assert fit["key"] == [0, "same-node", "TCP_STREAM", 65536, "cross-cpu"] and fit["n"] == 10
    assert fit["slope"] == pytest.approx(-22, abs=0.2) and fit["r2"] > 0.99
    at = fit["rate_at"]
    assert fit["ofo_per_mseg"] == pytest.approx(455)            # the median of all ten
    assert at["ebpf"] - at["legacy"] == pytest.approx(400, abs=5)
    assert at["legacy"] == pytest.approx(37000 - 22 * 455 - 100, abs=5)
    from rich.console import Console
    out = io.StringIO()
    report.print_tables(result, Console(file=out, width=240))
    line = next(line for line in out.getvalue().splitlines()
                if line.startswith("│ same-node TCP_STREAM 65536 B"))
    assert "-22.0" in line and "1.00" in line and "26,889" in line and "27,289" in line, line
    ratio = fit["ratios"]["ebpf/legacy"]
    assert ratio["value"] == pytest.approx(at["ebpf"] / at["legacy"]) and ratio["n"] == 5
    low, high = ratio["ci"]
    assert low <= ratio["value"] <= high and high - low < 0.01   # 5 Mbit/s of noise: narrow
    assert f"1.01x [{low:.2f}-{high:.2f}]" in line, line
    assert report.reordering_fits(_result(samples[:6])) == []     # too few samples
    # where reordering explains little of the rate, the JSON has the fit, the table not
    noise = [{**s, "values": {"mbps": 30000 + (997 * i) % 1000}} for i, s in enumerate(samples)]
    result = report.with_summary(_result(noise))
    assert result["reordering"] and result["reordering"][0]["r2"] < report.MIN_FIT_R2
    out = io.StringIO()
    report.print_tables(result, Console(file=out, width=240))
    assert "Rate against reordering" not in out.getvalue()


def test_the_ratio_at_equal_reordering_has_an_interval_from_refitted_repetitions():
    """eBPF 2% above legacy at equal reordering, each sample off by up to +-1,500 Mbit/s: the
    interval is drawn from fits over resampled repetitions, holds the true ratio and is as
    wide as that noise makes it; with the noise ten times smaller it is about ten times
    narrower. A result saved before the interval existed gets it when printed."""
    rng = np.random.default_rng(3)

    def samples(noise):
        out = []
        for rep in range(10):
            for m, level, ofo in (("legacy", 30000, 380), ("ebpf", 30600, 520)):
                x = ofo + rng.uniform(-150, 150)
                out.append({**_sample(m, rep, 0, test="TCP_STREAM", size=65536),
                            "values": {"mbps": level - 20 * (x - 450) + rng.uniform(-noise, noise)},
                            "tcp": {"sent_segs": 1_000_000, "retrans_segs": 0, "ofo_queued": x}})
        return out
    (wide,) = report.reordering_fits(_result(samples(1500)))
    (narrow,) = report.reordering_fits(_result(samples(150)))
    w, n = wide["ratios"]["ebpf/legacy"], narrow["ratios"]["ebpf/legacy"]
    assert w["ci"][0] < 1.02 < w["ci"][1] and n["ci"][0] < 1.02 < n["ci"][1]
    assert w["ci"][1] - w["ci"][0] > 0.02            # the noise shows
    assert 5 < (w["ci"][1] - w["ci"][0]) / (n["ci"][1] - n["ci"][0]) < 20
    # four repetitions: the fit, but no interval (most draws repeat one or two of them)
    few = [smp for smp in samples(150) if smp["repeat"] < 4]
    (fit,) = report.reordering_fits(_result(few))
    assert fit["ratios"]["ebpf/legacy"]["ci"] is None and fit["ratios"]["ebpf/legacy"]["n"] == 4
    assert report._fit_ratio(fit["ratios"]["ebpf/legacy"]) == \
        f"{fit['ratios']['ebpf/legacy']['value']:.2f}x"
    from rich.console import Console
    out = io.StringIO()       # and the table leaves such a fit out, whatever its R²
    report.print_reordering({"reordering": [{**fit, "r2": 0.9}], "samples": few},
                            Console(file=out, width=240))
    assert out.getvalue() == ""
    old = report.with_summary(_result(samples(150)))
    for fit in old["reordering"]:
        del fit["ratios"]
    out = io.StringIO()
    report.print_reordering(old, Console(file=out, width=240))
    assert re.search(r"\d\.\d\dx \[\d\.\d\d-\d\.\d\d\]", out.getvalue()), out.getvalue()


def test_a_kernel_without_the_dsack_counter_gives_the_rest(monkeypatch):
    """TCPDSACKRecvSegs is optional (older kernels lack it): read without it, a sample has
    no spurious figure and still its others; any other counter missing is an error."""
    from datapath.bench import tcp_counters
    from netns_lab import netns
    counters = tcp_counters.parse(SNMP_TEXT)
    monkeypatch.setattr(netns, "call_in", lambda ns, fn: counters)
    assert tcp_counters.read("c", tcp_counters.CLIENT) == {"sent_segs": 200000,
                                                            "retrans_segs": 500}
    counters[("TcpExt", "TCPDSACKRecvSegs")] = 7
    assert tcp_counters.read("c", tcp_counters.CLIENT)["dsack_segs"] == 7
    del counters[("Tcp", "RetransSegs")]
    with pytest.raises(netns.NetnsError, match="no Tcp: RetransSegs"):
        tcp_counters.read("c", tcp_counters.CLIENT)
