"""Turning benchmark samples into medians, ratios, tables, comparisons and a plot.

A summary row is one (iptables rules, scenario, test, size, metric): the
median, min and max of each mode, the ratios eBPF/legacy and eBPF/limit of the
medians, and the published AKS ratio where one exists. For latencies and CPU
cost lower is better, so a ratio below 1 is the gain there.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

# Azure CNI powered by Cilium (ACNS) eBPF host routing vs legacy, as published.
PUBLISHED = {
    ("same-node", "TCP_STREAM", "mbps"): 1.30,
    ("cross-node", "TCP_STREAM", "mbps", 64): 3.0,  # "up to 3x" for small messages
    ("same-node", "TCP_RR", "tps"): 20396.9 / 16003.7,
    ("cross-node", "TCP_RR", "tps"): 20396.9 / 16003.7,
}
LOWER_IS_BETTER = ("p50_us", "p90_us", "p99_us", "mean_us", "cpu_us_per_trans", "cpu_s_per_gb")
METRICS = {
    "TCP_STREAM": ("mbps", "cpu_s_per_gb"),
    "TCP_RR": ("tps", "p50_us", "p90_us", "p99_us", "cpu_us_per_trans"),
    "TCP_CRR": ("cps", "p50_us", "p99_us", "cpu_us_per_trans"),
}
UNITS = {"mbps": "Mbit/s", "tps": "trans/s", "cps": "conn/s", "p50_us": "p50 µs",
         "p90_us": "p90 µs", "p99_us": "p99 µs", "cpu_us_per_trans": "CPU µs/trans",
         "cpu_s_per_gb": "CPU s/GB", "mean_us": "mean µs"}


def derived(sample: dict, duration: float) -> dict[str, float]:
    """The sample's values plus its CPU cost per transaction or per gigabyte."""
    values = dict(sample["values"])
    transactions = (values.get("tps") or values.get("cps") or 0) * duration
    if transactions:
        values["cpu_us_per_trans"] = sample["cpu_s"] / transactions * 1e6
    if values.get("mbps"):
        gigabytes = values["mbps"] * 1e6 / 8 * duration / 1e9
        values["cpu_s_per_gb"] = sample["cpu_s"] / gigabytes
    return values


def published(scenario: str, test: str, metric: str, size) -> float | None:
    return PUBLISHED.get((scenario, test, metric, size)) or PUBLISHED.get((scenario, test, metric))


def summarise(result: dict) -> list[dict]:
    duration = result["environment"]["config"]["duration"]
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in result["samples"]:
        values = derived(s, duration)
        for metric in METRICS[s["test"]]:
            if metric in values:
                key = (s["rules"], s["scenario"], s["test"], s["size"], metric)
                groups[key][s["mode"]].append(values[metric])
    rows = []
    for (rules, scenario, test, size, metric), by_mode in groups.items():
        row = {"rules": rules, "scenario": scenario, "test": test, "size": size, "metric": metric}
        for mode, vals in by_mode.items():
            row[mode] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                         "n": len(vals)}
        med = {m: row[m]["median"] for m in ("legacy", "ebpf", "limit") if m in row}
        row["ebpf_vs_legacy"] = med["ebpf"] / med["legacy"] if med.get("legacy") and "ebpf" in med else None
        row["ebpf_vs_limit"] = med["ebpf"] / med["limit"] if med.get("limit") and "ebpf" in med else None
        row["published"] = published(scenario, test, metric, size)
        rows.append(row)
    return rows


def with_summary(result: dict) -> dict:
    result["summary"] = summarise(result)
    return result


def _fmt(v: float | None, metric: str = "") -> str:
    if v is None:
        return "-"
    if metric.startswith("cpu"):
        return f"{v:.3g}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_tables(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    env = result["environment"]
    console.print(f"[bold]hostrouting bench[/] on {env['kernel']}, {env['cpu']}, {env['cores']} "
                  f"cores; {env['config']['duration']:g}s per test, {env['config']['repeat']} "
                  "repetitions, modes interleaved; medians, ratios of medians")
    rows = result.get("summary") or summarise(result)
    for rules in sorted({r["rules"] for r in rows}):
        for test in ("TCP_STREAM", "TCP_RR", "TCP_CRR"):
            sel = [r for r in rows if r["rules"] == rules and r["test"] == test]
            if not sel:
                continue
            title = {"TCP_STREAM": "Throughput by message size (TCP_STREAM)",
                     "TCP_RR": "Request/response latency and transactions (TCP_RR)",
                     "TCP_CRR": "New connections (TCP_CRR)"}[test]
            table = Table(title=f"{title}, {rules} iptables rules per node")
            for col in ("scenario", "size" if test == "TCP_STREAM" else "metric", "legacy",
                        "eBPF", "limit", "eBPF/legacy", "eBPF/limit", "published"):
                table.add_column(col, justify="left" if col == "scenario" else "right")
            for r in sorted(sel, key=lambda r: (r["scenario"], r["size"] or 0,
                                                METRICS[test].index(r["metric"]))):
                label = (f"{r['size']} B {UNITS[r['metric']]}" if test == "TCP_STREAM"
                         else UNITS[r["metric"]])
                table.add_row(r["scenario"], label,
                              *[_fmt(r.get(m, {}).get("median"), r["metric"])
                                for m in ("legacy", "ebpf", "limit")],
                              _ratio(r["ebpf_vs_legacy"]), _ratio(r["ebpf_vs_limit"]),
                              _ratio(r["published"]))
            console.print(table)
    if len({r["rules"] for r in rows}) > 1:
        table = Table(title="Rule load: TCP_RR transactions/s by iptables rules per node")
        for col in ("scenario", "rules", "legacy", "eBPF", "eBPF/legacy"):
            table.add_column(col, justify="right")
        for r in sorted((r for r in rows if r["test"] == "TCP_RR" and r["metric"] == "tps"),
                        key=lambda r: (r["scenario"], r["rules"])):
            table.add_row(r["scenario"], str(r["rules"]), _fmt(r["legacy"]["median"]),
                          _fmt(r["ebpf"]["median"]), _ratio(r["ebpf_vs_legacy"]))
        console.print(table)
    for retry in env.get("retried_runs", []):
        console.print(f"[yellow]retried once[/]: {retry['scenario']} {retry['test']} "
                      f"{retry['mode']} (repeat {retry['repeat'] + 1}): {retry['error']}")


def save(result: dict, path: str) -> None:
    """Every sample and the summary, as JSON that ``load_result`` (bench compare) reads."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def load_result(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
        return result if "summary" in result else with_summary(result)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a hostrouting bench result ({e})") from None


def compare(a: dict, b: dict) -> list[dict]:
    """Rows present in both runs: medians, the change, and whether ranges overlap (noise)."""
    index = {(r["rules"], r["scenario"], r["test"], r["size"], r["metric"]): r for r in a["summary"]}
    out = []
    for rb in b["summary"]:
        key = (rb["rules"], rb["scenario"], rb["test"], rb["size"], rb["metric"])
        ra = index.get(key)
        if not ra:
            continue
        for mode in ("legacy", "ebpf", "limit"):
            if mode in ra and mode in rb:
                x, y = ra[mode], rb[mode]
                out.append({"key": key, "mode": mode, "a": x["median"], "b": y["median"],
                            "change": (y["median"] - x["median"]) / x["median"] if x["median"] else None,
                            "within_noise": not (y["min"] > x["max"] or y["max"] < x["min"]),
                            "a_range": (x["min"], x["max"]), "b_range": (y["min"], y["max"])})
    return out


def print_compare(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    table = Table(title="bench compare: A -> B (medians; noise = the min..max ranges overlap)")
    for col in ("scenario", "test", "size/metric", "mode", "A", "B", "change", "verdict"):
        table.add_column(col, justify="right")
    for r in rows:
        rules, scenario, test, size, metric = r["key"]
        better = (r["change"] or 0) < 0 if metric in LOWER_IS_BETTER else (r["change"] or 0) > 0
        verdict = "noise" if r["within_noise"] else ("better" if better else "worse")
        table.add_row(scenario, test, f"{size or ''} {UNITS[metric]}".strip(), r["mode"],
                      _fmt(r["a"], metric), _fmt(r["b"], metric),
                      "-" if r["change"] is None else f"{r['change']:+.1%}", verdict)
    console.print(table)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in (result.get("summary") or summarise(result)) if r["rules"] == 0] or \
        result["summary"]
    scenarios = sorted({r["scenario"] for r in rows})
    fig, axes = plt.subplots(2, len(scenarios), figsize=(5 * len(scenarios), 8), squeeze=False)
    for col, scenario in enumerate(scenarios):
        ax = axes[0][col]
        stream = sorted((r for r in rows if r["scenario"] == scenario and r["metric"] == "mbps"),
                        key=lambda r: r["size"])
        for mode in ("legacy", "ebpf", "limit"):
            pts = [(r["size"], r[mode]["median"]) for r in stream if mode in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{scenario}: TCP_STREAM")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("Mbit/s")
        ax.legend()
        ax = axes[1][col]
        lat = {r["metric"]: r for r in rows if r["scenario"] == scenario and r["test"] == "TCP_RR"}
        pcts = [m for m in ("p50_us", "p90_us", "p99_us") if m in lat]
        width = 0.25
        for i, mode in enumerate(("legacy", "ebpf", "limit")):
            vals = [lat[m][mode]["median"] if mode in lat[m] else 0 for m in pcts]
            ax.bar([x + i * width for x in range(len(pcts))], vals, width, label=mode)
        ax.set_xticks([x + width for x in range(len(pcts))], [m[:3] for m in pcts])
        ax.set_title(f"{scenario}: TCP_RR latency")
        ax.set_ylabel("µs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
