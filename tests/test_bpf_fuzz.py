"""Property tests: random and mutated packets through both programs under BPF_PROG_TEST_RUN.

Packets are built by scapy from random choices (destination class, protocol,
TCP flags, IP options, fragments, VLAN tags, IPv6, TTL, sizes) and then
mutated at the byte level (truncated, bad IHL, bad total length, random byte
flips). Whatever arrives, the programs must:

- answer one of the verdicts the design allows, counted exactly once;
- leave a packet they pass to the stack byte for byte unchanged;
- drop only with a drop reason;
- on a redirect, keep the IPv4 header checksum exactly as valid as it came
  (incremental update), with the TTL one lower and the L4 bytes untouched;
  an ICMP they build has valid IP and ICMP checksums.

FUZZ_CASES is the number of examples per program (reported in docs/reliability.md).
"""

from __future__ import annotations

import struct

import errno

from hypothesis import HealthCheck, assume, given, settings, strategies as hst
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from tests.bpf_helpers import HIN_MAC, POD_MAC, nonzero_counters, run_prog
from tests.bpf_helpers import dp, loaded, route_ns  # noqa: F401  (fixtures)
from tests.test_bpf_unit import (DST_MAC, DST_NODE_MAC, EXTERNAL_DST, LOCAL_DST, REMOTE_DST, SRC,
                                 TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, add_local_pod)

FUZZ_CASES = 300
DESTS = [LOCAL_DST, REMOTE_DST, EXTERNAL_DST, "198.18.99.1", "198.18.3.5", "198.19.0.1",
         "198.18.4.9"]
ALLOWED = {TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}


def ip_checksum_ok(header: bytes) -> bool:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


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
    """Run the program; a frame the kernel's test harness itself refuses is not a case."""
    try:
        return run_prog(prog.fd, data, ns, ifindex)
    except OSError as e:
        # test_run wants a full IPv4/IPv6 header when the EtherType claims one: a random
        # byte flip can make the EtherType say so for a frame too short to carry it.
        assume(e.errno != errno.EINVAL)
        raise


def check_invariants(dp, data: bytes, res) -> None:
    assert res.retval in ALLOWED
    counts = nonzero_counters(dp.maps)
    assert sum(p for p, _ in counts.values()) == 1, counts
    (reason, (packets_, nbytes)), = counts.items()
    assert nbytes == len(data)
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
            assert ip_checksum_ok(out[14:14 + ihl])
            icmp_len = struct.unpack("!H", out[16:18])[0] - ihl
            assert ip_checksum_ok(out[14 + ihl:14 + ihl + icmp_len] + b"\0" * (icmp_len % 2))
            assert out[14 + ihl] == 3 and out[15 + ihl] == 4
        else:
            # Routing updates the checksum incrementally: valid stays valid, and a header that
            # arrived corrupt stays corrupt (the receiving stack drops it, as it would have).
            assert ip_checksum_ok(out[14:14 + ihl]) == ip_checksum_ok(data[14:14 + ihl])
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
