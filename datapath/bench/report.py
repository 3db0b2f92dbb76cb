"""Turning benchmark samples into paired ratios, confidence intervals, tables, JSON and a plot.

Every repetition of a point measures every mode back to back (runner.py),
so the modes are compared within a repetition: for each repetition the
ratio eBPF/legacy (eBPF/limit, ...) is taken, and the result is the median
of those per-repetition ratios with a 95% bootstrap confidence interval
(``1.12x [1.08-1.15]``). Pairing cancels what drifts between repetitions
(the machine's other load), which ratios of per-mode medians do not.
Absolute values are the median of each mode, with the same kind of interval.

A summary row is one (iptables rules, scenario, test, size, CPU placement,
metric). For latencies and CPU cost lower is better, so a ratio below 1 is the
gain there.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict

import numpy as np

from . import tcp_counters
from .netperf import INHERIT_CC

# Azure CNI powered by Cilium (ACNS) eBPF host routing vs legacy, as published.
PUBLISHED = {
    ("same-node", "TCP_STREAM", "mbps"): 1.30,
    ("cross-node", "TCP_STREAM", "mbps", 64): 3.0,  # "up to 3x" for small messages
    ("same-node", "TCP_RR", "tps"): 20396.9 / 16003.7,
    ("cross-node", "TCP_RR", "tps"): 20396.9 / 16003.7,
}
LOWER_IS_BETTER = ("p50_us", "p90_us", "p99_us", "mean_us", "max_us", "cpu_us_per_trans",
                   "cpu_s_per_gb", "retrans_pct", "spurious_pct", "ofo_per_mseg")
# what TCP saw of the path (tcp_counters): counts near zero where all goes well, so only
# eBPF/legacy is given (no bound: the least reordered path is no limit of anything)
TCP_COUNTS = ("retrans_pct", "spurious_pct", "ofo_per_mseg")
# a stream's rate, its CPU cost, and TCP's counts
STREAM = ("mbps", "cpu_s_per_gb", *TCP_COUNTS)
METRICS = {
    "TCP_STREAM": STREAM,
    "TCP_RR": ("tps", "p50_us", "p90_us", "p99_us", "cpu_us_per_trans"),
    "TCP_CRR": ("cps", "p50_us", "p99_us", "cpu_us_per_trans"),
    "UDP_RR": ("tps", "p50_us", "p90_us", "p99_us", "cpu_us_per_trans"),
    "UDP_STREAM": ("pps", "sent_pps", "cpu_s_per_gb"),
    "TCP_STREAMx4": STREAM,
    "TCP_STREAMx16": STREAM,
}
UNITS = {"mbps": "Mbit/s", "tps": "trans/s", "cps": "conn/s", "p50_us": "p50 µs",
         "p90_us": "p90 µs", "p99_us": "p99 µs", "cpu_us_per_trans": "CPU µs/trans",
         "cpu_s_per_gb": "CPU s/GB", "mean_us": "mean µs", "max_us": "max µs",
         "pps": "packets/s received", "sent_pps": "packets/s sent",
         "retrans_pct": "retransmitted %", "spurious_pct": "spurious retransmitted %",
         "ofo_per_mseg": "out of order /M segs"}
TITLES = {"TCP_STREAM": "Throughput by message size (TCP_STREAM, no Nagle)",
          "TCP_RR": "Request/response latency and transactions (TCP_RR)",
          "TCP_CRR": "New connections (TCP_CRR)",
          "UDP_RR": "Request/response over UDP (UDP_RR)",
          "UDP_STREAM": "Small datagrams (UDP_STREAM)",
          "TCP_STREAMx4": "Throughput of 4 flows at once (TCP_STREAMx4)",
          "TCP_STREAMx16": "Throughput of 16 flows at once (TCP_STREAMx16)"}
# (numerator, denominator) of each ratio reported, when both modes were measured
RATIOS = (("ebpf", "legacy"), ("ebpf", "limit"), ("ebpf", "floor"), ("floor", "limit"),
          ("ebpf", "bound"), ("legacy-b", "legacy"))
MODE_NAMES = {"legacy": "legacy", "ebpf": "eBPF", "limit": "limit", "floor": "floor",
              "legacy-b": "legacy B", "bound": "bound"}
HEADLINE = ("tps", "cps", "mbps", "pps")   # the rate of each workload, what --aa judges by
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 14     # a fixed seed: the same samples always give the same interval
WIDE_CONSOLE = 240      # columns when stdout is not a terminal (the widest row: about 210)


def bootstrap_ci(values: list[float], level: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                 ) -> tuple[float, float, float]:
    """(median, low, high): the median of ``values`` and its percentile bootstrap interval.

    With one value the interval is that value; with few, it is no wider than
    their range (a median of resampled values never leaves it)."""
    if not values:
        raise ValueError("no values")
    data = np.asarray(values, dtype=float)
    median = float(np.median(data))
    if len(data) == 1:
        return median, median, median
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return median, float(low), float(high)


def derived(sample: dict, duration: float) -> dict[str, float]:
    """The sample's values plus its CPU cost per transaction or per gigabyte and, for TCP,
    its retransmissions and out-of-order arrivals (``tcp_counters.figures``).

    CPU time and what was transferred are taken over the same interval (the
    sample's ``cpu_window_s``; results from before it existed: the nominal
    duration)."""
    values = dict(sample["values"])
    seconds = sample.get("cpu_window_s") or duration
    transactions = (values.get("tps") or values.get("cps") or 0) * seconds
    if transactions:
        values["cpu_us_per_trans"] = sample["cpu_s"] / transactions * 1e6
    if values.get("mbps"):
        gigabytes = values["mbps"] * 1e6 / 8 * seconds / 1e9
        values["cpu_s_per_gb"] = sample["cpu_s"] / gigabytes
    values.update(tcp_counters.figures(sample.get("tcp")))
    return values


def published(scenario: str, test: str, metric: str, size) -> float | None:
    return PUBLISHED.get((scenario, test, metric, size)) or PUBLISHED.get((scenario, test, metric))


def ratio_name(num: str, den: str) -> str:
    return f"{num}/{den}"


def paired_ratios(by_rep: dict[int, dict[str, float]], num: str, den: str) -> list[float]:
    """num/den within each repetition that measured both (a repetition is one pair)."""
    return [modes[num] / modes[den] for _, modes in sorted(by_rep.items())
            if num in modes and modes.get(den)]


def with_bound(by_rep: dict[int, dict[str, float]], metric: str) -> None:
    """Add to each repetition that measured the limit and the floor its ``bound``: the better
    of the two (the higher rate, the lower latency or cost).

    Neither alone bounds eBPF everywhere: the limit (no program, fewest hops) is the fastest
    path for small packets, but for a bulk TCP flow on two CPUs the floor (eBPF's own path,
    a constant redirect, bulk skbs un-cloned as eBPF does) outruns it (docs/benchmarks.md:
    when the limit is not a limit). The better of two paths without eBPF's logic is one eBPF
    cannot beat: above it, the bench is wrong."""
    best = min if metric in LOWER_IS_BETTER else max
    for modes in by_rep.values():
        if "limit" in modes and "floor" in modes:
            modes["bound"] = best(modes["limit"], modes["floor"])


def _key(s: dict) -> tuple:
    return (s["rules"], s["scenario"], s["test"], s["size"], s.get("pin"))


def summarise(result: dict) -> list[dict]:
    duration = result["environment"]["config"]["duration"]
    # key -> metric -> repetition -> mode -> value
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for s in result["samples"]:
        values = derived(s, duration)
        for metric in METRICS[s["test"]]:
            if metric in values:
                groups[_key(s)][metric][s["repeat"]][s["mode"]] = values[metric]
    rows = []
    for (rules, scenario, test, size, pin), metrics in groups.items():
        for metric, by_rep in metrics.items():
            row = {"rules": rules, "scenario": scenario, "test": test, "size": size, "pin": pin,
                   "metric": metric, "ratios": {}}
            if metric not in TCP_COUNTS:
                with_bound(by_rep, metric)
            # a mode's own figures for measured modes only: the bound is in ratios alone
            modes = {m for reps in by_rep.values() for m in reps} - {"bound"}
            for mode in sorted(modes):
                vals = [reps[mode] for _, reps in sorted(by_rep.items()) if mode in reps]
                median, low, high = bootstrap_ci(vals)
                row[mode] = {"median": median, "ci": [low, high], "min": min(vals),
                             "max": max(vals), "n": len(vals)}
            for num, den in RATIOS:
                if metric in TCP_COUNTS and (num, den) != ("ebpf", "legacy"):
                    continue
                ratios = paired_ratios(by_rep, num, den)
                pairs = sum(1 for modes in by_rep.values() if num in modes and den in modes)
                # a ratio over the few repetitions whose denominator was not 0 (a count
                # that is 0 in most, as retransmissions at 64 B) says nothing: none
                if ratios and 2 * len(ratios) > pairs:
                    median, low, high = bootstrap_ci(ratios)
                    row["ratios"][ratio_name(num, den)] = {"median": median, "ci": [low, high],
                                                           "n": len(ratios), "each": ratios}
            row["published"] = published(scenario, test, metric, size)
            rows.append(row)
    return rows


def with_summary(result: dict) -> dict:
    result["summary"] = summarise(result)
    result["reordering"] = reordering_fits(result)
    return result


MIN_FIT_SAMPLES = 8     # a line through fewer samples says little
MIN_FIT_REPS = 5        # below, the refits' interval is mostly a few repetitions repeated
MAX_UNFIT_DRAWS = 0.02  # draws whose fit is undefined (every mode's reordering alike)
# the report's table shows a point only where reordering explains this much of the rate's
# variation within the modes (the JSON keeps every fit): elsewhere, as at 16 KiB, a "rate at
# equal reordering" is the modes' means under another name
MIN_FIT_R2 = 0.3


def reordering_fits(result: dict) -> list[dict]:
    """Per stream point whose samples carry TCP's counters: the rate (Mbit/s) against the
    out-of-order skbs per million segments, one slope for every mode and a level per mode
    (least squares over all samples), and from it each mode's rate at equal reordering (at
    the median reordering of all the point's samples). ``r2``: the share of the rate's
    variation within the modes that the reordering explains. ``ebpf/legacy``: the two modes'
    rates at equal reordering as a ratio, with a 95% bootstrap interval from refitting over
    repetitions drawn with replacement (a repetition, all its modes back to back, is the
    pair the bench's other ratios are built on).

    On two CPUs a bulk flow's rate falls with its reordering (tcp_counters); where it
    explains most of the rate within the modes, the modes' rates at equal reordering say
    how they compare once that is taken out (docs/benchmarks.md: rate against reordering)."""
    points: dict = defaultdict(list)
    for s in result["samples"]:
        figures = tcp_counters.figures(s.get("tcp"))
        if "ofo_per_mseg" in figures and s["values"].get("mbps"):
            points[_key(s)].append((figures["ofo_per_mseg"], s["values"]["mbps"], s["mode"],
                                    s["repeat"]))
    fits = []
    for key, pts in sorted(points.items(), key=lambda kv: tuple(map(str, kv[0]))):
        names = sorted({p[2] for p in pts})
        if len(pts) < MIN_FIT_SAMPLES or len(names) < 2:
            continue
        x, y = (np.array([p[i] for p in pts], dtype=float) for i in (0, 1))
        mode = np.array([names.index(p[2]) for p in pts])
        at = float(np.median(x))
        fit = _within_modes_fit(x, y, mode, len(names), at)
        if fit is None:
            continue
        slope, r2, rate_at = fit
        modes_of = defaultdict(set)     # repetition -> the modes it measured
        for p in pts:
            modes_of[p[3]].add(p[2])
        entry = {"key": list(key), "n": len(pts), "reps": len(modes_of),
                 "slope": slope, "ofo_per_mseg": at, "r2": r2,
                 "rate_at": dict(zip(names, rate_at))}
        if {"ebpf", "legacy"} <= set(names):
            num, den = names.index("ebpf"), names.index("legacy")
            entry["ratios"] = {ratio_name("ebpf", "legacy"): {
                "value": rate_at[num] / rate_at[den],
                "ci": _refit_interval(x, y, mode, np.array([p[3] for p in pts]), len(names),
                                      at, num, den),
                "n": sum({"ebpf", "legacy"} <= m for m in modes_of.values())}}
        fits.append(entry)
    return fits


def _within_modes_fit(x, y, mode, n_modes: int, at: float):
    """(slope, r2, each mode's rate at `at`) of y against x with one slope and a level per
    mode; None where x does not vary within any mode (or a mode has no sample)."""
    if any(not np.any(mode == i) for i in range(n_modes)):
        return None
    mx, my = (np.array([v[mode == i].mean() for i in range(n_modes)]) for v in (x, y))
    # what is left of x and y within the modes, once each mode's mean is taken off
    x_in, y_in = x - mx[mode], y - my[mode]
    if np.dot(x_in, x_in) <= 1e-12 * max(float(np.dot(x, x)), 1e-300):  # rounding only
        return None
    slope = float(np.dot(x_in, y_in) / np.dot(x_in, x_in))
    residual = y_in - slope * x_in
    within = float(np.dot(y_in, y_in))
    r2 = 1 - float(np.dot(residual, residual)) / within if within else 0.0
    return slope, r2, [float(v) for v in my + slope * (at - mx)]


def _refit_interval(x, y, mode, reps, n_modes: int, at: float, num: int, den: int,
                    level: float = 0.95) -> list[float] | None:
    """The percentile bootstrap interval [low, high] of rate_at[num] / rate_at[den],
    refitting over repetitions drawn with replacement. None (no interval) with fewer than
    MIN_FIT_REPS repetitions, where most draws repeat a few of them, or where more than
    MAX_UNFIT_DRAWS of the draws leave the fit undefined (leaving them out would no longer
    be resampling)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    labels = sorted(set(reps.tolist()))
    if len(labels) < MIN_FIT_REPS:
        return None
    members = [np.flatnonzero(reps == r) for r in labels]
    ratios = []
    for draw in rng.integers(0, len(labels), size=(BOOTSTRAP_RESAMPLES, len(labels))):
        idx = np.concatenate([members[i] for i in draw])
        fit = _within_modes_fit(x[idx], y[idx], mode[idx], n_modes, at)
        if fit is not None and fit[2][den] > 0:
            ratios.append(fit[2][num] / fit[2][den])
    if len(ratios) < (1 - MAX_UNFIT_DRAWS) * BOOTSTRAP_RESAMPLES:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return [float(low), float(high)]


def print_reordering(result: dict, console) -> None:
    from rich.table import Table
    fits = result.get("reordering")
    if fits is None or any("ratios" not in f for f in fits if {"ebpf", "legacy"} <= set(
            f["rate_at"])):     # saved before the fits had their interval
        fits = reordering_fits(result)
    # a fit through a few repetitions (--quick) has no interval and its slope can come out
    # of noise with either sign: the JSON has it, the table not
    fits = [f for f in fits
            if f["r2"] >= MIN_FIT_R2 and f.get("reps", MIN_FIT_REPS) >= MIN_FIT_REPS]
    if not fits:
        return
    modes = [m for m in MODE_NAMES if any(m in f["rate_at"] for f in fits)]
    both = {"ebpf", "legacy"} <= set(modes)
    table = Table(title="Rate against reordering (TCP_STREAM, where it explains the rate: R² "
                  f"within the modes >= {MIN_FIT_R2}, {MIN_FIT_REPS} repetitions or more): one "
                  "slope for every mode; each mode's Mbit/s at equal reordering")
    for col in ("point", "Mbit/s per out of order /M segs", "R²", "at out of order /M",
                *(MODE_NAMES[m] for m in modes), *(("eBPF/legacy",) if both else ())):
        table.add_column(col, justify="left" if col == "point" else "right")
    for f in fits:
        at = f["rate_at"]
        ratio = f.get("ratios", {}).get(ratio_name("ebpf", "legacy"))
        table.add_row(_point_label(f["key"]), f"{f['slope']:+.1f}", f"{f['r2']:.2f}",
                      f"{f['ofo_per_mseg']:,.0f}", *(_fmt(at.get(m)) for m in modes),
                      *((_fit_ratio(ratio),) if both else ()))
    console.print(table)


def _point_label(key) -> str:
    """A point's (rules, scenario, test, size, pin) as a table's first cell."""
    rules, scenario, test, size, pin = key
    return " ".join(str(x) for x in (scenario, test, size and f"{size} B", pin) if x)


def _fmt(v: float | None, metric: str = "") -> str:
    if v is None:
        return "-"
    if metric.startswith("cpu"):
        return f"{v:.3g}"
    if metric in ("retrans_pct", "spurious_pct"):
        return f"{v:.2f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def format_ratio(r: dict | None) -> str:
    """``1.12x [1.08-1.15]``; ``-`` when not measured."""
    return _ratio_with_ci(r["median"], r["ci"]) if r else "-"


def _ratio_with_ci(value: float, ci) -> str:
    low, high = ci
    return f"{value:.2f}x [{low:.2f}-{high:.2f}]"


def _plain_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fit_ratio(r: dict | None) -> str:
    """A fitted ratio and its interval, as format_ratio() prints a median's: ``0.97x
    [0.90-1.04]``; the ratio alone where there is no interval (too few repetitions)."""
    if not r:
        return "-"
    return _ratio_with_ci(r["value"], r["ci"]) if r["ci"] else _plain_ratio(r["value"])


def console_for_output(console=None):
    """A rich console that does not cut tables to 80 columns when stdout is a pipe or a log."""
    from rich.console import Console
    if console is not None:
        return console
    probe = Console()
    return probe if probe.is_terminal else Console(width=WIDE_CONSOLE, log_path=False)


def _row_label(r: dict) -> str:
    label = f"{r['size']} B {UNITS[r['metric']]}" if r["size"] else UNITS[r["metric"]]
    return f"{label} {r['pin']}" if r.get("pin") else label


def _row_order(r: dict) -> tuple:
    return (r["scenario"], r.get("pin") or "", r["size"] or 0,
            METRICS[r["test"]].index(r["metric"]))


def node_profile_line(profile: dict) -> str:
    """What the labs' nodes carried (runner's environment["node_profile"])."""
    applied = next(iter(profile["labs"].values()), {})
    forced = any(a.get("ebpf_forced") for a in profile["labs"].values())
    return (f"node profile {profile['name']}: {applied.get('rules_per_node', 0):,} iptables "
            f"rules and {applied.get('conntrack_per_node', 0):,} filled conntrack entries in "
            "every node of the legacy and eBPF labs"
            + ("; eBPF host routing enabled over them with --force (the rules no longer apply "
               "to its pod traffic)" if forced else ""))


def placement(cpu_pin) -> str:
    """The bench's --cpu-pin in words (a result from before it took a value: True or False)."""
    pin = {True: "both", False: "none", None: "none"}.get(cpu_pin, cpu_pin)
    return {"cross-cpu": "pinned to two CPUs (netperf -T 0,1)",
            "same-cpu": "pinned to one CPU (netperf -T 0,0)",
            "both": "every point on two CPUs and on one (netperf -T 0,1 and 0,0)",
            "none": "where the scheduler put them (not pinned)"}.get(pin, str(pin))


def _above(r: dict, name: str) -> bool:
    return bool((q := r["ratios"].get(name)) and q["ci"][0] > 1.0)


def limits_beaten(rows: list[dict]) -> list[tuple[dict, str]]:
    """(row, ratio name) of every rate (``HEADLINE``) where eBPF is above its bound (the better
    of limit and floor, ``with_bound``) with the whole interval: a bug in the bench. A result
    without the floor is judged by its limit."""
    return [(r, name) for r in sorted(rows, key=_row_order) if r["metric"] in HEADLINE
            for name in ("ebpf/bound" if "ebpf/bound" in r["ratios"] else "ebpf/limit",)
            if _above(r, name)]


def limits_outrun(rows: list[dict]) -> list[dict]:
    """Rates where eBPF or the floor is above the limit with the whole interval but eBPF is
    not above its bound: there the plain path is no bound and the floor is."""
    return [r for r in sorted(rows, key=_row_order) if r["metric"] in HEADLINE
            and "ebpf/bound" in r["ratios"] and not _above(r, "ebpf/bound")
            and (_above(r, "ebpf/limit") or _above(r, "floor/limit"))]


def _congestion_record(result: dict) -> dict | None:
    return (result.get("lab_settings") or {}).get("tcp_congestion_control") or None


def _inherited(cc: dict) -> bool:
    """The TCP tests ran the namespaces' default (--tcp-cc inherit)."""
    return cc.get("tests") in (None, INHERIT_CC)


def congestion(result: dict) -> str:
    """The TCP tests' congestion control in words: the one named (netperf -K) or the
    namespaces' default, which they took from the host's."""
    cc = _congestion_record(result)
    if not cc:
        return "not recorded (each namespace's default, taken from the host's)"
    default = cc.get("namespace_default") or "unknown"
    if _inherited(cc):
        return f"the namespaces' default, {default} (--tcp-cc {INHERIT_CC})"
    return f"{cc['tests']} (netperf -K; the namespaces' default: {default})"


def congestion_that_ran(result: dict) -> str | None:
    """The congestion control the TCP tests ran (None: not recorded)."""
    cc = _congestion_record(result)
    if not cc:
        return None
    return cc.get("namespace_default") if _inherited(cc) else cc["tests"]


def compare_notes(a: dict, b: dict) -> list[str]:
    """What makes two runs' TCP figures measure different things."""
    ca, cb = congestion_that_ran(a), congestion_that_ran(b)
    if ca == cb:
        return []
    def said(cc):
        return cc or "an unrecorded congestion control (each namespace's default)"
    return [f"A's TCP tests ran {said(ca)}, B's {said(cb)}: their TCP figures measure "
            "different congestion controls (a bulk flow's rate and reordering depend on it)"]


def print_tables(result: dict, console=None) -> None:
    from rich.table import Table
    console = console_for_output(console)
    env = result["environment"]
    cfg = env["config"]
    modes = [m for m in env.get("modes", ("legacy", "ebpf", "limit"))]
    console.print(f"[bold]hostrouting bench[/] on {env['kernel']}, {env['cpu']}, {env['cores']} "
                  f"cores; IPv{cfg.get('ip_family', 4)}; {cfg['duration']:g}s per test, "
                  f"{cfg['repeat']} repetitions, modes "
                  "back to back in rotated order; medians, ratios: median of the "
                  "per-repetition ratios [95% bootstrap CI]")
    if "floor" in modes:
        console.print("limit: no netfilter and no routing program at all; floor: only a constant "
                      "redirect on eBPF's hooks (bulk skbs un-cloned, as eBPF does). eBPF/floor "
                      "is what the program's logic costs, floor/limit what the redirect "
                      "mechanism costs; bound: the better of limit and floor in each "
                      "repetition, which eBPF cannot beat.")
    if (profile := env.get("node_profile")) and profile["name"] != "bare":
        console.print(node_profile_line(profile))
    tcp = any(t.startswith("TCP_") for t in cfg.get("tests", ("TCP_",)))
    console.print(f"netperf and netserver: {placement(cfg.get('cpu_pin'))}"
                  + (f"; TCP congestion control: {congestion(result)}" if tcp else ""))
    attach = sorted(set((result.get("lab_settings") or {}).get("attach", {}).values()))
    if attach:
        console.print(f"eBPF programs attached with: {', '.join(attach)}")
    rows = result.get("summary") or summarise(result)
    aa = "legacy-b" in modes
    measured = set(modes) | ({"bound"} if {"limit", "floor"} <= set(modes) else set())
    ratios = [("legacy-b", "legacy")] if aa else \
        [(n, d) for n, d in RATIOS if n in measured and d in measured and n != "legacy-b"]
    for rules in sorted({r["rules"] for r in rows}):
        for test in TITLES:
            sel = [r for r in rows if r["rules"] == rules and r["test"] == test]
            if not sel:
                continue
            title = f"{TITLES[test]}, {rules} iptables rules per node"
            table = Table(title=("A/A noise floor: " if aa else "") + title)
            cols = ["scenario", "size" if test == "TCP_STREAM" else "metric",
                    *(MODE_NAMES[m] for m in modes),
                    *(f"{MODE_NAMES[n]}/{MODE_NAMES[d]}" for n, d in ratios)]
            for col in cols:
                table.add_column(col, justify="left" if col == "scenario" else "right",
                                 no_wrap=True)
            for r in sorted(sel, key=_row_order):
                cells = [r["scenario"], _row_label(r),
                         *(_fmt(r.get(m, {}).get("median"), r["metric"]) for m in modes),
                         *(format_ratio(r["ratios"].get(ratio_name(n, d))) for n, d in ratios)]
                table.add_row(*cells)
            console.print(table)
    shown = sorted({(r["scenario"], r["test"], UNITS[r["metric"]], r["published"]) for r in rows
                    if r["published"] and not aa})
    if shown:
        console.print("published eBPF/legacy (Azure CNI powered by Cilium): " + "; ".join(
            f"{scenario} {test} {unit} {_plain_ratio(v)}" for scenario, test, unit, v in shown))
    for r, name in limits_beaten(rows):
        console.print(f"[red]limit beaten[/]: {r['scenario']} {r['test']} {_row_label(r)}: "
                      f"eBPF/{name.split('/')[1]} {format_ratio(r['ratios'][name])}: " + (
                          "eBPF is above what no datapath logic can beat, a bug in the bench"
                          if name == "ebpf/bound" else "this result has no floor, so whether "
                          "the limit bounds this point it cannot tell"))
    for r in limits_outrun(rows):
        console.print(f"[yellow]limit outrun[/]: {r['scenario']} {r['test']} {_row_label(r)}: "
                      f"eBPF/limit {format_ratio(r['ratios'].get('ebpf/limit'))}, floor/limit "
                      f"{format_ratio(r['ratios'].get('floor/limit'))}: the plain path is no "
                      f"bound here, the floor is; eBPF/bound "
                      f"{format_ratio(r['ratios']['ebpf/bound'])} (docs/benchmarks.md: when the "
                      "limit is not a limit)")
    if aa and (floor := noise_floor(rows)):
        typical, far, row = floor
        console.print(f"noise floor: the A/A intervals of throughput and transaction rates reach "
                      f"{typical:.1%} from 1.00x (median over the points), at most {far:.1%} "
                      f"({row['scenario']} {_row_label(row)} "
                      f"{format_ratio(row['ratios']['legacy-b/legacy'])}); a difference "
                      "within that reach is none on this machine")
    if len({r["rules"] for r in rows}) > 1 and not aa:
        table = Table(title="Rule load: TCP_RR transactions/s by iptables rules per node")
        for col in ("scenario", "rules", "legacy", "eBPF", "eBPF/legacy"):
            table.add_column(col, justify="right")
        for r in sorted((r for r in rows if r["test"] == "TCP_RR" and r["metric"] == "tps"),
                        key=lambda r: (r["scenario"], r["rules"])):
            table.add_row(r["scenario"], str(r["rules"]), _fmt(r["legacy"]["median"]),
                          _fmt(r["ebpf"]["median"]), format_ratio(r["ratios"].get("ebpf/legacy")))
        console.print(table)
    print_reordering(result, console)
    print_program_costs(result, console)
    if env.get("bpf_stats_sysctl"):
        console.print("[yellow]kernel.bpf_stats_enabled was 1[/]: every sample's BPF programs "
                      "(eBPF's, the floor's) paid two clock reads per run; legacy and limit "
                      "did not")
    if env.get("steal_s"):
        console.print(f"steal time during the run: {env['steal_s']:.2f} s (the hypervisor ran "
                      "something else on these CPUs)")
    for retry in env.get("retried_runs", []):
        console.print(f"[yellow]retried once[/]: {retry['scenario']} {retry['test']} "
                      f"{retry['mode']} (repeat {retry['repeat'] + 1}): {retry['error']}")
    if result.get("profiles"):
        print_profiles(result["profiles"], console)


def program_costs(result: dict) -> list[dict]:
    """Per point and eBPF program that ran in it: its ns per run (bpf_stats: the program's own
    time, tail calls included) and runs a second over the point's program-cost run (a run of
    its own, outside the samples: runner.Bench.record_program_costs), or, in a result from
    before those runs, the median over the eBPF samples, which carried the stats then.
    Programs that did not run in a point are left out."""
    runs: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    measured = result.get("program_costs")
    if measured is None:        # a result from before: the samples held the stats
        measured = [s for s in result["samples"] if s["mode"] == "ebpf"]
    for s in measured:
        for prog, fig in (s.get("bpf_programs") or {}).items():
            if fig.get("run_cnt") and fig.get("ns_per_run") is not None:
                runs[(*_key(s), prog)].append((fig["ns_per_run"],
                                               fig["run_cnt"] / max(s["seconds"], 1e-9)))
    return [{"key": key[:-1], "program": key[-1],
             "ns_per_run": statistics.median(ns for ns, _ in v),
             "runs_per_s": statistics.median(r for _, r in v), "samples": len(v)}
            for key, v in sorted(runs.items(), key=lambda kv: tuple(map(str, kv[0])))]


def print_program_costs(result: dict, console) -> None:
    from rich.table import Table
    rows = program_costs(result)
    if not rows:
        return
    own_run = result.get("program_costs") is not None
    table = Table(title="eBPF programs: ns per run (bpf_stats, " + (
        "one more eBPF run per point, outside the samples)" if own_run else
        "median over the eBPF samples)"))
    cols = ("point", "program", "ns/run", "runs/s") + (() if own_run else ("samples",))
    for col in cols:
        table.add_column(col, justify="left" if col in ("point", "program") else "right")
    for r in rows:
        table.add_row(_point_label(r["key"]), r["program"], f"{r['ns_per_run']:.0f}",
                      _fmt(r["runs_per_s"]), *(() if own_run else (str(r["samples"]),)))
    console.print(table)


def side_by_side(profiles: list[dict], left: str, right: str, top: int) -> list[dict]:
    """Per point that profiled both modes: the two modes' top kernel symbols, rank by rank."""
    by_point: dict = defaultdict(dict)
    for p in profiles:
        by_point[(p["rules"], p["scenario"], p["test"], p["size"], p.get("pin"))][p["mode"]] = p
    out = []
    for key, modes in by_point.items():
        if left not in modes or right not in modes:
            continue
        a, b = modes[left].get("top", [])[:top], modes[right].get("top", [])[:top]
        out.append({"key": key, "left": modes[left], "right": modes[right],
                    "rows": [(a[i] if i < len(a) else None, b[i] if i < len(b) else None)
                             for i in range(max(len(a), len(b)))]})
    return out


def print_profiles(profiles: list[dict], console=None) -> None:
    """The top kernel symbols of legacy and eBPF (A/A: legacy and legacy B) side by side, per
    point, from bench --profile's recordings."""
    from rich.markup import escape
    from rich.table import Table

    from .perf import PATH_NAMES, TOP
    console = console_for_output(console)
    modes = {p["mode"] for p in profiles}
    left, right = ("legacy", "legacy-b") if "legacy-b" in modes else ("legacy", "ebpf")
    for p in profiles:
        if p.get("error"):
            console.print(f"[yellow]no profile[/] of {p['scenario']} {p['test']} {p['mode']}: "
                          f"{escape(p['error'])}")
    for point in side_by_side(profiles, left, right, TOP):
        table = Table(title=f"Where the time goes, {_point_label(point['key'])}: top kernel "
                      f"symbols by self % of the path's samples ({PATH_NAMES}; perf record, an "
                      "extra repetition)")
        for col in ("#", MODE_NAMES[left], "%", MODE_NAMES[right], "%"):
            table.add_column(col, justify="left" if col not in ("#", "%") else "right",
                             no_wrap=True)
        for rank, (a, b) in enumerate(point["rows"], 1):
            table.add_row(str(rank), escape(a["symbol"]) if a else "",
                          f"{a['self_pct']:.1f}" if a else "",
                          escape(b["symbol"]) if b else "", f"{b['self_pct']:.1f}" if b else "")
        console.print(table)
        console.print("; ".join(
            f"{MODE_NAMES[m]}: {p['path_samples']:,} of {p['samples']:,} samples on the path, "
            f"{p['kernel_samples'] / max(1, p['path_samples']):.0%} in the kernel"
            for m, p in ((left, point["left"]), (right, point["right"]))))
    if profiles:
        first = next((p for p in profiles if p.get("perf_data")), None)
        if first:
            console.print(f"recordings, folded stacks and full symbol lists in "
                          f"{escape(os.path.dirname(first['perf_data']))} (perf report -i FILE)")


def noise_floor(rows: list[dict]) -> tuple[float, float, dict] | None:
    """How far from 1.00x the A/A intervals of throughput and transaction rates reach: the
    median over the points, the farthest, and the row that reaches it."""
    reach = [(max(1 - r["ratios"]["legacy-b/legacy"]["ci"][0],
                  r["ratios"]["legacy-b/legacy"]["ci"][1] - 1), r)
             for r in rows if "legacy-b/legacy" in r["ratios"] and r["metric"] in HEADLINE]
    if not reach:
        return None
    far, row = max(reach, key=lambda x: x[0])
    return float(np.median([x for x, _ in reach])), far, row


def save(result: dict, path: str) -> None:
    """Every sample and the summary, as JSON that ``load_result`` (bench compare) reads."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def load_result(path: str) -> dict:
    """A saved result, its summary computed again from the samples (older files had none
    with intervals)."""
    try:
        with open(path) as f:
            return with_summary(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a hostrouting bench result ({e})") from None


def _row_key(r: dict) -> tuple:
    return (r["rules"], r["scenario"], r["test"], r["size"], r.get("pin"), r["metric"])


def _overlap(a: list[float], b: list[float]) -> bool:
    return not (b[0] > a[1] or b[1] < a[0])


def compare(a: dict, b: dict) -> list[dict]:
    """Every ratio (and every mode's median) present in both runs: A, B with their
    intervals, and whether the intervals overlap (then the change is noise)."""
    index = {_row_key(r): r for r in a["summary"]}
    out = []
    for rb in b["summary"]:
        ra = index.get(_row_key(rb))
        if not ra:
            continue
        items = [(name, ra["ratios"][name], rb["ratios"][name]) for name in rb["ratios"]
                 if name in ra["ratios"]]
        items += [(mode, ra[mode], rb[mode]) for mode in MODE_NAMES if mode in ra and mode in rb]
        for what, x, y in items:
            x_ci, y_ci = (v["ci"] if "ci" in v else [v["min"], v["max"]] for v in (x, y))
            out.append({"key": _row_key(rb), "what": what, "a": x["median"], "b": y["median"],
                        "a_ci": x_ci, "b_ci": y_ci,
                        "change": (y["median"] - x["median"]) / x["median"] if x["median"]
                        else None, "within_noise": _overlap(x_ci, y_ci)})
    return out


def print_compare(rows: list[dict], console=None) -> None:
    from rich.table import Table
    console = console_for_output(console)
    table = Table(title="bench compare: A -> B (medians [95% CI]; noise = the intervals overlap)")
    for col in ("scenario", "test", "size/metric", "what", "A", "B", "change", "verdict"):
        table.add_column(col, justify="right")
    for r in rows:
        rules, scenario, test, size, pin, metric = r["key"]
        better = (r["change"] or 0) < 0 if metric in LOWER_IS_BETTER else (r["change"] or 0) > 0
        verdict = "noise" if r["within_noise"] else ("better" if better else "worse")
        ratio = "/" in r["what"]

        def cell(v, ci):
            if ratio:
                return format_ratio({"median": v, "ci": ci})
            return f"{_fmt(v, metric)} [{_fmt(ci[0], metric)}-{_fmt(ci[1], metric)}]"
        label = f"{size or ''} {UNITS[metric]}{f' {pin}' if pin else ''}".strip()
        table.add_row(scenario, test, label, r["what"], cell(r["a"], r["a_ci"]),
                      cell(r["b"], r["b_ci"]),
                      "-" if r["change"] is None else f"{r['change']:+.1%}", verdict)
    console.print(table)


def _errorbar(stat: dict) -> tuple[float, float, float]:
    """(value, distance down, distance up) of a median and its interval."""
    low, high = stat.get("ci", [stat.get("min", stat["median"]), stat.get("max", stat["median"])])
    return stat["median"], stat["median"] - low, high - stat["median"]


def plot(result: dict, path: str) -> None:
    """First the ratios a reader wants (eBPF/legacy, eBPF/limit per point, 95% CI error bars,
    a line at 1.0), then the absolute values: markers with error bars where measured, never a
    line joining sizes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = result.get("summary") or summarise(result)
    rows = [r for r in rows if r["rules"] == min(x["rules"] for x in rows)]
    points = sorted((r for r in rows if r["metric"] in HEADLINE),
                    key=lambda r: (r["scenario"], r["test"], r.get("pin") or "", r["size"] or 0))
    ratios = [name for name in ("ebpf/legacy", "ebpf/limit", "legacy-b/legacy")
              if any(name in r["ratios"] for r in points)]
    scenarios = sorted({r["scenario"] for r in rows})
    fig = plt.figure(figsize=(max(8, 0.6 * len(points) + 3), 12))
    grid = fig.add_gridspec(3, len(scenarios))
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, len(ratios))
    for i, name in enumerate(ratios):
        xs, ys, down, up = [], [], [], []
        for x, r in enumerate(points):
            if name in r["ratios"]:
                y, d, u = _errorbar(r["ratios"][name])
                xs.append(x + (i - (len(ratios) - 1) / 2) * width)
                ys.append(y)
                down.append(d)
                up.append(u)
        ax.errorbar(xs, ys, yerr=[down, up], fmt="o", capsize=3, label=name.replace("ebpf", "eBPF"))
    ax.axhline(1.0, color="grey", linewidth=1)
    # a log scale shows 0.8x and 1.25x equally far from 1.0; one wild interval (a stall in
    # a noisy repetition) is cut at 4x rather than squash every other point flat
    ax.set_yscale("log", base=2)
    ends = [v for r in points for name in ratios if name in r["ratios"]
            for v in r["ratios"][name]["ci"]]
    if ends:
        ax.set_ylim(max(0.25, min(ends) / 1.05), min(4.0, max(ends) * 1.05))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2gx"))
    ax.set_xticks(range(len(points)),
                  [f"{r['scenario']}\n{r['test']}{' ' + str(r['size']) if r['size'] else ''}"
                   f"{' ' + r['pin'] if r.get('pin') else ''}" for r in points],
                  rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ratio (median of per-repetition ratios)")
    ax.set_title("ratios per point, 95% bootstrap CI (above 1: more throughput)")
    ax.legend()
    modes = [m for m in MODE_NAMES if any(m in r for r in rows)]
    # the absolute panels show one placement (--cpu-pin both measures two): two CPUs first
    pin = min({r.get("pin") for r in rows}, key=lambda p: (p != "cross-cpu", p or ""))
    for col, scenario in enumerate(scenarios):
        ax = fig.add_subplot(grid[1, col])
        stream = sorted((r for r in rows if r["scenario"] == scenario and r["metric"] == "mbps"
                         and r.get("pin") == pin), key=lambda r: r["size"])
        for i, mode in enumerate(modes):
            pts = [(r["size"] * (1 + 0.06 * (i - len(modes) / 2)), *_errorbar(r[mode]))
                   for r in stream if mode in r]
            if pts:
                xs, ys, down, up = zip(*pts)
                ax.errorbar(xs, ys, yerr=[down, up], fmt="o", linestyle="none", capsize=3,
                            label=MODE_NAMES[mode])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{scenario}: TCP_STREAM{f' ({pin})' if pin else ''}")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("Mbit/s")
        ax.legend(fontsize=7)
        ax = fig.add_subplot(grid[2, col])
        lat = {r["metric"]: r for r in rows if r["scenario"] == scenario and r["test"] == "TCP_RR"
               and r.get("pin") == pin}
        pcts = [m for m in ("p50_us", "p90_us", "p99_us") if m in lat]
        for i, mode in enumerate(modes):
            pts = [(x + (i - (len(modes) - 1) / 2) * 0.15, *_errorbar(lat[m][mode]))
                   for x, m in enumerate(pcts) if mode in lat[m]]
            if pts:
                xs, ys, down, up = zip(*pts)
                ax.errorbar(xs, ys, yerr=[down, up], fmt="o", capsize=3, label=MODE_NAMES[mode])
        ax.set_xticks(range(len(pcts)), [m[:3] for m in pcts])
        ax.set_title(f"{scenario}: TCP_RR latency")
        ax.set_ylabel("µs")
        if pcts:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
