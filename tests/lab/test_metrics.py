"""``hostrouting metrics serve`` under a real Prometheus, scraping every second.

One eBPF lab, one exporter (``--all-labs``, started before the lab exists, so the lab is
one that appears) and one Prometheus on free loopback ports serve the module. Each test
sends its own packets and asks Prometheus's HTTP API whether the counters moved by at
least that much.

    Prometheus 127.0.0.1:P --scrape 1s--> hostrouting metrics serve 127.0.0.1:E
                                              | BPF maps by program id, lab state, events
        node1-pod1 --ping--> node2-pod1       v
        node1-pod1 --UDP---> external (SNAT)  lab: node1, node2 (eBPF), fabric, external
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from datapath import prog_stats, switch
from netns_lab import netns
from netns_lab.builder import lab_down
from netns_lab.state import lab_lock, load_state
from netns_lab.topology import Topology
from tests.labtools import SPOOF, ping, udp_echo, udp_request

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
CLI = [sys.executable, "-m", "datapath.cli"]
PINGS = 20

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def exporter():
    """`hostrouting metrics serve --all-labs` on a free port: its /metrics URL."""
    proc = subprocess.Popen([*CLI, "metrics", "serve", "--all-labs", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " on http://" in line, proc.stderr.read() if proc.poll() is not None else line
        yield line.split(" on ", 1)[1].strip()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0       # SIGTERM is how it is stopped: not an error


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, promql: str) -> float | None:
        """The value of a query that gives one series (None: no series)."""
        q = urllib.parse.urlencode({"query": promql})
        answer = json.loads(http_get(f"{self.url}/api/v1/query?{q}"))
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        assert len(result) <= 1, f"{promql}: {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, ok, timeout: float = 20) -> float | None:
        """Poll until `ok(value)`: scrapes are 1 s apart."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.query(promql)
            if value is not None and ok(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: {value} after {timeout}s")
            time.sleep(0.25)


@pytest.fixture(scope="module")
def prometheus(exporter, tmp_path_factory):
    """A Prometheus scraping the exporter every second, storage in a temporary directory."""
    assert PROMETHEUS, ("no prometheus binary: the Debian package prometheus, which "
                        "scripts/provision.sh --test-tools installs")
    work = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(exporter).netloc
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: hostrouting\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    listen = f"127.0.0.1:{free_port()}"
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address={listen}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(f"http://{listen}/-/ready")
                break
            except OSError:
                assert proc.poll() is None, (work / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus not ready after 30s"
                time.sleep(0.2)
        yield Prometheus(f"http://{listen}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def lab(exporter, make_module_lab):
    """The module's eBPF lab, dual stack, made after the exporter started."""
    _, topo = make_module_lab("ebpf", ip_family="dual")
    return topo


def series(name: str, topo: Topology, **labels) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in {"lab": topo.lab, **labels}.items()) \
        + "}"


def total(name: str, topo: Topology, **labels) -> str:
    return f"sum({series(name, topo, **labels)})"


def test_the_lab_that_appeared_is_scraped_and_up(prometheus, lab):
    prometheus.wait_for('up{job="hostrouting"}', lambda v: v == 1)
    prometheus.wait_for(series("hostrouting_mode", lab, mode="ebpf"), lambda v: v == 1)
    # a scrape while the lab was being made may have seen the guard not yet started
    prometheus.wait_for(series("hostrouting_rule_guard_up", lab), lambda v: v == 1)
    assert prometheus.query(series("hostrouting_mode", lab, mode="legacy")) == 0


def test_forward_counters_grow_by_the_packets_sent(prometheus, lab):
    src, dst = lab.nodes[0].pods[0], lab.nodes[1].pods[0]
    out = total("hostrouting_forward_packets_total", lab, node="node1", hook="from_pod")
    back = total("hostrouting_forward_packets_total", lab, node="node1", hook="from_underlay")
    nbytes = total("hostrouting_forward_bytes_total", lab, node="node1", hook="from_pod")
    before_out = prometheus.wait_for(out, lambda v: True)
    before_back, before_bytes = prometheus.query(back), prometheus.query(nbytes)
    proc = ping(src.netns, dst.ip, count=PINGS, interval=0.01)
    assert f"{PINGS} received" in proc.stdout, proc.stdout
    prometheus.wait_for(out, lambda v: v >= before_out + PINGS)      # requests redirected
    prometheus.wait_for(back, lambda v: v >= before_back + PINGS)    # replies into the pod
    assert prometheus.query(nbytes) >= before_bytes + PINGS * 98     # 84 B of IP + Ethernet


def test_ipv6_packets_are_counted_under_their_family(prometheus, lab):
    src, dst = lab.nodes[0].pods[0], lab.nodes[1].pods[0]
    out6 = total("hostrouting_forward_packets_total", lab, node="node1", family="ipv6",
                 hook="from_pod", reason="redirect_neigh")
    back6 = total("hostrouting_forward_packets_total", lab, node="node1", family="ipv6",
                  hook="from_underlay", reason="redirect_peer")
    out4 = total("hostrouting_forward_packets_total", lab, node="node1", family="ipv4",
                 hook="from_pod", reason="redirect_neigh")
    before_out, before_back = (prometheus.wait_for(q, lambda v: True) for q in (out6, back6))
    before_out4 = prometheus.query(out4)
    proc = ping(src.netns, dst.ip6, count=PINGS, interval=0.01)
    assert f"{PINGS} received" in proc.stdout, proc.stdout
    prometheus.wait_for(out6, lambda v: v >= before_out + PINGS)      # requests out, IPv6
    prometheus.wait_for(back6, lambda v: v >= before_back + PINGS)    # replies into the pod
    assert prometheus.query(out4) == before_out4                      # none under IPv4


def test_a_spoofed_packet_is_counted_as_a_drop(prometheus, lab):
    a1, a2 = lab.nodes[0].pods
    b1 = lab.nodes[1].pods[0]
    with netns.ipr(a1.netns) as sock:
        own_mac = netns.link_mac(sock, netns.ifindex(sock, "eth0"))
    with netns.ipr(lab.nodes[0].netns) as sock:
        gw_mac = netns.link_mac(sock, netns.ifindex(sock, a1.host_ifname))
    dropped = series("hostrouting_drop_packets_total", lab, node="node1", family="ipv4",
                     hook="from_pod", reason="drop_spoofed")
    before = prometheus.wait_for(dropped, lambda v: True)
    netns.run(a1.netns, [sys.executable, "-c", SPOOF, b1.ip, gw_mac, "1", f"{a2.ip},{own_mac}"],
              timeout=60)
    prometheus.wait_for(dropped, lambda v: v >= before + 1)


def test_nat_entries_after_a_pod_to_external_flow(prometheus, lab):
    node, pod = lab.nodes[0], lab.nodes[0].pods[0]
    with udp_echo(lab.external.netns):
        assert udp_request(pod.netns, lab.external.ip) == f"hello from {node.ip}"
    v4 = {"node": "node1", "family": "ipv4"}
    entries = prometheus.wait_for(series("hostrouting_nat_entries", lab, **v4),
                                  lambda v: v > 0)
    assert entries >= 2                                     # the flow's OUT and IN entries
    capacity = prometheus.query(series("hostrouting_nat_capacity", lab, **v4))
    assert capacity == 2 * lab.nat.max_flows
    assert prometheus.query(series("hostrouting_nat_port_range_size", lab, **v4)) == \
        lab.nat.port_max - lab.nat.port_min + 1
    # the lab has IPv6: its table is exported beside, as large
    assert prometheus.query(series("hostrouting_nat_capacity", lab, node="node1",
                                   family="ipv6")) == 2 * lab.nat.max_flows


def test_program_run_time_while_bpf_stats_are_on(prometheus, lab):
    runs = series("hostrouting_program_runs_total", lab, node="node1", program="from_pod")
    seconds = series("hostrouting_program_run_seconds_total", lab, node="node1",
                     program="from_pod")
    prometheus.wait_for("hostrouting_bpf_stats_enabled", lambda v: v in (0, 1))
    before = prometheus.wait_for(runs, lambda v: True)
    try:
        stats = prog_stats.enable_stats()
    except OSError as e:
        pytest.skip(f"BPF_ENABLE_STATS refused by this kernel: {e}")
    with stats:
        proc = ping(lab.nodes[0].pods[0].netns, lab.nodes[1].pods[0].ip, count=PINGS,
                    interval=0.01)
        assert f"{PINGS} received" in proc.stdout, proc.stdout
    prometheus.wait_for(runs, lambda v: v >= before + PINGS)
    assert prometheus.query(seconds) > 0


def test_counters_never_go_down_across_disable_and_enable(prometheus, lab, exporter):
    fwd = total("hostrouting_forward_packets_total", lab)
    enabled = series("hostrouting_events_total", lab, type="Normal", reason="Enabled")
    ping(lab.nodes[0].pods[0].netns, lab.nodes[1].pods[0].ip, count=3, interval=0.01)
    before = prometheus.wait_for(fwd, lambda v: v >= 3)
    enables = prometheus.query(enabled)
    # a scrape in each mode: the first after enable reads fresh maps, near zero
    for step, mode in ((switch.disable_ebpf, "legacy"), (switch.enable_ebpf, "ebpf")):
        with lab_lock(lab.lab):
            step(load_state(lab.lab), lab)
        prometheus.wait_for(series("hostrouting_mode", lab, mode=mode), lambda v: v == 1)
    assert prometheus.query(fwd) >= before
    assert prometheus.wait_for(enabled, lambda v: v >= enables + 1) == enables + 1
    proc = ping(lab.nodes[0].pods[0].netns, lab.nodes[1].pods[0].ip, count=PINGS,
                interval=0.01)
    assert f"{PINGS} received" in proc.stdout, proc.stdout
    prometheus.wait_for(fwd, lambda v: v >= before + 2 * PINGS)   # out and back, node1
    for name in ("forward_packets", "drop_packets", "stack_packets", "forward_bytes",
                 "program_runs"):
        assert prometheus.query(f"sum(resets(hostrouting_{name}_total"
                                f'{{lab="{lab.lab}"}}[5m]))') == 0, name


def test_a_blocked_firewall_change_is_counted(prometheus, lab):
    node1 = lab.nodes[0].netns
    blocked = total("hostrouting_blocked_rules_total", lab, node="node1")
    before = prometheus.query(blocked) or 0
    netns.run(node1, ["iptables-nft", "-A", "FORWARD", "-s", "198.18.9.8", "-j", "DROP"])
    prometheus.wait_for(blocked, lambda v: v >= before + 1)


def test_the_documented_queries_and_the_dashboard_run(prometheus, lab):
    docs = (REPO / "docs" / "metrics.md").read_text()
    prometheus.wait_for(series("hostrouting_rule_guard_up", lab), lambda v: v == 1)
    for promql in re.findall(r"```promql\n(.*?)```", docs, re.S):
        if " unless " in promql:        # the alert: no series while the lab is healthy
            assert prometheus.query(f"count({promql})") is None, promql
        else:                           # valid, and on metrics that exist
            prometheus.wait_for(f"count({promql})", lambda v: v > 0)
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            promql = target["expr"].replace("$lab", lab.lab).replace("$__rate_interval", "1m")
            if "blocked_rules" in promql:               # none unless a rule was blocked
                prometheus.query(promql)
            else:
                prometheus.wait_for(f"count({promql})", lambda v: v > 0)


def test_a_lab_that_goes_away_leaves_metrics(exporter, make_lab):
    _, topo = make_lab("legacy", nodes=1, pods_per_node=1)
    mode = f'hostrouting_mode{{lab="{topo.lab}",mode="legacy"}} 1.0'
    assert mode in http_get(exporter)           # appeared: legacy mode, no datapath series
    lab_down(topo.lab)
    assert f'lab="{topo.lab}"' not in http_get(exporter)


def test_scrape_cost_of_a_4x8_lab_with_100000_nat_entries(make_lab):
    """The figure in docs/metrics.md (printed with -s); no time is asserted: a loaded CI
    machine would make that flaky, and the answer's content is what must hold."""
    from datapath import shared_types as st
    from datapath.nat_table import twin_key
    from prometheus_client.parser import text_string_to_metric_families
    state, topo = make_lab("ebpf", nodes=4, pods_per_node=8)
    per_node = 100_000 // len(topo.nodes) // 2                  # flows: two entries each
    now = time.monotonic_ns()
    for node in topo.nodes:
        with switch.node_maps(state, node) as maps:
            for i in range(per_node):
                pod = node.pods[i % len(node.pods)]
                key = st.NatKey(pod.ip, topo.external.ip, 10000 + i // len(node.pods), 443,
                                socket.IPPROTO_TCP, "out")
                out = st.NatEntry(created_ns=now, last_seen_ns=now, packets=1, bytes=60,
                                  addr=node.ip, port=1024 + i, state=1)   # established
                maps.nat_update(key, out)
                maps.nat_update(twin_key(key, out), st.NatEntry(
                    created_ns=now, last_seen_ns=now, packets=1, bytes=60, addr=pod.ip,
                    port=key.sport, state=1))
    proc = subprocess.Popen([*CLI, "metrics", "serve", "--lab", topo.lab, "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" on ", 1)[1].strip()
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            text = http_get(url)
            seconds.append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    entries = sum(s.value for f in text_string_to_metric_families(text)
                  if f.name == "hostrouting_nat_entries" for s in f.samples)
    assert entries == 100_000
    print(f"\nscrape of a {len(topo.nodes)}x{len(topo.nodes[0].pods)} lab with {entries:,.0f} NAT "
          f"entries: median {sorted(seconds)[2] * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms, "
          f"{len(text):,} bytes")
