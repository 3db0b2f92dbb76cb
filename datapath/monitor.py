"""``hostrouting monitor``: what the datapath does, packet by packet.

The programs emit a trace record per verdict into each node's ring buffer,
but only while the ``trace`` flag of that node's config map is set, so the
datapath pays nothing for tracing when nobody listens. The monitor sets the
flag on every node, polls the ring buffers, prints what matches, and clears
the flag again however it ends (Ctrl-C, SIGTERM, --count reached), unless
another monitor of the lab still runs. Each monitor keeps a pidfile
(``<lab>.monitor-<pid>``) while it runs: a monitor killed with SIGKILL leaves
tracing on, and ``status`` reports that (tracing on, no monitor running) as a
difference that ``enable`` repairs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime

from . import shared_types as st
from netns_lab import netns
from netns_lab.topology import Topology

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
ETHERTYPES = {0x0800: "ip", 0x0806: "arp", 0x86dd: "ipv6", 0x8100: "vlan", 0x88a8: "qinq",
              0x8035: "rarp", 0x88cc: "lldp"}


def _ifnames(ns: str) -> dict[int, str]:
    with netns.ipr(ns) as sock:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in sock.get_links()}


def _wanted(event, kind: str, pod_ips: set[str] | None) -> bool:
    if kind == "drop" and not event.reason.startswith("drop"):
        return False
    return pod_ips is None or bool(pod_ips & {event.saddr, event.daddr})


def _with_port(addr: str, port: int, family: str) -> str:
    if not port:
        return addr
    return f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"


def _has_addresses(event) -> bool:
    """IPv4 frames show their addresses (0.0.0.0 too: a malformed header); IPv6 frames once
    the IPv6 program parsed them (one that did not leaves them all 0)."""
    if event.family == "ipv6":
        return event.saddr != "::" or event.daddr != "::" or bool(event.protocol)
    return event.eth_proto == st.ETH_P_IP


def describe(node: str, event, names: dict[int, str]) -> dict:
    if _has_addresses(event):
        proto = PROTOCOLS.get(event.protocol, str(event.protocol) if event.protocol else "-")
        src = _with_port(event.saddr, event.sport, event.family)
        dst = _with_port(event.daddr, event.dport, event.family)
        summary = f"{src} > {dst}"
    elif event.eth_proto == st.ETH_P_ARP and event.arp_op:
        proto, src, dst = "arp", event.saddr, event.daddr
        summary = {1: f"who-has {dst} tell {src}", 2: f"reply {src} is-at {event.arp_sha}"}.get(
            event.arp_op, f"op {event.arp_op} {src} > {dst}")
    else:   # no addresses to show: the frame's type is what there is
        proto = ETHERTYPES.get(event.eth_proto, f"0x{event.eth_proto:04x}")
        src = dst = None
        summary = f"ethertype 0x{event.eth_proto:04x}"
    return {"node": node, "hook": event.hook, "verdict": event.reason, "family": event.family,
            "protocol": proto,
            "src": src, "dst": dst, "summary": summary, "len": event.len,
            "in": names.get(event.ifindex_in, str(event.ifindex_in)),
            "out": names.get(event.ifindex_out, str(event.ifindex_out)) if event.ifindex_out
            else None, "ts_ns": event.ts_ns}


def format_line(rec: dict) -> str:
    """One line per verdict. The protocol column names IPv6 as netstat does (tcp6, udp6,
    icmp6; an IPv6 frame without addresses: ipv6)."""
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    out = f" -> {rec['out']}" if rec["out"] else ""
    proto = rec["protocol"]
    if rec.get("family") == "ipv6" and rec["src"] is not None and not proto.endswith("6"):
        proto += "6"
    return (f"{stamp} {rec['node']:<8} {rec['hook']:<14} {rec['verdict']:<20} {proto:<5} "
            f"{rec['summary']} len {rec['len']} on {rec['in']}{out}")


def run_monitor(state, topo: Topology, kind: str = "trace", pod: str | None = None,
                count: int | None = None, duration: float | None = None, as_json: bool = False,
                emit=print) -> int:
    """Stream events until count/duration/interrupt; returns how many were printed."""
    from datapath.observe import monitor_pidfile, monitors
    from datapath.switch import node_maps
    from netns_lab import procs
    pod_ips = None
    if pod:
        found = topo.find_pod(pod)[1]
        pod_ips = {ip for ip in (found.ip, found.ip6) if ip}
    printed = 0
    pidfile = monitor_pidfile(topo.lab, os.getpid())
    with contextlib.ExitStack() as stack:
        procs.write_pidfile(pidfile)
        stack.callback(pidfile.unlink, missing_ok=True)
        readers = []
        for node in topo.nodes:
            maps = stack.enter_context(node_maps(state, node))
            names = _ifnames(node.netns)
            pending: list = []
            readers.append((node.name, names, pending, stack.enter_context(
                contextlib.closing(maps.trace_reader(pending.append)))))
            maps.set_trace(True)
            stack.callback(_trace_off_unless_watched, topo.lab, maps, monitors)
        deadline = time.monotonic() + duration if duration else None
        while (count is None or printed < count) and \
                (deadline is None or time.monotonic() < deadline):
            for node_name, names, pending, reader in readers:
                reader.poll(50)
                for event in pending:
                    if _wanted(event, kind, pod_ips) and (count is None or printed < count):
                        rec = describe(node_name, event, names)
                        emit(json.dumps(rec) if as_json else format_line(rec))
                        printed += 1
                pending.clear()
    return printed


def _trace_off_unless_watched(lab: str, maps, monitors) -> None:
    if not [p for p in monitors(lab) if p.pid != os.getpid()]:
        maps.set_trace(False)
