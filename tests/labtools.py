"""Labs for tests: fresh lab names, and driving real traffic in a lab (ping, servers and
clients inside namespaces)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time

from netns_lab import netns
from netns_lab.state import lab_names


def _lab_letter() -> str:
    """One first letter per pytest-xdist worker ("t" without xdist), so that workers running
    side by side never pick the same lab name (4 characters of the 8 a lab name may have)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return "t"
    return "uvwxyzabcdefghijklmnopqrs"[int(worker[2:]) % 25]


def fresh_lab_name() -> str:
    while True:
        name = _lab_letter() + secrets.token_hex(2)[:3]
        existing = os.listdir(netns.NETNS_DIR) if os.path.isdir(netns.NETNS_DIR) else []
        if not any(n.startswith(name + "-") for n in existing) and name not in lab_names():
            return name


def ping(ns: str, dst: str, count: int = 1, size: int | None = None, df: bool = False,
         timeout: float = 2, interval: float = 0.2) -> subprocess.CompletedProcess:
    argv = ["ping", "-n", "-c", str(count), "-W", str(timeout), "-i", str(interval)]
    if size is not None:
        argv += ["-s", str(size)]
    if df:
        argv += ["-M", "do"]
    return netns.run(ns, argv + [dst], check=False, timeout=timeout * count + 5)


def assert_ping(ns: str, dst: str, **kw) -> None:
    proc = ping(ns, dst, **kw)
    assert proc.returncode == 0, f"ping {dst} from {ns} failed:\n{proc.stdout}{proc.stderr}"


def wait_port(ns: str, port: int, proto: str = "tcp", timeout: float = 5) -> None:
    flag = "-ltn" if proto == "tcp" else "-lun"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = netns.run(ns, ["ss", "-H", flag, f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {proto}/{port} in {ns} after {timeout}s")


@contextlib.contextmanager
def background(ns: str, argv: list[str], port: int | None = None, proto: str = "tcp"):
    """A process in a namespace for the duration of the block (output kept)."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        if port is not None:
            wait_port(ns, port, proto)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def netserver(ns: str, port: int = 12865):
    with background(ns, ["netserver", "-D", "-4", "-p", str(port)], port=port) as proc:
        yield proc


def netperf(ns: str, host: str, test: str = "TCP_RR", seconds: float = 1, port: int = 12865,
            extra: list[str] | None = None) -> subprocess.CompletedProcess:
    argv = ["netperf", "-H", host, "-p", str(port), "-t", test, "-l", str(seconds), "-P", "0"]
    if extra:
        argv += ["--", *extra]
    return netns.run(ns, argv, check=False, timeout=seconds + 20)


# A pod sending frames with other source addresses or MACs: argv dst, gateway MAC, count per
# case, then cases "ip,mac".
SPOOF = """
import sys
from scapy.all import Ether, IP, UDP, sendp, conf
conf.verb = 0
dst, gw_mac, count, cases = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
for case in cases:                      # "ip,mac"
    src_ip, src_mac = case.split(",")
    frame = Ether(src=src_mac, dst=gw_mac) / IP(src=src_ip, dst=dst) / \\
        UDP(sport=4444, dport=5353) / b"spoofed"
    sendp(frame, iface="eth0", count=count)
"""


ECHO = """
import socket, sys
port, family, proto = int(sys.argv[1]), sys.argv[2], sys.argv[3]
af = socket.AF_INET6 if family == "6" else socket.AF_INET
s = socket.socket(af, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
if af == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if af == socket.AF_INET6 else "0.0.0.0", port))
if proto == "tcp":
    s.listen(16)
while True:
    if proto == "udp":
        data, addr = s.recvfrom(65535)
        s.sendto(data + (" from %s" % addr[0]).encode(), addr)
        continue
    conn, addr = s.accept()
    with conn:
        conn.sendall(conn.recv(65535) + (" from %s" % addr[0]).encode())
"""

CLIENT = """
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
af = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(af, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.settimeout(2)
if proto == "udp":
    s.sendto(b"hello", (host, port))
    print(s.recvfrom(65535)[0].decode())
else:
    s.connect((host, port))
    s.sendall(b"hello")
    reply = b""
    while chunk := s.recv(65535):
        reply += chunk
    print(reply.decode())
"""


@contextlib.contextmanager
def echo_server(ns: str, port: int = 5353, proto: str = "udp", family: int = 4):
    """A server that answers what it gets with " from <the client address it saw>"."""
    with background(ns, [sys.executable, "-c", ECHO, str(port), str(family), proto],
                    port=port, proto=proto) as p:
        yield p


def udp_echo(ns: str, port: int = 5353, family: int = 4):
    return echo_server(ns, port, "udp", family)


def echo_request(ns: str, host: str, port: int = 5353, proto: str = "udp") -> str:
    """Send "hello" (UDP, or TCP), return the reply, which names the source the server saw;
    IPv6 when the host is an IPv6 address."""
    proc = netns.run(ns, [sys.executable, "-c", CLIENT, host, str(port), proto], check=False)
    assert proc.returncode == 0, f"{proto.upper()} {host}:{port} from {ns}: {proc.stderr}"
    return proc.stdout.strip()


def udp_request(ns: str, host: str, port: int = 5353) -> str:
    """Send one datagram, return the reply, which names the source the server saw."""
    return echo_request(ns, host, port, "udp")


def conntrack_entries(ns: str, *filters: str) -> list[str]:
    proc = netns.run(ns, ["conntrack", "-L", *filters], check=False)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def lab_counters(topo) -> dict[str, dict[str, int]]:
    """{node name: {reason: packets}} from the datapath counters of an eBPF lab."""
    from datapath import switch
    from netns_lab.state import load_state
    stats = switch.stats(load_state(topo.lab), topo)
    return {n["name"]: {k: v["packets"] for k, v in n["counters"].items()} for n in stats["nodes"]}
