"""The BPF SNAT table of a node, read and swept from user space.

The datapath keeps two entries per flow in the `nat` hash map (see
bpf_c/include/nat.h), and in `nat6` for IPv6 (nat6.h): OUT, keyed by the pod's
packet, and IN, keyed by the reply. This module pairs them into flows for
``hostrouting nat list``, and deletes flows that have been idle longer than
their timeout (``sweep``), which the rule guard runs every few seconds while
eBPF host routing is on: the table is bounded by expiry (a full table refuses
new flows, it evicts none). Both tables are listed and swept alike (an IPv6
flow's addresses are IPv6, written [addr]:port; its ICMPv6 echo is "icmp6").

Expiry follows the datapath's rule exactly: a flow is alive while the most
recent packet of either entry is younger than the timeout of its state (TCP:
SYN sent, established once a reply came, closing after RST or FIN both ways;
UDP; ICMP). Timestamps are CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass

from . import libbpf, shared_types as st
from .host_routing import NAT_MAPS, DatapathMaps

_BITS = st.NAT_STATE_BITS
#: The sweep leaves a flow alone this long past its expiry: the datapath may be taking
#: its port over right then (its delete is claimed by compare-and-swap, the sweep's is a
#: delete by key), and the sweep's delete must not hit the new flow's fresh entry.
SWEEP_GRACE_NS = 2_000_000_000
_PROTO_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
                socket.IPPROTO_ICMPV6: "icmp6"}
_ECHO = (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)   # an identifier, no ports
_KEY_STRUCTS = {4: "struct hr_nat_key *", 6: "struct hr_nat6_key *"}
_ENTRY_STRUCTS = {4: "struct hr_nat_entry *", 6: "struct hr_nat6_entry *"}


def state_name(protocol: int, state: int) -> str:
    if protocol != socket.IPPROTO_TCP:
        return "replied" if state & _BITS["seen_reply"] else "new"
    if state & _BITS["rst"]:
        return "reset"
    fins = state & (_BITS["fin_out"] | _BITS["fin_in"])
    if fins == _BITS["fin_out"] | _BITS["fin_in"]:
        return "closed"
    if fins:
        return "half-closed"
    return "established" if state & _BITS["seen_reply"] else "syn-sent"


def timeout_s(cfg: st.Config, protocol: int, state: int) -> int:
    """The idle timeout the datapath applies (nat_timeout_ns in nat.h)."""
    nat = cfg.nat
    if protocol == socket.IPPROTO_TCP:
        fins = _BITS["fin_out"] | _BITS["fin_in"]
        if state & _BITS["rst"] or state & fins == fins:
            return nat["nat_timeout_tcp_closing"]
        if state & _BITS["seen_reply"]:
            return nat["nat_timeout_tcp_established"]
        return nat["nat_timeout_tcp_syn"]
    if protocol == socket.IPPROTO_UDP:
        return nat["nat_timeout_udp"]
    return nat["nat_timeout_icmp"]


def twin_key(key: st.NatKey, entry: st.NatEntry) -> st.NatKey:
    """The key of the other entry of the same flow (nat_twin in nat.h)."""
    if key.dir == "out":
        return st.NatKey(key.daddr, entry.addr, key.dport, entry.port, key.protocol, "in")
    return st.NatKey(entry.addr, key.saddr, entry.port, key.sport, key.protocol, "out")


def points_back(key: st.NatKey, twin: st.NatEntry | None) -> bool:
    """Whether `twin` (found at twin_key) is this entry's partner, not another flow's."""
    if twin is None:
        return False
    if key.dir == "out":
        return (twin.addr, twin.port) == (key.saddr, key.sport)
    return (twin.addr, twin.port) == (key.daddr, key.dport)


def _at(addr: str, port: int) -> str:
    """addr:port, [addr]:port for IPv6."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class Flow:
    protocol: str
    pod: str            # ip:port (ICMP: ip:identifier); IPv6: [ip]:port
    remote: str         # ip:port
    nat: str            # node ip:port
    state: str
    idle_s: float
    expires_in_s: float
    packets_out: int
    bytes_out: int
    packets_in: int
    bytes_in: int
    complete: bool      # both entries present (False: one is being swept or put back)

    def to_dict(self) -> dict:
        return asdict(self)


def flows(maps: DatapathMaps, now_ns: int | None = None) -> list[Flow]:
    """Every flow of both tables (IPv4, IPv6), each once, whether OUT, IN or both entries
    are left."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    cfg = maps.config()
    table = {k: v for family in maps.nat_families() for k, v in maps.nat_entries(family)}
    seen: set[st.NatKey] = set()
    out: list[Flow] = []
    for key, entry in table.items():
        if key in seen:
            continue
        tkey = twin_key(key, entry)
        twin = table.get(tkey)
        if not points_back(key, twin):
            twin = None
        seen.add(key)
        if twin is not None:
            seen.add(tkey)
        fwd, rev = (entry, twin) if key.dir == "out" else (twin, entry)
        state = entry.state | (twin.state if twin else 0)
        last = max(entry.last_seen_ns, twin.last_seen_ns if twin else 0)
        idle = max(0.0, (now_ns - last) / 1e9)
        proto = key.protocol
        if key.dir == "out":
            pod, nat = _at(key.saddr, key.sport), _at(entry.addr, entry.port)
            remote = key.daddr if proto in _ECHO else _at(key.daddr, key.dport)
        else:
            pod, nat = _at(entry.addr, entry.port), _at(key.daddr, key.dport)
            # the identifier is in sport (out) / dport (in)
            remote = key.saddr if proto in _ECHO else _at(key.saddr, key.sport)
        out.append(Flow(
            protocol=_PROTO_NAMES.get(proto, str(proto)), pod=pod, remote=remote, nat=nat,
            state=state_name(proto, state), idle_s=round(idle, 3),
            expires_in_s=round(timeout_s(cfg, proto, state) - idle, 3),
            packets_out=fwd.packets if fwd else 0, bytes_out=fwd.bytes if fwd else 0,
            packets_in=rev.packets if rev else 0, bytes_in=rev.bytes if rev else 0,
            complete=fwd is not None and rev is not None))
    out.sort(key=lambda f: (f.protocol, f.pod, f.remote))
    return out


def alive(cfg: st.Config, key: st.NatKey, entry: st.NatEntry, twin: st.NatEntry | None,
          now_ns: int, grace_ns: int = 0) -> bool:
    """nat_alive in nat.h: fresh by its own state, or by the newer of the pair under both
    (``grace_ns`` longer for the sweep)."""
    def fresh(seen: int, state: int) -> bool:
        return now_ns - seen <= timeout_s(cfg, key.protocol, state) * 1_000_000_000 + grace_ns
    if fresh(entry.last_seen_ns, entry.state):
        return True
    if twin is None:
        return False
    return fresh(max(entry.last_seen_ns, twin.last_seen_ns), entry.state | twin.state)


def sweep(maps: DatapathMaps, now_ns: int | None = None) -> int:
    """Delete the entries of every expired flow, of both tables; returns how many entries
    went.

    Expiry is judged as the datapath does (``alive``), on the dump and again
    on a fresh read just before deleting; a packet that refreshes the flow
    between that read and the delete loses the race (the flow then gets a new
    port), a window of microseconds per expired flow. Entries fresh on their
    own (most of a busy table) are passed over without being unpacked: the
    guard sweeps tables of hundreds of thousands of entries every few seconds.
    """
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    cfg = maps.config()
    stale = []
    for family in maps.nat_families():
        for kraw, vraw in maps.nat_raw_entries(family):
            k = st.ffi.from_buffer(_KEY_STRUCTS[family], kraw)
            v = st.ffi.from_buffer(_ENTRY_STRUCTS[family], vraw)
            if now_ns - v.last_seen_ns > timeout_s(cfg, k.protocol, v.state) * 1_000_000_000 \
                    + SWEEP_GRACE_NS:
                stale.append((st.unpack_nat_key(kraw), st.unpack_nat_entry(vraw)))
    deleted = 0
    for key, entry in stale:
        tkey = twin_key(key, entry)
        twin = maps.nat_lookup(tkey)
        if alive(cfg, key, entry, twin if points_back(key, twin) else None, now_ns,
                 SWEEP_GRACE_NS):
            continue
        entry = maps.nat_lookup(key)          # as it is now
        if entry is None:
            continue
        twin = maps.nat_lookup(tkey)
        twin = twin if points_back(key, twin) else None
        if alive(cfg, key, entry, twin, now_ns, SWEEP_GRACE_NS):
            continue
        deleted += maps.nat_delete(key)
        if twin is not None:
            deleted += maps.nat_delete(tkey)
    return deleted


def flush(maps: DatapathMaps) -> int:
    """Delete every entry of both tables (the benchmark starts each sample empty)."""
    return sum(libbpf.map_delete(maps.fd(NAT_MAPS[family][0]), key)
               for family in maps.nat_families() for key, _ in maps.nat_raw_entries(family))
