"""Running things inside a named network namespace.

Everything here acts only inside the namespace it is given; nothing touches
the namespace of the calling process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from pyroute2 import IPRoute, netns as pr_netns

from . import faults

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    """A command inside a namespace failed; the message carries its stderr."""


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create(name: str) -> None:
    if exists(name):
        raise NetnsError(f"network namespace {name!r} exists already "
                         "(a crashed lab? run: hostrouting lab down --all)")
    faults.point(f"create netns {name}")
    pr_netns.create(name)


# pyroute2 calls whose first argument is one of these only read
_READ_COMMANDS = {"get", "dump", "show", "list"}


class CountedIPRoute:
    """An IPRoute whose changes (link/addr/route/tc add, set, del) pass faults.point."""

    def __init__(self, sock: IPRoute):
        self._sock = sock

    def __getattr__(self, attr):
        value = getattr(self._sock, attr)
        if attr not in ("link", "addr", "route", "tc", "rule", "neigh"):
            return value

        def counted(command, *args, **kwargs):
            if command not in _READ_COMMANDS:
                faults.point(f"netlink {attr} {command}")
            return value(command, *args, **kwargs)
        return counted

    def __enter__(self) -> "CountedIPRoute":
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close()


def call_in(name: str, fn):
    """fn() run in the namespace (a name, or a path such as /proc/PID/ns/net) by a thread of
    its own that ends afterwards, so the calling process never changes namespace; for calls
    that act on the caller's namespace (a bpf(2) attach by ifindex). Returns fn's result."""
    import ctypes
    import threading
    path = name if "/" in name else os.path.join(NETNS_DIR, name)
    result: dict = {}

    def run_in() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:      # raised again in the caller
            result["error"] = e

    t = threading.Thread(target=run_in, name=f"in netns {name}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def ipr(name: str) -> CountedIPRoute:
    """A netlink socket inside the namespace; flags=0 so a missing one is an error."""
    return CountedIPRoute(IPRoute(netns=name, flags=0))


def run(name: str, argv: list[str], check: bool = True, timeout: float = 30,
        input: str | None = None, changes: bool = True) -> subprocess.CompletedProcess:
    """argv inside the namespace; changes=False for a command that only reads (it is not
    a fault-injection point)."""
    if changes:
        faults.point(f"in {name}: {' '.join(argv)[:80]}")
    try:
        proc = subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True,
                              text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"in netns {name}: {' '.join(argv)}: did not finish within "
                         f"{timeout:g}s (killed)") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"in netns {name}: {' '.join(argv)}: exit {proc.returncode}: "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def sysctl(name: str, settings: dict[str, str | int]) -> None:
    if settings:  # nothing to set (a node without pods) is not an error
        run(name, ["sysctl", "-qw", *[f"{k}={v}" for k, v in settings.items()]])


def read_sysctl(name: str, key: str) -> str:
    return run(name, ["sysctl", "-n", key], changes=False).stdout.strip()


def pids(name: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()]


def _same_netns(path_a: str, path_b: str) -> bool:
    a, b = os.stat(path_a), os.stat(path_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def kill_all(name: str, timeout: float = 2.0) -> None:
    """Stop every process inside the namespace (SIGTERM, then SIGKILL).

    Refuses when the name resolves to the caller's own network namespace: a
    stray bind mount must never turn lab clean-up into killing the host.
    """
    if _same_netns(os.path.join(NETNS_DIR, name), "/proc/self/ns/net"):
        raise NetnsError(f"network namespace {name!r} is this process's own namespace: "
                         "not killing its processes")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids(name) if p != os.getpid()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p in pids(name) for p in left):
            time.sleep(0.02)


def remove(name: str) -> bool:
    """Remove the namespace and everything in it; False when it was not there."""
    if not exists(name):
        return False
    faults.point(f"remove netns {name}")
    kill_all(name)
    pr_netns.remove(name)
    return True


def ifindex(ipr_sock: IPRoute, ifname: str) -> int:
    found = ipr_sock.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"no interface {ifname!r}")
    return found[0]


def link_mac(ipr_sock: IPRoute, index: int) -> str:
    link = ipr_sock.get_links(index)[0]
    return link.get_attr("IFLA_ADDRESS")
