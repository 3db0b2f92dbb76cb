"""hostrouting monitor: per-packet verdicts, emitted only while someone listens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from datapath.monitor import run_monitor
from datapath.switch import node_maps
from netns_lab.state import load_state
from tests.labtools import assert_ping

pytestmark = pytest.mark.slow     # every test here builds a lab

SEND_BAD_IHL = """
from scapy.all import Ether, IP, ICMP, sendp, get_if_hwaddr
pkt = Ether(dst="ff:ff:ff:ff:ff:ff", src=get_if_hwaddr("eth0")) / IP(ihl=3, dst="{dst}") / ICMP()
sendp(pkt, iface="eth0", verbose=False)
"""


def later(fn, delay=1.0):
    t = threading.Timer(delay, fn)
    t.start()
    return t


def trace_flags(state, topo) -> list[int]:
    flags = []
    for node in topo.nodes:
        with node_maps(state, node) as maps:
            flags.append(maps.config().trace)
    return flags


def test_no_listener_no_events_then_filtered_streams_of_both_families(make_lab):
    """A dual-stack lab (the IPv6 part: ipv6_stream below, in this lab so as to build no
    other)."""
    state, topo = make_lab("ebpf", ip_family="dual")
    state = load_state(topo.lab)
    (a1, a2), (b1, _) = topo.nodes[0].pods, topo.nodes[1].pods
    assert trace_flags(state, topo) == [0, 0]
    assert_ping(a1.netns, b1.ip)
    for node in topo.nodes:  # nothing was traced while nobody listened
        with node_maps(state, node) as maps:
            assert maps.read_trace_events() == []

    lines: list[str] = []
    timer = later(lambda: (assert_ping(a2.netns, b1.ip), assert_ping(a1.netns, a2.ip)))
    run_monitor(state, topo, "trace", pod="node1-pod1", count=2, duration=15,
                as_json=False, emit=lines.append)
    timer.join()
    assert len(lines) == 2
    assert all("198.18.1.10" in line and "redirect_peer" in line for line in lines), lines
    assert trace_flags(state, topo) == [0, 0]
    ipv6_stream(state, topo)


def ipv6_stream(state, topo):
    """ping -6 from node1-pod1 to a pod on its node and one on node2: the monitor shows the
    pods' IPv6 addresses (icmp6) and the family in --json, for the redirects of both hooks
    on both nodes; --pod matches the pod by its IPv6 address too. (The line's format:
    tests/system/test_family_observability.py.)"""
    (a1, a2), (b1, _) = topo.nodes[0].pods, topo.nodes[1].pods
    records: list[str] = []
    timer = later(lambda: (assert_ping(a1.netns, a2.ip6), assert_ping(a1.netns, b1.ip6)))
    run_monitor(state, topo, "trace", pod="node1-pod1", duration=4, as_json=True,
                emit=records.append)
    timer.join()
    seen = [json.loads(r) for r in records]
    assert all(a1.ip6 in (r["src"], r["dst"]) or a1.ip in (r["src"], r["dst"]) for r in seen)
    v6 = {(r["node"], r["hook"], r["verdict"], r["protocol"], r["src"], r["dst"])
          for r in seen if r["family"] == "ipv6"}
    assert ("node1", "from_pod", "redirect_peer", "icmp6", a1.ip6, a2.ip6) in v6, seen
    assert ("node1", "from_pod", "redirect_peer", "icmp6", a2.ip6, a1.ip6) in v6, seen
    assert ("node1", "from_pod", "redirect_neigh", "icmp6", a1.ip6, b1.ip6) in v6, seen
    assert ("node2", "from_underlay", "redirect_peer", "icmp6", a1.ip6, b1.ip6) in v6, seen
    assert ("node1", "from_underlay", "redirect_peer", "icmp6", b1.ip6, a1.ip6) in v6, seen
    assert trace_flags(state, topo) == [0, 0]


def test_drop_filter_shows_a_malformed_packet(make_lab):
    state, topo = make_lab("ebpf")
    state = load_state(topo.lab)
    a1, a2 = topo.nodes[0].pods
    lines: list[str] = []

    def send():
        assert_ping(a1.netns, a2.ip)  # traced, but not a drop: filtered out
        subprocess.run(["ip", "netns", "exec", a1.netns, sys.executable, "-c",
                        SEND_BAD_IHL.format(dst=a2.ip)], check=True, timeout=30)

    timer = later(send)
    run_monitor(state, topo, "drop", count=1, duration=20, as_json=True, emit=lines.append)
    timer.join()
    assert len(lines) == 1 and '"verdict": "drop_malformed"' in lines[0], lines
    assert '"node": "node1"' in lines[0] and '"hook": "from_pod"' in lines[0]


SEND_ARP = """
from scapy.all import ARP, Ether, get_if_hwaddr, sendp
mac = get_if_hwaddr("eth0")
sendp(Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(op=1, hwsrc=mac, psrc="{src}", pdst="{dst}"),
      iface="eth0", verbose=False)
"""


def test_arp_and_other_frames_are_shown_as_what_they_are(make_lab):
    """A pod's ARP request for its gateway reads `arp who-has <gateway> tell <pod>` (it read
    `0.0.0.0 > 0.0.0.0`), in the line and in --json."""
    state, topo = make_lab("ebpf")
    state = load_state(topo.lab)
    a1 = topo.nodes[0].pods[0]
    gateway = topo.nodes[0].gateway
    lines: list[str] = []
    records: list[str] = []
    send = ["ip", "netns", "exec", a1.netns, sys.executable, "-c",
            SEND_ARP.format(src=a1.ip, dst=gateway)]
    for as_json, out in ((False, lines), (True, records)):
        timer = later(lambda: subprocess.run(send, check=True, timeout=30))
        run_monitor(state, topo, "trace", pod="node1-pod1", count=1, duration=20,
                    as_json=as_json, emit=out.append)
        timer.join()
    assert len(lines) == 1 and f"arp   who-has {gateway} tell {a1.ip} len" in lines[0], lines
    assert "pass_not_ipv4" in lines[0] and "0.0.0.0" not in lines[0]
    rec = json.loads(records[0])
    assert (rec["protocol"], rec["src"], rec["dst"], rec["summary"]) == (
        "arp", a1.ip, gateway, f"who-has {gateway} tell {a1.ip}")
