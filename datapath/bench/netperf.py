"""netperf inside lab namespaces: a netserver per target, one workload per call.

Results come from netperf's omni output selectors, so each test reports
exactly the fields the benchmark records (no screen scraping of headers).

The workloads (``WORKLOADS``):

- TCP_STREAM, with ``-D`` (TCP_NODELAY): without it Nagle coalesces small
  writes, and a 64-byte "message" test measures something else; large
  messages fill segments either way;
- TCP_RR, TCP_CRR, UDP_RR: transactions a second and latency percentiles.
  netperf 2.7.0 has no p99.9: its latency selectors are MIN, P50, P90, P99,
  MAX, MEAN and STDDEV, and Debian's build prints no histogram to compute one
  from, so MAX_LATENCY is recorded beside P99;
- UDP_STREAM: 64-byte datagrams; packets a second received (the receiver's
  recv calls, one per datagram, over the elapsed time) and sent, since a UDP
  sender does not slow down for a receiver that drops;
- TCP_CRR runs by transaction count (``COUNTED``): in a timed test netserver,
  having closed the last connection, waits in accept() for one that never
  comes until its own timer, the test length plus netperf's PAD_TIME (4 s),
  ends the wait (recv_omni in src/nettest_omni.c; TCP_RR ends when netperf
  shuts its one connection, UDP_RR when netperf sends zero-length datagrams),
  so a 1 s test took 5 s. A counted test (``-l -N``) ends when netserver has
  served N; the runner sizes N from a short first run (``transactions_for``)
  and netperf's rate is N over its measured elapsed time. netperf binds each
  connection's client port itself, cycling through 5000-65535 unless told
  (test option ``-p``); a pod's kernel picks from its ephemeral ports
  (net.ipv4.ip_local_port_range, 32768-60999), so the client cycles through
  those of its namespace (``ephemeral_ports``). Its ports above the NAT range
  (61000-65535, the nodes' own) were masqueraded to other ports, some of them
  held in TIME-WAIT by the external host for an earlier connection with other
  TCP timestamps: the host dropped the SYN (PAWS) and legacy TCP_CRR to the
  external host stalled on its second long run (docs/benchmarks.md);
- TCP_STREAMxN: N TCP_STREAM flows at once (parallel netperf instances),
  summed over the window in which all N ran: each instance reports its rate
  every DEMO_INTERVAL_S with a timestamp (netperf's demo mode), and only the
  part of each report inside the common window counts.

Every TCP test names its congestion control (test option ``-K``, both ends; the bench's
``--tcp-cc``, cubic unless told). A namespace takes its default from the host's when it is
created, so without ``-K`` the labs measure whatever the machine runs: this VM kind's is bbr,
whose pacing sends part of a bulk flow from a timer's softirq on the idle CPU. That part
waits in the CPU's backlog until the timer softirq ends, the other CPU's later segments
overtake it, and the receiver's SACKs make the sender retransmit what was not lost: a
same-node 64 KiB stream ran at half cubic's rate, reordered more on the paths without
conntrack than on legacy's (docs/benchmarks.md, "The reordering was pacing"). netperf
ignores a ``-K`` name the kernel does not have (and sets a name under three letters at
the client only), so ``check_congestion`` comes first, and TCP_STREAM and TCP_RR read back what
each end ran where netperf prints it (``ran_congestion``): a run that ran another is an error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from netns_lab import netns

PORT = 12865
RR_SELECTORS = ("THROUGHPUT", "P50_LATENCY", "P90_LATENCY", "P99_LATENCY", "MEAN_LATENCY",
                "MAX_LATENCY")
# text, not numbers: the congestion control each end of the data connection ran, read back from
# its socket (a -K name either end could not set is not what it reports). Not for TCP_CRR:
# netperf reads its sockets after closing them and prints nothing for either end
CC_SELECTORS = ("LOCAL_CONG_CONTROL", "REMOTE_CONG_CONTROL")
SELECTORS = {
    "TCP_STREAM": ("THROUGHPUT", "LOCAL_BYTES_SENT", *CC_SELECTORS),
    "TCP_RR": (*RR_SELECTORS, *CC_SELECTORS),
    "TCP_CRR": ("THROUGHPUT", "P50_LATENCY", "P99_LATENCY"),
    "UDP_RR": RR_SELECTORS,
    "UDP_STREAM": ("THROUGHPUT", "LOCAL_SEND_CALLS", "REMOTE_RECV_CALLS", "ELAPSED_TIME"),
}
FIELD_NAMES = {
    "THROUGHPUT": None,  # named per test below
    "LOCAL_BYTES_SENT": "bytes",
    "P50_LATENCY": "p50_us", "P90_LATENCY": "p90_us", "P99_LATENCY": "p99_us",
    "MEAN_LATENCY": "mean_us", "MAX_LATENCY": "max_us",
    "LOCAL_SEND_CALLS": "sent", "REMOTE_RECV_CALLS": "received", "ELAPSED_TIME": "elapsed_s",
}
THROUGHPUT_NAME = {"TCP_STREAM": "mbps", "TCP_RR": "tps", "TCP_CRR": "cps", "UDP_RR": "tps",
                   "UDP_STREAM": "mbps"}
# test-specific options of every run of a test (sizes come on top)
OPTIONS = {"TCP_STREAM": ("-D",), "UDP_STREAM": ("-R", "1")}   # -R 1: UDP_STREAM may be routed
TCP_TESTS = ("TCP_STREAM", "TCP_RR", "TCP_CRR")
# the bench's TCP tests run cubic unless told: the kernel's own default, and the usual one of
# Kubernetes nodes; INHERIT_CC: each namespace's default, which it took from the host's
DEFAULT_CC = "cubic"
INHERIT_CC = "inherit"
AVAILABLE_CC = "/proc/sys/net/ipv4/tcp_available_congestion_control"
FLOWS = (4, 16)                     # TCP_STREAMx4, TCP_STREAMx16
WORKLOADS = (*SELECTORS, *(f"TCP_STREAMx{n}" for n in FLOWS))
FIXED_SIZE = {"UDP_STREAM": 64, **{f"TCP_STREAMx{n}": 16384 for n in FLOWS}}
SIZED = ("TCP_STREAM",)             # run at every --sizes
COUNTED = ("TCP_CRR",)              # run by transaction count, not time (see above)
CALIBRATION_TRANSACTIONS = 2000     # the short first run of a counted test: 0.1-0.3 s
MIN_TRANSACTIONS = 100
DEMO_INTERVAL_S = 0.2


class NetperfError(RuntimeError):
    """netperf failed or printed something that is not a result."""


def require_netperf() -> None:
    for tool in ("netperf", "netserver"):
        if shutil.which(tool) is None:
            raise NetperfError(f"{tool} not found: install netperf (Debian non-free, Ubuntu "
                               "multiverse), e.g. by running scripts/provision.sh")


def available_congestion() -> list[str]:
    """The TCP congestion controls this kernel has loaded (built in or a module)."""
    try:
        with open(AVAILABLE_CC) as f:
            return f.read().split()
    except OSError:
        return []


def check_congestion(name: str) -> None:
    """ValueError unless ``name`` is a congestion control the kernel has: netperf -K with
    another name runs silently with the namespace's default."""
    if len(name) < 3:       # netperf 2.7's -K sets a shorter remote name nowhere
        raise ValueError(f"TCP congestion control {name!r}: netperf sets a name under three "
                         "letters at the client only")
    have = available_congestion()
    if name not in have:
        raise ValueError(f"TCP congestion control {name!r} is not available on this kernel "
                         f"(available: {' '.join(have) or 'none listed'}; a module such as "
                         f"tcp_{name} may load it)")


def netserver_argv(port: int = PORT, family: int = 4) -> list[str]:
    """netserver in the foreground (-D), listening on ``port`` for IP version ``family``."""
    return ["netserver", "-D", f"-{family}", "-p", str(port)]


class Netserver:
    """A netserver in a namespace; stopped by ``close`` (or the lab's removal)."""

    def __init__(self, ns: str, port: int = PORT, family: int = 4):
        self.ns, self.port = ns, port
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *netserver_argv(port, family)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
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
    seconds: float      # wall time of the run
    measured_s: float   # netperf's measurement: the duration, or a counted run's elapsed time
    measured_from: float = 0.0  # seconds after the run's start that measurement began (N flows:
                                # the start of the window in which all of them ran)
    congestion: str | None = None   # the TCP congestion control both ends ran (TCP tests)


def transactions_for(rate: float, seconds: float) -> int:
    """The transaction count that lasts about ``seconds`` at ``rate`` a second."""
    return max(MIN_TRANSACTIONS, round(rate * seconds))


def split_workload(workload: str) -> tuple[str, int]:
    """(netperf test, flows): TCP_STREAMx4 is four TCP_STREAM flows at once."""
    m = re.fullmatch(r"([A-Z_]+?)x(\d+)", workload)
    return (m.group(1), int(m.group(2))) if m else (workload, 1)


def ephemeral_ports(ns: str) -> tuple[int, int]:
    """The namespace's ephemeral ports: net.ipv4.ip_local_port_range (it holds IPv6's too)."""
    out = netns.read_sysctl(ns, "net.ipv4.ip_local_port_range").split()
    if len(out) != 2 or not all(f.isdigit() for f in out):
        raise NetperfError(f"net.ipv4.ip_local_port_range in {ns}: unexpected {out!r}")
    return int(out[0]), int(out[1])


def argv_for(host: str, test: str, duration: float, size: int | None, port: int = PORT,
             cpus: str | None = None, demo: bool = False,
             transactions: int | None = None, family: int = 4,
             client_ports: tuple[int, int] | None = None,
             congestion: str | None = None) -> list[str]:
    """netperf's command line; with ``transactions`` the test runs that many (-l -N) instead
    of ``duration`` seconds; ``family`` 6: control and data connections over IPv6 (the global
    -6; ``host`` an IPv6 address). ``client_ports``: the range TCP_CRR binds its client
    ports in (the client's ephemeral ports; netperf's own default is 5000-65535).
    ``congestion``: a TCP test's congestion control at both ends (-K; None: the
    namespaces' default)."""
    length = f"-{transactions}" if transactions else f"{duration:g}"
    argv = ["netperf", *(["-6"] if family == 6 else []), "-H", host, "-p", str(port), "-t",
            test, "-l", length, "-P", "0",
            *(["-T", cpus] if cpus else []),
            *(["-D", f"-{DEMO_INTERVAL_S:g}"] if demo else []),   # negative: with timestamps
            "--", "-o", ",".join(SELECTORS[test]), *OPTIONS.get(test, ())]
    if size is not None:
        argv += ["-m", str(size)] if test.endswith("_STREAM") else ["-r", f"{size},{size}"]
    if client_ports and test == "TCP_CRR":
        argv += ["-p", f"{client_ports[0]},{client_ports[1]}"]
    if congestion and test in TCP_TESTS:
        argv += ["-K", f"{congestion},{congestion}"]
    return argv


def _fields(test: str, stdout: str) -> dict[str, str]:
    """{selector: field} of netperf's omni output line (the last line) for ``test``;
    ValueError when it is not one."""
    lines = stdout.strip().splitlines()
    fields = lines[-1].split(",") if lines else []
    selectors = SELECTORS[test]
    if len(fields) != len(selectors):
        raise ValueError(f"expected {len(selectors)} fields ({','.join(selectors)}), got "
                         f"{lines[-1] if lines else 'nothing'!r}")
    return {sel: f.strip() for sel, f in zip(selectors, fields)}


def parse_result(test: str, stdout: str) -> dict[str, float]:
    """The values of netperf's omni output line (the last line) for ``test``; ValueError when
    it is not one."""
    fields = {sel: f for sel, f in _fields(test, stdout).items() if sel not in CC_SELECTORS}
    try:
        values = {FIELD_NAMES[sel] or THROUGHPUT_NAME[test]: float(f)
                  for sel, f in fields.items()}
    except ValueError:
        raise ValueError(f"unexpected output {stdout.strip().splitlines()[-1]!r}") from None
    if test == "UDP_STREAM" and values["elapsed_s"] > 0:
        values["pps"] = values["received"] / values["elapsed_s"]
        values["sent_pps"] = values["sent"] / values["elapsed_s"]
    return values


def ran_congestion(test: str, stdout: str, wanted: str | None = None) -> str | None:
    """The congestion control both ends of a TCP test's data connection ran, from its output
    (None for a test whose output has none: UDP, TCP_CRR; and where netperf printed none, as
    it did once for a short run through a lossy path); ValueError when the ends differ or,
    with ``wanted``, it is not that one."""
    if not set(CC_SELECTORS) <= set(SELECTORS[test]):
        return None
    fields = _fields(test, stdout)
    local, remote = (fields[sel] for sel in CC_SELECTORS)
    if not local and not remote:
        return None
    if local != remote or (wanted and local != wanted):
        raise ValueError(f"the data connection ran {local} at netperf and {remote} at "
                         f"netserver{f', not {wanted}' if wanted else ''}")
    return local


def parse_interim(stdout: str) -> list[tuple[float, float, float]]:
    """netperf demo-mode reports as (start, end, Mbit/s); lines "rate,units,interval,end"."""
    out = []
    for line in stdout.splitlines():
        fields = line.split(",")
        if len(fields) == 4 and fields[1] == "10^6bits/s":
            rate, interval, end = float(fields[0]), float(fields[2]), float(fields[3])
            out.append((end - interval, end, rate))
    return out


def common_window(flows: list[list[tuple[float, float, float]]]) -> tuple[float, float, float]:
    """(the flows' summed Mbit/s, the window's start, its end) over the window in which every
    flow reported: from the latest first start to the earliest last end (netperf's interim
    reports carry the time of day); a report counts for the part of its interval inside the
    window."""
    if not flows or not all(flows):
        raise ValueError("a flow made no interim report (demo mode): no common window")
    start = max(f[0][0] for f in flows)
    end = min(f[-1][1] for f in flows)
    if end <= start:
        raise ValueError("the flows did not run at the same time")
    megabits = sum(rate * max(0.0, min(e, end) - max(s, start))
                   for f in flows for s, e, rate in f)
    return megabits / (end - start), start, end


def run_test(ns: str, host: str, test: str, duration: float, size: int | None = None,
             port: int = PORT, cpus: str | None = None,
             transactions: int | None = None, family: int = 4,
             congestion: str | None = None) -> Result:
    """One workload (``WORKLOADS``); ``cpus`` ("local,remote") binds netperf and netserver
    to those CPUs (-T). ``transactions``: a counted run (``COUNTED`` tests), expected to
    last about ``duration``. ``congestion``: see argv_for."""
    base, flows = split_workload(test)
    size = FIXED_SIZE.get(test) if size is None else size
    if flows > 1:
        return _run_flows(ns, host, base, flows, duration, size, port, cpus, family, congestion)
    started = time.monotonic()
    # a counted run that goes slower than its first run foretold still ends
    timeout = duration + 30 + (2 * duration if transactions else 0)
    ports = ephemeral_ports(ns) if base == "TCP_CRR" else None
    proc = netns.run(ns, argv_for(host, base, duration, size, port, cpus,
                                  transactions=transactions, family=family,
                                  client_ports=ports, congestion=congestion),
                    check=False, timeout=timeout)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise NetperfError(f"netperf {test} {ns} -> {host}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    try:
        values = parse_result(base, proc.stdout)
        ran = ran_congestion(base, proc.stdout, congestion)
        measured = counted_elapsed(values, transactions) if transactions else duration
    except ValueError as e:
        raise NetperfError(f"netperf {test} {ns} -> {host}: {e}") from None
    return Result(values, seconds, measured, congestion=ran)


def counted_elapsed(values: dict[str, float], transactions: int) -> float:
    """A counted run's measured seconds, from its rate (netperf prints ELAPSED_TIME to the
    hundredth only); recorded in ``values`` with the count."""
    rate = values.get("cps") or values.get("tps") or 0
    if rate <= 0:
        raise ValueError(f"{transactions} transactions at a rate of {rate}")
    values["transactions"] = transactions
    values["elapsed_s"] = transactions / rate
    return values["elapsed_s"]


def _run_flows(ns: str, host: str, test: str, flows: int, duration: float, size: int | None,
               port: int, cpus: str | None, family: int = 4,
               congestion: str | None = None) -> Result:
    argv = ["ip", "netns", "exec", ns, *argv_for(host, test, duration, size, port, cpus,
                                                  demo=True, family=family,
                                                  congestion=congestion)]
    started, started_at = time.monotonic(), time.time()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(flows)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=duration + 30)
            outputs.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        raise NetperfError(f"netperf {test}x{flows} {ns} -> {host}: did not finish within "
                           f"{duration + 30:g}s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - started
    for rc, out, err in outputs:
        if rc != 0:
            raise NetperfError(f"netperf {test}x{flows} {ns} -> {host}: exit {rc}: "
                               f"{(err or out).strip()[-300:]}")
    try:
        mbps, start, end = common_window([parse_interim(out) for _, out, _ in outputs])
        each = [parse_result(test, out) for _, out, _ in outputs]
        ran = {ran_congestion(test, out, congestion) for _, out, _ in outputs} - {None}
        if len(ran) > 1:
            raise ValueError(f"the flows ran different congestion controls: {sorted(ran)}")
    except ValueError as e:
        raise NetperfError(f"netperf {test}x{flows} {ns} -> {host}: {e}") from None
    # the CPU time is read over the same window
    return Result({"mbps": mbps, "window_s": end - start, "flows": flows,
                   "mbps_whole_runs": sum(v["mbps"] for v in each)}, seconds, end - start,
                  max(0.0, start - started_at), congestion=ran.pop() if ran else None)
