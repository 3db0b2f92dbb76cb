"""Fixtures and tools for the BPF unit tests (tests/bpf/test_bpf_unit.py).

The datapath is compiled and loaded once per module. Programs that call
bpf_fib_lookup() are run with BPF_PROG_TEST_RUN from inside a private test
namespace (the thread switches into it and back), so results depend only on
the routes set up here, never on the root namespace, which is not touched.

Test namespace (hrtest-<random>), all forwarding on:

    hin     198.18.1.1/32   the "host-side veth" packets come in on (ctx ifindex)
    uplink  198.19.0.1/24   underlay; 198.18.2.0/24 and 203.0.113.0/24 via
                            198.19.0.2 / 198.19.0.254 (permanent neighbours)
    narrow  198.19.1.1/24   MTU 1280; 198.18.3.0/24 via 198.19.1.2
            198.18.4.0/24 via 198.19.0.3 on uplink: no neighbour entry
    unreachable 198.18.99.0/24, blackhole 198.18.98.0/24
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from datapath import host_routing, libbpf, shared_types as st

CLONE_NEWNET = 0x40000000
ROUTER_IP = "198.18.1.1"
NETNS_DIR = "/run/netns"

POD_MAC = "02:00:00:00:01:0a"       # the sending pod's eth0
HIN_MAC = "02:00:00:00:01:01"       # host-side veth of the sending pod
NARROW_MTU = 1280
SRC_POD = "198.18.1.10"              # the sending pod, behind hin
NODE_IP = "198.19.0.1"              # the node's underlay address: the SNAT source
CLUSTER_CIDRS = ("198.18.0.0/16", "198.19.0.0/16")  # pods and underlay: everything but 203.0.113/24

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str):
    """Switch the calling thread into netns `name` for the block, then back."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(orig)
        finally:
            os.close(target)
    finally:
        os.close(orig)


def ip_batch(netns: str, commands: list[str]) -> None:
    proc = subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {netns} -batch failed: {proc.stderr}")


def ifindex(netns: str, ifname: str) -> int:
    proc = subprocess.run(["ip", "-n", netns, "-j", "link", "show", "dev", ifname],
                          capture_output=True, text=True, check=True, timeout=10)
    return int(json.loads(proc.stdout)[0]["ifindex"])


def fresh_netns_name() -> str:
    while True:
        name = "hrtest-" + secrets.token_hex(4)
        if not os.path.exists(os.path.join(NETNS_DIR, name)):
            return name


@contextlib.contextmanager
def private_netns():
    """A new, empty named netns (lo up), always deleted afterwards."""
    name = fresh_netns_name()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        ip_batch(name, ["link set lo up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@dataclass
class RouteNs:
    name: str
    hin: int        # ifindex of the ingress device
    uplink: int
    narrow: int


@pytest.fixture(scope="module")
def route_ns():
    with private_netns() as name:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.conf.all.forwarding=1",
                        "net.ipv4.conf.default.forwarding=1",
                        "net.ipv6.conf.all.disable_ipv6=1",       # no RS/DAD/MLD noise
                        "net.ipv6.conf.default.disable_ipv6=1"],
                       check=True, capture_output=True, timeout=10)
        ip_batch(name, [
            f"link add hin address {HIN_MAC} type veth peer name hin-p address {POD_MAC}",
            "link add uplink type veth peer name uplink-p",
            f"link add narrow mtu {NARROW_MTU} type veth peer name narrow-p mtu {NARROW_MTU}",
            *[f"link set {d} up" for d in ("hin", "hin-p", "uplink", "uplink-p",
                                           "narrow", "narrow-p")],
            f"addr add {ROUTER_IP}/32 dev hin",
            "addr add 198.19.0.1/24 dev uplink",
            "addr add 198.19.1.1/24 dev narrow",
            "route add 198.18.2.0/24 via 198.19.0.2 dev uplink",
            "route add 203.0.113.0/24 via 198.19.0.254 dev uplink",
            "route add 198.18.3.0/24 via 198.19.1.2 dev narrow",
            "route add 198.18.4.0/24 via 198.19.0.3 dev uplink",      # neighbour unknown
            "route add unreachable 198.18.99.0/24",
            "route add blackhole 198.18.98.0/24",
            "neigh replace 198.19.0.2 lladdr 02:00:00:00:00:02 dev uplink nud permanent",
            "neigh replace 198.19.0.254 lladdr 02:00:00:00:00:fe dev uplink nud permanent",
            "neigh replace 198.19.1.2 lladdr 02:00:00:00:01:02 dev narrow nud permanent",
        ])
        yield RouteNs(name=name, hin=ifindex(name, "hin"), uplink=ifindex(name, "uplink"),
                      narrow=ifindex(name, "narrow"))


def loaded_datapath(**kw):
    """A datapath loaded for a module (host_routing.load's options), closed after it."""
    dp = host_routing.load(ROUTER_IP, **kw)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="module")
def loaded():
    yield from loaded_datapath()


@pytest.fixture
def dp(loaded, route_ns):
    """The module's datapath: the sending pod SRC_POD on hin as its only endpoint,
    zero counters, an empty NAT table, tracing on, BPF SNAT off."""
    maps = loaded.maps
    for ip in list(maps.endpoints()):
        maps.delete_endpoint(ip)
    maps.set_endpoint(SRC_POD, route_ns.hin, POD_MAC, HIN_MAC)
    for key, _ in maps.nat_entries():
        maps.nat_delete(key)
    maps.reset_counters()
    for name in ("cluster_cidrs", "node_routes"):  # what an earlier test left
        for key in list(libbpf.map_keys(maps.fd(name), st.SIZEOF_LPM_KEY)):
            libbpf.map_delete(maps.fd(name), key)
    for cidr in CLUSTER_CIDRS:
        maps.set_cluster_cidr(cidr)
    maps.set_config(ROUTER_IP, trace=True)
    maps.read_trace_events()        # drop leftovers
    return loaded


def run_prog(prog_fd: int, data: bytes, netns: str, ifindex: int):
    """BPF_PROG_TEST_RUN from inside `netns`, skb arriving on `ifindex`."""
    with in_netns(netns):
        return libbpf.prog_test_run(prog_fd, data, ctx=libbpf.skb_ctx(ifindex=ifindex))


def send_raw(netns: str, ifname: str, frame: bytes) -> None:
    """Transmit one raw Ethernet frame on a device of `netns` (AF_PACKET)."""
    with in_netns(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind((ifname, 0))
        s.send(frame)
    finally:
        s.close()


def wait_for(predicate, timeout: float = 3.0):
    """Poll until predicate() is truthy (returns it) or the deadline passes (returns last)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def nonzero_counters(maps) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in maps.counters().items() if v != (0, 0)}
