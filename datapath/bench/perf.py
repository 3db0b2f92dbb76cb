"""``bench --profile DIR``: perf record around one extra repetition of each point and mode,
and where its time went.

The profiled repetition runs after a point's measured ones and is not a
sample, so perf's overhead never reaches the statistics. perf samples every
CPU by time (cpu-clock: this VM kind exposes no hardware counters) with call
chains, from the root namespaces; it only reads, and changes no network
state. It is started with its events off and turned on and off through its
control fifo right around the netperf run, so its start-up and the bench's
table flushes stay out of the recording.

Each recording leaves, in DIR, ``<scenario>-<test>[-<size>][-<pin>]-<mode>``:

- ``.perf.data``: the recording (``perf report -i``, ``perf script -i``);
- ``.folded``: every sample's stack, root first, its command as the first
  frame, one line per stack with its count (flamegraph.pl's input);
- ``.top.txt``: the kernel symbols of the path's samples by self %.

The path's samples are those of netperf, netserver and the ksoftirqd threads:
on veth, a packet's softirq runs in the sender's context or in ksoftirqd, so
this keeps the packets' work and leaves out idle CPUs, perf itself and
whatever else the machine runs. Self % is the share of those samples whose
innermost frame is the symbol (``perf report --no-children --sort sym``, but
of the path's samples, not of all).

A cpu-clock sample is taken from a timer interrupt, so time spent with
interrupts off is charged to the place that turns them back on: much of
``finish_task_switch`` and ``_raw_spin_unlock_irqrestore`` is the work of the
sections they end, not their own.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

FREQUENCY_HZ = 999          # not 1000: off the beat of the kernel's own 1 kHz timers
PATH_COMMS = ("netperf", "netserver")
PATH_COMM_PREFIXES = ("ksoftirqd/",)
TOP = 15                    # printed side by side
TOP_RECORDED = 50           # in the JSON
KERNEL_START = 1 << 63      # x86-64 and arm64 kernel addresses have the top bit set
CONTROL_TIMEOUT_S = 30      # perf's answer to enable/disable; its start reads every process
PACKAGE_HINT = ("install linux-perf (Debian; Ubuntu: linux-tools-$(uname -r)), e.g. by running "
                "scripts/provision.sh")


class ProfileError(RuntimeError):
    """perf is missing, failed, or printed what is not a recording."""


def require_perf() -> None:
    """A clear error, before anything is built, when perf cannot record."""
    if shutil.which("perf") is None:
        raise ProfileError(f"perf not found: {PACKAGE_HINT}")
    proc = subprocess.run(["perf", "version"], capture_output=True, text=True)
    if proc.returncode != 0:       # e.g. Ubuntu's wrapper without this kernel's tools
        raise ProfileError(f"perf does not run ({first_line(proc.stderr or proc.stdout)}): "
                           f"{PACKAGE_HINT}")


def first_line(text: str) -> str:
    """What perf said, as one line: its first line that is not blank."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def file_stem(scenario: str, test: str, size: int | None, pin: str | None, mode: str) -> str:
    """``same-node-TCP_STREAM-16384-ebpf``; ``size`` only for a test run at several sizes."""
    return "-".join(str(p) for p in (scenario, test, size, pin, mode) if p)


class Recording:
    """``perf record -a -g`` to ``path``, its events off until ``enabled()`` turns them on.

    ``with Recording(path) as rec: ... with rec.enabled(): run()``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.proc: subprocess.Popen | None = None
        self.fifo_dir = None
        self.ctl = self.ack = -1

    def __enter__(self) -> "Recording":
        self.path.unlink(missing_ok=True)      # perf would keep the old one as .old
        self.fifo_dir = tempfile.TemporaryDirectory(prefix="hostrouting-perf-")
        ctl, ack = (os.path.join(self.fifo_dir.name, n) for n in ("ctl", "ack"))
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # read-write: opening a fifo so never blocks, whether or not perf has opened it yet
        self.ctl, self.ack = os.open(ctl, os.O_RDWR), os.open(ack, os.O_RDWR)
        self.proc = subprocess.Popen(
            ["perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", str(FREQUENCY_HZ),
             "-D", "-1", "--control", f"fifo:{ctl},{ack}", "--no-buildid",
             "--no-buildid-cache", "-q", "-o", str(self.path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        return self

    def _command(self, command: str) -> None:
        """Sends an enable or disable and waits for perf's ack (the first one: until perf
        has started)."""
        os.write(self.ctl, f"{command}\n".encode())
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        while not select.select([self.ack], [], [], 0.1)[0]:
            if self.proc.poll() is not None:
                raise ProfileError(f"perf record exited {self.proc.returncode}: "
                                   f"{first_line(self.proc.stderr.read())}")
            if time.monotonic() > deadline:
                raise ProfileError(f"perf record did not answer '{command}' within "
                                   f"{CONTROL_TIMEOUT_S} s")
        os.read(self.ack, 64)

    @contextlib.contextmanager
    def enabled(self):
        self._command("enable")
        try:
            yield
        finally:
            self._command("disable")

    def __exit__(self, *exc) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=CONTROL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            os.close(self.ctl)
            os.close(self.ack)
            self.fifo_dir.cleanup()
        # perf ends on SIGINT by raising it again once the file is written
        if exc[0] is None and self.proc.returncode not in (0, -signal.SIGINT):
            raise ProfileError(f"perf record exited {self.proc.returncode}: "
                               f"{first_line(self.proc.stderr.read())}")


def perf_script(path: Path) -> str:
    """Every sample of a recording: its command, then its frames (address, symbol)."""
    proc = subprocess.run(["perf", "script", "-i", str(path), "-F", "comm,ip,sym"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProfileError(f"perf script -i {path}: {first_line(proc.stderr)}")
    return proc.stdout


def parse_samples(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """``perf script -F comm,ip,sym`` as [(command, [(address, symbol), ...innermost first])].

    A sample is its command alone on a line, then a tab-indented line per frame, then a
    blank line."""
    samples: list[tuple[str, list[tuple[int, str]]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t"):
            if not samples:
                raise ValueError(f"a frame before any sample: {line.strip()!r}")
            address, _, symbol = line.strip().partition(" ")
            try:
                samples[-1][1].append((int(address, 16), symbol.strip() or "[unknown]"))
            except ValueError:
                raise ValueError(f"not a frame: {line.strip()!r}") from None
        else:
            samples.append((line.strip(), []))
    return samples


PATH_NAMES = ", ".join([*PATH_COMMS, *(f"{p}*" for p in PATH_COMM_PREFIXES)])


def on_path(comm: str) -> bool:
    return comm in PATH_COMMS or comm.startswith(PATH_COMM_PREFIXES)


def aggregate(samples: list[tuple[str, list[tuple[int, str]]]]) -> dict:
    """The path's kernel symbols by self % (every symbol, largest first), the counts, and
    every sample's stack folded (root first, the command as the first frame)."""
    self_counts: Counter = Counter()
    folded: Counter = Counter()
    path = kernel = 0
    for comm, frames in samples:
        folded[";".join([comm, *(sym for _, sym in reversed(frames))])] += 1
        if not on_path(comm):
            continue
        path += 1
        if frames and frames[0][0] >= KERNEL_START:
            kernel += 1
            self_counts[frames[0][1]] += 1
    return {
        "samples": len(samples), "path_samples": path, "kernel_samples": kernel,
        "symbols": [{"symbol": sym, "self_pct": 100.0 * n / path, "samples": n}
                    for sym, n in sorted(self_counts.items(), key=lambda x: (-x[1], x[0]))],
        "folded": folded,
    }


def top_text(summary: dict, title: str) -> str:
    lines = [f"# {title}",
             f"# {summary['path_samples']} of {summary['samples']} samples on the path "
             f"({PATH_NAMES}), "
             f"{summary['kernel_samples']} of them in the kernel; self % of the path's samples",
             "# self%  samples  symbol"]
    lines += [f"{s['self_pct']:7.2f} {s['samples']:8d}  {s['symbol']}" for s in summary["symbols"]]
    return "\n".join(lines) + "\n"


def summarise(path: Path, title: str) -> dict:
    """Writes the recording's .folded and .top.txt beside it; returns what the JSON records."""
    path = Path(path)
    try:
        summary = aggregate(parse_samples(perf_script(path)))
    except ValueError as e:
        raise ProfileError(f"perf script -i {path}: {e}") from None
    stem = path.name.removesuffix(".perf.data")
    folded = path.with_name(f"{stem}.folded")
    folded.write_text("".join(f"{stack} {n}\n" for stack, n in sorted(summary["folded"].items())))
    top = path.with_name(f"{stem}.top.txt")
    top.write_text(top_text(summary, title))
    return {"perf_data": str(path), "folded": str(folded), "top_text": str(top),
            "samples": summary["samples"], "path_samples": summary["path_samples"],
            "kernel_samples": summary["kernel_samples"],
            "top": summary["symbols"][:TOP_RECORDED]}
