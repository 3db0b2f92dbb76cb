"""Counters, stats, monitor, metrics and events name the address family (issue 12), from
crafted trace records and counter readings of both families, without a lab. The map readers
themselves: tests/bpf/test_counters_family.py."""

from __future__ import annotations

import ipaddress
import json
import socket

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from datapath import cli_output, metrics, monitor, rule_guard, shared_types as st, switch

NAMES = {3: "hr-1-1", 4: "hr-1-2", 2: "hr-uplink"}
POD6, PEER6 = "2001:db8:0:1::a", "2001:db8:0:2::a"


def raw_event(family: str = "ipv4", saddr: str = "0.0.0.0", daddr: str = "0.0.0.0",
              sport: int = 0, dport: int = 0, protocol: int = 0, reason: str = "redirect_peer",
              eth_proto: int | None = None, length: int = 98) -> bytes:
    """A struct hr_trace_event as the programs write it (addresses and ports network order)."""
    ev = st.ffi.new("struct hr_trace_event *")
    ev.ts_ns, ev.hook, ev.reason = 1, st.HOOKS["HR_HOOK_FROM_POD"], st.REASON_BY_NAME[reason]
    ev.ifindex_in, ev.ifindex_out = 3, 4
    ev.family = st.FAMILIES[f"HR_FAMILY_{family.upper()}"]
    if family == "ipv6":
        st.ffi.memmove(ev.saddr6, ipaddress.IPv6Address(saddr).packed, 16)
        st.ffi.memmove(ev.daddr6, ipaddress.IPv6Address(daddr).packed, 16)
        ev.eth_proto = st.ETH_P_IPV6 if eth_proto is None else eth_proto
    else:
        ev.saddr, ev.daddr = st.ip_to_be32(saddr), st.ip_to_be32(daddr)
        ev.eth_proto = st.ETH_P_IP if eth_proto is None else eth_proto
    ev.sport, ev.dport = socket.htons(sport), socket.htons(dport)
    ev.protocol, ev.len = protocol, length
    return bytes(st.ffi.buffer(ev))


def test_trace_records_of_both_families_unpack_with_their_addresses():
    v4 = st.unpack_trace_event(raw_event("ipv4", "198.18.1.10", "198.18.2.10", 40000, 5201, 6))
    assert (v4.family, v4.saddr, v4.daddr, v4.sport, v4.dport, v4.protocol) == (
        "ipv4", "198.18.1.10", "198.18.2.10", 40000, 5201, 6)
    v6 = st.unpack_trace_event(raw_event("ipv6", POD6, PEER6, 40000, 5201, 6, length=94))
    assert (v6.family, v6.saddr, v6.daddr, v6.sport, v6.dport, v6.protocol, v6.len) == (
        "ipv6", POD6, PEER6, 40000, 5201, 6, 94)
    assert v6.eth_proto == st.ETH_P_IPV6 and (v6.hook, v6.reason) == ("from_pod", "redirect_peer")


def test_monitor_prints_ipv6_addresses_and_names_the_family():
    v6 = st.unpack_trace_event(raw_event("ipv6", POD6, PEER6, 40000, 5201, 6, length=94))
    rec = monitor.describe("node1", v6, NAMES)
    assert (rec["family"], rec["protocol"], rec["src"], rec["dst"], rec["summary"]) == (
        "ipv6", "tcp", f"[{POD6}]:40000", f"[{PEER6}]:5201",
        f"[{POD6}]:40000 > [{PEER6}]:5201")
    line = monitor.format_line(rec)
    assert f" tcp6  [{POD6}]:40000 > [{PEER6}]:5201 len 94 on hr-1-1 -> hr-1-2" in line
    assert json.loads(json.dumps(rec)) == rec

    echo = st.unpack_trace_event(raw_event("ipv6", POD6, PEER6, protocol=58, length=118))
    rec = monitor.describe("node1", echo, NAMES)
    assert (rec["protocol"], rec["summary"]) == ("icmp6", f"{POD6} > {PEER6}")
    assert f" icmp6 {POD6} > {PEER6} len 118" in monitor.format_line(rec)


def test_monitor_lines_of_ipv4_keep_their_format_and_gain_the_family_in_json():
    v4 = st.unpack_trace_event(raw_event("ipv4", "198.18.1.10", "198.18.2.10", 40000, 5201, 6))
    rec = monitor.describe("node1", v4, NAMES)
    assert (rec["family"], rec["protocol"], rec["summary"]) == (
        "ipv4", "tcp", "198.18.1.10:40000 > 198.18.2.10:5201")
    assert " tcp   198.18.1.10:40000 > 198.18.2.10:5201 len 98 on hr-1-1 -> hr-1-2" in \
        monitor.format_line(rec)


def test_an_ipv6_frame_without_parsed_addresses_shows_its_ethertype():
    """An IPv6 frame no IPv6 program parsed (its addresses left 0) reads as before IPv6."""
    raw = st.unpack_trace_event(raw_event("ipv6", "::", "::", reason="pass_not_ipv4"))
    rec = monitor.describe("node1", raw, NAMES)
    assert (rec["family"], rec["protocol"], rec["src"], rec["summary"]) == (
        "ipv6", "ipv6", None, "ethertype 0x86dd")
    assert " ipv6  ethertype 0x86dd len 98" in monitor.format_line(rec)


def test_the_pod_filter_takes_either_address_of_the_pod():
    v6 = st.unpack_trace_event(raw_event("ipv6", POD6, PEER6, protocol=58))
    v4 = st.unpack_trace_event(raw_event("ipv4", "198.18.1.10", "198.18.2.10", protocol=1))
    assert monitor._wanted(v6, "trace", {"198.18.2.10", PEER6})
    assert monitor._wanted(v4, "trace", {"198.18.2.10", PEER6})
    assert not monitor._wanted(v6, "trace", {"198.18.1.11", "2001:db8:0:1::b"})
    assert monitor._wanted(v6, "trace", None) and not monitor._wanted(v6, "drop", None)


def by_family(**nonzero) -> dict[tuple[str, str], tuple[int, int]]:
    """A DatapathMaps.counters_by_family() reading: every pair 0 but `nonzero`
    (ipv6__redirect_peer=(5, 500))."""
    out = {(f, r): (0, 0) for f in st.FAMILY_NAMES.values() for r in st.REASON_NAMES.values()}
    for key, value in nonzero.items():
        family, reason = key.split("__")
        out[(family, reason)] = value
    return out


def test_stats_json_keeps_the_summed_counters_and_adds_each_familys():
    tables = switch.counter_tables(by_family(ipv4__redirect_peer=(3, 294),
                                             ipv6__redirect_peer=(5, 590),
                                             ipv6__pass_icmp6_control=(2, 172)))
    assert list(tables["counters"]) == list(st.REASON_NAMES.values())
    assert tables["counters"]["redirect_peer"] == {"packets": 8, "bytes": 884}
    assert tables["counters"]["pass_icmp6_control"] == {"packets": 2, "bytes": 172}
    assert tables["counters"]["drop_spoofed"] == {"packets": 0, "bytes": 0}
    fams = tables["counters_by_family"]
    assert list(fams) == ["ipv4", "ipv6"]
    assert all(list(c) == list(st.REASON_NAMES.values()) for c in fams.values())
    assert fams["ipv4"]["redirect_peer"] == {"packets": 3, "bytes": 294}
    assert fams["ipv6"]["redirect_peer"] == {"packets": 5, "bytes": 590}
    assert fams["ipv4"]["pass_icmp6_control"] == {"packets": 0, "bytes": 0}


def test_stats_table_has_a_row_per_family(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    tables = switch.counter_tables(by_family(ipv4__redirect_peer=(3, 294),
                                             ipv6__redirect_peer=(5, 590)))
    cli_output.print_stats({"lab": "t1", "bpf_stats": {"window_s": None, "sysctl": True},
                            "nodes": [{"name": "node1", **tables, "programs": {},
                                       "nat": {"entries": 0, "capacity": 8, "out_entries": 0,
                                               "in_entries": 0}}]})
    rows = [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert rows == [["node1", "ipv4", "redirect_peer", "3", "294"],
                    ["node1", "ipv6", "redirect_peer", "5", "590"]]


def test_metrics_label_every_verdict_series_with_its_family():
    by_fh = {(f, h, r): (0, 0) for f in st.FAMILY_NAMES.values()
             for h in st.HOOK_NAMES.values() for r in st.REASON_NAMES.values()}
    by_fh[("ipv6", "from_pod", "redirect_peer")] = (5, 590)
    by_fh[("ipv6", "from_underlay", "drop_link_local")] = (1, 86)
    by_fh[("ipv4", "from_pod", "redirect_peer")] = (3, 294)
    collector = metrics.DatapathCollector(["t1"])
    lab = collector._known["t1"] = metrics._Lab(created_at=0)
    metrics.count_verdicts(lab.totals, "node1", by_fh, source=7)

    class Once:
        def collect(self):
            return collector._families([metrics._Reading(name="t1", mode="ebpf",
                                                         guard_up=True)])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Once())
    samples = {(s.name, s.labels.get("family"), s.labels.get("hook"), s.labels.get("reason")):
               s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples if s.name.startswith(("hostrouting_forward",
                                                        "hostrouting_drop",
                                                        "hostrouting_stack"))}
    assert samples[("hostrouting_forward_packets_total", "ipv6", "from_pod",
                    "redirect_peer")] == 5
    assert samples[("hostrouting_forward_packets_total", "ipv4", "from_pod",
                    "redirect_peer")] == 3
    assert samples[("hostrouting_forward_bytes_total", "ipv6", "from_pod",
                    "redirect_peer")] == 590
    assert samples[("hostrouting_drop_packets_total", "ipv6", "from_underlay",
                    "drop_link_local")] == 1
    assert samples[("hostrouting_stack_packets_total", "ipv4", "from_underlay",
                    "pass_icmp6_control")] == 0
    # every reason of a kind, for both families and hooks, zeros included
    assert len(samples) == 2 * st.FAMILY_MAX * st.HOOK_MAX * st.REASON_MAX
    assert {family for _, family, _, _ in samples} == {"ipv4", "ipv6"}


def test_nat_drop_events_name_the_family_of_the_packets():
    seen: dict = {}
    first = by_family(ipv4__drop_nat_exhausted=(2, 0))
    assert rule_guard.Guard._counter_rise(seen, "node1", first, "drop_nat_exhausted") == \
        {"ipv4": 2}
    later = by_family(ipv4__drop_nat_exhausted=(2, 0), ipv6__drop_nat_exhausted=(3, 0))
    rises = rule_guard.Guard._counter_rise(seen, "node1", later, "drop_nat_exhausted")
    assert rises == {"ipv6": 3}
    assert rule_guard._packets_of_new_flows(rises) == "3 packet(s) of new IPv6 flows"
    assert rule_guard._packets_of_new_flows({"ipv4": 2, "ipv6": 3}) == \
        "5 packet(s) of new flows (IPv4 2, IPv6 3)"
    assert rule_guard.Guard._counter_rise(seen, "node1", later, "drop_nat_exhausted") == {}


class NatMaps:
    """What stats reads of a node's NAT tables, crafted: raw keys of both families."""

    def __init__(self, keys: dict[int, list]):
        self.keys = keys

    def nat_raw_entries(self, family: int = 4) -> list[tuple[bytes, bytes]]:
        return [(st.pack_nat_key(k), b"") for k in self.keys[family]]

    def nat_capacity(self, family: int = 4) -> int:
        return {4: 524288, 6: 1024}[family]


def test_stats_sizes_each_familys_nat_table():
    def key(src, dst, direction):
        return st.NatKey(src, dst, 40000, 443, socket.IPPROTO_TCP, direction)
    maps = NatMaps({4: [key("198.18.1.10", "203.0.113.10", "out"),
                        key("203.0.113.10", "198.19.0.1", "in")],
                    6: [key(POD6, "2001:db8:2::a", "out"), key(POD6, "2001:db8:2::b", "out"),
                        key("2001:db8:2::a", "2001:db8:1::1", "in")]})
    assert switch.nat_table_use(maps, 4) == {"entries": 2, "capacity": 524288,
                                             "out_entries": 1, "in_entries": 1}
    assert switch.nat_table_use(maps, 6) == {"entries": 3, "capacity": 1024,
                                             "out_entries": 2, "in_entries": 1}


def test_nat_gauges_are_labelled_with_the_family():
    collector = metrics.DatapathCollector(["t1"])
    collector._known["t1"] = metrics._Lab(created_at=0)
    reading = metrics._Reading(name="t1", mode="ebpf", guard_up=True)
    reading.nat = {("node1", "ipv4"): (2, 524288, 59976), ("node1", "ipv6"): (4, 1024, 59976)}
    gauges = {(m.name, s.labels["family"]): s.value
              for m in collector._families([reading]) if m.name.startswith("hostrouting_nat_")
              for s in m.samples}
    assert gauges == {("hostrouting_nat_entries", "ipv4"): 2,
                      ("hostrouting_nat_entries", "ipv6"): 4,
                      ("hostrouting_nat_capacity", "ipv4"): 524288,
                      ("hostrouting_nat_capacity", "ipv6"): 1024,
                      ("hostrouting_nat_port_range_size", "ipv4"): 59976,
                      ("hostrouting_nat_port_range_size", "ipv6"): 59976}


def test_a_full_ipv6_nat_table_is_its_own_event():
    from datapath import events
    lab = "h4fam"
    guard = rule_guard.Guard(lab, {})
    warned: set = set()
    guard._table_fill("node1", "ipv6", 950, 1024, 0, warned)     # 90 %: warned once
    guard._table_fill("node1", "ipv6", 960, 1024, 0, warned)
    guard._table_fill("node1", "ipv4", 10, 524288, 0, warned)    # the IPv4 table is fine
    guard._table_fill("node1", "ipv6", 100, 1024, 0, warned)     # under half: may warn again
    guard._table_fill("node1", "ipv4", 20, 524288, 3, warned)    # refused new flows
    full = [e for e in events.read(lab) if e["reason"] == "NatTableFull"]
    assert [(e["details"]["family"], e["details"]["used"]) for e in full] == [
        ("ipv6", 950), ("ipv4", 20)]
    assert full[0]["message"].startswith("BPF SNAT table (IPv6) at 950 of 1024 entries: ")
    assert full[1]["message"].startswith("BPF SNAT table at 20 of 524288 entries, 3 packet(s) "
                                         "of new IPv4 flows refused: new flows are refused")
    assert warned == {("node1", "ipv4")}
