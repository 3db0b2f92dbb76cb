"""What the ``hostrouting`` command prints for people: rich tables of what the
control plane returns as plain data (the same data ``--json`` prints as it is).

Only datapath/cli.py uses this module; the modules it renders for know nothing
of terminals.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .nat_table import Flow


#: Columns given to tables when stdout is a pipe or a log and COLUMNS is not set: wide
#: enough that every table keeps its natural width (rich would squeeze it into 80).
UNLIMITED_COLUMNS = 1000


def console(**kwargs) -> Console:
    """A rich console for the CLI: the terminal's width on a terminal, COLUMNS when set,
    otherwise the natural width of each table (``hostrouting nat list | cat``)."""
    probe = Console(**kwargs)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return Console(width=UNLIMITED_COLUMNS, **kwargs)


def print_labs(labs: list[dict]) -> None:
    out = console()
    if not labs:
        out.print("no labs")
    for lab in labs:
        family = lab.get("ip_family", "ipv4")     # ip6 columns only when the lab has IPv6
        six = family != "ipv4"
        table = Table(title=f"lab {lab['name']} (mode {lab['mode']}, {lab['phase']}"
                            + (f", {family})" if six else ")"))
        for col in ("node", "netns", "ip") + ("ip6",) * six + ("pod", "pod netns", "pod ip") \
                + ("pod ip6",) * six:
            table.add_column(col)

        def ips(entry: dict, pod: bool = False) -> tuple:
            ip = "-" if pod and family == "ipv6" else entry.get("ip", "")   # planned, unused
            return (ip, entry.get("ip6", "")) if six else (ip,)

        for node in lab["nodes"]:
            first = True
            for pod in node["pods"] or [{"name": "", "netns": "", "ip": ""}]:
                mine = (node["name"], node["netns"], *ips(node))
                table.add_row(*mine if first else ("",) * len(mine),
                              pod["name"], pod["netns"], *ips(pod, pod=bool(pod["name"])))
                first = False
        table.add_row("external", lab["external"]["netns"], *ips(lab["external"]), "", "",
                      *("",) * (1 + six))
        out.print(table)


def print_status(status: dict) -> None:
    table = Table(title=f"lab {status['lab']}: {status['mode']} routing wanted")
    for col in ("node", "observed", "device", "hook", "program", "id"):
        table.add_column(col)
    for node in status["nodes"]:
        first = True
        for att in node["attached"] or [{"ifname": "-", "hook": "-", "programs": []}]:
            progs = att["programs"] or [{"name": "-", "id": "-"}]
            for p in progs:
                observed = node["mode"] + (f" ({node['attach']})" if node.get("attach") else "")
                table.add_row(node["name"] if first else "", observed if first else "",
                              att["ifname"], att["hook"], p["name"], str(p["id"]))
                first = False
    out = console()
    out.print(table)
    if status["converged"]:
        out.print("observed = desired")
    else:
        out.print("[bold red]observed differs from desired:[/]")
        for line in status["differences"]:
            out.print(f"  lab: {line}")
        for node in status["nodes"]:
            for line in node["differences"]:
                out.print(f"  {node['name']}: {line}")
        out.print(f"converge with: [bold]{status['fix']}[/]")
    blocking = status["rule_blocking"]
    out.print(f"new firewall rules in node namespaces: blocked by {blocking['active']} "
              f"(rule guard {blocking['guard']})")
    if blocking["nat_sweep_age_s"] is not None:
        out.print(f"BPF SNAT expiry sweep: last ran {blocking['nat_sweep_age_s']:g}s ago")
    for backend, how in blocking["backends"].items():
        out.print(f"  {backend}: {how}")
    out.print(f"BPF LSM: {blocking['bpf_lsm']['detail']}")
    support = status["ebpf_support"]
    if support["usable"]:
        out.print(f"eBPF host routing: usable on this kernel ({', '.join(support['checked'])})")
    else:
        out.print("[bold red]eBPF host routing cannot be used here:[/] "
                  + "; ".join(support["missing"]))


def print_stats(stats: dict) -> None:
    table = Table(title=f"lab {stats['lab']}: datapath counters")
    table.add_column("node")
    table.add_column("family")
    table.add_column("verdict / reason")
    table.add_column("packets", justify="right")
    table.add_column("bytes", justify="right")
    for node in stats["nodes"]:
        # ipv4 also counts the frames of neither family (ARP, ...), as the datapath does
        for family, counters in node["counters_by_family"].items():
            for name, c in counters.items():
                if c["packets"]:
                    table.add_row(node["name"], family, name, f"{c['packets']:,}",
                                  f"{c['bytes']:,}")
    out = console()
    out.print(table)
    for node in stats["nodes"]:
        for key, which in (("nat", ""), ("nat6", " (IPv6)")):
            if nat := node.get(key):
                out.print(f"{node['name']}: BPF SNAT table{which} {nat['entries']:,} of "
                          f"{nat['capacity']:,} entries ({nat['out_entries']:,} out, "
                          f"{nat['in_entries']:,} in)")
    print_program_runs(stats, out)


def print_program_runs(stats: dict, out: Console) -> None:
    """Each program's runs, run time and ns per run (what BPF stats counted), or how to have
    them counted."""
    window = stats["bpf_stats"]["window_s"]
    rows = [(node["name"], name, f) for node in stats["nodes"]
            for name, f in node.get("programs", {}).items() if f["run_cnt"]]
    if rows:
        what = f"over {window:g} s" if window else "since loaded, while BPF stats were on"
        table = Table(title=f"lab {stats['lab']}: program run time ({what})")
        for col in ("node", "program", "runs", "run time ms", "ns/run"):
            table.add_column(col, justify="left" if col in ("node", "program") else "right")
        for node, name, f in rows:
            table.add_row(node, name, f"{f['run_cnt']:,}", f"{f['run_time_ns'] / 1e6:,.1f}",
                          f"{f['ns_per_run']:,.0f}")
        out.print(table)
    if window:
        if not rows:
            out.print(f"no program ran in the {window:g} s sampled")
    elif not stats["bpf_stats"]["sysctl"]:
        out.print("program run time: BPF stats are off; sample them with "
                  "`hostrouting stats --bpf-stats 5`, or count them for every program with "
                  "`sysctl kernel.bpf_stats_enabled=1` (a clock read per run, machine-wide)",
                  soft_wrap=True)


def print_flows(lab: str, per_node: dict[str, list[Flow]]) -> None:
    table = Table(title=f"lab {lab}: BPF SNAT flows")
    for col in ("node", "proto", "pod", "remote", "as (node IP:port)", "state", "idle s",
                "expires in s", "pkts out/in", "bytes out/in"):
        table.add_column(col, justify="right" if col.endswith(("s", "in")) else "left")
    total = 0
    for node, node_flows in per_node.items():
        for f in node_flows:
            total += 1
            table.add_row(node, f.protocol, f.pod, f.remote, f.nat,
                          f.state + ("" if f.complete else " (one entry)"),
                          f"{f.idle_s:.1f}", f"{max(f.expires_in_s, 0):.1f}",
                          f"{f.packets_out}/{f.packets_in}", f"{f.bytes_out}/{f.bytes_in}")
    out = console()
    out.print(table)
    out.print(f"{total} flow(s)")
