"""What the running kernel offers eBPF host routing, asked of the verifier itself.

A trivial sched_cls program and one per helper the datapath calls
(bpf_redirect_peer, bpf_redirect_neigh, bpf_fib_lookup) are compiled with bcc
and loaded, so the answer is the kernel's, not a guess from its version.
Helpers are called by number, not by name, so the answer does not depend on
how old the kernel headers are. bcc and the verifier print to fd 2; that is
captured while probing and only the reason reaches the answer.

``hostrouting doctor`` probes every time (``Probes``, ``sched_cls``,
``helper``); ``known`` keeps the answer for the rest of the boot in the state
directory, since a running kernel's features do not change, and ``hostrouting
status`` would otherwise compile and load four programs on every call.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
from dataclasses import asdict, dataclass

from netns_lab.state import state_dir

from .bpf_build import capture_fd2

# Helper ids from include/uapi/linux/bpf.h, and the release that added each.
HELPERS = {
    "bpf_redirect_peer": (155, "5.10"),
    "bpf_redirect_neigh": (152, "5.10"),
    "bpf_fib_lookup": (69, "4.18"),
}
SCHED_CLS = "sched_cls program loads"
TCX = "TCX attach"

PROBE_SOURCE = r"""
int hr_probe_ok(struct __sk_buff *skb)
{
	return 0;
}

int hr_probe_redirect_peer(struct __sk_buff *skb)
{
	long (*redirect_peer)(__u32 ifindex, __u64 flags) = (void *)155;

	return redirect_peer(skb->ifindex, 0);
}

int hr_probe_redirect_neigh(struct __sk_buff *skb)
{
	long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)152;

	return redirect_neigh(skb->ifindex, 0, 0, 0);
}

int hr_probe_fib_lookup(struct __sk_buff *skb)
{
	long (*fib_lookup)(void *ctx, void *params, int plen, __u32 flags) = (void *)69;
	struct bpf_fib_lookup params;

	__builtin_memset(&params, 0, sizeof(params));
	params.family = 2;	/* AF_INET */
	params.ifindex = skb->ifindex;
	return fib_lookup(skb, &params, sizeof(params), 0) == 0 ? 0 : 2;
}
"""
PROBE_FUNCS = {
    SCHED_CLS: "hr_probe_ok",
    "bpf_redirect_peer": "hr_probe_redirect_peer",
    "bpf_redirect_neigh": "hr_probe_redirect_neigh",
    "bpf_fib_lookup": "hr_probe_fib_lookup",
}
CACHE_NAME = "kernel-features.json"


@dataclass(frozen=True)
class Feature:
    name: str       # SCHED_CLS or a helper's name
    ok: bool
    detail: str     # what loaded, or why not


def first_line(text: str) -> str:
    return next((l.strip() for l in text.splitlines() if l.strip()), "")


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines()
             if l.strip() and not l.startswith("processed ")]
    return lines[-1] if lines else ""


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line or "fatal" in line:
            return line.strip()
    return first_line(text)


def explain_rejection(exc: str, log: str, min_kernel: str | None = None) -> str:
    if re.search(r"Operation not permitted|Permission denied", exc + log):
        return "not permitted to load BPF programs (needs root: CAP_BPF and CAP_NET_ADMIN)"
    if re.search(r"invalid func unknown#\d+|unknown func", log):
        need = f", needs Linux >= {min_kernel}" if min_kernel else ""
        return f"rejected by the verifier (helper unknown{need})"
    m = re.search(r"program of this type cannot use helper (\S+)", log)
    if m:
        return f"rejected by the verifier ({m.group(1)} is not allowed in sched_cls programs)"
    reason = _last_line(log)
    return f"rejected: {reason}" if reason else f"load failed: {exc}"


class Probes:
    """The probe programs, compiled once with bcc; ``load`` loads one as sched_cls."""

    def __init__(self) -> None:
        self.bpf = None
        self.import_error = ""
        self.compile_error = ""
        self.fds: dict[str, int] = {}
        try:
            from bcc import BPF
        except Exception as e:  # ImportError, or bcc's own failure to find libbcc
            self.import_error = f"{type(e).__name__}: {e}"
            return
        self.BPF = BPF
        with capture_fd2() as err:
            try:
                self.bpf = BPF(text=PROBE_SOURCE.encode(), cflags=["-w"])
            except Exception as e:
                self.compile_error = str(e)
        if self.bpf is None:
            self.compile_error = _first_error(err[0]) or self.compile_error

    def not_checked(self) -> str | None:
        if self.import_error:
            return f"not checked: bcc is not importable ({self.import_error})"
        if self.bpf is None:
            return f"not checked: bcc could not compile the probe programs: {self.compile_error}"
        return None

    def load(self, func: str) -> tuple[int | None, str, str]:
        """(fd or None, exception text, verifier log)."""
        with capture_fd2() as err:
            try:
                fn = self.bpf.load_func(func.encode(), self.BPF.SCHED_CLS)
            except Exception as e:
                fd, exc = None, str(e)
            else:
                fd, exc = fn.fd, ""
        if fd is not None:
            self.fds[func] = fd
        return fd, exc, err[0]

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def sched_cls(probes: Probes) -> Feature:
    skipped = probes.not_checked()
    if skipped:
        return Feature(SCHED_CLS, False, skipped)
    fd, exc, log = probes.load(PROBE_FUNCS[SCHED_CLS])
    if fd is not None:
        return Feature(SCHED_CLS, True, "a trivial BPF_PROG_TYPE_SCHED_CLS program loaded")
    return Feature(SCHED_CLS, False, explain_rejection(exc, log))


def helper(probes: Probes, name: str) -> Feature:
    skipped = probes.not_checked()
    if skipped:
        return Feature(name, False, skipped)
    number, min_kernel = HELPERS[name]
    fd, exc, log = probes.load(PROBE_FUNCS[name])
    if fd is not None:
        return Feature(name, True, f"helper #{number} accepted by the verifier in sched_cls")
    return Feature(name, False, f"{name}: {explain_rejection(exc, log, min_kernel)}")


def tcx() -> Feature:
    """Whether the kernel has TCX hooks (Linux >= 6.6): BPF_PROG_QUERY of tcx_ingress on
    the loopback device (ifindex 1 in every namespace), which reads and changes nothing.
    No program is needed; the doctor attaches one for real."""
    from . import libbpf
    try:
        libbpf.prog_query(1, libbpf.BPF_TCX_INGRESS)
    except OSError as e:
        if e.errno == errno.EPERM:
            return Feature(TCX, False, "not permitted to query BPF attachments (needs root)")
        return Feature(TCX, False, f"BPF_PROG_QUERY of tcx_ingress: {e.strerror} (TCX needs "
                                   "Linux >= 6.6): programs attach as clsact filters")
    return Feature(TCX, True, "tcx_ingress hooks answer BPF_PROG_QUERY")


def _probe() -> tuple[list[Feature], bool]:
    """Every feature, loaded for real now; and whether the verifier answered them all."""
    probes = Probes()
    try:
        return [sched_cls(probes)] + [helper(probes, name) for name in HELPERS], \
            probes.not_checked() is None
    finally:
        probes.close()


def _boot_key() -> str:
    """Which kernel run, and which probes, an answer belongs to."""
    with contextlib.suppress(OSError):
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        probes = hashlib.sha256(json.dumps([PROBE_SOURCE, HELPERS]).encode()).hexdigest()
        return f"{boot} {platform.release()} {probes[:16]}"
    return ""


def known() -> list[Feature]:
    """Every feature, probed once per boot and kept in the state directory.

    Only the verifier's answers are kept: when bcc is missing or cannot compile
    the probes, nothing was learnt about the kernel and the next call asks again.
    """
    key = _boot_key()
    path = state_dir() / CACHE_NAME
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads(path.read_text())
        if key and saved["key"] == key:
            return [Feature(**f) for f in saved["features"]]
    found, answered = _probe()
    if key and answered:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "features": [asdict(f) for f in found]}))
            os.replace(tmp, path)
    return found
