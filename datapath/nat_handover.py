"""Handing open pod-to-external flows over between conntrack and the BPF SNAT table.

A datapath replaced by another (a new build, converge) hands its entries of
both tables, `nat` and `nat6`, to its successor as they are (``nat_snapshot``,
``restore``).

In legacy mode a flow's NAT mapping (pod address and port <-> node IP and
port) lives in the node's conntrack, made by the MASQUERADE rule; in eBPF
mode it lives in the `nat` map (two entries per flow, bpf_c/include/nat.h).
Without a handover every switch changes the port of every open flow, and the
remote resets it. So:

- ``import_conntrack`` (enable): every masqueraded conntrack entry of the
  node's pods becomes both BPF entries of its flow, with the same node port
  and the state the datapath would have given it (TCP: SYN-sent,
  established, or closing; UDP and ICMP: replied or not), last seen now. It
  runs after the maps are filled and before the programs are attached: the
  first packet BPF translates finds the flow.
- ``export_to_conntrack`` (disable): every live BPF flow becomes a conntrack
  entry with the same mapping (``conntrack -I ... --src-nat NODE:PORT``;
  TCP by its state, with what is left of its BPF timeout), after the node's
  stale masqueraded entries (left from before ``enable``) are deleted, and
  before MASQUERADE is restored and the programs are detached: the first
  packet the stack handles finds its entry. Conntrack has no window data for
  such an entry (nor the window scale), so the node namespace's
  ``nf_conntrack_tcp_be_liberal`` is set (``liberal_tcp_tracking``, on
  enable too): without it, segments out of the window conntrack knows would
  be INVALID, leave un-NATed, and replies would reach the node's own stack,
  which resets them.

Both families: IPv4's flows go between `nat` and conntrack, IPv6's (in a dual or
ipv6 lab: the pods' flows masqueraded to the node's IPv6 address by ip6tables)
between `nat6` and conntrack, ``conntrack -I`` taking an IPv6 NAT target as
``[addr]:port``. A flow opened in the milliseconds between the import and the
attach is not carried over (its next packet gets a new port). conntrack cannot be told an
ICMP echo's translated identifier, so an echo flow whose BPF identifier is
not the pod's own goes over without it (later requests get a new mapping).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

from netns_lab import netns
from netns_lab.topology import Node, Topology

from . import libbpf, nat_table, shared_types as st
from .host_routing import NAT_MAPS, DatapathMaps

_BITS = st.NAT_STATE_BITS
_PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP,
           "icmpv6": socket.IPPROTO_ICMPV6}
_PROTO_NAMES = {v: k for k, v in _PROTOS.items()}
#: an echo flow (no ports; its identifier instead): the request's type, by protocol
_ECHO_REQUEST = {socket.IPPROTO_ICMP: "8", socket.IPPROTO_ICMPV6: "128"}
_CLOSING = _BITS["seen_reply"] | _BITS["fin_out"] | _BITS["fin_in"]
#: conntrack's TCP state -> the datapath's state bits. Half-closed states keep the
#: established bits only: conntrack does not say which side sent the FIN.
_TCP_STATE_BITS = {"NONE": 0, "SYN_SENT": 0, "SYN_SENT2": 0,
                   "SYN_RECV": _BITS["seen_reply"], "ESTABLISHED": _BITS["seen_reply"],
                   "FIN_WAIT": _BITS["seen_reply"], "CLOSE_WAIT": _BITS["seen_reply"],
                   "LAST_ACK": _CLOSING, "TIME_WAIT": _CLOSING, "CLOSE": _CLOSING}


@dataclass(frozen=True)
class CtFlow:
    """A conntrack entry of a masqueraded flow, as the handover needs it."""
    protocol: int
    pod: str
    pod_port: int       # ICMP echo: the identifier
    remote: str
    remote_port: int    # ICMP echo: 0
    nat_addr: str
    nat_port: int       # ICMP echo: the identifier in replies
    tcp_state: str      # "" unless TCP
    replied: bool


def parse_conntrack(text: str) -> list[CtFlow]:
    """TCP, UDP and ICMP (ICMPv6) echo entries of ``conntrack -L -o extended``, IPv4's and
    IPv6's."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or words[0] not in ("ipv4", "ipv6") or words[2] not in _PROTOS:
            continue
        proto = _PROTOS[words[2]]
        state = words[5] if proto == socket.IPPROTO_TCP and "=" not in words[5] else ""
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        for w in words:
            if "=" in w:
                k, v = w.split("=", 1)
                (reply if k in orig else orig).setdefault(k, v)
        try:
            if proto in _ECHO_REQUEST:
                if orig.get("type") != _ECHO_REQUEST[proto]:
                    continue
                ports = int(orig["id"]), 0, int(reply["id"])
            else:
                ports = int(orig["sport"]), int(orig["dport"]), int(reply["dport"])
            found.append(CtFlow(proto, orig["src"], ports[0], orig["dst"], ports[1],
                                reply["dst"], ports[2], state, "[UNREPLIED]" not in words))
        except (KeyError, ValueError):
            continue
    return found


def liberal_tcp_tracking(node: Node) -> None:
    """nf_conntrack_tcp_be_liberal in the node: conntrack judges no TCP window.

    Across a switch, conntrack sees only part of a flow's segments (one direction
    while BPF already handles the other, or none for a while) and, for entries
    written by ``conntrack -I``, no window scale: strict tracking would mark the
    next segments INVALID, which are then neither NATed nor translated back, and a
    reply reaching the node's own stack is answered with an RST that ends the pod's
    connection. (Without nf_conntrack loaded there is nothing to set.)
    """
    netns.run(node.netns, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=1"],
              check=False)


def masqueraded(topo: Topology, node: Node) -> list[CtFlow]:
    """The node's conntrack entries of its pods' flows masqueraded to the node IP (and, in a
    lab with IPv6, to its IPv6 address)."""
    proc = netns.run(node.netns, ["conntrack", "-L", "-o", "extended"], check=False,
                     changes=False)
    families = [(node.pod_cidr, node.ip, topo.non_masquerade_cidrs)]
    if topo.has_ipv6 and node.ip6:
        families.append((node.pod_cidr6, node.ip6, topo.non_masquerade_cidrs6))
    found = []
    for pod_cidr, node_ip, inside in families:
        pods = ipaddress.ip_network(pod_cidr)
        nets = [ipaddress.ip_network(c) for c in inside]
        found += [f for f in parse_conntrack(proc.stdout)
                  if f.nat_addr == node_ip and ipaddress.ip_address(f.pod) in pods
                  and not any(ipaddress.ip_address(f.remote) in net for net in nets)]
    return found


def _state_bits(flow: CtFlow) -> int:
    if flow.protocol == socket.IPPROTO_TCP:
        return _TCP_STATE_BITS.get(flow.tcp_state, _BITS["seen_reply"])
    return _BITS["seen_reply"] if flow.replied else 0


def import_conntrack(topo: Topology, node: Node, maps: DatapathMaps,
                     now_ns: int | None = None) -> tuple[int, int]:
    """Both BPF entries for each masqueraded flow of the node's pods; (imported, skipped).

    Skipped: a flow whose entries cannot both be inserted (the table full, or a key
    taken already); nothing half-inserted stays.
    """
    liberal_tcp_tracking(node)
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    imported = skipped = 0
    for f in masqueraded(topo, node):
        family = st.nat_family(f.pod)
        if family not in maps.nat_families():
            skipped += 1
            continue
        fd = maps.fd(NAT_MAPS[family][0])
        bits = _state_bits(f)
        out_key = st.NatKey(f.pod, f.remote, f.pod_port, f.remote_port, f.protocol, "out")
        in_key = st.NatKey(f.remote, f.nat_addr, f.remote_port, f.nat_port, f.protocol, "in")
        out_val = st.NatEntry(now_ns, now_ns, 0, 0, f.nat_addr, f.nat_port, bits)
        in_val = st.NatEntry(now_ns, now_ns, 0, 0, f.pod, f.pod_port, bits)
        try:
            libbpf.map_update(fd, st.pack_nat_key(in_key), st.pack_nat_entry(in_val),
                              libbpf.BPF_NOEXIST)
        except OSError:
            skipped += 1
            continue
        try:
            libbpf.map_update(fd, st.pack_nat_key(out_key), st.pack_nat_entry(out_val),
                              libbpf.BPF_NOEXIST)
        except OSError:
            libbpf.map_delete(fd, st.pack_nat_key(in_key))
            skipped += 1
            continue
        imported += 1
    return imported, skipped


def nat_snapshot(maps: DatapathMaps) -> list[tuple[str, bytes, bytes]]:
    """Every raw entry of a datapath's NAT tables, IPv4's (`nat`) and IPv6's (`nat6`), as
    (map name, key, value): what a datapath replacing it gets (``restore``)."""
    return [(NAT_MAPS[family][0], key, value) for family in maps.nat_families()
            for key, value in maps.nat_raw_entries(family)]


def restore(maps: DatapathMaps, entries: list[tuple[str, bytes, bytes]]) -> None:
    """Write a ``nat_snapshot`` into a new datapath's tables (an IPv6 table it lacks: none)."""
    have = {NAT_MAPS[f][0] for f in maps.nat_families()}
    for name, key, value in entries:
        if name in have:
            libbpf.map_update(maps.fd(name), key, value)


@dataclass(frozen=True)
class BpfFlow:
    protocol: int
    pod: str
    pod_port: int
    remote: str
    remote_port: int
    nat_addr: str
    nat_port: int
    state: int
    remaining_s: int


def live_flows(maps: DatapathMaps, now_ns: int | None = None) -> list[BpfFlow]:
    """Every live flow of the table with both entries (as the datapath would judge it)."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    cfg = maps.config()
    table = {k: v for family in maps.nat_families() for k, v in maps.nat_entries(family)}
    found = []
    for key, out in table.items():
        if key.dir != "out":
            continue
        tkey = nat_table.twin_key(key, out)
        twin = table.get(tkey)
        if not nat_table.points_back(key, twin):
            continue
        if not nat_table.alive(cfg, key, out, twin, now_ns):
            continue
        state = out.state | twin.state
        last = max(out.last_seen_ns, twin.last_seen_ns)
        timeout = nat_table.timeout_s(cfg, key.protocol, state)
        remaining = max(1, int(timeout - max(0, now_ns - last) / 1e9))
        found.append(BpfFlow(key.protocol, key.saddr, key.sport, key.daddr, key.dport,
                             out.addr, out.port, state, remaining))
    return found


def _ct_tuple(protocol: int, pod: str, pod_port: int, remote: str, remote_port: int) -> list[str]:
    # the family follows from the addresses (-I refuses -f)
    argv = ["-p", _PROTO_NAMES[protocol], "-s", pod, "-d", remote]
    if protocol in _ECHO_REQUEST:
        opt = "--icmpv6" if protocol == socket.IPPROTO_ICMPV6 else "--icmp"
        return argv + [f"{opt}-type", _ECHO_REQUEST[protocol], f"{opt}-code", "0",
                       f"{opt}-id", str(pod_port)]
    return argv + ["--sport", str(pod_port), "--dport", str(remote_port)]


def _ct_state(flow: BpfFlow) -> list[str]:
    if flow.protocol != socket.IPPROTO_TCP:
        return ["-u", "SEEN_REPLY,ASSURED"] if flow.state & _BITS["seen_reply"] else []
    if flow.state & _BITS["rst"]:
        tcp = "CLOSE"
    elif flow.state & (_BITS["fin_out"] | _BITS["fin_in"]) == _BITS["fin_out"] | _BITS["fin_in"]:
        tcp = "TIME_WAIT"
    elif flow.state & _BITS["fin_out"]:
        tcp = "FIN_WAIT"
    elif flow.state & _BITS["fin_in"]:
        tcp = "CLOSE_WAIT"
    elif flow.state & _BITS["seen_reply"]:
        tcp = "ESTABLISHED"
    else:
        return ["--state", "SYN_SENT"]
    return ["--state", tcp, "-u", "SEEN_REPLY,ASSURED"]


def _nat_to(addr: str, port: int) -> str:
    """conntrack's --src-nat argument: addr:port, [addr]:port for IPv6."""
    return f"[{addr}]:{port}" if st.nat_family(addr) == 6 else f"{addr}:{port}"


def export_to_conntrack(topo: Topology, node: Node, maps: DatapathMaps) -> tuple[int, int]:
    """A conntrack entry with the same NAT mapping for every live BPF flow; (written, failed).

    ``failed`` counts flows conntrack refused and flows it gave another port (checked
    on a fresh listing).
    """
    liberal_tcp_tracking(node)
    flows = live_flows(maps)
    # stale masqueraded entries (from before enable) would clash on either tuple
    for f in masqueraded(topo, node):
        netns.run(node.netns, ["conntrack", "-D", *_ct_tuple(f.protocol, f.pod, f.pod_port,
                                                             f.remote, f.remote_port)],
                  check=False)
    failed = 0
    for f in flows:
        nat = f.nat_addr if f.protocol in _ECHO_REQUEST else _nat_to(f.nat_addr, f.nat_port)
        argv = ["conntrack", "-I", *_ct_tuple(f.protocol, f.pod, f.pod_port, f.remote,
                                              f.remote_port),
                *_ct_state(f), "-t", str(f.remaining_s), "--src-nat", nat]
        if netns.run(node.netns, argv, check=False).returncode != 0:
            failed += 1
    if flows:
        have = {(c.protocol, c.pod, c.pod_port, c.remote, c.remote_port): c.nat_port
                for c in masqueraded(topo, node)}
        def kept(f: BpfFlow) -> bool:
            port = have.get((f.protocol, f.pod, f.pod_port, f.remote, f.remote_port))
            return port is not None and (f.protocol in _ECHO_REQUEST or port == f.nat_port)
        failed = sum(1 for f in flows if not kept(f))
    return len(flows) - failed, failed
