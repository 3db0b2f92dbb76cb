"""Tables stay whole when stdout is a pipe or a log (make demo | tee, CI logs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from datapath import cli_output

REPO = Path(__file__).resolve().parents[2]


def _lab(netns: str) -> dict:
    return {"name": "t1", "mode": "ebpf", "phase": "ready",
            "nodes": [{"name": "node1", "netns": netns, "ip": "198.18.0.11",
                       "pods": [{"name": "pod1", "netns": netns + "-pod1", "ip": "198.18.1.10"}]}],
            "external": {"netns": "t1-ext", "ip": "203.0.113.10"}}


@pytest.fixture
def piped(monkeypatch, capsys):
    """stdout captured, not a terminal: what rich sees under `| cat`."""
    monkeypatch.delenv("COLUMNS", raising=False)
    return capsys


def test_piped_table_keeps_its_natural_width(piped):
    netns = "t1-node1-" + "x" * 60      # a cell wider than 80 columns allow for the table
    cli_output.print_labs([_lab(netns)])
    text = piped.readouterr().out
    assert netns + "-pod1" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) > 80


def test_columns_is_honoured_when_set(piped, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    cli_output.print_labs([_lab("t1-node1-" + "x" * 60)])
    text = piped.readouterr().out
    assert "…" in text and max(len(line) for line in text.splitlines()) <= 80


def test_terminal_width_is_the_terminals(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(cli_output, "Console",
                        lambda **kw: Console(force_terminal=True, width=60, file=io.StringIO(),
                                             **kw))
    assert cli_output.console().width == 60


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`hostrouting doctor --json | head -0`: exit 141 as filters do, no traceback."""
    env = {**os.environ, "HOSTROUTING_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "datapath.cli", "doctor", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    proc.stdout.close()         # before the command has imported anything, let alone printed
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
