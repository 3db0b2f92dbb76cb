"""bench --profile: what perf script printed, aggregated into the path's top kernel symbols and
folded stacks, the side-by-side report, and the errors before anything is built. The samples
below are lines of ``perf script -F comm,ip,sym`` of a bench recording (perf 6.1, kernel 6.18),
call chains shortened."""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest
from rich.console import Console

from datapath import cli
from datapath.bench import perf, report

SCRIPT = """\
netperf 
\tffffffffc0062075 bpf_prog_69c180c67260e88a_from_pod
\t          10ab59 __send

netperf 
\tffffffff81dfdd0b veth_xmit
\tffffffff81eb0f2c dev_hard_start_xmit
\t          10ab59 __send

netserver 
\tffffffff81ead43f __netif_receive_skb_core.constprop.0
\tffffffff81eae609 __netif_receive_skb_one_core

netserver 
\t           224b6 strcmp

ksoftirqd/1 
\tffffffff81dfdde8 veth_xmit
\tffffffff81369c0d handle_softirqs

netperf 
\tffffffff81f7d6b3 [unknown]

         swapper 
\tffffffff82240ddb pv_native_safe_halt
\tffffffff822428f5 default_idle

python3 
\t          12481e std::_Hashtable<int, std::pair<int const, int> >::_M_rehash
\t          14ced [unknown]

"""


def test_the_paths_kernel_symbols_by_self_share():
    samples = perf.parse_samples(SCRIPT)
    assert [comm for comm, _ in samples] == ["netperf", "netperf", "netserver", "netserver",
                                             "ksoftirqd/1", "netperf", "swapper", "python3"]
    assert samples[0][1] == [(0xffffffffc0062075, "bpf_prog_69c180c67260e88a_from_pod"),
                             (0x10ab59, "__send")]
    summary = perf.aggregate(samples)
    # on the path: netperf x3, netserver x2, ksoftirqd x1 (not swapper, not python3);
    # netserver's strcmp is user space: on the path, in the denominator, not a kernel symbol
    assert (summary["samples"], summary["path_samples"], summary["kernel_samples"]) == (8, 6, 5)
    top = {s["symbol"]: (s["samples"], s["self_pct"]) for s in summary["symbols"]}
    assert top == {"veth_xmit": (2, pytest.approx(100 * 2 / 6)),     # netperf and ksoftirqd
                   "bpf_prog_69c180c67260e88a_from_pod": (1, pytest.approx(100 / 6)),
                   "__netif_receive_skb_core.constprop.0": (1, pytest.approx(100 / 6)),
                   "[unknown]": (1, pytest.approx(100 / 6))}
    assert summary["symbols"][0]["symbol"] == "veth_xmit"             # largest first
    assert "dev_hard_start_xmit" not in top                           # a caller: not self time


def test_every_sample_is_folded_root_first_under_its_command():
    folded = perf.aggregate(perf.parse_samples(SCRIPT))["folded"]
    assert folded["netperf;__send;dev_hard_start_xmit;veth_xmit"] == 1
    assert folded["swapper;default_idle;pv_native_safe_halt"] == 1    # all samples, idle too
    assert sum(folded.values()) == 8


@pytest.mark.parametrize("text", ["\tffffffff81dfdd0b veth_xmit\n",      # a frame first
                                  "netperf \n\tnot-an-address veth_xmit\n"])
def test_what_is_not_perf_script_output_is_an_error(text):
    with pytest.raises(ValueError):
        perf.parse_samples(text)


def test_file_names_carry_the_size_only_where_it_varies():
    assert perf.file_stem("same-node", "TCP_STREAM", 16384, None, "ebpf") == \
        "same-node-TCP_STREAM-16384-ebpf"
    assert perf.file_stem("cross-node", "TCP_RR", None, "cross-cpu", "legacy") == \
        "cross-node-TCP_RR-cross-cpu-legacy"


def test_top_text_lists_every_symbol_with_its_share():
    summary = perf.aggregate(perf.parse_samples(SCRIPT))
    text = perf.top_text(summary, "same-node TCP_RR, ebpf")
    assert "6 of 8 samples on the path (netperf, netserver, ksoftirqd/*), 5 of them" in text
    assert text.splitlines()[3].split() == ["33.33", "2", "veth_xmit"]


def _profile(mode, symbols, test="TCP_RR"):
    return {"rules": 0, "scenario": "same-node", "test": test, "size": None, "pin": None,
            "mode": mode, "samples": 2000, "path_samples": 1000, "kernel_samples": 930,
            "perf_data": f"/tmp/p/same-node-{test}-{mode}.perf.data",
            "top": [{"symbol": s, "self_pct": pct, "samples": 1} for s, pct in symbols]}


def test_the_report_puts_legacy_and_ebpf_side_by_side():
    profiles = [_profile("legacy", [("nf_conntrack_in", 3.0), ("fib_table_lookup", 2.0)]),
                _profile("ebpf", [("bpf_prog_69c1_from_pod", 4.0), ("[unknown]", 1.0),
                                  ("veth_xmit", 0.5)]),
                _profile("limit", [("veth_xmit", 9.0)]),
                _profile("ebpf", [("x", 1.0)], test="TCP_CRR")]         # no legacy: no table
    points = report.side_by_side(profiles, "legacy", "ebpf", 15)
    assert len(points) == 1
    assert [(a and a["symbol"], b and b["symbol"]) for a, b in points[0]["rows"]] == [
        ("nf_conntrack_in", "bpf_prog_69c1_from_pod"), ("fib_table_lookup", "[unknown]"),
        (None, "veth_xmit")]
    out = io.StringIO()
    report.print_profiles(profiles, Console(file=out, width=200))
    text = out.getvalue()
    assert "Where the time goes, same-node TCP_RR" in text and "TCP_CRR" not in text
    row = next(line for line in text.splitlines() if "nf_conntrack_in" in line)
    assert "bpf_prog_69c1_from_pod" in row and "3.0" in row and "4.0" in row
    assert "[unknown]" in text                     # a symbol, not rich markup
    assert "legacy: 1,000 of 2,000 samples on the path, 93% in the kernel" in text


def test_a_failed_recording_is_named_and_the_others_still_print():
    profiles = [{**_profile("legacy", []), "error": "perf record exited 1: [boom]"},
                _profile("ebpf", [("veth_xmit", 1.0)])]
    out = io.StringIO()
    report.print_profiles(profiles, Console(file=out, width=200))
    assert "no profile of same-node TCP_RR legacy: perf record exited 1: [boom]" in out.getvalue()


def test_bench_profile_without_perf_is_one_line_naming_the_package(monkeypatch, tmp_path,
                                                                  capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    target = tmp_path / "prof"
    assert cli.main(["bench", "--quick", "--profile", str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hostrouting: error: --profile: perf not found: install linux-perf")
    assert len(err.splitlines()) == 1 and not target.exists()


def test_bench_profile_into_a_file_is_refused(tmp_path, capsys):
    if shutil.which("perf") is None:
        pytest.skip("perf not installed (Debian package linux-perf)")
    target = tmp_path / "a-file"
    target.write_text("x")
    assert cli.main(["bench", "--quick", "--profile", str(target)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_a_recording_of_a_busy_process_is_summarised(tmp_path):
    """perf itself, no lab: events on only while the process runs, then the three files."""
    if shutil.which("perf") is None:
        pytest.skip("perf not installed (Debian package linux-perf)")
    path = tmp_path / "busy-netperf.perf.data"
    with perf.Recording(path) as recording:
        with recording.enabled():
            subprocess.run(["python3", "-c", "sum(range(3000000))"], check=True)
    summary = perf.summarise(path, "busy")
    assert summary["samples"] > 0
    for key in ("perf_data", "folded", "top_text"):
        assert (tmp_path / summary[key].rsplit("/", 1)[1]).exists()
