"""Processes a lab starts, known by identity rather than by a bare pid.

A pid alone names whatever process has it now: after the one we started ends,
the kernel hands the number to the next process. So a process is recorded as
its pid *and* its start time (field 22 of ``/proc/<pid>/stat``, in clock ticks
since boot), and is signalled only while both still match and its command line
is the one expected. Pidfiles are JSON, written atomically; their mtime is the
process's heartbeat.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import faults


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None      # field 22: state is field 3, index 0


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None       # field 4


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


@dataclass(frozen=True)
class Process:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> "Process | None":
        started = start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        """Still this process (not a later one with its pid), and not a zombie."""
        fields = _stat_fields(self.pid)
        return bool(fields) and fields[0] != "Z" and int(fields[19]) == self.start_time

    def runs(self, *words: str) -> bool:
        """Alive, and its command line holds each of these words."""
        argv = cmdline(self.pid)
        return self.alive() and all(w in argv for w in words)

    def stop(self, *words: str, timeout: float = 5) -> bool:
        """SIGTERM its process group (where it leads one: started in a session of its own;
        else itself), then SIGKILL; every signal only while it is still this process running
        these words. Returns whether it was running."""
        if not self.runs(*words):
            return False
        faults.point(f"stop pid {self.pid}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.runs(*words):
                break
            try:
                if os.getpgid(self.pid) == self.pid:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.02)
        try:   # our own child: reap it
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return True


def find(*words: str, where=None) -> list[Process]:
    """Every process whose command line holds all these words, and satisfies
    ``where(argv)`` when given (this process excepted)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        argv = cmdline(pid)
        if argv and all(w in argv for w in words) and (where is None or where(argv)):
            proc = Process.of(pid)
            if proc is not None and proc.alive():
                found.append(proc)
    return found


def outermost(found: list[Process]) -> list[Process]:
    """Those of ``found`` whose parent is not among them (a daemon's own child process goes
    with it: signalled alone, it would be started again)."""
    pids = {p.pid for p in found}
    return [p for p in found if parent_pid(p.pid) not in pids]


def write_pidfile(path: Path, pid: int | None = None, **details) -> None:
    """This process's identity (or that of ``pid``, the process it works for) and details,
    replaced atomically (readers never see half)."""
    me = Process.of(os.getpid() if pid is None else pid)
    if me is None:
        raise ProcessLookupError(f"no process {pid}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": me.pid, "start_time": me.start_time, **details}))
    os.replace(tmp, path)


def read_pidfile(path: Path) -> tuple[Process, dict, float] | None:
    """(process, the file's details, seconds since its last heartbeat), or None when there
    is no readable pidfile."""
    try:
        data = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
        return Process(int(data.pop("pid")), int(data.pop("start_time"))), data, age
    except (OSError, ValueError, KeyError, TypeError):
        return None

