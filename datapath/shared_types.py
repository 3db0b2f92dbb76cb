"""The C layouts shared with the BPF programs, read from bpf_c/include/hostrouting_shared.h.

The header is the single source of truth: it is fed to cffi's cdef (include
guard stripped, the __u* types typedef'd first), so Python never restates a
layout. Helpers here pack and unpack the structs to and from the raw bytes
that map operations and ring-buffer records deal in.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import cffi

HEADER = Path(__file__).resolve().parent.parent / "bpf_c" / "include" / "hostrouting_shared.h"

_PRELUDE = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
"""

_GUARD = re.compile(r"^\s*#\s*(ifndef|define|endif)\b.*$", re.M)


def _header_cdef(path: Path = HEADER) -> str:
    text = path.read_text()
    stripped = _GUARD.sub("", text)
    if re.search(r"^\s*#", stripped, re.M):
        raise ValueError(f"{path}: only the include guard may use the preprocessor "
                         "(cffi reads this file)")
    return stripped


ffi = cffi.FFI()
ffi.cdef(_PRELUDE + _header_cdef())


def _enum_members(prefix: str) -> dict[str, int]:
    enum = ffi.typeof(f"enum {prefix}")
    return {name: value for value, name in enum.elements.items()}


#: enum hr_reason, name -> value (HR_REASON_MAX excluded).
REASONS: dict[str, int] = {n: v for n, v in sorted(_enum_members("hr_reason").items(),
                                                     key=lambda kv: kv[1])
                           if n != "HR_REASON_MAX"}
REASON_MAX: int = _enum_members("hr_reason")["HR_REASON_MAX"]
#: value -> pretty lowercase name ("redirect_peer").
REASON_NAMES: dict[int, str] = {v: n.removeprefix("HR_").lower() for n, v in REASONS.items()}
#: pretty name -> value.
REASON_BY_NAME: dict[str, int] = {p: v for v, p in REASON_NAMES.items()}


def reason_kind(name: str) -> str:
    """What a verdict did with the packet, from its name: "drop", "stack" (handed to the
    kernel's stack: pass_*, snat_pass_*) or "forward" (redirected by BPF, or answered by it:
    icmp_frag_needed)."""
    if name.startswith("drop_"):
        return "drop"
    return "stack" if "pass" in name.split("_") else "forward"


#: enum hr_hook, name -> value (HR_HOOK_MAX excluded).
HOOKS: dict[str, int] = {n: v for n, v in _enum_members("hr_hook").items() if n != "HR_HOOK_MAX"}
HOOK_MAX: int = _enum_members("hr_hook")["HR_HOOK_MAX"]
HOOK_NAMES: dict[int, str] = {v: n.removeprefix("HR_HOOK_").lower() for n, v in HOOKS.items()}

#: enum hr_family, name -> value (HR_FAMILY_MAX excluded): the counters' outer dimension.
FAMILIES: dict[str, int] = {n: v for n, v in _enum_members("hr_family").items()
                            if n != "HR_FAMILY_MAX"}
FAMILY_MAX: int = _enum_members("hr_family")["HR_FAMILY_MAX"]
#: value -> "ipv4" / "ipv6" (IPv4's also counts frames of neither family: ARP, ...).
FAMILY_NAMES: dict[int, str] = {v: n.removeprefix("HR_FAMILY_").lower()
                                for n, v in sorted(FAMILIES.items(), key=lambda kv: kv[1])}


def counter_index(family: int, hook: int, reason: int) -> int:
    """The slot of the `counters` array that counts `reason` of `hook` under `family`."""
    return (family * HOOK_MAX + hook) * REASON_MAX + reason

SIZEOF_ENDPOINT = ffi.sizeof("struct hr_endpoint")
SIZEOF_POD_VETH = ffi.sizeof("struct hr_pod_veth")
POD_VETH_SLOTS: int = _enum_members("hr_map_sizes")["HR_POD_VETH_SLOTS"]
SIZEOF_LPM_KEY = ffi.sizeof("struct hr_lpm_key")
SIZEOF_ROUTE = ffi.sizeof("struct hr_route")
SIZEOF_IN6 = ffi.sizeof("struct hr_in6")
SIZEOF_LPM6_KEY = ffi.sizeof("struct hr_lpm6_key")
SIZEOF_ROUTE6 = ffi.sizeof("struct hr_route6")
#: enum hr_prog6: slot of each IPv6 program in the `progs6` program array.
PROG6_SLOTS: dict[str, int] = {n.removeprefix("HR_PROG_").lower(): v
                               for n, v in _enum_members("hr_prog6").items() if n != "HR_PROG6_MAX"}
SIZEOF_CONFIG = ffi.sizeof("struct hr_config")
SIZEOF_COUNTER = ffi.sizeof("struct hr_counter")
SIZEOF_TRACE_EVENT = ffi.sizeof("struct hr_trace_event")


def reason_name(value: int) -> str:
    return REASON_NAMES.get(value, f"reason_{value}")


# -- addresses and MACs -------------------------------------------------------------------

def ip_to_key(ip: str | ipaddress.IPv4Address) -> bytes:
    """IPv4 address -> the 4 key bytes (network order) of the `endpoints` map."""
    return ipaddress.IPv4Address(ip).packed


def key_to_ip(key: bytes) -> str:
    return str(ipaddress.IPv4Address(bytes(key[:4])))


def ip6_to_key(ip: str | ipaddress.IPv6Address) -> bytes:
    """IPv6 address -> the 16 key bytes (network order, struct hr_in6) of `endpoints6`."""
    return ipaddress.IPv6Address(ip).packed


def key_to_ip6(key: bytes) -> str:
    return str(ipaddress.IPv6Address(bytes(key[:16])))


def be32_to_ip(value: int) -> str:
    """A __u32 holding an address in network order, as read natively from a struct."""
    return socket.inet_ntoa(value.to_bytes(4, "little"))


def ip_to_be32(ip: str) -> int:
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def mac_to_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError(f"a MAC has 6 bytes, not {len(mac)}")
        return bytes(mac)
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_to_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def _ntohs(v: int) -> int:
    return socket.ntohs(v)


# -- structs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    ifindex: int
    mac: str
    node_mac: str
    flags: int = 0


def pack_endpoint(ifindex: int, mac: str | bytes, node_mac: str | bytes, flags: int = 0) -> bytes:
    ep = ffi.new("struct hr_endpoint *")
    ep.ifindex = ifindex
    ep.flags = flags
    ffi.memmove(ep.mac, mac_to_bytes(mac), 6)
    ffi.memmove(ep.node_mac, mac_to_bytes(node_mac), 6)
    return bytes(ffi.buffer(ep))


def pack_lpm_key(cidr: str) -> bytes:
    """An IPv4 network -> the key of the `cluster_cidrs` / `node_routes` LPM tries."""
    net = ipaddress.IPv4Network(cidr)
    key = ffi.new("struct hr_lpm_key *")
    key.prefixlen = net.prefixlen
    ffi.memmove(ffi.addressof(key, "addr"), net.network_address.packed, 4)
    return bytes(ffi.buffer(key))


def pack_route(nexthop: str, ifindex: int) -> bytes:
    route = ffi.new("struct hr_route *")
    ffi.memmove(ffi.addressof(route, "nexthop"), ipaddress.IPv4Address(nexthop).packed, 4)
    route.ifindex = ifindex
    return bytes(ffi.buffer(route))


def pack_lpm6_key(cidr: str) -> bytes:
    """An IPv6 network -> the key of the `cluster_cidrs6` / `node_routes6` LPM tries."""
    net = ipaddress.IPv6Network(cidr)
    key = ffi.new("struct hr_lpm6_key *")
    key.prefixlen = net.prefixlen
    ffi.memmove(key.addr, net.network_address.packed, 16)
    return bytes(ffi.buffer(key))


def pack_route6(nexthop: str, ifindex: int) -> bytes:
    route = ffi.new("struct hr_route6 *")
    ffi.memmove(route.nexthop, ipaddress.IPv6Address(nexthop).packed, 16)
    route.ifindex = ifindex
    return bytes(ffi.buffer(route))


@dataclass(frozen=True)
class PodVeth:
    """A `pod_veths` slot: the pod's addresses (None: none known) and MAC."""
    ip: str | None
    mac: str
    ip6: str | None = None


def pack_pod_veth(ip: str | None, mac: str | bytes, ip6: str | None = None) -> bytes:
    v = ffi.new("struct hr_pod_veth *")
    if ip:
        ffi.memmove(ffi.addressof(v, "addr"), ip_to_key(ip), 4)
    ffi.memmove(v.mac, mac_to_bytes(mac), 6)
    if ip6:
        ffi.memmove(v.addr6, ip6_to_key(ip6), 16)
    return bytes(ffi.buffer(v))


def unpack_pod_veth(raw: bytes) -> PodVeth:
    v = _from_bytes("struct hr_pod_veth", raw)
    addr6 = bytes(ffi.buffer(v.addr6))
    return PodVeth(ip=be32_to_ip(v.addr) if v.addr else None, mac=mac_to_str(ffi.buffer(v.mac)),
                   ip6=key_to_ip6(addr6) if any(addr6) else None)


def unpack_endpoint(raw: bytes) -> Endpoint:
    ep = _from_bytes("struct hr_endpoint", raw)
    return Endpoint(ifindex=ep.ifindex, mac=mac_to_str(ffi.buffer(ep.mac)),
                    node_mac=mac_to_str(ffi.buffer(ep.node_mac)), flags=ep.flags)


#: NAT settings of struct hr_config, field name -> default (ports host order, timeouts in s).
NAT_CONFIG_DEFAULTS: dict[str, int] = {
    "nat_port_min": 1024,
    "nat_port_max": 60999,               # below the lab nodes' ephemeral ports (61000-65535)
    "nat_timeout_tcp_syn": 60,
    "nat_timeout_tcp_established": 7500,      # > Linux's keepalive time (7200 s)
    "nat_timeout_tcp_closing": 10,
    "nat_timeout_udp": 60,
    "nat_timeout_icmp": 30,
}


@dataclass(frozen=True)
class Config:
    router_ip: str
    trace: bool
    node_ip: str | None = None          # None: BPF SNAT off
    nat: dict[str, int] = field(default_factory=lambda: dict(NAT_CONFIG_DEFAULTS))
    router_ip6: str | None = None       # the pods' IPv6 gateway; None: an IPv4-only lab
    node_ip6: str | None = None         # None: BPF SNAT off for IPv6


def pack_config(router_ip: str, trace: bool = False, node_ip: str | None = None,
                nat: dict[str, int] | None = None, router_ip6: str | None = None,
                node_ip6: str | None = None) -> bytes:
    """struct hr_config; `nat` overrides NAT_CONFIG_DEFAULTS (unknown keys are an error);
    the IPv6 addresses None: all 0 (none)."""
    settings = dict(NAT_CONFIG_DEFAULTS)
    unknown = set(nat or {}) - set(settings)
    if unknown:
        raise ValueError(f"unknown NAT setting(s): {', '.join(sorted(unknown))}")
    settings.update(nat or {})
    cfg = ffi.new("struct hr_config *")
    cfg.router_ip = ip_to_be32(router_ip)
    cfg.trace = 1 if trace else 0
    cfg.node_ip = ip_to_be32(node_ip) if node_ip else 0
    for name, value in settings.items():
        setattr(cfg, name, value)   # cffi raises OverflowError on a value that does not fit
    for name, ip6 in (("router_ip6", router_ip6), ("node_ip6", node_ip6)):
        if ip6:
            ffi.memmove(getattr(cfg, name), ip6_to_key(ip6), 16)
    return bytes(ffi.buffer(cfg))


def _in6_or_none(words) -> str | None:
    return in6_to_ip(words) if any(bytes(ffi.buffer(words))) else None


def unpack_config(raw: bytes) -> Config:
    cfg = _from_bytes("struct hr_config", raw)
    return Config(router_ip=be32_to_ip(cfg.router_ip), trace=cfg.trace == 1,
                  node_ip=be32_to_ip(cfg.node_ip) if cfg.node_ip else None,
                  nat={name: getattr(cfg, name) for name in NAT_CONFIG_DEFAULTS},
                  router_ip6=_in6_or_none(cfg.router_ip6), node_ip6=_in6_or_none(cfg.node_ip6))


# -- NAT entries ----------------------------------------------------------------------------

NAT_DIRS: dict[int, str] = {v: n.removeprefix("HR_NAT_").lower()
                            for n, v in _enum_members("hr_nat_dir").items()}
#: "out" / "in" -> enum hr_nat_dir value.
NAT_DIR_VALUES: dict[str, int] = {n: v for v, n in NAT_DIRS.items()}
NAT_STATE_BITS: dict[str, int] = {n.removeprefix("HR_NAT_").lower(): v
                                  for n, v in _enum_members("hr_nat_state").items()}
CIDR_FLAGS: dict[str, int] = {n.removeprefix("HR_CIDR_").lower(): v
                              for n, v in _enum_members("hr_cidr_flags").items()}
SIZEOF_NAT_KEY = ffi.sizeof("struct hr_nat_key")
SIZEOF_NAT_ENTRY = ffi.sizeof("struct hr_nat_entry")
#: The `nat6` map's (IPv6 BPF SNAT): NatKey and NatEntry hold IPv6 addresses then.
SIZEOF_NAT6_KEY = ffi.sizeof("struct hr_nat6_key")
SIZEOF_NAT6_ENTRY = ffi.sizeof("struct hr_nat6_entry")
SIZEOF_FRAG6_KEY = ffi.sizeof("struct hr_frag6_key")


def nat_family(addr: str) -> int:
    """4 or 6: the family of a NAT key's or entry's address, which picks `nat` or `nat6`."""
    return 6 if ":" in addr else 4


def _set_in6(field_, ip: str) -> None:
    ffi.memmove(field_.a, ipaddress.IPv6Address(ip).packed, 16)


@dataclass(frozen=True)
class NatKey:
    saddr: str
    daddr: str
    sport: int          # host order; ICMP echo: the identifier (or 0)
    dport: int
    protocol: int
    dir: str            # "out" | "in"


@dataclass(frozen=True)
class NatEntry:
    created_ns: int
    last_seen_ns: int
    packets: int
    bytes: int
    addr: str
    port: int           # host order
    state: int
    seq_hint: int = 0   # host order; 0: none
    seq_end: int = 0    # host order; 0: none


def pack_nat_key(key: NatKey) -> bytes:
    """struct hr_nat_key, or struct hr_nat6_key for a key with IPv6 addresses."""
    if nat_family(key.saddr) == 6:
        k = ffi.new("struct hr_nat6_key *")
        _set_in6(k.saddr, key.saddr)
        _set_in6(k.daddr, key.daddr)
    else:
        k = ffi.new("struct hr_nat_key *")
        k.saddr = ip_to_be32(key.saddr)
        k.daddr = ip_to_be32(key.daddr)
    k.sport = socket.htons(key.sport)
    k.dport = socket.htons(key.dport)
    k.protocol = key.protocol
    k.dir = NAT_DIR_VALUES[key.dir]
    return bytes(ffi.buffer(k))


def unpack_nat_key(raw: bytes) -> NatKey:
    """A key of `nat` or, by its size, of `nat6`."""
    if len(raw) == SIZEOF_NAT6_KEY:
        k = _from_bytes("struct hr_nat6_key", raw)
        saddr, daddr = in6_to_ip(k.saddr.a), in6_to_ip(k.daddr.a)
    else:
        k = _from_bytes("struct hr_nat_key", raw)
        saddr, daddr = be32_to_ip(k.saddr), be32_to_ip(k.daddr)
    return NatKey(saddr=saddr, daddr=daddr, sport=_ntohs(k.sport),
                  dport=_ntohs(k.dport), protocol=k.protocol,
                  dir=NAT_DIRS.get(k.dir, str(k.dir)))


def pack_nat_entry(e: NatEntry) -> bytes:
    """struct hr_nat_entry, or struct hr_nat6_entry for an entry with an IPv6 address."""
    v = ffi.new("struct hr_nat6_entry *" if nat_family(e.addr) == 6 else "struct hr_nat_entry *")
    v.created_ns, v.last_seen_ns, v.packets, v.bytes = (e.created_ns, e.last_seen_ns,
                                                        e.packets, e.bytes)
    if nat_family(e.addr) == 6:
        _set_in6(v.addr, e.addr)
    else:
        v.addr = ip_to_be32(e.addr)
    v.port = socket.htons(e.port)
    v.state = e.state
    v.seq_hint = socket.htonl(e.seq_hint)
    v.seq_end = socket.htonl(e.seq_end)
    return bytes(ffi.buffer(v))


def unpack_nat_entry(raw: bytes) -> NatEntry:
    """An entry of `nat` or, by its size, of `nat6`."""
    six = len(raw) == SIZEOF_NAT6_ENTRY
    v = _from_bytes("struct hr_nat6_entry" if six else "struct hr_nat_entry", raw)
    addr = in6_to_ip(v.addr.a) if six else be32_to_ip(v.addr)
    return NatEntry(created_ns=v.created_ns, last_seen_ns=v.last_seen_ns, packets=v.packets,
                    bytes=v.bytes, addr=addr, port=_ntohs(v.port), state=v.state,
                    seq_hint=socket.ntohl(v.seq_hint), seq_end=socket.ntohl(v.seq_end))


def pack_counter(packets: int, bytes_: int) -> bytes:
    c = ffi.new("struct hr_counter *")
    c.packets = packets
    c.bytes = bytes_
    return bytes(ffi.buffer(c))


def unpack_counter(raw: bytes) -> tuple[int, int]:
    c = _from_bytes("struct hr_counter", raw)
    return c.packets, c.bytes


ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86dd


@dataclass(frozen=True)
class TraceEvent:
    ts_ns: int
    hook: str
    reason: str
    ifindex_in: int
    ifindex_out: int
    saddr: str          # the address of the event's family: IPv4 dotted, IPv6 as text
    daddr: str
    sport: int          # host order
    dport: int
    protocol: int       # IPv6: the upper-layer protocol, after the extension headers
    len: int
    eth_proto: int = ETH_P_IP   # the frame's ethertype
    arp_op: int = 0             # ARP: 1 request, 2 reply
    arp_sha: str = ""           # ARP: the sender's MAC
    family: str = "ipv4"        # FAMILY_NAMES: the counters' family of the verdict


def in6_to_ip(words) -> str:
    """Four __u32 words holding an IPv6 address in network order (struct hr_in6, the trace's
    saddr6 / daddr6) -> its text ("::" when all 0)."""
    return str(ipaddress.IPv6Address(bytes(ffi.buffer(words))))


def unpack_trace_event(raw: bytes) -> TraceEvent:
    ev = _from_bytes("struct hr_trace_event", raw)
    family = FAMILY_NAMES.get(ev.family, str(ev.family))
    if ev.family == FAMILIES["HR_FAMILY_IPV6"]:
        saddr, daddr = in6_to_ip(ev.saddr6), in6_to_ip(ev.daddr6)
    else:
        saddr, daddr = be32_to_ip(ev.saddr), be32_to_ip(ev.daddr)
    return TraceEvent(ts_ns=ev.ts_ns, hook=HOOK_NAMES.get(ev.hook, str(ev.hook)),
                      reason=reason_name(ev.reason), ifindex_in=ev.ifindex_in,
                      ifindex_out=ev.ifindex_out, saddr=saddr, daddr=daddr,
                      sport=_ntohs(ev.sport), dport=_ntohs(ev.dport), protocol=ev.protocol,
                      len=ev.len, eth_proto=ev.eth_proto, arp_op=ev.arp_op,
                      arp_sha=mac_to_str(ffi.buffer(ev.arp_sha)) if ev.arp_op else "",
                      family=family)


@dataclass(frozen=True)
class XtRefusal:
    netns_cookie: int
    pid: int
    level: int
    optname: int
    comm: str
    table: str


def unpack_xt_refusal(raw: bytes) -> XtRefusal:
    ev = _from_bytes("struct hr_xt_refusal", raw)
    return XtRefusal(netns_cookie=ev.netns_cookie, pid=ev.pid, level=ev.level,
                     optname=ev.optname, comm=ffi.string(ev.comm).decode(errors="replace"),
                     table=ffi.string(ev.table).decode(errors="replace"))


def _from_bytes(ctype: str, raw: bytes):
    size = ffi.sizeof(ctype)
    if len(raw) < size:
        raise ValueError(f"{ctype} needs {size} bytes, got {len(raw)}")
    # a view into the bytes, no copy: unpacking a 500k-entry NAT table stays fast
    return ffi.from_buffer(ctype + " *", raw if isinstance(raw, bytes) else bytes(raw))
