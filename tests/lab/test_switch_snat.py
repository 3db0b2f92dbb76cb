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

from datapath.bench.netperf import ephemeral_ports
from netns_lab import netns
from netns_lab.topology import TopologyError, load_topology
from tests.labtools import background, wait_port

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


@pytest.mark.slow
def test_node_ephemeral_ports_are_disjoint_from_the_nat_ports_by_default(ebpf_lab):
    _, topo = ebpf_lab
    assert topo.node_local_port_range == (61000, 65535)
    assert (topo.nat.port_min, topo.nat.port_max) == (1024, 60999)
    for node in topo.nodes:
        low, high = ephemeral_ports(node.netns)
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


@pytest.mark.slow
def test_a_node_and_a_pod_connection_to_the_same_remote_port_both_work(make_lab, tmp_path):
    """One NAT port (60000) and two node ports (60002-60003): the collision is certain if the
    ranges overlap (the node's connect() takes its range's first free port); here they
    cannot, the remote sees both connections and each carries its own data."""
    topo_file = tmp_path / "topo.toml"
    topo_file.write_text("[lab]\nnode_local_port_range = [60002, 60003]\n"
                         "[nat]\nport_min = 60000\nport_max = 60000\n")
    _, topo = make_lab("ebpf", topology=str(topo_file))
    node, pod, ext = topo.nodes[0], topo.nodes[0].pods[0], topo.external
    assert ephemeral_ports(node.netns) == (60002, 60003)
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


@pytest.mark.slow
def test_legacy_masquerade_takes_its_ports_from_the_nat_range_too(make_lab, tmp_path):
    """A pod's source port outside [nat] is not kept: MASQUERADE picks one inside it (TCP and
    UDP), never one of the node's own ports, and the flows stay so when handed to BPF."""
    topo_file = tmp_path / "topo.toml"
    topo_file.write_text("[nat]\nport_min = 45000\nport_max = 45000\n")
    _, topo = make_lab("legacy", topology=str(topo_file))
    node, pod, ext = topo.nodes[0], topo.nodes[0].pods[0], topo.external
    go = tmp_path / "go"
    go.touch()
    with background(ext.netns, [sys.executable, "-c", PEER_ECHO, ext.ip, "9300"], port=9300):
        proc = netns.run(pod.netns, [sys.executable, "-c", PEER_CLIENT, ext.ip, "9300", "pod",
                                     str(go)], check=False, timeout=60)
    words = proc.stdout.split()
    assert proc.returncode == 0 and words[-2:] == ["ok", "200"], proc.stdout + proc.stderr
    assert words[1] == f"{node.ip}:45000", words        # not the pod's own port (32768-60999)
    with background(ext.netns, [sys.executable, "-c", UDP_PORT_ECHO_ONCE, ext.ip, "9301"],
                    port=9301, proto="udp"):
        seen = netns.run(pod.netns, [sys.executable, "-c", UDP_ASK, ext.ip, "9301"],
                         timeout=30).stdout.split()
    assert seen[1] == "45000", seen


UDP_PORT_ECHO_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"%d" % peer[1], peer)
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"port?")
print(s.getsockname()[1], s.recv(100).decode())
"""


# -- part 3: switching without breaking pod-to-external connections ------------------------------

# Both ends agree on the bytes: the stream is PATTERN repeated (a prime length, so that no
# chunk boundary lines up with it); the receiver checks every byte.
PATTERN_CODE = """
import random
PATTERN = random.Random(17).randbytes(1000003)
def expected(offset, n):
    out = bytearray()
    while n:
        start = offset % len(PATTERN)
        take = min(n, len(PATTERN) - start)
        out += PATTERN[start:start + take]
        offset += take
        n -= take
    return bytes(out)
"""

# Sender: a chunk every 10 ms (about 3 MB/s) until the stop file exists, then EOF.
SEND_CODE = """
def send_until(sock, stop, report):
    sent = 0
    while not os.path.exists(stop):
        chunk = expected(sent, 32768)
        sock.sendall(chunk)
        sent += len(chunk)
        time.sleep(0.01)
    sock.shutdown(socket.SHUT_WR)
    return sent
"""

# Receiver: every byte checked, the running total written to `progress`.
RECV_CODE = """
def receive_all(sock, progress):
    got, bad, last = 0, 0, 0.0
    while True:
        data = sock.recv(262144)
        if not data:
            break
        if data != expected(got, len(data)):
            bad += 1
        got += len(data)
        if time.monotonic() - last > 0.1:
            with open(progress + ".tmp", "w") as f:
                f.write(str(got))
            os.replace(progress + ".tmp", progress)
            last = time.monotonic()
    with open(progress, "w") as f:
        f.write(str(got))
    return got, bad
"""

PRELUDE = "import os, socket, sys, time\n" + PATTERN_CODE + SEND_CODE + RECV_CODE

# External: port A streams to whoever connects (download), port B receives (upload). Each
# prints the peer it accepted and its totals.
TRANSFER_SERVER = PRELUDE + """
ip, mode, port, stop, progress = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port)); srv.listen(1)
c, peer = srv.accept()
print("peer %s:%d" % peer, flush=True)
try:
    if mode == "download":
        print("sent", send_until(c, stop, progress), flush=True)
        c.recv(1)
    else:
        got, bad = receive_all(c, progress)
        print("received", got, "bad", bad, flush=True)
        c.sendall(b"done")
except OSError as e:
    print("error", type(e).__name__, e, flush=True)
"""

TRANSFER_CLIENT = PRELUDE + """
host, mode, port, stop, progress = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = socket.create_connection((host, port), timeout=30)
print("local", s.getsockname()[1], flush=True)
try:
    if mode == "download":
        got, bad = receive_all(s, progress)
        print("received", got, "bad", bad, flush=True)
    else:
        print("sent", send_until(s, stop, progress), flush=True)
        print("ack", s.recv(4).decode(), flush=True)
except OSError as e:
    print("error", type(e).__name__, e, flush=True)
"""


# UDP: the external server answers each datagram with the source port it came from; the pod's
# client sends one every 20 ms, counts the answers (in `progress`) and the ports it was told.
UDP_PORT_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data + b" %d" % peer[1], peer)
"""

UDP_PORT_CLIENT = """
import os, socket, sys, time
host, port, stop, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
s.settimeout(0.2)
print("local", s.getsockname()[1], flush=True)
answers, seen, i = 0, set(), 0
while not os.path.exists(stop):
    i += 1
    s.send(b"%d" % i)
    try:
        reply = s.recv(2048).split()
    except socket.timeout:
        continue
    answers += 1
    seen.add(int(reply[1]))
    with open(progress + ".tmp", "w") as f:
        f.write(str(answers))
    os.replace(progress + ".tmp", progress)
    time.sleep(0.02)
print("answers", answers, "ports", ",".join(map(str, sorted(seen))), flush=True)
"""


def _progress(path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _wait_more(path, at_least: int, what: str, procs) -> int:
    """Wait until the receiver behind `path` has `at_least` more bytes (the transfer goes on)."""
    start = _progress(path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _progress(path)
        if now >= start + at_least:
            return now
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    outs = [p.communicate(timeout=5)[0] if p.poll() is not None else "(running)" for p in procs]
    raise AssertionError(f"{what}: stuck at {_progress(path)} bytes (from {start}): {outs}")


def _ports_in_bpf(topo, node) -> dict[tuple[str, int, int], int]:
    """(pod ip, pod port, remote port) -> NAT port, from the BPF SNAT table (TCP and UDP)."""
    from datapath import switch
    from netns_lab.state import load_state
    flows = switch.nat_flows(load_state(topo.lab), topo, node.name)[node.name]
    found = {}
    for f in flows:
        if f.protocol in ("tcp", "udp") and f.complete:
            pod_ip, pod_port = f.pod.split(":")
            found[(pod_ip, int(pod_port), int(f.remote.split(":")[1]))] = int(f.nat.split(":")[1])
    return found


def _ports_in_conntrack(topo, node) -> dict[tuple[str, int, int], int]:
    from datapath import nat_handover
    return {(f.pod, f.pod_port, f.remote_port): f.nat_port
            for f in nat_handover.masqueraded(topo, node) if f.protocol in (6, 17)}


@pytest.mark.slow
@pytest.mark.parametrize("start, steps", [("ebpf", ("disable", "enable", "disable")),
                                          ("legacy", ("enable", "disable", "enable"))])
def test_long_transfers_carry_on_across_switches(make_lab, tmp_path, start, steps):
    """A download, an upload and a UDP flow whose NAT port is never the pod's own ([nat]
    20000-29999; pods' ports are 32768-60999). Started in eBPF mode the port is BPF's
    (random): after `disable`, conntrack must hold each flow with that port before the
    stack translates its next packet, or the stack maps it afresh (MASQUERADE's own pick)
    and the remote sees a new port and resets. Started in legacy mode the port is
    MASQUERADE's, and `enable` must put it in the BPF table, or BPF picks another. Each
    step's table is checked at once, before the transfers go on, and again after; every
    byte arrives, no reset, one port per flow."""
    from datapath import switch
    from netns_lab.state import load_state
    topo_file = tmp_path / "topo.toml"
    topo_file.write_text("[nat]\nport_min = 20000\nport_max = 29999\n")
    _, topo = make_lab(start, nodes=1, pods_per_node=1, topology=str(topo_file))
    node, pod, ext = topo.nodes[0], topo.nodes[0].pods[0], topo.external
    stop = tmp_path / "stop"
    progress = {m: tmp_path / f"{m}.progress" for m in ("download", "upload", "udp")}
    ports = {"download": 9401, "upload": 9402}
    servers, clients = {}, {}
    try:
        for mode, port in ports.items():
            servers[mode] = subprocess.Popen(
                ["ip", "netns", "exec", ext.netns, sys.executable, "-c", TRANSFER_SERVER,
                 ext.ip, mode, str(port), str(stop), str(progress[mode])],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for mode, port in ports.items():
            wait_port(ext.netns, port)
            clients[mode] = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, sys.executable, "-c", TRANSFER_CLIENT,
                 ext.ip, mode, str(port), str(stop), str(progress[mode])],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        servers["udp"] = subprocess.Popen(
            ["ip", "netns", "exec", ext.netns, sys.executable, "-c", UDP_PORT_ECHO, ext.ip,
             "9403"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_port(ext.netns, 9403, "udp")
        clients["udp"] = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-c", UDP_PORT_CLIENT, ext.ip,
             "9403", str(stop), str(progress["udp"])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        udp_local = int(clients["udp"].stdout.readline().split()[1])
        procs = list(servers.values()) + list(clients.values())
        peers = {m: servers[m].stdout.readline().split() for m in ports}
        local = {m: clients[m].stdout.readline().split() for m in ports}
        flows = {}
        for m in ports:
            assert peers[m][:1] == ["peer"] and local[m][:1] == ["local"], (peers, local)
            ip, nat_port = peers[m][1].split(":")
            assert ip == node.ip
            flows[m] = (pod.ip, int(local[m][1]), ports[m], int(nat_port))
        step = 1 << 20                                   # 1 MiB more after each step
        for m in ports:
            _wait_more(progress[m], step, f"{m} before {steps[0]}", procs)
        _wait_more(progress["udp"], 5, f"udp before {steps[0]}", procs)
        first_table = _ports_in_bpf if start == "ebpf" else _ports_in_conntrack
        udp_nat = first_table(topo, node)[(pod.ip, udp_local, 9403)]
        for pod_ip, pod_port, _, nat_port in flows.values():
            assert 20000 <= nat_port <= 29999 and nat_port != pod_port, flows
        assert 20000 <= udp_nat <= 29999 and udp_nat != udp_local, (udp_nat, udp_local)
        want = {(pod_ip, pod_port, remote_port): nat_port
                for pod_ip, pod_port, remote_port, nat_port in flows.values()}
        want[(pod.ip, udp_local, 9403)] = udp_nat
        started = time.monotonic()
        for step_name in steps:
            if step_name == "enable":
                switch.enable_ebpf(load_state(topo.lab), topo)
                table = _ports_in_bpf
            else:
                switch.disable_ebpf(load_state(topo.lab), topo)
                table = _ports_in_conntrack
            # at once, before the transfers go on: each flow with the port the remote knows
            # (after disable: the reply tuple's destination port in the node's conntrack)
            at_once = table(topo, node)
            assert {k: at_once.get(k) for k in want} == want, (step_name, at_once)
            for m in ports:
                _wait_more(progress[m], step, f"{m} after {step_name}", procs)
            _wait_more(progress["udp"], 5, f"udp after {step_name}", procs)
            later = table(topo, node)
            assert {k: later.get(k) for k in want} == want, (step_name, later)
        switched_s = time.monotonic() - started
        stop.touch()
        outs = {name: p.communicate(timeout=60)[0]
                for name, p in (("download server", servers["download"]),
                                ("download client", clients["download"]),
                                ("upload server", servers["upload"]),
                                ("upload client", clients["upload"]),
                                ("udp client", clients["udp"]))}
    finally:
        stop.touch()
        for p in list(servers.values()) + list(clients.values()):
            if p.poll() is None:
                p.kill()
                p.wait()
    text = "\n".join(f"{k}: {v}" for k, v in outs.items())
    assert "error" not in text, text                   # no reset, no timeout
    sent_down = int(outs["download server"].split("sent")[1].split()[0])
    got_down = outs["download client"].split("received")[1].split()
    assert got_down == [str(sent_down), "bad", "0"], text
    sent_up = int(outs["upload client"].split("sent")[1].split()[0])
    got_up = outs["upload server"].split("received")[1].split()
    assert got_up == [str(sent_up), "bad", "0"], text
    assert "ack done" in outs["upload client"], text
    assert sent_down > 3 * step and sent_up > 3 * step
    # every answer named the same source port: the datagrams never left from another one
    assert outs["udp client"].split()[-2:] == ["ports", str(udp_nat)], text
    print(f"download {sent_down} B, upload {sent_up} B, switched in {switched_s:.1f} s, "
          f"TCP NAT ports {[f[3] for f in flows.values()]} (pod ports "
          f"{[f[1] for f in flows.values()]}), UDP {udp_nat} (pod {udp_local}, "
          f"{outs['udp client'].split()[1]} answers)")
