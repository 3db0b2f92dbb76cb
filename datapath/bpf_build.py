"""Compile BPF C with bcc and load programs, turning failures into readable errors.

bcc (and clang inside it) print diagnostics and the verifier log straight to
the process's file descriptor 2, not to a Python stream. While compiling and
loading, fd 2 is therefore pointed at a temporary file at the OS level and
restored afterwards; what was captured goes into the exception message (and
is passed on to the real stderr when nothing went wrong, so warnings are not
lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = REPO_ROOT / "bpf_c"
INCLUDE_DIR = BPF_DIR / "include"

#: Lines of verifier log kept in VerifierError.
VERIFIER_TAIL_LINES = 20


class BpfBuildError(RuntimeError):
    """Base class of everything this module raises."""


class KernelHeadersMissing(BpfBuildError):
    """bcc needs the kernel headers under /lib/modules/<release>/{build,source}."""


class BccMissing(BpfBuildError):
    """The distro's python3-bpfcc is not importable (venv without system site packages?)."""


class BpfCompileError(BpfBuildError):
    """clang rejected the source; the message carries its diagnostics (file:line: error: ...)."""

    def __init__(self, source: str, diagnostics: str):
        self.source = source
        self.diagnostics = diagnostics
        super().__init__(f"compiling {source} failed:\n{diagnostics.rstrip() or '(no diagnostics)'}")


class VerifierError(BpfBuildError):
    """The kernel refused to load a program; log_tail is the end of the verifier log."""

    def __init__(self, program: str, log_tail: str, errno_: int | None = None):
        self.program = program
        self.log_tail = log_tail
        self.errno = errno_
        reason = f" ({os.strerror(errno_)})" if errno_ else ""
        super().__init__(f"the verifier rejected program {program!r}{reason}; "
                         f"last lines of its log:\n{log_tail.rstrip() or '(empty log)'}")


# bcc reports load failures as text ("...: Permission denied"); map it back to an errno.
_STRERROR_TO_ERRNO = {os.strerror(n): n for n in range(1, 134)}


@contextlib.contextmanager
def capture_fd2():
    """Redirect file descriptor 2 into a temporary file; yields a list filled with the text."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


_ARCH_DIRS = {"x86_64": "x86", "i686": "x86", "aarch64": "arm64", "armv7l": "arm",
              "riscv64": "riscv", "ppc64le": "powerpc", "s390x": "s390"}


def check_kernel_headers(release: str | None = None) -> Path:
    """The header tree bcc compiles against (/lib/modules/<release>/build); raises
    KernelHeadersMissing naming what is absent, where bcc's own error says much less.

    bcc compiles against /lib/modules/<release>/build (generated headers of a
    configured tree) and .../source (the rest); both must exist, links resolved.
    This is the one rule for "kernel headers present": ``enable`` compiles only
    when it holds, and ``hostrouting doctor`` reports it. (bcc itself would also
    try BCC_KERNEL_SOURCE or /sys/kernel/kheaders.tar.xz, which this rule does not
    accept: the datapath was never built that way.)
    """
    release = release or platform.release()
    base = Path("/lib/modules") / release
    missing = [str(base / sub) for sub in ("build", "source") if not (base / sub).exists()]
    if not missing:
        needed = [("source", "include/uapi/linux/bpf.h")]
        arch = _ARCH_DIRS.get(platform.machine())
        if arch:
            needed.append(("build", f"arch/{arch}/include/generated/uapi/asm"))
        for sub, rel in needed:
            if not (base / sub / rel).exists() and not (base / "build" / rel).exists():
                missing.append(str(base / sub / rel))
    if missing:
        raise KernelHeadersMissing(
            f"kernel headers for {release} are missing: {', '.join(missing)} "
            "(install linux-headers for this kernel, or link a compatible header tree "
            "there: see scripts/provision.sh)")
    return base / "build"


def _import_bcc():
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise BccMissing("cannot import bcc: install python3-bpfcc and use a venv made with "
                         f"--system-site-packages ({e})") from e
    return bcc


def default_cflags() -> list[str]:
    return [f"-I{INCLUDE_DIR}", "-Wno-unused-function"]


#: Texts known to compile here. Kept on disk too (HOSTROUTING_CACHE_DIR, else
#: /var/cache/ebpf-hostrouting), keyed by everything that decides the outcome, so a
#: later process skips the child's compile: each is a second or two of CPU.
_COMPILED_OK: set[str] = set()
_COMPILED_OK_FILE = "bpf-compiled-ok"


def _compile_key(bcc, text: str, flags: list[str]) -> str:
    h = hashlib.sha256("\0".join([text, *flags, getattr(bcc, "__version__", ""),
                                   platform.release()]).encode())
    for header in sorted(INCLUDE_DIR.glob("*.h")):  # what the text #includes
        h.update(header.name.encode() + b"\0" + header.read_bytes())
    return h.hexdigest()


def _compiled_ok_path() -> Path:
    return Path(os.environ.get("HOSTROUTING_CACHE_DIR", "/var/cache/ebpf-hostrouting"),
                _COMPILED_OK_FILE)


def _known_to_compile(digest: str) -> bool:
    if digest in _COMPILED_OK:
        return True
    with contextlib.suppress(OSError):
        if digest in _compiled_ok_path().read_text().split():
            _COMPILED_OK.add(digest)
            return True
    return False


def _remember_compiles(digest: str) -> None:
    _COMPILED_OK.add(digest)
    with contextlib.suppress(OSError):
        path = _compiled_ok_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if not path.exists() or path.stat().st_size < 64 * 1024 else "w"
        with open(path, mode) as f:     # one short line per append: atomic enough
            f.write(digest + "\n")


def _check_compiles_in_child(bcc, source: str, text: str, flags: list[str]) -> None:
    """Compile once in a forked child first: LLVM ends the whole process on some
    errors (a program over the 512-byte stack, say) with exit(1), which would
    take the diagnostics and the caller with it. Passing texts are remembered,
    so a lab's nodes, and later runs, pay for this once."""
    digest = _compile_key(bcc, text, flags)
    if _known_to_compile(digest):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, report by exit status, diagnostics on the pipe
        try:
            os.close(rfd)
            os.dup2(wfd, 2)
            try:
                bcc.BPF(text=text.encode(), cflags=flags).cleanup()
            except BaseException:
                os._exit(3)
            os._exit(0)
        finally:
            os._exit(4)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        diag = pipe.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        _remember_compiles(digest)
        return
    if "No such file or directory" in diag and "/lib/modules" in diag:
        raise KernelHeadersMissing(f"bcc could not find kernel headers:\n{diag}")
    raise BpfCompileError(source, diag.strip() or
                          f"the compiler ended with status {os.waitstatus_to_exitcode(status)}")


def compile_bpf(source: Path | str, cflags: list[str] | None = None, text: str | None = None):
    """Compile a BPF C file (or `text`, named `source` in messages) with bcc; returns bcc.BPF.

    `cflags` are added after `-I bpf_c/include`. Raises BpfCompileError with clang's
    diagnostics, KernelHeadersMissing, or BccMissing.
    """
    bcc = _import_bcc()
    check_kernel_headers()
    source = Path(source)
    if text is None:
        try:
            text = source.read_text()
        except OSError as e:
            raise BpfCompileError(str(source), f"cannot read {source}: {e.strerror}") from e
    # bcc compiles the text as /virtual/main.c; a #line directive makes clang name the
    # real file (and the right line numbers) in its diagnostics.
    text = f'#line 1 "{source}"\n' + text
    flags = default_cflags() + list(cflags or [])
    _check_compiles_in_child(bcc, str(source), text, flags)
    with capture_fd2() as captured:
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=flags)
        except Exception as e:  # bcc raises a bare Exception("Failed to compile BPF module")
            err = e
        else:
            err = None
    diag = captured[0] if captured else ""
    if err is not None and "Failed to compile" not in str(err):
        raise err   # not a compiler verdict: a bug or a bcc problem, keep the traceback
    if err is not None:
        if "No such file or directory" in diag and "/lib/modules" in diag:
            raise KernelHeadersMissing(f"bcc could not find kernel headers:\n{diag}") from err
        raise BpfCompileError(str(source), diag or str(err)) from err
    if diag.strip():
        sys.stderr.write(diag)
    return bpf


def _verifier_tail(log: str, lines: int = VERIFIER_TAIL_LINES) -> str:
    kept = [line for line in log.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def load_program(bpf, name: str, prog_type: int | None = None, attach_type: int = -1) -> int:
    """Load function `name` of a compiled module as a program (SCHED_CLS by default;
    `attach_type` is the expected attach type some program types need at load).

    Returns the program fd (owned by the bcc.BPF object). Raises VerifierError with
    the last lines of the verifier log when the kernel refuses it.
    """
    bcc = _import_bcc()
    if prog_type is None:
        prog_type = bcc.BPF.SCHED_CLS
    with capture_fd2() as captured:
        try:
            fn = bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
        except Exception as e:
            err = e
        else:
            err = None
    log = captured[0] if captured else ""
    if err is not None and not str(err).startswith(("Failed to load BPF program",
                                                    "Unknown program")):
        raise err
    if err is not None:
        if "Unknown program" in str(err):
            raise BpfBuildError(f"no function {name!r} in the compiled module") from err
        m = re.search(r"Failed to load BPF program \S+: (.*)$", str(err))
        errno_ = _STRERROR_TO_ERRNO.get(m.group(1)) if m else None
        raise VerifierError(name, _verifier_tail(log) or str(err), errno_) from err
    if log.strip():
        sys.stderr.write(log)
    return fn.fd
