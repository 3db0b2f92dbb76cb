"""Fixtures of the BPF unit tests: the namespace the programs run in, the datapath loaded
once for the session (compiling it costs seconds), and the datapath reset for each test.

Test namespace (hrtest-<random>), all forwarding on:

    hin     198.18.1.1/32   the "host-side veth" packets come in on (ctx ifindex)
    uplink  198.19.0.1/24   underlay; 198.18.2.0/24 and 203.0.113.0/24 via
                            198.19.0.2 / 198.19.0.254 (permanent neighbours)
    narrow  198.19.1.1/24   MTU 1280; 198.18.3.0/24 via 198.19.1.2
            198.18.4.0/24 via 198.19.0.3 on uplink: no neighbour entry
    unreachable 198.18.99.0/24, blackhole 198.18.98.0/24

IPv6 test namespace (route6_ns, IPv6 forwarding on, no DAD, no router advertisements
accepted; packets6.py names the addresses):

    hin     2001:db8:0:1::1/128   where pod packets come in
    uplink  2001:db8:1::1/64      2001:db8:0:2::/64 via 2001:db8:1::2, default via
                                  2001:db8:1::fe (permanent neighbours); 2001:db8:0:4::/64
                                  via 2001:db8:1::3: no neighbour entry
    narrow  2001:db8:1:1::1/64    MTU 1280; 2001:db8:0:3::/64 via 2001:db8:1:1::2
    unreachable 2001:db8:0:99::/64
"""

from __future__ import annotations

import subprocess

import pytest

from tests.bpf.harness import (Route6Ns, RouteNs, ifindex, ip_batch, loaded_datapath,
                               private_netns, reset_datapath, reset_datapath6)
from tests.bpf.packets import HIN_MAC, NARROW_MTU, NODE_IP, POD_MAC, ROUTER, ROUTER_IP, ROUTER_MAC
from tests.bpf.packets6 import NODE_IP6, REMOTE_NODE6, ROUTER6, ROUTER6_UNDERLAY


# the devices of both test namespaces, up
DEVICES = [
    f"link add hin address {HIN_MAC} type veth peer name hin-p address {POD_MAC}",
    "link add uplink type veth peer name uplink-p",
    f"link add narrow mtu {NARROW_MTU} type veth peer name narrow-p mtu {NARROW_MTU}",
    *[f"link set {d} up" for d in ("hin", "hin-p", "uplink", "uplink-p", "narrow", "narrow-p")],
]


@pytest.fixture(scope="session")
def route_ns():
    with private_netns() as name:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.conf.all.forwarding=1",
                        "net.ipv4.conf.default.forwarding=1",
                        "net.ipv6.conf.all.disable_ipv6=1",       # no RS/DAD/MLD noise
                        "net.ipv6.conf.default.disable_ipv6=1"],
                       check=True, capture_output=True, timeout=10)
        ip_batch(name, [
            *DEVICES,
            f"addr add {ROUTER_IP}/32 dev hin",
            f"addr add {NODE_IP}/24 dev uplink",
            "addr add 198.19.1.1/24 dev narrow",
            "route add 198.18.2.0/24 via 198.19.0.2 dev uplink",
            f"route add 203.0.113.0/24 via {ROUTER} dev uplink",
            "route add 198.18.3.0/24 via 198.19.1.2 dev narrow",
            "route add 198.18.4.0/24 via 198.19.0.3 dev uplink",      # neighbour unknown
            "route add unreachable 198.18.99.0/24",
            "route add blackhole 198.18.98.0/24",
            "neigh replace 198.19.0.2 lladdr 02:00:00:00:00:02 dev uplink nud permanent",
            f"neigh replace {ROUTER} lladdr {ROUTER_MAC} dev uplink nud permanent",
            "neigh replace 198.19.1.2 lladdr 02:00:00:00:01:02 dev narrow nud permanent",
        ])
        yield RouteNs(name=name, hin=ifindex(name, "hin"), uplink=ifindex(name, "uplink"),
                      narrow=ifindex(name, "narrow"))


@pytest.fixture(scope="session")
def loaded():
    yield from loaded_datapath()


@pytest.fixture
def dp(loaded, route_ns):
    """The session's datapath, reset (harness.reset_datapath): the sending pod SRC on hin as
    its only endpoint, zero counters, empty NAT tables, tracing on, BPF SNAT off."""
    return reset_datapath(loaded, route_ns)


@pytest.fixture(scope="session")
def route6_ns():
    with private_netns() as name:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1",
                        "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                        "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0"],
                       check=True, capture_output=True, timeout=10)
        ip_batch(name, [
            *DEVICES,
            f"addr add {ROUTER6}/128 dev hin nodad",
            f"addr add {NODE_IP6}/64 dev uplink nodad",
            "addr add 2001:db8:1:1::1/64 dev narrow nodad",
            f"route add 2001:db8:0:2::/64 via {REMOTE_NODE6} dev uplink",
            f"route add default via {ROUTER6_UNDERLAY} dev uplink",
            "route add 2001:db8:0:3::/64 via 2001:db8:1:1::2 dev narrow",
            "route add 2001:db8:0:4::/64 via 2001:db8:1::3 dev uplink",     # neighbour unknown
            "route add unreachable 2001:db8:0:99::/64",
            f"neigh replace {REMOTE_NODE6} lladdr 02:00:00:00:00:02 dev uplink nud permanent",
            f"neigh replace {ROUTER6_UNDERLAY} lladdr {ROUTER_MAC} dev uplink nud permanent",
            "neigh replace 2001:db8:1:1::2 lladdr 02:00:00:00:01:02 dev narrow nud permanent",
        ])
        yield Route6Ns(name=name, hin=ifindex(name, "hin"), uplink=ifindex(name, "uplink"),
                       narrow=ifindex(name, "narrow"))


@pytest.fixture
def dp6(loaded, route6_ns):
    """The session's datapath reset for the IPv6 tests (harness.reset_datapath6)."""
    return reset_datapath6(loaded, route6_ns)
