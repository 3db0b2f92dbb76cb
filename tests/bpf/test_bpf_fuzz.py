"""Property tests: random and mutated packets through both programs under BPF_PROG_TEST_RUN.

Packets are built by scapy from random choices (destination class, protocol,
TCP flags, IP options, fragments, VLAN tags, IPv6, TTL, sizes) and then
mutated at the byte level (truncated, bad IHL, bad total length, random byte
flips). Whatever arrives, the programs must:

- answer one of the verdicts the design allows, counted exactly once;
- leave a packet they pass to the stack byte for byte unchanged;
- drop only with a drop reason;
- drop an IPv4 packet whose header checksum is wrong (drop_bad_checksum, as
  ip_rcv() would), and only such packets, before anything else;
- on a redirect, keep the IPv4 header checksum valid (incremental update),
  with the TTL one lower and the L4 bytes untouched; an ICMP they build has
  valid IP and ICMP checksums.

FUZZ_CASES is the number of examples per program (reported in docs/reliability.md).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings, strategies as hst
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from tests.bpf.harness import add_local_pod, nonzero_counters, run_example
from tests.bpf.packets import (DST_MAC, DST_NODE_MAC, EXTERNAL_DST, HIN_MAC, LOCAL_DST, NODE_IP,
                               POD_MAC, REMOTE_DST, ROUTER_IP, SRC, TC_ACT_OK, TC_ACT_REDIRECT,
                               TC_ACT_SHOT, checksum_ok)

FUZZ_CASES = 300
DESTS = [LOCAL_DST, REMOTE_DST, EXTERNAL_DST, "198.18.99.1", "198.18.3.5", "198.19.0.1",
         "198.18.4.9"]
ALLOWED = {TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}


def parsed_header(data: bytes) -> bytes | None:
    """The IPv4 header the programs' parser accepts (parse.h: Ethernet IPv4, version 4,
    IHL 5..15 within the frame, total length covering the header and within the frame),
    or None for anything it calls malformed or not IPv4."""
    if len(data) < 34 or data[12:14] != b"\x08\x00" or data[14] >> 4 != 4:
        return None
    ihl = (data[14] & 0x0F) * 4
    total = struct.unpack("!H", data[16:18])[0]
    if ihl < 20 or 14 + ihl > len(data) or total < ihl or total > len(data) - 14:
        return None
    return data[14:14 + ihl]


def check_header_checksum(data: bytes, reason: str) -> None:
    """Exactly the packets with a wrong header checksum are dropped for it, before all else."""
    header = parsed_header(data)
    if reason == "drop_bad_checksum":
        assert header is not None and not checksum_ok(header)
    elif header is not None:
        assert checksum_ok(header), reason


@hst.composite
def packets(draw):
    proto = draw(hst.sampled_from(["udp", "tcp", "icmp", "raw"]))
    l4 = {"udp": lambda: UDP(sport=draw(hst.integers(1, 65535)), dport=draw(hst.integers(1, 65535))),
          "tcp": lambda: TCP(sport=draw(hst.integers(1, 65535)), dport=draw(hst.integers(1, 65535)),
                             flags=draw(hst.integers(0, 0xFF))),
          "icmp": lambda: ICMP(type=draw(hst.sampled_from([0, 3, 8, 11])), code=draw(hst.integers(0, 15))),
          "raw": lambda: b""}[proto]()
    options = draw(hst.sampled_from([[], [IPOption_NOP()] * 4, [IPOption_RR()]]))
    ip = IP(src=SRC, dst=draw(hst.sampled_from(DESTS)), ttl=draw(hst.sampled_from([0, 1, 2, 64, 255])),
            flags=draw(hst.sampled_from(["", "DF", "MF"])), frag=draw(hst.sampled_from([0, 0, 0, 5])),
            options=options, tos=draw(hst.integers(0, 255)))
    payload = b"p" * draw(hst.sampled_from([0, 8, 100, 1400, 3000]))
    pkt = ip / l4 / payload
    wrap = draw(hst.sampled_from(["eth", "eth", "eth", "vlan", "ipv6"]))
    if wrap == "vlan":
        frame = Ether(src=POD_MAC, dst=HIN_MAC) / Dot1Q(vlan=draw(hst.integers(1, 4094))) / pkt
    elif wrap == "ipv6":
        frame = Ether(src=POD_MAC, dst=HIN_MAC) / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP()
    else:
        frame = Ether(src=POD_MAC, dst=HIN_MAC) / pkt
    data = bytearray(bytes(frame))
    mutation = draw(hst.sampled_from(["none", "none", "truncate", "ihl", "tot_len", "flip"]))
    if mutation == "truncate":
        shortest = 54 if wrap == "ipv6" else 34  # test_run wants the L3 header it is told of
        data = data[:draw(hst.integers(shortest, max(shortest, len(data))))]
    elif mutation == "ihl" and wrap == "eth":
        data[14] = 0x40 | draw(hst.integers(0, 15))
    elif mutation == "tot_len" and wrap == "eth":
        data[16:18] = draw(hst.integers(0, 65535)).to_bytes(2, "big")
    elif mutation == "flip":
        for _ in range(draw(hst.integers(1, 4))):
            data[draw(hst.integers(0, len(data) - 1))] ^= draw(hst.integers(1, 255))
    return bytes(data)


def run(dp, prog, data: bytes, ns: str, ifindex: int):
    """Run the program (harness.run_example: a frame test_run refuses is not a case)."""
    return run_example(prog.fd, data, ns, ifindex)


def check_invariants(dp, data: bytes, res) -> None:
    assert res.retval in ALLOWED
    counts = nonzero_counters(dp.maps)
    assert sum(p for p, _ in counts.values()) == 1, counts
    (reason, (packets_, nbytes)), = counts.items()
    event(reason)
    assert nbytes == len(data)
    check_header_checksum(data, reason)
    if res.retval == TC_ACT_OK:
        assert reason.startswith("pass_"), reason
        assert res.data_out == data
    elif res.retval == TC_ACT_SHOT:
        assert reason.startswith("drop_"), reason
    else:
        out = res.data_out
        assert reason in ("redirect_peer", "redirect_neigh", "icmp_frag_needed"), reason
        ihl = (out[14] & 0x0F) * 4
        if reason == "icmp_frag_needed":
            assert checksum_ok(out[14:14 + ihl])
            icmp_len = struct.unpack("!H", out[16:18])[0] - ihl
            assert checksum_ok(out[14 + ihl:14 + ihl + icmp_len] + b"\0" * (icmp_len % 2))
            assert out[14 + ihl] == 3 and out[15 + ihl] == 4
        else:
            # Only a valid header is routed, and the incremental update keeps it valid.
            assert checksum_ok(out[14:14 + ihl])
            assert out[22] == data[22] - 1  # TTL
            assert out[14 + ihl:] == data[14 + ihl:]  # L4 untouched by routing
            if reason == "redirect_peer":
                assert out[:12] == bytes.fromhex(DST_MAC.replace(":", "")) + \
                    bytes.fromhex(DST_NODE_MAC.replace(":", ""))


SETTINGS = settings(max_examples=FUZZ_CASES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(data=packets())
def test_fuzz_from_pod(dp, route_ns, data):
    dp.maps.reset_counters()
    add_local_pod(dp)
    check_invariants(dp, data, run(dp, dp.from_pod, data, route_ns.name, route_ns.hin))
    dp.maps.read_trace_events()


@SETTINGS
@given(data=packets())
def test_fuzz_from_underlay(dp, route_ns, data):
    dp.maps.reset_counters()
    add_local_pod(dp)
    check_invariants(dp, data, run(dp, dp.from_underlay, data, route_ns.name, route_ns.uplink))
    dp.maps.read_trace_events()


# -- with BPF SNAT on --------------------------------------------------------------------------

def l4_checksum_ok(ip_bytes: bytes) -> bool | None:
    """TCP/UDP/ICMP checksum of an unfragmented packet, None when it cannot be judged."""
    ihl = (ip_bytes[0] & 0x0F) * 4
    total = struct.unpack("!H", ip_bytes[2:4])[0]
    proto = ip_bytes[9]
    frag = struct.unpack("!H", ip_bytes[6:8])[0] & 0x3FFF
    if frag or total > len(ip_bytes) or total < ihl or proto not in (1, 6, 17):
        return None
    l4 = ip_bytes[ihl:total]
    if proto == 17 and l4[6:8] == b"\0\0":
        return True
    pseudo = b"" if proto == 1 else ip_bytes[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    data = pseudo + l4 + b"\0" * (len(l4) % 2)
    return checksum_ok(data) if len(data) >= 2 else None


def nat_table_consistent(dp) -> None:
    """Every entry has its twin, and the twin points back (nat_twin in nat.h)."""
    from datapath.nat_table import twin_key
    table = dict(dp.maps.nat_entries())
    for key, entry in table.items():
        twin = table.get(twin_key(key, entry))
        assert twin is not None, f"orphan {key}"
        back = (key.saddr, key.sport) if key.dir == "out" else (key.daddr, key.dport)
        assert (twin.addr, twin.port) == back, (key, entry, twin)


def check_snat_invariants(dp, data: bytes, res) -> None:
    assert res.retval in ALLOWED
    counts = nonzero_counters(dp.maps)
    assert sum(p for p, _ in counts.values()) == 1, counts
    (reason, _), = counts.items()
    event(reason)       # pytest --hypothesis-show-statistics: which verdicts the cases reached
    check_header_checksum(data, reason)
    if res.retval == TC_ACT_SHOT:
        assert reason.startswith("drop_"), reason
    elif res.retval == TC_ACT_OK and reason != "snat_pass_frag_needed":
        assert reason.startswith("pass_") and res.data_out == data, reason
    elif reason in ("snat_redirect_neigh", "snat_pass_frag_needed", "rnat_redirect_peer",
                    "rnat_icmp_error", "snat_fragment", "rnat_fragment"):
        out, ihl = res.data_out, (data[14] & 0x0F) * 4
        assert checksum_ok(out[14:14 + ihl])
        before = l4_checksum_ok(data[14:])
        if before is not None:
            assert l4_checksum_ok(out[14:]) == before, reason
        if reason.startswith("snat"):
            assert out[26:30] == bytes([198, 19, 0, 1])     # from the node IP
        else:
            assert out[30:34] == bytes([198, 18, 1, 10])    # to the pod
    nat_table_consistent(dp)


def _snat_on(dp, ports: int = 64):
    dp.maps.set_config(ROUTER_IP, trace=True, node_ip=NODE_IP,
                       nat={"nat_port_min": 40000, "nat_port_max": 40000 + ports - 1})


@hst.composite
def leaving_packets(draw):
    """Pod packets to destinations outside the cluster, mostly well formed."""
    proto = draw(hst.sampled_from(["udp", "tcp", "icmp-echo", "icmp-other", "raw"]))
    sport, dport = draw(hst.integers(1, 65535)), draw(hst.sampled_from([53, 80, 443]))
    l4 = {"udp": lambda: UDP(sport=sport, dport=dport),
          "tcp": lambda: TCP(sport=sport, dport=dport, flags=draw(hst.integers(0, 0xFF))),
          "icmp-echo": lambda: ICMP(type=8, id=sport),
          "icmp-other": lambda: ICMP(type=draw(hst.sampled_from([0, 3, 11, 13]))),
          "raw": lambda: b""}[proto]()
    ip = IP(src=SRC, dst=draw(hst.sampled_from([EXTERNAL_DST, "203.0.113.20", "203.0.113.30"])),
            ttl=draw(hst.sampled_from([1, 2, 64])), flags=draw(hst.sampled_from(["", "DF", "MF"])),
            frag=draw(hst.sampled_from([0, 0, 0, 0, 5])), tos=draw(hst.integers(0, 255)),
            options=draw(hst.sampled_from([[], [], [IPOption_NOP()] * 4])))
    if proto == "raw":
        ip.proto = draw(hst.sampled_from([47, 132]))
    data = bytearray(bytes(Ether(src=POD_MAC, dst=HIN_MAC) / ip / l4 /
                           (b"p" * draw(hst.sampled_from([0, 8, 100, 1400])))))
    mutation = draw(hst.sampled_from(["none"] * 6 + ["truncate", "flip"]))
    if mutation == "truncate":
        data = data[:draw(hst.integers(34, len(data)))]
    elif mutation == "flip":
        data[draw(hst.integers(14, len(data) - 1))] ^= draw(hst.integers(1, 255))
    return bytes(data)


@SETTINGS
@given(data=leaving_packets())
def test_fuzz_from_pod_with_snat(dp, route_ns, data):
    _snat_on(dp)
    dp.maps.reset_counters()
    add_local_pod(dp)
    check_snat_invariants(dp, data, run(dp, dp.from_pod, data, route_ns.name, route_ns.hin))
    dp.maps.read_trace_events()


def reply_to(draw, flow, stranger: bool):
    """A packet from outside to the node IP about `flow` (an IN NatKey), or a near miss."""
    nat_port, remote_port = flow.dport, flow.sport
    if stranger:
        nat_port ^= draw(hst.integers(1, 0xFF))
    kind = draw(hst.sampled_from(["reply", "reply", "icmp-error"]))
    if kind == "reply":
        l4 = {6: lambda: TCP(sport=remote_port, dport=nat_port, flags=draw(hst.integers(0, 0xFF))),
              17: lambda: UDP(sport=remote_port, dport=nat_port),
              1: lambda: ICMP(type=0, id=nat_port)}[flow.protocol]()
    else:
        inner_l4 = {6: TCP(sport=nat_port, dport=remote_port, flags="A"),
                    17: UDP(sport=nat_port, dport=remote_port),
                    1: ICMP(type=8, id=nat_port)}[flow.protocol]
        inner = IP(src=flow.daddr, dst=flow.saddr, ttl=1) / inner_l4 / \
            (b"q" * draw(hst.sampled_from([0, 8, 200])))
        quote = bytes(inner)[:draw(hst.sampled_from([28, 36, 48, 1000]))]
        l4 = ICMP(type=draw(hst.sampled_from([3, 11, 12])), code=draw(hst.integers(0, 5))) / quote
    # a reply in fragments (frag.h): its first (MF), or a later one (its record there or not)
    frag = draw(hst.sampled_from(["whole", "whole", "first", "later"])) if kind == "reply" \
        else "whole"
    frame = Ether(src="02:00:00:00:00:fe", dst="02:00:00:00:00:01") / \
        IP(src=flow.saddr if kind == "reply" else "198.19.0.254", dst=flow.daddr,
           ttl=draw(hst.sampled_from([1, 64, 64, 64])), id=draw(hst.sampled_from([1, 2])),
           flags="MF" if frag == "first" else "", frag=185 if frag == "later" else 0) / l4
    if frag == "later":             # no L4 header in it: the bytes after the IPv4 header
        frame = Ether(bytes(frame)[:34]) / (b"r" * draw(hst.sampled_from([8, 200])))
        frame[IP].len = None
        frame[IP].chksum = None
    data = bytearray(bytes(frame))
    if draw(hst.sampled_from(["none", "none", "none", "flip"])) == "flip":
        data[draw(hst.integers(34, len(data) - 1))] ^= draw(hst.integers(1, 255))
    return bytes(data)


@SETTINGS
@given(choice=hst.data())
def test_fuzz_from_underlay_with_snat(dp, route_ns, choice):
    _snat_on(dp)
    if len(dp.maps.nat_entries()) < 6:          # flows for the replies to be about
        for l4 in (UDP(sport=1000, dport=53), TCP(sport=1001, dport=80), ICMP(type=8, id=7)):
            run(dp, dp.from_pod, bytes(Ether(src=POD_MAC, dst=HIN_MAC) /
                                       IP(src=SRC, dst=EXTERNAL_DST) / l4), route_ns.name,
                route_ns.hin)
    flows = sorted((k for k, _ in dp.maps.nat_entries() if k.dir == "in"), key=str)
    data = reply_to(choice.draw, choice.draw(hst.sampled_from(flows)),
                    stranger=choice.draw(hst.booleans()))
    dp.maps.reset_counters()
    add_local_pod(dp)
    check_snat_invariants(dp, data, run(dp, dp.from_underlay, data, route_ns.name,
                                        route_ns.uplink))
    dp.maps.read_trace_events()
