"""Deterministic fault injection at the calls that change the kernel.

Every call that changes a lab's kernel state (a command run in a namespace,
a netlink change, a namespace created or removed, a BPF map update, a TC
attach or detach, the rule guard started) passes ``point(what)`` first. The
tests of issue 16 use two environment variables:

- ``HOSTROUTING_FAULT_TRACE=FILE``: every point appends one line (its number
  and what it was about to do), so a test learns how many points a command
  passes;
- ``HOSTROUTING_FAULT_AT=K``: at the K-th point (1-based) the process sends
  itself SIGKILL: no ``finally``, no rollback, no atexit, children (the
  guard) left running, exactly as a kill from outside at that point.

With neither set a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

AT_ENV = "HOSTROUTING_FAULT_AT"
TRACE_ENV = "HOSTROUTING_FAULT_TRACE"

_count = 0


def point(what: str) -> None:
    """Called before each kernel-changing call; ends the process at the chosen one."""
    at, trace = os.environ.get(AT_ENV), os.environ.get(TRACE_ENV)
    if not at and not trace:
        return
    global _count
    _count += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_count} {os.getpid()} {what}\n")
    if at and _count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
