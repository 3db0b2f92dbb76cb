"""Signals: the CLI unwinds on Ctrl-C/SIGTERM, but a process forked from it never does.

pyroute2 forks helpers (a netlink socket inside a namespace) and stops them
with SIGTERM. Before this was handled, such a child raised KeyboardInterrupt
through a copy of the CLI's stack and ran its clean-up (removing labs) while
the parent waited for it, which hung `bench` and tore labs down mid-build.
"""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from datapath import cli
    cli._MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, cli._interrupted)
    marker = sys.argv[1]
    try:
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except KeyboardInterrupt:
        with open(marker, "a") as f:
            f.write(f"cleanup in {'parent' if os.getpid() == cli._MAIN_PID else 'child'}\\n")
        print("parent unwound")
""")


def test_forked_child_exits_on_sigterm_and_parent_unwinds(tmp_path):
    marker = tmp_path / "cleanups"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(marker)], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == [f"child {128 + signal.SIGTERM}", "parent unwound"]
    assert marker.read_text() == "cleanup in parent\n"
