"""The `counters` map read by family (issue 12): per-CPU values written into chosen slots of
the session's datapath (index (family * HR_HOOK_MAX + hook) * HR_REASON_MAX + reason, as
verdict() counts), then read back through every DatapathMaps reader, and a real IPv4 packet
counted under ipv4 only."""

from __future__ import annotations

from datapath import libbpf, shared_types as st
from tests.bpf.harness import add_local_pod, from_pod
from tests.bpf.packets import LOCAL_DST, SRC, pod_packet

IPV4, IPV6 = st.FAMILIES["HR_FAMILY_IPV4"], st.FAMILIES["HR_FAMILY_IPV6"]
FROM_POD, FROM_UNDERLAY = st.HOOKS["HR_HOOK_FROM_POD"], st.HOOKS["HR_HOOK_FROM_UNDERLAY"]


def write_slot(maps, family: int, hook: int, reason: str, per_cpu: list[tuple[int, int]]):
    """(packets, bytes) per CPU into the slot of (family, hook, reason); other CPUs 0."""
    stride = (st.SIZEOF_COUNTER + 7) // 8 * 8
    ncpus = libbpf.num_possible_cpus()
    value = bytearray(stride * ncpus)
    for cpu, (p, b) in enumerate(per_cpu[:ncpus]):
        value[cpu * stride:cpu * stride + st.SIZEOF_COUNTER] = st.pack_counter(p, b)
    index = st.counter_index(family, hook, st.REASON_BY_NAME[reason])
    libbpf.map_update(maps.fd("counters"), index.to_bytes(4, "little"), bytes(value))


def nonzero(counters: dict) -> dict:
    return {k: v for k, v in counters.items() if v != (0, 0)}


def test_the_map_has_a_slot_for_every_family_hook_and_reason(dp):
    assert st.FAMILY_NAMES == {IPV4: "ipv4", IPV6: "ipv6"} and st.FAMILY_MAX == 2
    assert dp.maps.counter_entries == st.FAMILY_MAX * st.HOOK_MAX * st.REASON_MAX
    assert st.counter_index(IPV6, FROM_POD, 0) == st.HOOK_MAX * st.REASON_MAX
    # IPv4's slots are where they were before the family dimension
    assert st.counter_index(IPV4, FROM_UNDERLAY, 5) == st.REASON_MAX + 5


def test_each_reader_names_or_sums_the_family(dp):
    maps = dp.maps
    cpus = min(2, libbpf.num_possible_cpus())
    write_slot(maps, IPV4, FROM_POD, "redirect_peer", [(3, 300), (1, 100)][:cpus])
    write_slot(maps, IPV6, FROM_POD, "redirect_peer", [(5, 500)])
    write_slot(maps, IPV6, FROM_UNDERLAY, "pass_icmp6_control", [(2, 172)])
    v4 = (4, 400) if cpus == 2 else (3, 300)

    by_fh = maps.counters_by_family_hook()
    assert len(by_fh) == st.FAMILY_MAX * st.HOOK_MAX * st.REASON_MAX     # zeros included
    assert nonzero(by_fh) == {("ipv4", "from_pod", "redirect_peer"): v4,
                              ("ipv6", "from_pod", "redirect_peer"): (5, 500),
                              ("ipv6", "from_underlay", "pass_icmp6_control"): (2, 172)}
    assert nonzero(maps.counters_by_family()) == {
        ("ipv4", "redirect_peer"): v4, ("ipv6", "redirect_peer"): (5, 500),
        ("ipv6", "pass_icmp6_control"): (2, 172)}
    assert len(maps.counters_by_family()) == st.FAMILY_MAX * st.REASON_MAX
    # the readers of before IPv6 sum both families, their keys unchanged
    assert nonzero(maps.counters_by_hook()) == {
        ("from_pod", "redirect_peer"): (v4[0] + 5, v4[1] + 500),
        ("from_underlay", "pass_icmp6_control"): (2, 172)}
    counters = maps.counters()
    assert list(counters) == list(st.REASON_NAMES.values())
    assert nonzero(counters) == {"redirect_peer": (v4[0] + 5, v4[1] + 500),
                                 "pass_icmp6_control": (2, 172)}


def test_reset_zeroes_the_ipv6_counters_too(dp):
    last = (st.FAMILY_MAX - 1, st.HOOK_MAX - 1, st.REASON_MAX - 1)
    write_slot(dp.maps, *last[:2], st.REASON_NAMES[last[2]], [(7, 7)])
    write_slot(dp.maps, IPV6, FROM_POD, "redirect_neigh", [(1, 90)])
    assert sum(p for p, _ in dp.maps.counters().values()) == 8
    dp.maps.reset_counters()
    assert nonzero(dp.maps.counters_by_family_hook()) == {}


def test_an_ipv4_packet_is_counted_under_ipv4_only(dp, route_ns):
    add_local_pod(dp)
    data, _ = from_pod(dp, route_ns, pod_packet(LOCAL_DST))
    assert nonzero(dp.maps.counters_by_family_hook()) == {
        ("ipv4", "from_pod", "redirect_peer"): (1, len(data))}
    (event,) = dp.maps.read_trace_events()
    assert (event.family, event.saddr, event.daddr) == ("ipv4", SRC, LOCAL_DST)
