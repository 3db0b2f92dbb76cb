"""BPF SNAT and the node: ports that never collide, flows that survive a switch (issue 17).

Part 2: the node's own connections take their ports from
``node_local_port_range`` (the node namespaces' net.ipv4.ip_local_port_range),
which the topology keeps disjoint from the BPF SNAT ports, so that a node
connection never takes a pod's NAT port towards the same remote.

Part 3: ``enable`` and ``disable`` hand the NAT state of open pod-to-external
flows over (conntrack MASQUERADE entries into the BPF SNAT table, and back),
so long transfers carry on across switches with the same NAT port.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from netns_lab import netns
from netns_lab.topology import TopologyError, load_topology
from tests.labtools import background

PEER_ECHO = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
def serve(c, peer):
    c.sendall(("%s:%d\\n" % peer).encode())
    while True:
        data = c.recv(65536)
        if not data:
            break
        c.sendall(data)
    c.close()
while True:
    c, peer = srv.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# connect, print the address the server saw, then (once `go` exists) echo its own tokens
PEER_CLIENT = """
import os, socket, sys, time
host, port, token, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
print("seen-as", f.readline().decode().strip(), "local", s.getsockname()[1], flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
for i in range(200):
    msg = ("%s-%04d\\n" % (token, i)).encode()
    s.sendall(msg)
    got = f.readline()
    if got != msg:
        print("foreign", got, flush=True)
        sys.exit(1)
print("ok", 200, flush=True)
"""


def _node_ports(ns: str) -> tuple[int, int]:
    low, high = netns.read_sysctl(ns, "net.ipv4.ip_local_port_range").split()
    return int(low), int(high)


def test_node_ephemeral_ports_are_disjoint_from_the_nat_ports_by_default(ebpf_lab):
    _, topo = ebpf_lab
    assert topo.node_local_port_range == (61000, 65535)
    assert (topo.nat.port_min, topo.nat.port_max) == (1024, 60999)
    for node in topo.nodes:
        low, high = _node_ports(node.netns)
        assert (low, high) == topo.node_local_port_range, node.name
        assert high < topo.nat.port_min or low > topo.nat.port_max, node.name


@pytest.mark.parametrize("text, line, expected", [
    ("[nat]\nport_min = 50000\nport_max = 62000\n", 3,
     "nat.port_max: NAT ports 50000-62000 overlap the nodes' local ports 61000-65535 "
     "(lab.node_local_port_range)"),
    ("[lab]\nnode_local_port_range = [32768, 60999]\n", 2,
     "lab.node_local_port_range: NAT ports 1024-60999 overlap the nodes' local ports "
     "32768-60999: "),
    ("[lab]\nnode_local_port_range = [40000]\n", 2,
     "lab.node_local_port_range: [40000] must be [low, high]"),
    ("[lab]\nnode_local_port_range = [5000, 4000]\n", 2,
     "lab.node_local_port_range: [5000, 4000] must be [low, high]"),
])
def test_a_nat_range_overlapping_the_nodes_local_ports_is_refused(tmp_path, text, line, expected):
    path = tmp_path / "topo.toml"
    path.write_text(text)
    with pytest.raises(TopologyError) as err:
        load_topology("ab", path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: {expected}"), message
    assert "\n" not in message


def test_a_node_and_a_pod_connection_to_the_same_remote_port_both_work(make_lab, tmp_path):
    """One NAT port (60000) and two node ports (60002-60003): the collision is certain if the
    ranges overlap (the node's connect() takes its range's first free port); here they
    cannot, the remote sees both connections and each carries its own data."""
    topo_file = tmp_path / "topo.toml"
    topo_file.write_text("[lab]\nnode_local_port_range = [60002, 60003]\n"
                         "[nat]\nport_min = 60000\nport_max = 60000\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    node, pod, ext = topo.nodes[0], topo.nodes[0].pods[0], topo.external
    assert _node_ports(node.netns) == (60002, 60003)
    go = tmp_path / "go"
    with background(ext.netns, [sys.executable, "-c", PEER_ECHO, ext.ip, "9300"], port=9300):
        clients = []
        for ns, token in ((pod.netns, "pod"), (node.netns, "node")):
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER_CLIENT,
                                     ext.ip, "9300", token, str(go)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            clients.append(proc)
            first = proc.stdout.readline().split()     # connected: the next one may start
            assert first[:1] == ["seen-as"], f"{token}: {first} {proc.stdout.read()}"
            clients[-1].seen = first[1]
            clients[-1].local = int(first[3])
        go.touch()                                       # both connections open: now talk
        outputs = [p.communicate(timeout=60)[0] for p in clients]
    pod_client, node_client = clients
    assert pod_client.seen == f"{node.ip}:60000"          # the pod's NAT port
    assert node_client.seen == f"{node.ip}:{node_client.local}"
    assert node_client.local in (60002, 60003)
    for proc, out in zip(clients, outputs):
        assert proc.returncode == 0 and out.strip() == "ok 200", out
