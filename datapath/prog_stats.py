"""What a loaded BPF program cost: its run time and run count, as the kernel keeps them.

The kernel adds up each program's run time (ns) and runs in its bpf_prog_info,
but only while BPF stats are on: either the root-namespace sysctl
``kernel.bpf_stats_enabled`` is 1, or some process holds a BPF_ENABLE_STATS fd
(``enable_stats()``; stats stop when the last such fd closes, and the sysctl
is left as it was). Measuring costs every program on the machine a clock read
per run, so nothing here turns it on behind the user's back: callers report
``stats_enabled()`` instead. The totals are per program and never reset while
it is loaded; ns per packet over an interval is the ratio of the two deltas.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import libbpf

SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats(prog_fd) -> tuple[int, int]:
    """(run time in ns, runs) of the program behind `prog_fd` (an int or libbpf.Fd)."""
    info = libbpf.prog_info(prog_fd)
    return info.run_time_ns, info.run_cnt


def program_stats_by_id(prog_id: int) -> tuple[int, int]:
    """(run time in ns, runs) of a loaded program by its id (OSError ENOENT once unloaded)."""
    with libbpf.prog_fd_by_id(prog_id) as fd:
        return program_stats(fd)


def ns_per_run(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Mean ns per run between two program_stats() readings (None: no run counted between)."""
    runs = after[1] - before[1]
    return (after[0] - before[0]) / runs if runs > 0 else None


def stats_enabled() -> bool:
    """Whether kernel.bpf_stats_enabled is 1. Stats can also be on without it, through a
    BPF_ENABLE_STATS fd some process holds: the kernel does not tell, the sysctl stays 0."""
    try:
        return SYSCTL.read_text().strip() == "1"
    except OSError:
        return False


def enable_stats() -> libbpf.Fd:
    """Turn stats on for as long as the returned fd is open (close it, or use it in a with
    block): a benchmark or a test measuring a few seconds, never a default."""
    return libbpf.enable_stats(libbpf.BPF_STATS_RUN_TIME)


def read_programs(prog_ids: dict) -> dict:
    """{key: (run time in ns, runs)} of programs given as {key: id}; one unloaded meanwhile
    is left out."""
    out = {}
    for key, prog_id in prog_ids.items():
        try:
            out[key] = program_stats_by_id(prog_id)
        except OSError:
            continue
    return out


def figures(prog_ids: dict, after: dict, before: dict | None = None) -> dict:
    """{key: {"id", "run_cnt", "run_time_ns", "ns_per_run"}} from read_programs() readings:
    the totals in `after`, or what was added since `before` (ns_per_run None: no run)."""
    out = {}
    for key, now in after.items():
        if before is not None and key not in before:
            continue        # loaded meanwhile: no start to count from
        then = before[key] if before is not None else (0, 0)
        run_ns, runs = now[0] - then[0], now[1] - then[1]
        out[key] = {"id": prog_ids[key], "run_cnt": runs, "run_time_ns": run_ns,
                    "ns_per_run": ns_per_run(then, now)}
    return out


def sample_programs(prog_ids: dict, seconds: float) -> dict:
    """figures() over `seconds`, with stats held on by a BPF_ENABLE_STATS fd meanwhile (the
    sysctl left as it is): what the programs cost under the traffic of that window."""
    with enable_stats():
        before = read_programs(prog_ids)
        time.sleep(seconds)
        after = read_programs(prog_ids)
    return figures(prog_ids, after, before)
