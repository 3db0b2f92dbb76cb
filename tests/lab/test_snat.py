"""BPF SNAT with real packets: pods reach the external host as their node, without conntrack.

The external namespace runs real servers (HTTP, UDP echo, a TCP sink) and
reports the client address it saw; the nodes' conntrack tables are read to
show the flows never went through netfilter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from datapath import switch
from netns_lab import legacy, netns
from netns_lab.state import load_state
from tests.labtools import (lab_counters, assert_ping, background, conntrack_entries, ping, udp_echo,
                            udp_request)

pytestmark = pytest.mark.slow     # every test here builds a lab


counters = lab_counters


def nat_flows(topo) -> dict[str, list]:
    return switch.nat_flows(load_state(topo.lab), topo)


def no_conntrack_for(topo, ip: str) -> None:
    for node in topo.nodes:
        assert conntrack_entries(node.netns, "-d", ip) == [], f"{node.name} tracked a flow to {ip}"
        assert conntrack_entries(node.netns, "-s", ip) == []


HTTP_GET = """
import sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}:8080/", timeout=5) as r:
    print(r.status, len(r.read()))
"""


def test_http_from_pods_on_both_nodes_is_seen_from_node_ips_without_conntrack(ebpf_lab):
    """The bar: the server logs the node IP as the client; conntrack has no entry."""
    _, topo = ebpf_lab
    ext = topo.external
    for node in topo.nodes:
        assert not legacy.masquerade_installed(topo, node)    # BPF SNAT replaced it
    with background(ext.netns, [sys.executable, "-m", "http.server", "8080", "--bind", ext.ip],
                    port=8080) as server:
        for node in topo.nodes:
            for pod in node.pods:
                proc = netns.run(pod.netns, [sys.executable, "-c", HTTP_GET, ext.ip],
                                 check=False, timeout=20)
                assert proc.returncode == 0 and proc.stdout.startswith("200"), proc.stderr
        server.terminate()
        log = server.communicate(timeout=5)[0]
    clients = {line.split()[0] for line in log.splitlines() if '"GET / ' in line}
    assert clients == {n.ip for n in topo.nodes}, log
    no_conntrack_for(topo, ext.ip)
    flows = nat_flows(topo)
    for node in topo.nodes:
        tcp = [f for f in flows[node.name] if f.protocol == "tcp"]
        assert {f.pod.split(":")[0] for f in tcp} == {p.ip for p in node.pods}
        assert all(f.nat.startswith(node.ip + ":") and f.complete for f in tcp)
    c = counters(topo)
    assert all(c[n.name]["snat_redirect_neigh"] > 0 and c[n.name]["rnat_redirect_peer"] > 0
               for n in topo.nodes)


def test_udp_and_ping_from_both_nodes(ebpf_lab):
    _, topo = ebpf_lab
    ext = topo.external
    with udp_echo(ext.netns):
        for node in topo.nodes:
            for pod in node.pods:
                assert udp_request(pod.netns, ext.ip) == f"hello from {node.ip}"
                assert_ping(pod.netns, ext.ip, count=2)
    no_conntrack_for(topo, ext.ip)
    protos = {(n, f.protocol) for n, fl in nat_flows(topo).items() for f in fl}
    assert protos == {(n.name, p) for n in topo.nodes for p in ("udp", "icmp")}


TCP_COUNTER_SERVER = """
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 9100)); srv.listen(1024)
def serve(c, a):
    data = c.recv(100)
    c.sendall(data + b" " + a[0].encode()); c.close()
while True:
    c, a = srv.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""

TCP_MANY_CLIENTS = """
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
socks = [socket.create_connection((host, 9100), timeout=10) for _ in range(n)]  # all open at once
seen = set()
for i, s in enumerate(socks):
    s.sendall(b"c%d" % i)
for i, s in enumerate(socks):
    reply = s.recv(100).decode().split()
    assert reply[0] == "c%d" % i, reply
    seen.add(reply[1]); s.close()
print(" ".join(sorted(seen)))
"""


def test_hundreds_of_concurrent_tcp_connections_from_several_pods(ebpf_lab):
    _, topo = ebpf_lab
    ext = topo.external
    per_pod = 100
    with background(ext.netns, [sys.executable, "-c", TCP_COUNTER_SERVER, ext.ip], port=9100):
        clients = [(node, pod, subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-c", TCP_MANY_CLIENTS, ext.ip,
             str(per_pod)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for node in topo.nodes for pod in node.pods]
        for node, pod, proc in clients:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{pod.name}: {err}"
            assert out.split() == [node.ip], f"{pod.name} was seen as {out}"
    no_conntrack_for(topo, ext.ip)
    for node in topo.nodes:
        tcp = [f for f in nat_flows(topo)[node.name] if f.protocol == "tcp"]
        assert len(tcp) == per_pod * len(node.pods)
        assert len({f.nat for f in tcp}) == len(tcp)        # every flow its own NAT port
    assert all(c["drop_nat_exhausted"] == 0 and c["drop_nat_failed"] == 0
               for c in counters(topo).values())


NO_HOLE_POD = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40404))
s.sendto(b"hello", (sys.argv[1], 5353))
print("reply", s.recvfrom(100)[0].decode(), flush=True)
s.settimeout(1.5)
try:
    data, addr = s.recvfrom(100)
    print("also got", data, "from", addr, flush=True)
except socket.timeout:
    print("nothing else", flush=True)
"""

PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7777))
s.sendto(b"intruder", (sys.argv[1], int(sys.argv[2])))
"""


def test_no_nat_hole_only_the_remote_of_a_flow_reaches_the_pod(ebpf_lab):
    """The pod's socket accepts datagrams from anyone: only the NAT can keep strangers out."""
    _, topo = ebpf_lab
    ext, node, pod = topo.external, topo.nodes[0], topo.nodes[0].pods[0]
    with udp_echo(ext.netns):
        client = subprocess.Popen(["ip", "netns", "exec", pod.netns, sys.executable, "-c",
                                   NO_HOLE_POD, ext.ip], stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().startswith("reply hello from")
        (flow,) = [f for f in nat_flows(topo)[node.name] if f.pod == f"{pod.ip}:40404"]
        nat_port = flow.nat.split(":")[1]
        # the external host, from another port, to the very node IP:port of the flow
        netns.run(ext.netns, [sys.executable, "-c", PROBE, node.ip, nat_port])
        assert client.stdout.readline().strip() == "nothing else"
        client.wait(timeout=5)
    assert counters(topo)[node.name]["pass_nat_miss"] >= 1


def test_a_smaller_mtu_towards_the_external_host_is_learned_and_tcp_completes(make_lab,
                                                                               tmp_path):
    """The router's ICMP frag-needed to the node IP is translated back to the pod."""
    topo_file = tmp_path / "mtu.toml"
    topo_file.write_text("[lab]\nexternal_mtu = 1280\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    ext = topo.external
    # The external host advertises the MSS of a 1500 link, so the pods' TCP has to learn
    # the path MTU from the router's ICMP (else the MSS alone would avoid the small link).
    netns.run(ext.netns, ["ip", "route", "change", "default", "via", ext.router_ip,
                          "advmss", "1460"])
    a1, b1 = topo.nodes[0].pods[0], topo.nodes[1].pods[0]
    proc = ping(a1.netns, ext.ip, size=1400, df=True)
    assert proc.returncode != 0
    assert f"From {topo.router_ip}" in proc.stdout and "mtu = 1280" in proc.stdout, proc.stdout
    sink = textwrap.dedent("""
        import socket, sys
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sys.argv[1], 9200)); s.listen(1)
        c, a = s.accept(); n = 0
        while (d := c.recv(65536)):
            n += len(d)
        c.sendall(str(n).encode()); c.close()
    """)
    upload = textwrap.dedent("""
        import socket, sys
        s = socket.create_connection((sys.argv[1], 9200), timeout=10)
        s.sendall(b"x" * 2_000_000); s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode())
    """)
    with background(ext.netns, [sys.executable, "-c", sink, ext.ip], port=9200):
        proc = netns.run(b1.netns, [sys.executable, "-c", upload, ext.ip], check=False,
                         timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "2000000", proc.stderr
    route = netns.run(b1.netns, ["ip", "route", "get", ext.ip]).stdout
    assert "mtu 1280" in route, route
    c = counters(topo)
    assert c["node1"]["rnat_icmp_error"] >= 1 and c["node2"]["rnat_icmp_error"] >= 1


def test_disable_puts_masquerade_back_and_traffic_still_leaves(ebpf_lab):
    state, topo = ebpf_lab
    ext = topo.external
    switch.disable_ebpf(load_state(topo.lab), topo)
    for node in topo.nodes:
        assert legacy.masquerade_installed(topo, node)
    a1 = topo.nodes[0].pods[0]
    with udp_echo(ext.netns):
        assert udp_request(a1.netns, ext.ip) == f"hello from {topo.nodes[0].ip}"
    time.sleep(0.1)
    assert conntrack_entries(topo.nodes[0].netns, "-d", ext.ip)     # the stack NATs again


def test_port_exhaustion_is_counted_shown_and_recorded_as_an_event(make_lab, tmp_path):
    """One NAT port: a second flow to the same destination has none left."""
    import json

    from datapath import events
    topo_file = tmp_path / "oneport.toml"
    topo_file.write_text("[nat]\nport_min = 30000\nport_max = 30000\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    ext, node = topo.external, topo.nodes[0]
    a1, a2 = node.pods
    with udp_echo(ext.netns):
        assert udp_request(a1.netns, ext.ip) == f"hello from {node.ip}"
        proc = netns.run(a2.netns, [sys.executable, "-c", "import socket; s = socket.socket("
                                    "socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); "
                                    f"s.sendto(b'x', ('{ext.ip}', 5353)); s.recvfrom(10)"],
                         check=False)
        assert proc.returncode != 0 and "timed out" in proc.stderr
    cli = [sys.executable, "-m", "datapath.cli"]
    listing = json.loads(subprocess.run(cli + ["nat", "list", "--lab", topo.lab, "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    (flow,) = listing["nodes"][node.name]
    assert flow["pod"].startswith(a1.ip + ":") and flow["nat"] == f"{node.ip}:30000"
    stats = json.loads(subprocess.run(cli + ["stats", "--lab", topo.lab, "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    n1 = stats["nodes"][0]
    assert n1["counters"]["drop_nat_exhausted"]["packets"] == 1
    assert n1["nat"]["entries"] == 2 and n1["nat"]["capacity"] == 2 * 262144
    deadline = time.monotonic() + 15          # the guard sweeps every NAT_SWEEP_S
    while time.monotonic() < deadline:
        found = [e for e in events.read(topo.lab) if e["reason"] == "NatPortsExhausted"]
        if found:
            break
        time.sleep(0.5)
    assert found and found[0]["object"] == f"node/{node.name}" and found[0]["type"] == "Warning"


def test_checksum_offloaded_segments_leave_with_a_right_checksum(ebpf_lab):
    """Pods hand TCP to their veth with the checksum left to the device (CHECKSUM_PARTIAL).
    With the router's link to the external host unable to offload, the kernel finishes the
    checksum in software from what BPF SNAT left in the field: it must still be right."""
    _, topo = ebpf_lab
    ext = topo.external
    netns.run(topo.fabric_netns, ["ethtool", "-K", f"{topo.lab}-ext", "tx", "off"])
    with background(ext.netns, [sys.executable, "-m", "http.server", "8080", "--bind", ext.ip],
                    port=8080):
        for node in topo.nodes:
            pod = node.pods[0]
            proc = netns.run(pod.netns, [sys.executable, "-c", HTTP_GET, ext.ip], check=False,
                             timeout=20)
            assert proc.returncode == 0 and proc.stdout.startswith("200"), proc.stderr


UDP_BIG_NO_DF = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)          # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear
s.settimeout(3)
s.sendto(b"y" * 1450, (sys.argv[1], 5353))
print(s.recvfrom(4000)[0].decode())
"""


UDP_SIZE_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(("%d from %s" % (len(data), addr[0])).encode(), addr)   # a short answer
"""


def test_too_big_without_df_is_natted_then_fragmented_by_the_stack(make_lab, tmp_path):
    """The node's uplink is narrower than the pod's link: the stack must fragment a 1450-byte
    datagram, so BPF NATs it first and hands it over (the node IP as source needs
    accept_local on the pod's veth, which enable sets). The answer is short (fragmented
    answers: test_fragmented_udp_and_ping_go_both_ways_through_bpf_snat)."""
    topo_file = tmp_path / "narrow.toml"
    topo_file.write_text("[lab]\nunderlay_mtu = 1400\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    ext, node = topo.external, topo.nodes[0]
    with background(ext.netns, [sys.executable, "-c", UDP_SIZE_SERVER], port=5353, proto="udp"):
        proc = netns.run(node.pods[0].netns, [sys.executable, "-c", UDP_BIG_NO_DF, ext.ip],
                         check=False, timeout=20)
    assert proc.returncode == 0 and proc.stdout.strip() == f"1450 from {node.ip}", proc.stderr
    assert counters(topo)[node.name]["snat_pass_frag_needed"] >= 1


UDP_TOKEN_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], 5454))
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data, addr)                          # the datagram back, token and all
"""

UDP_TOKEN_CLIENTS = """
import json, selectors, socket, sys, time
host, n, seconds, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
start_at = float(sys.argv[5])                     # both pods start together (wall clock)
sel = selectors.DefaultSelector()
token = {}
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind(("0.0.0.0", 0))
    token[s] = ("%s-%d" % (tag, i)).encode()
    sel.register(s, selectors.EVENT_READ)
sent = own = foreign = 0
owners_hit = set()
def drain(timeout):
    global own, foreign
    for key, _ in sel.select(timeout):
        s = key.fileobj
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                break
            if data == token[s]:
                own += 1
            else:
                foreign += 1
                owners_hit.add(data.decode(errors="replace"))
time.sleep(max(0.0, start_at - time.time()))
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s, t in token.items():
        try:
            s.sendto(t, (host, 5454))
            sent += 1
        except (BlockingIOError, OSError):
            pass
    drain(0.002)
stop = time.monotonic() + 1.0
while time.monotonic() < stop:
    drain(0.05)
print(json.dumps({"sent": sent, "own": own, "foreign": foreign,
                  "foreign_examples": sorted(owners_hit)[:5]}))
"""


def test_a_full_nat_table_costs_new_flows_never_another_flows_replies(make_lab, tmp_path):
    """Issue 17: 32 flows of table, 64 ports, two pods of one node with 60 UDP sockets each
    sending their own token to one echo server outside: every reply must reach the socket
    that sent its token (with an LRU table, thousands went to other sockets, other pods'
    among them). The flows that do not fit are refused: counted, and an event."""
    import json

    from datapath import events
    topo_file = tmp_path / "smallnat.toml"
    topo_file.write_text("[nat]\nmax_flows = 32\nport_min = 40000\nport_max = 40063\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    ext, node = topo.external, topo.nodes[0]
    a1, a2 = node.pods
    per_pod, seconds = 60, 6
    start_at = time.time() + 2
    with background(ext.netns, [sys.executable, "-c", UDP_TOKEN_ECHO, ext.ip], port=5454,
                    proto="udp"):
        procs = [(pod, subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-c", UDP_TOKEN_CLIENTS, ext.ip,
             str(per_pod), str(seconds), pod.name, str(start_at)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)) for pod in (a1, a2)]
        results = {}
        for pod, proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{pod.name}: {err}"
            results[pod.name] = json.loads(out)
    print("\nlive NAT-table-pressure run:", json.dumps(results), flush=True)
    c = counters(topo)[node.name]
    print(f"drop_nat_table_full={c.get('drop_nat_table_full')} "
          f"snat_redirect_neigh={c['snat_redirect_neigh']} "
          f"rnat_redirect_peer={c['rnat_redirect_peer']}", flush=True)
    for name, r in results.items():
        assert r["foreign"] == 0, f"{name} got replies of other flows: {r}"
    assert sum(r["own"] for r in results.values()) > 0
    flows = [f for f in nat_flows(topo)[node.name] if f.protocol == "udp"]
    assert 0 < len(flows) <= 32 and all(f.complete for f in flows)
    assert len({f.nat for f in flows}) == len(flows)
    assert c["drop_nat_table_full"] > 0
    deadline = time.monotonic() + 15          # the guard looks every NAT_SWEEP_S
    found = []
    while time.monotonic() < deadline:
        found = [e for e in events.read(topo.lab) if e["reason"] == "NatTableFull"]
        if found:
            break
        time.sleep(0.5)
    assert found and found[0]["object"] == f"node/{node.name}"
    assert "new flows are refused" in found[0]["message"] and "evicted" not in found[0]["message"]


UDP_BIG_DATAGRAMS = """
import json, os, socket, sys
host, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
sent = received = matched = 0
for i in range(n):
    data = os.urandom(size)
    s.sendto(data, (host, 5353))
    sent += len(data)
    reply, _ = s.recvfrom(65535)
    received += len(reply)
    expect = data + (" from %s" % sys.argv[4]).encode()
    assert reply == expect, "datagram %d: %d bytes back, %d expected" % (i, len(reply), len(expect))
    matched += 1
print(json.dumps({"datagrams": matched, "sent": sent, "received": received}))
"""


def test_fragmented_udp_and_ping_go_both_ways_through_bpf_snat(ebpf_lab):
    """Issue 17: 4,000-byte datagrams with 1500-byte MTUs leave each pod in 3 fragments and
    come back in 3 (the echo server's answer): every fragment is NATed by BPF (the first by its
    header, the others by the fragment map), every byte comes back, `ping -s 4000` works, and
    the nodes' conntrack never sees the flows. Before, the fragments were dropped on the way
    out (drop_nat_unsupported) and a fragmented reply was left to the node, which kept it."""
    import json
    _, topo = ebpf_lab
    ext = topo.external
    n, size, pings = 6, 4000, 3
    with udp_echo(ext.netns):
        for node in topo.nodes:
            for pod in node.pods:
                proc = netns.run(pod.netns, [sys.executable, "-c", UDP_BIG_DATAGRAMS, ext.ip,
                                             str(n), str(size), node.ip], check=False, timeout=60)
                assert proc.returncode == 0, proc.stderr
                figures = json.loads(proc.stdout)
                print(f"{pod.netns}: {figures}")
                assert figures == {"datagrams": n, "sent": n * size,
                                   "received": n * (size + len(f" from {node.ip}"))}
                assert_ping(pod.netns, ext.ip, count=pings, size=size)
    no_conntrack_for(topo, ext.ip)
    c = counters(topo)
    for node in topo.nodes:
        print(f"{node.name}: " + ", ".join(f"{k}={v}" for k, v in sorted(c[node.name].items())
                                           if v and ("frag" in k or "nat" in k)))
        per_node = len(node.pods) * (n + pings) * 3      # 3 fragments each way
        assert c[node.name].get("snat_fragment") == per_node
        assert c[node.name].get("rnat_fragment") == per_node
        assert not c[node.name].get("drop_frag_untracked")
        assert not c[node.name].get("drop_nat_unsupported")
    protos = {f.protocol for fl in nat_flows(topo).values() for f in fl}
    assert protos == {"udp", "icmp"}
