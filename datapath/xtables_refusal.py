"""Loader for bpf_c/xtables_refusal.c: x_tables writes refused by the kernel.

`XtablesRefusal.start(cgroup_fd, netns_paths)` compiles the program, fills
`lab_netns` with the namespaces' cookies and attaches it to the cgroup v2 root
with a bpf_link. Nothing is pinned: the link is detached when its fd closes,
so the refusal lives exactly as long as the process holding it (the lab's
rule guard) and cannot outlive the lab, whether the guard is stopped by
`disable`, killed with the lab's namespaces, or SIGKILLed.

`ip netns exec` remounts /sys, hiding the cgroup mounts, so the cgroup v2 root
is opened by whoever starts the guard (`open_cgroup2_root()`) and its fd is
handed down.
"""

from __future__ import annotations

import os
import socket
from typing import Callable

from datapath import libbpf, shared_types as st
from datapath.bpf_build import BPF_DIR, compile_bpf, load_program
from netns_lab import netns

SOURCE = BPF_DIR / "xtables_refusal.c"
PROGRAM = "refuse_xtables_write"
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
SO_NETNS_COOKIE = 71        # uapi asm-generic/socket.h, Linux 5.14
MOUNTINFO = "/proc/self/mountinfo"

# level, optname -> the tool family whose table load it is
WRITERS = {(0, 64): "iptables-legacy", (41, 64): "ip6tables-legacy",
           (0, 96): "arptables-legacy", (0, 128): "ebtables-legacy"}


class RefusalUnavailable(RuntimeError):
    """The kernel or the machine cannot refuse x_tables writes (the reason says why)."""


def cgroup2_root(mountinfo: str = MOUNTINFO) -> str | None:
    """Where the cgroup v2 hierarchy's root is mounted (unified or hybrid layout), if anywhere."""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2" and fields[3] == "/":
                    return fields[4]
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_cgroup2_root() -> int:
    """An O_RDONLY fd of the cgroup v2 root; RefusalUnavailable when there is none."""
    path = cgroup2_root()
    if path is None:
        raise RefusalUnavailable("no cgroup v2 hierarchy is mounted")
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise RefusalUnavailable(f"cannot open {path}: {e.strerror}") from e


def netns_cookie(netns_path: str) -> int:
    """The kernel's cookie of a network namespace (as bpf_get_netns_cookie() sees it)."""
    def cookie() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                  "little")
    return netns.call_in(netns_path, cookie)


class XtablesRefusal:
    """The attached program, its maps and its link; close() detaches."""

    def __init__(self, bpf, link: libbpf.Fd, prog_id: int):
        self.bpf, self.link, self.prog_id = bpf, link, prog_id

    @classmethod
    def start(cls, cgroup_fd: int, cookies: list[int],
              before_attach=None) -> "XtablesRefusal":
        """Compile, load and attach; ``before_attach()``, when given, runs between the load
        (which takes a compile's time) and the attach."""
        try:
            bpf = compile_bpf(SOURCE)
            prog_fd = load_program(bpf, PROGRAM, BPF_PROG_TYPE_CGROUP_SOCKOPT,
                                   attach_type=libbpf.BPF_CGROUP_SETSOCKOPT)
        except Exception as e:
            raise RefusalUnavailable(f"cannot load {PROGRAM}: {e}") from e
        table = bpf["lab_netns"]
        for cookie in cookies:
            table[table.Key(cookie)] = table.Leaf(1)
        try:
            if before_attach is not None:
                before_attach()
        except BaseException:
            bpf.cleanup()
            raise
        try:
            link = libbpf.link_create(prog_fd, cgroup_fd, libbpf.BPF_CGROUP_SETSOCKOPT)
        except OSError as e:
            bpf.cleanup()
            raise RefusalUnavailable(f"cannot attach {PROGRAM} to the cgroup v2 root: "
                                     f"{e.strerror}") from e
        return cls(bpf, link, libbpf.prog_info(prog_fd).id)

    def on_refusal(self, callback: Callable[[st.XtRefusal], None]) -> None:
        """Call `callback` for each refused write, from poll()."""
        def sample(_ctx, data, size):
            callback(st.unpack_xt_refusal(bytes(st.ffi.buffer(st.ffi.cast("char *", data),
                                                              size))))
        self.bpf["refusals"].open_ring_buffer(sample)

    def poll(self, timeout_ms: int = 200) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def close(self) -> None:
        self.link.close()
        self.bpf.cleanup()


def describe(ev: st.XtRefusal) -> str:
    tool = WRITERS.get((ev.level, ev.optname), f"setsockopt {ev.level}/{ev.optname}")
    return f"{tool} write of table {ev.table or '?'} by {ev.comm}[{ev.pid}]"
