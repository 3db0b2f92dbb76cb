"""The bench's netperf workloads: the command lines and the parsing of what netperf prints
(the output lines below are netperf 2.7.0's, from runs in a lab)."""

from __future__ import annotations

import io

import pytest

from datapath.bench import netperf, runner


def test_workloads_and_their_command_lines():
    assert netperf.split_workload("TCP_STREAMx16") == ("TCP_STREAM", 16)
    assert netperf.split_workload("UDP_RR") == ("UDP_RR", 1)
    stream = netperf.argv_for("10.0.0.2", "TCP_STREAM", 5, 64)
    options = stream[stream.index("--"):]
    assert "-D" in options and options[-2:] == ["-m", "64"]        # no Nagle: 64 B segments
    udp = netperf.argv_for("10.0.0.2", "UDP_STREAM", 5, 64)
    assert udp[udp.index("--"):][-4:] == ["-R", "1", "-m", "64"]   # routed, 64 B datagrams
    rr = netperf.argv_for("10.0.0.2", "UDP_RR", 5, 256)
    assert rr[-2:] == ["-r", "256,256"] and "-D" not in rr
    flows = netperf.argv_for("10.0.0.2", "TCP_STREAM", 5, 16384, demo=True)
    assert flows[flows.index("-D"):flows.index("-D") + 2] == ["-D", "-0.2"]
    assert flows.index("-D") < flows.index("--")                   # the global -D: demo mode


def test_every_tcp_test_names_its_congestion_control_at_both_ends():
    for test in ("TCP_STREAM", "TCP_RR", "TCP_CRR"):
        argv = netperf.argv_for("10.0.0.2", test, 5, 1024, congestion="cubic")
        assert argv[argv.index("--"):][-2:] == ["-K", "cubic,cubic"], argv
    # a UDP socket has none, and None leaves the namespace's default
    assert "-K" not in netperf.argv_for("10.0.0.2", "UDP_RR", 5, 1, congestion="cubic")
    assert "-K" not in netperf.argv_for("10.0.0.2", "TCP_STREAM", 5, 1024)
    flows = netperf.argv_for("10.0.0.2", "TCP_STREAM", 5, 16384, demo=True, congestion="reno")
    assert flows[-2:] == ["-K", "reno,reno"]
    assert runner.BenchConfig().congestion == "cubic"             # the bench's default
    assert runner.BenchConfig(tcp_cc="inherit").congestion is None


def test_a_congestion_control_the_kernel_lacks_is_refused_with_those_it_has(tmp_path,
                                                                           monkeypatch):
    # netperf -K with an unknown name runs the namespace's default without a word
    listing = tmp_path / "available"
    listing.write_text("reno cubic\n")
    monkeypatch.setattr(netperf, "AVAILABLE_CC", str(listing))
    netperf.check_congestion("cubic")
    with pytest.raises(ValueError, match=r"'bbr' is not available .*available: reno cubic"):
        netperf.check_congestion("bbr")
    with pytest.raises(ValueError, match="under three letters"):
        netperf.check_congestion("lp")      # netperf 2.7 would set it at the client only

    def build(self, *a, **k):
        raise AssertionError("a lab was built")
    monkeypatch.setattr(runner.Bench, "setup", build)
    with pytest.raises(ValueError, match="'bbr' is not available"):
        runner.run_bench(runner.BenchConfig(tcp_cc="bbr"))      # before any lab is built


def test_stream_and_rr_runs_read_back_the_congestion_control_of_both_ends():
    assert netperf.ran_congestion("TCP_STREAM", "9000.1,1000,cubic,cubic\n", "cubic") == "cubic"
    assert netperf.ran_congestion("TCP_RR", "1,2,3,4,5,6,bbr,bbr\n") == "bbr"    # inherit
    assert netperf.ran_congestion("UDP_RR", "1,2,3,4,5,6\n", "cubic") is None
    # netperf prints none for TCP_CRR (its sockets are closed when it reads them), and
    # printed none once for a short TCP_STREAM through a lossy path: not known, not wrong
    assert netperf.ran_congestion("TCP_CRR", "1,2,3\n", "cubic") is None
    assert netperf.ran_congestion("TCP_STREAM", "9000.1,1000,,\n", "cubic") is None
    # an end that did not take the name runs its namespace's default
    with pytest.raises(ValueError, match="ran cubic at netperf and bbr at netserver"):
        netperf.ran_congestion("TCP_RR", "1,2,3,4,5,6,cubic,bbr\n", "cubic")
    with pytest.raises(ValueError, match="ran bbr at netperf and bbr at netserver, not cubic"):
        netperf.ran_congestion("TCP_STREAM", "9000.1,1000,bbr,bbr\n", "cubic")


def test_udp_stream_reports_packets_per_second_received_and_sent():
    values = netperf.parse_result("UDP_STREAM", "66.27,265917,129455,1.00\n")
    assert values["mbps"] == 66.27
    assert values["pps"] == 129455 and values["sent_pps"] == 265917


@pytest.mark.parametrize("test, line", [("TCP_RR", "12591.92,63,96,300,79.32,129528,cubic,cubic"),
                                        ("UDP_RR", "12591.92,63,96,300,79.32,129528")])
def test_request_response_reports_percentiles_and_the_maximum(test, line):
    values = netperf.parse_result(test, line + "\n")
    assert values == {"tps": 12591.92, "p50_us": 63, "p90_us": 96, "p99_us": 300,
                      "mean_us": 79.32, "max_us": 129528}
    assert "p999_us" not in values   # netperf 2.7.0 has no selector for it


@pytest.mark.parametrize("out", ["", "establish_control could not establish the control "
                                 "connection\n", "12591.92,63,96\n", "12591.92,63,96,300,79.32,129528\n",
                                 "a,b,c,d,e,f,cubic,cubic\n"])
def test_what_is_not_a_result_is_an_error(out):
    with pytest.raises(ValueError):
        netperf.parse_result("TCP_RR", out)


def test_concurrent_flows_are_summed_over_the_window_all_of_them_ran():
    # flow A reports 0.0-1.0 at 100 and 1.0-2.0 at 300; flow B started 0.5 s later
    a = netperf.parse_interim("100.00,10^6bits/s,1.000,1001.000\n"
                              "300.00,10^6bits/s,1.000,1002.000\n100,2000\n")
    b = netperf.parse_interim("200.00,10^6bits/s,1.000,1001.500\n"
                              "200.00,10^6bits/s,0.500,1002.000\n")
    assert a == [(1000.0, 1001.0, 100.0), (1001.0, 1002.0, 300.0)]
    mbps, start, end = netperf.common_window([a, b])
    assert (start, end) == (1000.5, 1002.0)
    # A: 0.5 s at 100 + 1 s at 300; B: 1 s at 200 + 0.5 s at 200 -> 650 Mbit in 1.5 s
    assert mbps == pytest.approx((50 + 300 + 300) / 1.5)


def test_flows_that_never_overlapped_are_an_error():
    a = [(0.0, 1.0, 100.0)]
    b = [(2.0, 3.0, 100.0)]
    with pytest.raises(ValueError, match="same time"):
        netperf.common_window([a, b])
    with pytest.raises(ValueError, match="no common window"):
        netperf.common_window([a, []])


def test_the_report_has_a_table_for_every_workload_and_names_the_node_profile():
    from rich.console import Console

    from datapath.bench import report
    assert set(report.METRICS) == set(report.TITLES) == set(netperf.WORKLOADS)
    values = {"UDP_STREAM": {"mbps": 39.2, "pps": 76431.0, "sent_pps": 163584.0},
              "TCP_STREAMx4": {"mbps": 3099.0, "flows": 4}, "UDP_RR": {"tps": 12591.0}}
    samples = [{"rules": 45, "scenario": "same-node", "mode": mode, "test": test,
                "size": netperf.FIXED_SIZE.get(test), "repeat": rep, "values": v,
                "seconds": 1.0, "cpu_s": 0.5, "cpu_window_s": 1.0}
               for test, v in values.items() for mode in ("legacy", "ebpf") for rep in range(2)]
    profile = {"name": "kube-proxy:2x3", "labs": {
        "hrbl": {"rules_per_node": 45, "conntrack_per_node": 0},
        "hrbe": {"rules_per_node": 45, "conntrack_per_node": 0, "ebpf_forced": True}}}
    result = report.with_summary({"environment": {
        "config": {"duration": 1.0, "repeat": 2}, "modes": ["legacy", "ebpf"], "kernel": "k",
        "cpu": "c", "cores": 2, "node_profile": profile}, "samples": samples,
        "lab_settings": {"attach": {"node1/eth0": "tcx", "node1/veth1": "tcx"}}})
    out = io.StringIO()
    report.print_tables(result, Console(file=out, width=200))
    text = out.getvalue()
    assert "node profile kube-proxy:2x3: 45 iptables rules" in text and "--force" in text
    assert "64 B packets/s received" in text and "16384 B Mbit/s" in text
    assert "Request/response over UDP (UDP_RR)" in text
    assert "eBPF programs attached with: tcx\n" in text


def test_a_counted_test_runs_n_transactions_and_its_elapsed_time_comes_from_its_rate():
    argv = netperf.argv_for("10.0.0.2", "TCP_CRR", 1, None, transactions=24000)
    assert argv[argv.index("-l") + 1] == "-24000"       # netperf: a negative length is a count
    assert netperf.argv_for("10.0.0.2", "TCP_CRR", 1, None)[argv.index("-l") + 1] == "1"
    # netperf prints ELAPSED_TIME to the hundredth; the rate is transactions over the
    # precise elapsed time, so the elapsed time is taken back from it
    values = netperf.parse_result("TCP_CRR", "21856.97,48,120\n")
    assert netperf.counted_elapsed(values, 1000) == pytest.approx(1000 / 21856.97)
    assert values["transactions"] == 1000 and values["elapsed_s"] == pytest.approx(0.045752)
    with pytest.raises(ValueError, match="rate of 0"):
        netperf.counted_elapsed({"cps": 0.0}, 1000)


@pytest.mark.parametrize("rate, seconds, count", [(21857.0, 1.0, 21857), (21857.0, 5.0, 109285),
                                                  (8000.4, 0.5, 4000), (30.0, 1.0, 100)])
def test_the_count_lasts_the_duration_at_the_first_runs_rate(rate, seconds, count):
    assert netperf.transactions_for(rate, seconds) == count     # at least MIN_TRANSACTIONS


def test_the_bench_sizes_a_counted_test_once_per_point_and_mode(monkeypatch):
    runs = []

    def run_test(ns, host, test, duration, size=None, port=None, cpus=None, transactions=None,
                 family=4, congestion=None):
        runs.append((ns, test, transactions, congestion))
        rate = {"a": 20000.0, "b": 30000.0}[ns]
        return netperf.Result({"cps": rate}, 0.2, transactions / rate)

    monkeypatch.setattr(netperf, "run_test", run_test)
    bench = runner.Bench(runner.BenchConfig(duration=2.0))
    crr = runner.Point(0, "same-node", "TCP_CRR")
    assert bench.transactions(crr, "legacy", "a", "h") == 40000
    assert bench.transactions(crr, "ebpf", "b", "h") == 60000       # each mode its own count
    assert bench.transactions(crr, "legacy", "a", "h") == 40000     # the first run, once
    # the first run too with the bench's congestion control
    assert runs == [("a", "TCP_CRR", netperf.CALIBRATION_TRANSACTIONS, "cubic"),
                    ("b", "TCP_CRR", netperf.CALIBRATION_TRANSACTIONS, "cubic")]
    assert bench.transactions(runner.Point(0, "same-node", "TCP_RR"), "legacy", "a", "h") is None
    assert len(runs) == 2                                           # timed tests need none


def test_the_cpu_time_of_n_flows_is_read_over_the_window_all_of_them_ran(monkeypatch,
                                                                         no_tcp_counters):
    windows = []

    class Cpu:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def between(self, start, end):
            windows.append((start, end))
            return end - start, [0.5, 0.25], 0.0

    now = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(runner, "CpuReader", Cpu)
    monkeypatch.setattr(runner.Bench, "empty_connection_tables", lambda self, mode: None)
    # four flows whose common window opened 0.4 s after they were started and lasted 4.2 s
    monkeypatch.setattr(netperf, "run_test", lambda *a, **k: netperf.Result(
        {"mbps": 900.0, "window_s": 4.2, "flows": 4}, 5.1, 4.2, 0.4))
    bench = runner.Bench(runner.BenchConfig(duration=5.0))
    sample = bench._measure_once(runner.Point(0, "same-node", "TCP_STREAMx4"), "legacy", 0,
                                 "ns", "h", [])
    assert windows == [(100.4, 100.0 + 0.4 + 4.2 - runner.END_EDGE_S)]
    # a single run is measured from its start, the control connection's edge left out
    monkeypatch.setattr(netperf, "run_test", lambda *a, **k: netperf.Result(
        {"mbps": 900.0}, 5.1, 5.0))
    bench._measure_once(runner.Point(0, "same-node", "TCP_STREAM", 16384), "legacy", 0,
                        "ns", "h", [])
    assert windows[1] == (100.0 + runner.START_EDGE_S, 105.0 - runner.END_EDGE_S)
    assert sample.cpu_s == 0.75
