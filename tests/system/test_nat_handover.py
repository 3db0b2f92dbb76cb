"""The conntrack side of the NAT hand-over (datapath/nat_handover.py), both families: what
``conntrack -L -o extended`` lists is read into flows, and a BPF flow becomes the
``conntrack -I`` / ``-D`` arguments conntrack-tools 1.4.7 accepts (no ``-f`` with ``-I``; an
IPv6 NAT target with a port written ``[addr]:port``). The lines are conntrack's own, from a
dual-stack lab in legacy mode; the whole hand-over runs in lab tests (test_switch_snat for
IPv4; a dual lab switched by hand for IPv6, see nat_handover's docstring)."""

from __future__ import annotations

import socket

from datapath import nat_handover as nh

LISTING = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.1.10 dst=203.0.113.10 sport=40000 \
dport=80 src=203.0.113.10 dst=198.19.0.1 sport=80 dport=30001 [ASSURED] mark=0 use=1
ipv6     10 icmpv6   58 28 src=2001:db8:0:1::a dst=2001:db8:2::a type=128 code=0 id=14005 \
src=2001:db8:2::a dst=2001:db8:1::1 type=129 code=0 id=14005 mark=0 use=1
ipv6     10 udp      17 28 src=2001:db8:0:1::a dst=2001:db8:2::a sport=46574 dport=5353 \
[UNREPLIED] src=2001:db8:2::a dst=2001:db8:1::1 sport=5353 dport=46574 mark=0 use=1
ipv6     10 tcp      6 431998 ESTABLISHED src=2001:db8:0:1::a dst=2001:db8:2::a sport=58688 \
dport=7777 src=2001:db8:2::a dst=2001:db8:1::1 sport=7777 dport=30169 [ASSURED] mark=0 use=1
ipv6     10 icmpv6   58 29 src=2001:db8:2::a dst=2001:db8:1::1 type=128 code=0 id=9 \
src=2001:db8:1::1 dst=2001:db8:2::a type=129 code=0 id=9 mark=0 use=1
"""


def test_conntrack_listings_of_both_families_are_read():
    flows = nh.parse_conntrack(LISTING)
    assert flows == [
        nh.CtFlow(socket.IPPROTO_TCP, "198.18.1.10", 40000, "203.0.113.10", 80, "198.19.0.1",
                  30001, "ESTABLISHED", True),
        nh.CtFlow(socket.IPPROTO_ICMPV6, "2001:db8:0:1::a", 14005, "2001:db8:2::a", 0,
                  "2001:db8:1::1", 14005, "", True),
        nh.CtFlow(socket.IPPROTO_UDP, "2001:db8:0:1::a", 46574, "2001:db8:2::a", 5353,
                  "2001:db8:1::1", 46574, "", False),
        nh.CtFlow(socket.IPPROTO_TCP, "2001:db8:0:1::a", 58688, "2001:db8:2::a", 7777,
                  "2001:db8:1::1", 30169, "ESTABLISHED", True),
        # the last: a ping of the node from outside, an echo request too (masqueraded()
        # keeps only the node's pods' flows)
        nh.CtFlow(socket.IPPROTO_ICMPV6, "2001:db8:2::a", 9, "2001:db8:1::1", 0,
                  "2001:db8:2::a", 9, "", True),
    ]


def test_conntrack_arguments_of_an_ipv6_flow():
    assert nh._ct_tuple(socket.IPPROTO_TCP, "2001:db8:0:1::a", 58688, "2001:db8:2::a", 7777) == \
        ["-p", "tcp", "-s", "2001:db8:0:1::a", "-d", "2001:db8:2::a", "--sport", "58688",
         "--dport", "7777"]
    assert nh._ct_tuple(socket.IPPROTO_ICMPV6, "2001:db8:0:1::a", 77, "2001:db8:2::a", 0) == \
        ["-p", "icmpv6", "-s", "2001:db8:0:1::a", "-d", "2001:db8:2::a", "--icmpv6-type", "128",
         "--icmpv6-code", "0", "--icmpv6-id", "77"]
    assert nh._ct_tuple(socket.IPPROTO_ICMP, "198.18.1.10", 77, "203.0.113.10", 0)[-6:] == \
        ["--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "77"]
    assert nh._nat_to("2001:db8:1::1", 30169) == "[2001:db8:1::1]:30169"
    assert nh._nat_to("198.19.0.1", 30001) == "198.19.0.1:30001"
