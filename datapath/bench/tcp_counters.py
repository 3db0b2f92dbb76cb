"""TCP's own counters around a sample: what a stream's rate alone does not say.

A bulk TCP flow on two CPUs can lose a third of its rate to reordering: the
sender transmits from netperf's CPU and, from the ACKs it handles in softirq,
from the other one, and a veth hands each packet on through the backlog of the
CPU that sent it, so one flow crosses two queues and segments overtake each
other. The receiver queues them out of order, the sender can take that for loss,
retransmits and shrinks its window (docs/benchmarks.md: rate against reordering). So
the bench reads, before and after each TCP_STREAM sample, the namespace counters
that show it: in the client's namespace the segments sent (``Tcp: OutSegs``: new
data, ACKs and netperf's control connection, never a retransmission) and
retransmitted (``Tcp: RetransSegs``) and, of those, the ones the receiver reported as
duplicates of what it already had (``TcpExt: TCPDSACKRecvSegs``, segments in D-SACK blocks:
retransmissions that were spurious, where reordering passed for loss; left out where the
kernel does not count it), in the server's the skbs queued out of order
(``TcpExt: TCPOFOQueue``, each possibly several segments). The TCP MIB holds
IPv4's and IPv6's together. Read through /proc/thread-self by a thread
that entered the namespace (``netns.call_in``): no process is started.
"""

from __future__ import annotations

from netns_lab import netns

SNMP_FILES = ("/proc/thread-self/net/snmp", "/proc/thread-self/net/netstat")
CLIENT = {("Tcp", "OutSegs"): "sent_segs", ("Tcp", "RetransSegs"): "retrans_segs",
          ("TcpExt", "TCPDSACKRecvSegs"): "dsack_segs"}
OPTIONAL = {("TcpExt", "TCPDSACKRecvSegs")}     # older kernels do not count it
SERVER = {("TcpExt", "TCPOFOQueue"): "ofo_queued"}


def parse(text: str) -> dict[tuple[str, str], int]:
    """The counters of /proc/net/snmp or /proc/net/netstat text: a header line of names
    and a line of values per section ("Tcp: ...")."""
    lines = text.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2]):
        section, _, names = names.partition(":")
        vsection, _, values = values.partition(":")
        if section != vsection:
            raise ValueError(f"snmp text: a {section!r} header followed by {vsection!r} values")
        for name, value in zip(names.split(), values.split()):
            out[(section, name)] = int(value)
    return out


def _read_here() -> dict[tuple[str, str], int]:
    counters = {}
    for path in SNMP_FILES:
        with open(path) as f:
            counters.update(parse(f.read()))
    return counters


def read(ns: str, which: dict[tuple[str, str], str]) -> dict[str, int]:
    """``which`` (CLIENT or SERVER) of namespace ``ns``, by their short names; an OPTIONAL
    counter this kernel does not have is left out."""
    counters = netns.call_in(ns, _read_here)
    missing = [f"{s}: {n}" for s, n in which
               if (s, n) not in counters and (s, n) not in OPTIONAL]
    if missing:
        raise netns.NetnsError(f"{ns}: no {', '.join(missing)} in /proc/net/snmp or netstat")
    return {short: counters[key] for key, short in which.items() if key in counters}


class Around:
    """The counters' change over a sample: ``before()``, netperf, ``after()``; ``delta``
    holds sent_segs, retrans_segs, dsack_segs (client) and ofo_queued (server)."""

    def __init__(self, client_ns: str, server_ns: str):
        self.client_ns, self.server_ns = client_ns, server_ns
        self.delta: dict[str, int] = {}

    def _both(self) -> dict[str, int]:
        return {**read(self.client_ns, CLIENT), **read(self.server_ns, SERVER)}

    def before(self) -> None:
        self._start = self._both()

    def after(self) -> dict[str, int]:
        end = self._both()
        self.delta = {k: end[k] - self._start[k] for k in end if k in self._start}
        return self.delta


def figures(delta: dict[str, int]) -> dict[str, float]:
    """Retransmissions per 100 segments sent (OutSegs, which counts none of them), the
    spurious ones among them per 100 sent (where D-SACK was counted), and skbs queued out of
    order by the receiver per million segments sent; nothing when none was sent (or in a
    result from before these counters)."""
    sent = (delta or {}).get("sent_segs", 0)
    if sent <= 0:
        return {}
    out = {"retrans_pct": 100.0 * delta["retrans_segs"] / sent,
           "ofo_per_mseg": 1e6 * delta["ofo_queued"] / sent}
    if "dsack_segs" in delta:
        out["spurious_pct"] = 100.0 * delta["dsack_segs"] / sent
    return out
