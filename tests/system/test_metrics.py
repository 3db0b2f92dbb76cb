"""hostrouting metrics without a lab: the exposition format, the docs, monotonic totals and
the one-line errors. With a lab and a real Prometheus: tests/lab/test_metrics.py."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from datapath.metrics import Totals, parse_listen

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "datapath.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30)


def test_every_metric_has_help_and_type_parses_and_is_documented():
    proc = cli("metrics", "dump", "--all-labs")
    assert proc.returncode == 0, proc.stderr
    families = list(text_string_to_metric_families(proc.stdout))
    names = {f.name for f in families}
    assert {"hostrouting_forward_packets", "hostrouting_drop_packets",
            "hostrouting_stack_packets", "hostrouting_nat_entries",
            "hostrouting_program_run_seconds", "hostrouting_mode"} <= names
    docs = (REPO / "docs" / "metrics.md").read_text()
    for family in families:
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert re.search(rf"^# HELP {exposed} \S", proc.stdout, re.M), exposed
        assert re.search(rf"^# TYPE {exposed} {family.type}$", proc.stdout, re.M), exposed
        assert family.documentation and family.type in ("counter", "gauge"), family
        assert f"`{exposed}`" in docs, f"{exposed} is not in docs/metrics.md"


def test_totals_never_go_down_when_the_source_changes_or_resets():
    t = Totals()
    key = ("forward", "packets", "node1", "from_pod", "redirect_peer")
    t.update(key, 10, source=7)
    t.update(key, 15, source=7)
    assert t.value(key) == 15
    t.update(key, 2, source=9)          # new programs (enable): count from zero again
    assert t.value(key) == 17
    t.update(key, 4, source=9)
    t.update(key, 5, source=11)         # a new source that already counted more
    assert t.value(key) == 4 + 15 + 5
    t.update(key, 0, source=11)         # the same maps, reset
    assert t.value(key) == 24


@pytest.mark.parametrize("text, expected", [("127.0.0.1:9962", ("127.0.0.1", 9962)),
                                            ("[::1]:0", ("::1", 0)),
                                            ("localhost:9100", ("localhost", 9100))])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9962", "127.0.0.1", "127.0.0.1:", ":9962", "host:9962",
                                  "127.0.0.1:65536", "127.0.0.1:-1", "1.2.3:80"])
def test_a_bad_listen_address_is_one_line(text):
    proc = cli("metrics", "serve", "--all-labs", "--listen", text)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "expected ADDRESS:PORT" in proc.stderr, proc.stderr


def test_a_port_in_use_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("metrics", "serve", "--all-labs", "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert proc.stderr == (f"hostrouting: error: cannot listen on 127.0.0.1:{port}: the port "
                           "is in use (another exporter? pick another port)\n")


@pytest.mark.parametrize("command", ["serve", "dump"])
def test_an_unknown_lab_is_one_line(command):
    proc = cli("metrics", command, "--lab", "nosuch")
    assert proc.returncode == 1
    assert proc.stderr == ("hostrouting: error: no lab named 'nosuch' (see: hostrouting lab "
                           "show --all)\n")
