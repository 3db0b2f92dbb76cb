"""Path MTU discovery with real TCP transfers (issue 15, part 3).

Pods have 1500-byte links; the underlay between the nodes (and towards the
router to the external host) is 1280 bytes. Real TCP clients (socat) move a
few megabytes of random data; every transfer checks the receiver got every
byte (size and sha256) within a bounded time, with the pods' default offloads
(TSO/GSO and checksum offload on, so the datapath sees GSO packets and
CHECKSUM_PARTIAL segments) and with TSO/GSO off (full-size CHECKSUM_PARTIAL
segments one by one). Where the path is narrower than the sending pod's link,
the pod must learn it: its route cache says `mtu 1280` and the node counted
the frag-needed it sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCPerror
from scapy.utils import rdpcap

from netns_lab import netns
from tests.labtools import background, lab_counters

pytestmark = pytest.mark.slow     # every test here builds a lab

UNDERLAY_MTU = 1280
SIZE = 4 * 1024 * 1024       # bytes per transfer
TRANSFER_TIMEOUT = 20        # seconds a transfer may take at most (a stall ends here)
PORT = 9300

OFFLOADS = {
    "default_offloads": [],
    "tso_gso_off": ["tso", "off", "gso", "off"],
}


@pytest.fixture
def narrow_lab(make_lab, tmp_path):
    """make_lab(mode) with a 1280-byte underlay (pods and the external link stay at 1500)."""
    def make(mode: str, pods_per_node: int | None = None):
        topo_file = tmp_path / "narrow-underlay.toml"
        topo_file.write_text(f"[lab]\nunderlay_mtu = {UNDERLAY_MTU}\n")
        return make_lab(mode, pods_per_node=pods_per_node, topology=str(topo_file))[1]
    return make


def set_offloads(pod_ns: str, offloads: str) -> None:
    if OFFLOADS[offloads]:
        netns.run(pod_ns, ["ethtool", "-K", "eth0", *OFFLOADS[offloads]])


def route_mtu(ns: str, dst: str) -> str:
    return netns.run(ns, ["ip", "-o", "route", "get", dst]).stdout


def tcp_transfer(tmp_path, *, client_ns: str, server_ns: str, server_ip: str, upload: bool,
                 size: int = SIZE, port: int = PORT) -> float:
    """The client connects to server_ip:port; with upload it sends `size` random bytes to
    the server, else the server sends them to the client. Asserts the receiver got every
    byte; returns the seconds the transfer took."""
    src = tmp_path / f"data-{port}"
    dst = tmp_path / f"received-{port}"
    data = os.urandom(size)
    src.write_bytes(data)
    if dst.exists():
        dst.unlink()
    limit = ["timeout", str(TRANSFER_TIMEOUT)]
    listen = f"TCP4-LISTEN:{port},bind={server_ip},reuseaddr"
    connect = f"TCP4:{server_ip}:{port}"
    if upload:      # receiver listens
        server = [*limit, "socat", "-u", listen, f"CREATE:{dst}"]
        client = [*limit, "socat", "-u", f"OPEN:{src}", connect]
    else:           # the server sends, the client receives
        server = [*limit, "socat", "-u", f"OPEN:{src}", listen]
        client = [*limit, "socat", "-u", connect, f"CREATE:{dst}"]
    start = time.monotonic()
    with background(server_ns, server, port=port) as srv:
        proc = netns.run(client_ns, client, check=False, timeout=TRANSFER_TIMEOUT + 10)
        srv.wait(timeout=TRANSFER_TIMEOUT + 10)
    took = time.monotonic() - start
    got = dst.read_bytes() if dst.exists() else b""
    assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), (
        f"{'upload' if upload else 'download'} {client_ns} -> {server_ip}: "
        f"{len(got)} of {size} bytes arrived intact within {TRANSFER_TIMEOUT}s "
        f"(client exit {proc.returncode}: {proc.stderr.strip()}; server exit {srv.returncode})")
    return took


def frag_needed_sent(topo, node: str) -> int:
    return lab_counters(topo)[node].get("icmp_frag_needed", 0)


# -- pod -> outside, through the 1280 underlay ----------------------------------------------

@pytest.mark.parametrize("offloads", OFFLOADS)
@pytest.mark.parametrize("mode", ["ebpf", "legacy"])
def test_upload_to_the_external_host_learns_the_underlay_mtu(narrow_lab, tmp_path, mode,
                                                             offloads):
    """The issue's repro: a 4 MB upload from a pod to the external host. The first full-size
    segment is too big for the node's uplink; the pod must get a frag-needed, learn 1280
    and finish."""
    topo = narrow_lab(mode)
    node, ext = topo.nodes[0], topo.external
    pod = node.pods[0]
    set_offloads(pod.netns, offloads)
    tcp_transfer(tmp_path, client_ns=pod.netns, server_ns=ext.netns, server_ip=ext.ip,
                 upload=True)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(pod.netns, ext.ip)
    if mode == "ebpf":
        assert frag_needed_sent(topo, node.name) >= 1
        assert lab_counters(topo)[node.name].get("drop_icmp_failed", 0) == 0


@pytest.mark.parametrize("offloads", OFFLOADS)
def test_download_from_the_external_host(narrow_lab, tmp_path, offloads):
    """The pod opens the connection, the external host sends 4 MB: the router (a kernel)
    tells the external host the underlay's MTU, BPF translates replies back to the pod."""
    topo = narrow_lab("ebpf")
    pod, ext = topo.nodes[0].pods[0], topo.external
    set_offloads(pod.netns, offloads)
    set_offloads(ext.netns, offloads)
    tcp_transfer(tmp_path, client_ns=pod.netns, server_ns=ext.netns, server_ip=ext.ip,
                 upload=False)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(ext.netns, topo.nodes[0].ip)


# -- pod -> pod on another node, through the 1280 underlay ----------------------------------

@pytest.mark.parametrize("offloads", OFFLOADS)
def test_cross_node_transfers_both_ways_learn_the_underlay_mtu(narrow_lab, tmp_path, offloads):
    """A pod of node1 uploads to a pod of node2, another pod of node1 downloads from another
    pod of node2: the sender of each full-size stream is a different node's pod, and learns
    1280 from its own node. (Two pairs: once a pod knows the path MTU, its SYN advertises
    the smaller MSS and the peer never sends a full-size segment.)"""
    topo = narrow_lab("ebpf")
    (a, c), (b, d) = topo.nodes[0].pods[:2], topo.nodes[1].pods[:2]
    for pod in (a, b, c, d):
        set_offloads(pod.netns, offloads)
    tcp_transfer(tmp_path, client_ns=a.netns, server_ns=b.netns, server_ip=b.ip, upload=True)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(a.netns, b.ip)
    tcp_transfer(tmp_path, client_ns=c.netns, server_ns=d.netns, server_ip=d.ip, upload=False,
                 port=PORT + 1)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(d.netns, c.ip)
    counters = lab_counters(topo)
    for node in ("node1", "node2"):
        assert counters[node].get("icmp_frag_needed", 0) >= 1, counters[node]
        assert counters[node].get("drop_icmp_failed", 0) == 0, counters[node]


# -- pod -> pod on the same node, links of different MTUs ------------------------------------

def narrow_pod_link(topo, node, pod, mtu: int) -> None:
    """Give one pod a smaller link, both ends (as a CNI sets them), and make it advertise the
    MSS of a 1500-byte link, so that only path MTU discovery keeps senders within its link."""
    netns.run(pod.netns, ["ip", "link", "set", "eth0", "mtu", str(mtu)])
    netns.run(node.netns, ["ip", "link", "set", pod.host_ifname, "mtu", str(mtu)])
    default = netns.run(pod.netns, ["ip", "-o", "route", "show", "default"]).stdout.split()
    netns.run(pod.netns, ["ip", "route", "change", *default[:default.index("dev") + 2],
                          "advmss", "1460"])


@pytest.mark.parametrize("offloads", OFFLOADS)
@pytest.mark.parametrize("mode", ["ebpf", "legacy"])
def test_same_node_pods_with_different_mtus(make_lab, tmp_path, mode, offloads):
    """node1-pod1 (1500) and node1-pod2 (1280) send each other 4 MB: pod1's full-size segments
    do not fit pod2's link; pod1 learns 1280 from its node, as with the kernel's forwarding."""
    _, topo = make_lab(mode)
    node = topo.nodes[0]
    wide, narrow = node.pods[:2]
    narrow_pod_link(topo, node, narrow, UNDERLAY_MTU)
    for pod in (wide, narrow):
        set_offloads(pod.netns, offloads)
    tcp_transfer(tmp_path, client_ns=wide.netns, server_ns=narrow.netns, server_ip=narrow.ip,
                 upload=True)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(wide.netns, narrow.ip)
    tcp_transfer(tmp_path, client_ns=narrow.netns, server_ns=wide.netns, server_ip=wide.ip,
                 upload=True, port=PORT + 1)
    if mode == "ebpf":
        assert frag_needed_sent(topo, node.name) >= 1


# -- a pod of another node behind a narrower link ---------------------------------------------

@pytest.mark.parametrize("offloads", OFFLOADS)
@pytest.mark.parametrize("mode", ["ebpf", "legacy"])
def test_pod_on_another_node_with_a_narrower_link(make_lab, tmp_path, mode, offloads):
    """node2-pod1's link is 1280 (the underlay 1500): node1-pod1's full-size segments arrive
    at node2 too big for it; node2's stack answers (from_underlay hands them over), node1
    delivers the frag-needed, node1-pod1 learns 1280."""
    _, topo = make_lab(mode)
    sender, narrow = topo.nodes[0].pods[0], topo.nodes[1].pods[0]
    narrow_pod_link(topo, topo.nodes[1], narrow, UNDERLAY_MTU)
    for pod in (sender, narrow):
        set_offloads(pod.netns, offloads)
    tcp_transfer(tmp_path, client_ns=sender.netns, server_ns=narrow.netns, server_ip=narrow.ip,
                 upload=True)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(sender.netns, narrow.ip)
    if mode == "ebpf":
        assert lab_counters(topo)["node2"].get("pass_frag_needed", 0) >= 1


# -- a download from the outside to a pod behind a narrower link ------------------------------

@pytest.mark.parametrize("offloads", OFFLOADS)
@pytest.mark.parametrize("mode", ["ebpf", "legacy"])
def test_download_from_the_external_host_to_a_pod_with_a_narrower_link(make_lab, tmp_path, mode,
                                                                       offloads):
    """node1-pod1's link is 1280, everything else 1500; the pod downloads 4 MB from the
    external host. The host's full-size segments (to the node IP and NAT port) are too big for
    the pod's link: the node answers with a frag-needed that quotes them as sent (BPF in eBPF
    mode, conntrack's translated quote in legacy), so the host's TCP finds its socket and its
    route to the node IP learns 1280, and every byte arrives."""
    _, topo = make_lab(mode)
    node, ext = topo.nodes[0], topo.external
    pod = node.pods[0]
    narrow_pod_link(topo, node, pod, UNDERLAY_MTU)
    set_offloads(pod.netns, offloads)
    set_offloads(ext.netns, offloads)
    tcp_transfer(tmp_path, client_ns=pod.netns, server_ns=ext.netns, server_ip=ext.ip,
                 upload=False)
    assert f"mtu {UNDERLAY_MTU}" in route_mtu(ext.netns, node.ip)
    if mode == "ebpf":
        counters = lab_counters(topo)[node.name]
        assert counters.get("icmp_frag_needed", 0) >= 1, counters
        assert counters.get("drop_icmp_failed", 0) == 0, counters


# -- the frag-needed as the pod receives it ----------------------------------------------------

@contextlib.contextmanager
def icmp_capture(ns: str):
    """tcpdump of the ICMP arriving on a pod's eth0; the list it yields is filled with the
    packets (scapy) when the block ends."""
    # --immediate-mode: without it, packets still in the capture ring when tcpdump is
    # stopped are counted "received by filter" but never written
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "eth0", "-n",
                             "--immediate-mode", "-U", "-w", "-", "icmp"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    packets: list = []
    try:
        line = proc.stderr.readline().decode()  # "listening on eth0 ...": capturing from here
        assert "listening on" in line, line
        yield packets
    finally:
        time.sleep(0.2)                          # the last packets reach the capture
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    packets.extend(rdpcap(io.BytesIO(out)))


@pytest.mark.parametrize("offloads", OFFLOADS)
def test_the_frag_needed_a_pod_receives_is_valid(narrow_lab, tmp_path, offloads):
    """The replies to offloaded (CHECKSUM_PARTIAL) segments, as captured in the pod: valid IPv4
    and ICMP checksums, next-hop MTU 1280, from the pod's gateway, quoting the pod's own
    segment (its TCP ports and sequence number) within 576 bytes."""
    topo = narrow_lab("ebpf")
    node, ext = topo.nodes[0], topo.external
    pod = node.pods[0]
    set_offloads(pod.netns, offloads)
    with icmp_capture(pod.netns) as captured:
        tcp_transfer(tmp_path, client_ns=pod.netns, server_ns=ext.netns, server_ip=ext.ip,
                     upload=True)
    replies = [p for p in captured if ICMP in p and p[ICMP].type == 3]
    assert replies, "no frag-needed reached the pod"
    for pkt in replies:
        raw = bytes(pkt)
        rebuilt = pkt.copy()
        del rebuilt[IP].chksum
        del rebuilt[ICMP].chksum
        assert bytes(rebuilt.__class__(bytes(rebuilt))) == raw, "a checksum is wrong"
        assert (pkt[ICMP].code, pkt[ICMP].nexthopmtu) == (4, UNDERLAY_MTU)
        assert (pkt[IP].src, pkt[IP].dst) == (node.gateway, pod.ip)
        assert pkt[IP].len <= 576
        quoted = pkt[ICMP][TCPerror]
        assert (quoted.underlayer.src, quoted.underlayer.dst, quoted.dport) == (pod.ip, ext.ip,
                                                                                PORT)
