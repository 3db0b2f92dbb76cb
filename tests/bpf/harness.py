"""The BPF unit tests' harness: private namespaces, the datapath loaded and reset, and
BPF_PROG_TEST_RUN from inside a namespace (the thread switches into it and back), so that
bpf_fib_lookup() sees only the routes a test set up, never the root namespace's.

The fixtures built on these (route_ns, loaded, dp) are in conftest.py; the packets and
addresses in packets.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from datapath import host_routing, libbpf, nat_table, shared_types as st
from tests.bpf.packets import (CLUSTER_CIDRS, DST_IFINDEX, DST_MAC, DST_NODE_MAC, HIN_MAC,
                               LOCAL_DST, POD_MAC, ROUTER_IP, SRC)

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
SIZEOF_FRAG_KEY = st.ffi.sizeof("struct hr_frag_key")

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


@dataclass
class Route6Ns:
    """The IPv6 test namespace (conftest.route6_ns); devices as in RouteNs."""
    name: str
    hin: int
    uplink: int
    narrow: int


BPF_FUNC_SKB_CHANGE_HEAD = 43     # enum bpf_func_id, uapi/linux/bpf.h (a stable ABI number)


def helper_calls(module, name: str) -> set[int]:
    """The helpers (their BPF_FUNC_* ids) function ``name`` of a compiled bcc module calls:
    its BPF_JMP|BPF_CALL instructions whose source register is 0 (not a call of another BPF
    function or a kfunc)."""
    code = module.dump_func(name.encode())
    return {imm for op, regs, _, imm in (struct.unpack_from("<BBhi", code, i)
                                          for i in range(0, len(code), 8))
            if op == 0x85 and regs >> 4 == 0}


def loaded_datapath(**kw):
    """A datapath loaded for a fixture (host_routing.load's options), closed after it."""
    dp = host_routing.load(ROUTER_IP, **kw)
    try:
        yield dp
    finally:
        dp.close()


def reset_datapath(dp, route_ns: RouteNs):
    """The pod SRC on hin as the only endpoint, zero counters, empty NAT and fragment tables,
    the cluster CIDRS and no node routes, tracing on, BPF SNAT off, no trace event pending:
    whatever an earlier test left."""
    maps = dp.maps
    for ip in list(maps.endpoints()):
        maps.delete_endpoint(ip)
    maps.set_endpoint(SRC, route_ns.hin, POD_MAC, HIN_MAC)
    empty_nat_tables(maps)
    maps.reset_counters()
    for name in ("cluster_cidrs", "node_routes"):
        for key in list(libbpf.map_keys(maps.fd(name), st.SIZEOF_LPM_KEY)):
            libbpf.map_delete(maps.fd(name), key)
    for cidr in CLUSTER_CIDRS:
        maps.set_cluster_cidr(cidr)
    maps.set_config(ROUTER_IP, trace=True)
    maps.read_trace_events()
    return dp


def empty_nat_tables(maps) -> None:
    """Every NAT table of the datapath and its fragment records, both families."""
    nat_table.flush(maps)
    frags = {4: ("nat_frags", SIZEOF_FRAG_KEY), 6: ("nat6_frags", st.SIZEOF_FRAG6_KEY)}
    for family in maps.nat_families():
        name, size = frags[family]
        for key in list(libbpf.map_keys(maps.fd(name), size)):
            libbpf.map_delete(maps.fd(name), key)


def reset_datapath6(dp, ns: Route6Ns):
    """For the IPv6 tests, what reset_datapath does for IPv4: the pod SRC6 on the IPv6
    namespace's hin as the only endpoint (no IPv4 one), zero counters, the IPv6 cluster
    CIDRs, no IPv6 node routes, empty NAT tables, tracing on, the IPv6 gateway configured
    and BPF SNAT off, no trace event pending."""
    from tests.bpf.packets6 import CLUSTER_CIDRS6, ROUTER6, SRC6
    maps = dp.maps
    for ip in [*maps.endpoints(), *maps.endpoints6()]:
        maps.delete_endpoint(ip)
    maps.set_endpoint(SRC6, ns.hin, POD_MAC, HIN_MAC)
    empty_nat_tables(maps)
    maps.reset_counters()
    for name in ("cluster_cidrs6", "node_routes6"):
        for key in list(libbpf.map_keys(maps.fd(name), st.SIZEOF_LPM6_KEY)):
            libbpf.map_delete(maps.fd(name), key)
    for cidr in CLUSTER_CIDRS6:
        maps.set_cluster_cidr6(cidr)
    maps.set_config(ROUTER_IP, trace=True, router_ip6=ROUTER6)
    maps.read_trace_events()
    return dp


def run_prog(prog_fd: int, data: bytes, netns: str, ifindex: int, **skb):
    """BPF_PROG_TEST_RUN from inside `netns`, skb arriving on `ifindex` (and the other
    __sk_buff fields `skb` gives, libbpf.skb_ctx's: a GSO skb's gso_size and gso_segs)."""
    with in_netns(netns):
        return libbpf.prog_test_run(prog_fd, data, ctx=libbpf.skb_ctx(ifindex=ifindex, **skb))


def run_example(prog_fd: int, data: bytes, netns: str, ifindex: int):
    """run_prog for a hypothesis example: a frame the kernel's test harness itself refuses
    is not a case (test_run wants the full L3 header the EtherType announces; a random byte
    flip can make the EtherType claim one for a frame too short to carry it)."""
    from hypothesis import assume
    try:
        return run_prog(prog_fd, data, netns, ifindex)
    except OSError as e:
        assume(e.errno != errno.EINVAL)
        raise


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


def from_pod(dp, route_ns: RouteNs, pkt):
    """Run from_pod on the packet, arriving on hin: (its bytes, the result)."""
    data = bytes(pkt)
    return data, run_prog(dp.from_pod.fd, data, route_ns.name, route_ns.hin)


def from_underlay(dp, route_ns: RouteNs, pkt):
    """Run from_underlay on the packet, arriving on uplink: (its bytes, the result)."""
    data = bytes(pkt)
    return data, run_prog(dp.from_underlay.fd, data, route_ns.name, route_ns.uplink)


def add_local_pod(dp, ip=LOCAL_DST):
    dp.maps.set_endpoint(ip, DST_IFINDEX, DST_MAC, DST_NODE_MAC)


def nonzero_counters(maps) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in maps.counters().items() if v != (0, 0)}
