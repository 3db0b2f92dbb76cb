"""What the ``hostrouting`` command prints for people: rich tables of what the
control plane returns as plain data (the same data ``--json`` prints as it is).

Only datapath/cli.py uses this module; the modules it renders for know nothing
of terminals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .nat_table import Flow


def print_labs(labs: list[dict]) -> None:
    console = Console()
    if not labs:
        console.print("no labs")
    for lab in labs:
        table = Table(title=f"lab {lab['name']} (mode {lab['mode']}, {lab['phase']})")
        for col in ("node", "netns", "ip", "pod", "pod netns", "pod ip"):
            table.add_column(col)
        for node in lab["nodes"]:
            first = True
            for pod in node["pods"] or [{"name": "", "netns": "", "ip": ""}]:
                table.add_row(*(node["name"], node["netns"], node["ip"]) if first else ("", "", ""),
                              pod["name"], pod["netns"], pod["ip"])
                first = False
        table.add_row("external", lab["external"]["netns"], lab["external"]["ip"], "", "", "")
        console.print(table)


def print_status(status: dict) -> None:
    table = Table(title=f"lab {status['lab']}: {status['mode']} routing wanted")
    for col in ("node", "observed", "device", "hook", "program", "id"):
        table.add_column(col)
    for node in status["nodes"]:
        first = True
        for att in node["attached"] or [{"ifname": "-", "hook": "-", "programs": []}]:
            progs = att["programs"] or [{"name": "-", "id": "-"}]
            for p in progs:
                table.add_row(node["name"] if first else "", node["mode"] if first else "",
                              att["ifname"], att["hook"], p["name"], str(p["id"]))
                first = False
    console = Console()
    console.print(table)
    if status["converged"]:
        console.print("observed = desired")
    else:
        console.print("[bold red]observed differs from desired:[/]")
        for line in status["differences"]:
            console.print(f"  lab: {line}")
        for node in status["nodes"]:
            for line in node["differences"]:
                console.print(f"  {node['name']}: {line}")
        console.print(f"converge with: [bold]{status['fix']}[/]")
    blocking = status["rule_blocking"]
    console.print(f"new firewall rules in node namespaces: blocked by {blocking['active']} "
                  f"(rule guard {blocking['guard']})")
    for backend, how in blocking["backends"].items():
        console.print(f"  {backend}: {how}")
    console.print(f"BPF LSM: {blocking['bpf_lsm']['detail']}")
    support = status["ebpf_support"]
    if support["usable"]:
        console.print(f"eBPF host routing: usable on this kernel ({', '.join(support['checked'])})")
    else:
        console.print("[bold red]eBPF host routing cannot be used here:[/] "
                      + "; ".join(support["missing"]))


def print_stats(stats: dict) -> None:
    table = Table(title=f"lab {stats['lab']}: datapath counters")
    table.add_column("node")
    table.add_column("verdict / reason")
    table.add_column("packets", justify="right")
    table.add_column("bytes", justify="right")
    for node in stats["nodes"]:
        for name, c in node["counters"].items():
            if c["packets"]:
                table.add_row(node["name"], name, f"{c['packets']:,}", f"{c['bytes']:,}")
    console = Console()
    console.print(table)
    for node in stats["nodes"]:
        nat = node["nat"]
        console.print(f"{node['name']}: BPF SNAT table {nat['entries']:,} of {nat['capacity']:,} "
                      f"entries ({nat['out_entries']:,} out, {nat['in_entries']:,} in)")


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
    console = Console()
    console.print(table)
    console.print(f"{total} flow(s)")
