"""BPF SNAT for IPv6 with real packets (issue 12), in one dual-stack eBPF lab whose link from
the fabric router to the external host is 1280 bytes (pods and the underlay: 1500).

The external host has no route to the pods' IPv6 CIDRs: pods reach it only masqueraded to
their node's IPv6 address. Real clients and servers show that it sees the node's address,
that conntrack stays empty (BPF did the NAT, not netfilter), that traceroute -6 sees every
hop (the routers' Time Exceeded, sent to the node, translated back to the pod), and that
path MTU discovery works through the NAT: the router's Packet Too Big about the node's
address and NAT port reaches the pod translated, so tracepath -6 finds 1280 and a 2 MB
upload completes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from datapath import converge, libbpf, switch
from datapath.host_routing import DatapathMaps
from datapath.observe import differences, observe, pinned_map_id, progs6_pin
from netns_lab import netns
from netns_lab.state import load_state
from tests.labtools import (assert_ping, background, conntrack_entries, echo_request,
                            echo_server, lab_counters, ping)

pytestmark = pytest.mark.slow     # every test here builds a lab

EXTERNAL_MTU = 1280
SIZE = 2 * 1024 * 1024
SINK_PORT = 9406

# The external host's TCP sink: reads everything, answers the sha256 of it and the client
# address it saw.
SINK = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(4)
while True:
    conn, addr = s.accept()
    with conn:
        h = hashlib.sha256()
        while chunk := conn.recv(65536):
            h.update(chunk)
        conn.sendall(f"{h.hexdigest()} {addr[0]}".encode())
"""

UPLOAD = """
import socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=15)
with open(path, "rb") as f:
    s.sendall(f.read())
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print(reply.decode())
"""


@pytest.fixture(scope="module")
def lab(make_module_lab, tmp_path_factory):
    path = tmp_path_factory.mktemp("snat6") / "dual-narrow-external.toml"
    path.write_text(f'[lab]\nip_family = "dual"\nexternal_mtu = {EXTERNAL_MTU}\n')
    _, topo = make_module_lab("ebpf", topology=str(path))
    return topo


def first_pods(topo):
    """One pod of each node."""
    return [(node, node.pods[0]) for node in topo.nodes]


def assert_no_ipv6_conntrack(topo) -> None:
    ext = topo.external.ip6
    for node in topo.nodes:
        for flt in ("-d", "-s"):
            assert conntrack_entries(node.netns, "-f", "ipv6", flt, ext) == [], \
                f"{node.name} tracked an IPv6 flow with {ext}"


def test_ping_udp_and_tcp_reach_the_external_host_from_the_node_ipv6_address(lab):
    ext = lab.external
    for _, pod in first_pods(lab):
        assert_ping(pod.netns, ext.ip6, count=2)
    with echo_server(ext.netns, 5353, "udp", family=6), \
            echo_server(ext.netns, 5354, "tcp", family=6):
        for node, pod in first_pods(lab):
            assert echo_request(pod.netns, ext.ip6, 5353, "udp") == f"hello from {node.ip6}"
            assert echo_request(pod.netns, ext.ip6, 5354, "tcp") == f"hello from {node.ip6}"
    assert_no_ipv6_conntrack(lab)
    flows = switch.nat_flows(load_state(lab.lab), lab)
    for node, pod in first_pods(lab):
        mine = {f.protocol for f in flows[node.name] if f.pod.startswith(f"[{pod.ip6}]:")
                and f.nat.startswith(f"[{node.ip6}]:")}
        assert mine == {"icmp6", "udp", "tcp"}, flows[node.name]


def test_traceroute6_through_snat_shows_every_hop(lab):
    """Hop 1 the node (the pod's gateway), 2 the fabric router, 3 the external host: the
    router's Time Exceeded and the host's port unreachable go to the node's address and
    reach the pod translated (rnat_icmp_error)."""
    node, pod = first_pods(lab)[0]
    before = lab_counters(lab)[node.name].get("rnat_icmp_error", 0)
    proc = netns.run(pod.netns, ["traceroute", "-6", "-n", "-q", "1", "-w", "2", "-m", "6",
                                 lab.external.ip6], check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    hops = [line.split()[1] for line in proc.stdout.splitlines()[1:]]
    assert hops == [node.gateway6, lab.router_ip6, lab.external.ip6], proc.stdout
    assert lab_counters(lab)[node.name]["rnat_icmp_error"] >= before + 2


def test_path_mtu_discovery_through_snat_tracepath_and_a_2mb_upload(lab, tmp_path):
    """tracepath's 1500-byte probes meet the 1280-byte link: the router's Packet Too Big
    quotes the node's address and NAT port, the pod gets it translated (nothing else could
    tell it: its own link is 1500) and its route learns 1280; then 2 MB go up whole."""
    node, pod = first_pods(lab)[-1]
    ext = lab.external
    before = lab_counters(lab)[node.name].get("rnat_icmp_error", 0)
    proc = netns.run(pod.netns, ["tracepath", "-6", "-n", "-m", "6", ext.ip6], check=False,
                     timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"pmtu {EXTERNAL_MTU}\b", proc.stdout) and "reached" in proc.stdout, \
        proc.stdout
    route = netns.run(pod.netns, ["ip", "-6", "-o", "route", "get", ext.ip6]).stdout
    assert re.search(rf"\bmtu {EXTERNAL_MTU}\b", route), route
    assert lab_counters(lab)[node.name]["rnat_icmp_error"] > before

    data = os.urandom(SIZE)
    blob = tmp_path / "upload.bin"
    blob.write_bytes(data)
    with background(ext.netns, [sys.executable, "-c", SINK, str(SINK_PORT)], port=SINK_PORT):
        proc = netns.run(pod.netns, [sys.executable, "-c", UPLOAD, ext.ip6, str(SINK_PORT),
                                     str(blob)], check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [hashlib.sha256(data).hexdigest(), node.ip6]
    assert_no_ipv6_conntrack(lab)


def test_fragmented_ping6_learns_the_path_mtu_through_snat(lab):
    """3,000-byte echoes leave the pod in 1500-byte fragments; the router's Packet Too Big
    about the first (quoting it after its Fragment header) reaches the pod translated, and
    the next echoes, in 1280-byte fragments, go both ways through BPF SNAT."""
    node, pod = first_pods(lab)[0]
    ext = lab.external
    before = lab_counters(lab)[node.name]
    proc = ping(pod.netns, ext.ip6, count=4, size=3000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    route = netns.run(pod.netns, ["ip", "-6", "-o", "route", "get", ext.ip6]).stdout
    assert re.search(rf"\bmtu {EXTERNAL_MTU}\b", route), route
    after = lab_counters(lab)[node.name]
    for reason in ("snat_fragment", "rnat_fragment", "rnat_icmp_error"):
        assert after.get(reason, 0) > before.get(reason, 0), reason
    assert_no_ipv6_conntrack(lab)


def test_a_replaced_datapath_keeps_the_ipv6_flows_and_their_ports(lab):
    """converge's hand-over to a new datapath (here: an endpoint made stale, as a recreated
    veth would leave it) copies `nat6` as it copies `nat`: the IPv6 flow keeps its port."""
    node, pod = first_pods(lab)[0]
    ext = lab.external
    with echo_server(ext.netns, 5355, "udp", family=6):
        assert echo_request(pod.netns, ext.ip6, 5355, "udp") == f"hello from {node.ip6}"
    def udp6(flows):
        return {(f.pod, f.nat) for f in flows[node.name]
                if f.protocol == "udp" and f.remote == f"[{ext.ip6}]:5355"}
    before = udp6(switch.nat_flows(load_state(lab.lab), lab))
    assert len(before) == 1
    ids = switch.node_programs(lab, node)
    with DatapathMaps.from_prog_id(ids["from_pod"]) as maps:
        ep = maps.endpoints()[pod.ip]
        maps.set_endpoint(pod.ip, ep.ifindex, "02:00:00:00:00:01", ep.node_mac)
    proc = subprocess.run([sys.executable, "-m", "datapath.cli", "enable", "--lab", lab.lab],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert switch.node_programs(lab, node)["from_pod"] != ids["from_pod"]
    assert udp6(switch.nat_flows(load_state(lab.lab), lab)) == before
    assert_ping(pod.netns, ext.ip6)


def _filled_slots(map_id: int) -> int:
    """How many of a progs6's two slots hold a program (opened by id: held only meanwhile)."""
    with libbpf.map_fd_by_id(map_id) as fd:
        return sum(libbpf.map_lookup(fd, slot.to_bytes(4, "little"), 4) is not None
                   for slot in (0, 1))


def test_a_replaced_datapath_keeps_the_old_progs6_full_until_the_new_programs_are_attached(
        lab, monkeypatch):
    """converge pins a new datapath's progs6 after its last attach, in one rename: until then
    the old pin keeps the old programs' progs6 full, so before each of the node's devices is
    given the new program, a pod behind a device still running the old one reaches the
    external host through BPF SNAT (with progs6 emptied its IPv6 would go to the stack
    un-NATed, and the external host has no route back); afterwards the pin holds the new
    progs6, full."""
    node, ext = lab.nodes[0], lab.external
    pin = progs6_pin(lab, node)
    old = switch.node_programs(lab, node)
    with DatapathMaps.from_prog_id(old["from_pod"]) as maps:
        old_progs6 = maps.ids["progs6"]
        ep = maps.endpoints()[node.pods[0].ip]      # an endpoint of no pod: to be replaced
        maps.set_endpoint("10.255.255.254", ep.ifindex, ep.mac, ep.node_mac)
    assert pinned_map_id(pin) == old_progs6
    steps = []
    attach = converge._attach

    def watched(state, at, dev, fd, prog):
        if at.name == node.name:
            pod = next((p for p in node.pods if p.host_ifname == dev), None)
            steps.append((dev, _filled_slots(old_progs6),
                          pod and ping(pod.netns, ext.ip6, timeout=2).returncode == 0))
        attach(state, at, dev, fd, prog)

    monkeypatch.setattr(converge, "_attach", watched)
    switch.enable_ebpf(load_state(lab.lab), lab)
    monkeypatch.undo()
    assert steps == [(p.host_ifname, 2, True) for p in node.pods] + \
        [(lab.uplink_ifname, 2, None)]
    new = switch.node_programs(lab, node)
    assert new["from_pod"] != old["from_pod"]
    with DatapathMaps.from_prog_id(new["from_pod"]) as maps:
        assert pinned_map_id(pin) == maps.ids["progs6"] != old_progs6
    assert sorted(p.name for p in pin.parent.iterdir()) == [f"{n.name}_progs6" for n in lab.nodes]
    assert_ping(node.pods[0].netns, ext.ip6)


def test_a_pin_removed_while_progs6_is_held_is_drift_and_converge_pins_it_again(lab):
    """observe wants the lab's pin to hold the datapath's progs6, not only a full progs6: with
    the pin removed while something else holds progs6 (this test, as a monitor would), the
    node is drifted and status says why; converge pins the same load again (same programs,
    NAT table kept), so when the holder lets go the pod still reaches the external host."""
    node, pod = first_pods(lab)[0]
    ids = switch.node_programs(lab, node)
    pin = progs6_pin(lab, node)
    with DatapathMaps.from_prog_id(ids["from_pod"]) as held:
        progs6 = held.ids["progs6"]
        pin.unlink()
        assert len(held.progs6_ids()) == 2          # held: still full
        view = observe(lab)
        assert view.node(node.name).mode(lab) == "drifted"
        assert differences(load_state(lab.lab), lab, view) == {node.name: [
            f"the attached datapath does not match: its progs6 (map id {progs6}) is not the "
            f"one pinned at {pin}"]}
        assert switch.enable_ebpf(load_state(lab.lab), lab) == \
            [f"{node.name}: progs6 pinned again"]
        assert pinned_map_id(pin) == progs6
    assert switch.node_programs(lab, node) == ids
    assert observe(lab).node(node.name).mode(lab) == "ebpf"
    assert_ping(pod.netns, lab.external.ip6)
