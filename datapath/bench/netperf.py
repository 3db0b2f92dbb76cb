"""netperf inside lab namespaces: a netserver per target, one test per call.

Results come from netperf's omni output selectors, so each test reports
exactly the fields the benchmark records (no screen scraping of headers).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass

from netns_lab import netns

PORT = 12865
SELECTORS = {
    "TCP_STREAM": ("THROUGHPUT", "LOCAL_BYTES_SENT"),
    "TCP_RR": ("THROUGHPUT", "P50_LATENCY", "P90_LATENCY", "P99_LATENCY", "MEAN_LATENCY"),
    "TCP_CRR": ("THROUGHPUT", "P50_LATENCY", "P99_LATENCY"),
}
FIELD_NAMES = {
    "THROUGHPUT": None,  # named per test below
    "LOCAL_BYTES_SENT": "bytes",
    "P50_LATENCY": "p50_us", "P90_LATENCY": "p90_us", "P99_LATENCY": "p99_us",
    "MEAN_LATENCY": "mean_us",
}
THROUGHPUT_NAME = {"TCP_STREAM": "mbps", "TCP_RR": "tps", "TCP_CRR": "cps"}


class NetperfError(RuntimeError):
    """netperf failed or printed something that is not a result."""


def require_netperf() -> None:
    for tool in ("netperf", "netserver"):
        if shutil.which(tool) is None:
            raise NetperfError(f"{tool} not found: install netperf (Debian non-free, Ubuntu "
                               "multiverse), e.g. by running scripts/provision.sh")


class Netserver:
    """A netserver in a namespace; stopped by ``close`` (or the lab's removal)."""

    def __init__(self, ns: str, port: int = PORT):
        self.ns, self.port = ns, port
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "netserver", "-D", "-4", "-p",
                                      str(port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NetperfError(f"netserver in {ns} exited: {self.proc.stderr.read().strip()}")
            if netns.run(ns, ["ss", "-H", "-ltn", f"sport = :{port}"], check=False).stdout.strip():
                return
            time.sleep(0.05)
        self.close()
        raise NetperfError(f"netserver in {ns} did not listen on port {port} within 5s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Result:
    values: dict[str, float]
    seconds: float  # wall time of the run


def run_test(ns: str, host: str, test: str, duration: float, size: int | None = None,
             port: int = PORT, cpus: str | None = None) -> Result:
    """One test; ``cpus`` ("local,remote") binds netperf and netserver to those CPUs (-T)."""
    selectors = SELECTORS[test]
    argv = ["netperf", "-H", host, "-p", str(port), "-t", test, "-l", f"{duration:g}", "-P", "0",
            *(["-T", cpus] if cpus else []), "--", "-o", ",".join(selectors)]
    if size is not None:
        argv += ["-m", str(size)] if test == "TCP_STREAM" else ["-r", f"{size},{size}"]
    started = time.monotonic()
    proc = netns.run(ns, argv, check=False, timeout=duration + 30)
    seconds = time.monotonic() - started
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    fields = line.split(",")
    if proc.returncode != 0 or len(fields) != len(selectors):
        raise NetperfError(f"netperf {test} {ns} -> {host}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    try:
        numbers = [float(f) for f in fields]
    except ValueError:
        raise NetperfError(f"netperf {test} {ns} -> {host}: unexpected output {line!r}") from None
    values = {}
    for sel, number in zip(selectors, numbers):
        values[FIELD_NAMES[sel] or THROUGHPUT_NAME[test]] = number
    return Result(values, seconds)
