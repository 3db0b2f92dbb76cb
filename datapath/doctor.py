"""``hostrouting doctor``: is this machine fit for eBPF host routing? One line per check.

Each check is a small function returning a :class:`Check`; ``run_doctor`` runs
them all and prints one table (rich) or, with ``json_output``, a JSON list of
``{check, ok, required, detail}``. The exit code is 1 when a required check
failed; a failed check that is not required is a warning and does not fail.

Kernel features are probed for real, not guessed from the version
(``datapath/features.py``: the verifier itself says yes or no), afresh on
every run.

The clsact and TCX checks work in a throwaway namespace ``hrdoctor-<random>`` holding
a veth pair, removed however the check ends: the root network namespace is
never modified. (veth, not dummy: loading the dummy module creates dummy0 in
the root namespace.)

Run it directly with ``python -m datapath.doctor [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from datapath import bpf_build, features, libbpf
from datapath.features import HELPERS, PROBE_FUNCS, SCHED_CLS, Probes, first_line

SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
NETNS_PREFIX = "hrdoctor-"
CMD_TIMEOUT = 15

# __NR_bpf per architecture (x86_64 has its own table; the generic one is 280).
NR_BPF = {"x86_64": 321, "i686": 357, "armv7l": 386, "ppc64le": 361, "s390x": 351,
          "aarch64": 280, "riscv64": 280, "loongarch64": 280}
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2

@dataclass
class Check:
    check: str
    ok: bool
    required: bool
    detail: str


# ---------------------------------------------------------------- helpers

def which(tool: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    return shutil.which(tool, path=path)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                          stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- checks

def check_root() -> Check:
    euid = os.geteuid()
    if euid == 0:
        return Check("running as root", True, True, "euid 0")
    return Check("running as root", False, True,
                 f"euid {euid}: namespaces and BPF need root (try sudo)")


def check_bpf_syscall() -> Check:
    name = "bpf() syscall"
    nr = NR_BPF.get(platform.machine())
    if nr is None:
        return Check(name, False, True, f"unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.create_string_buffer(64)   # union bpf_attr, map_create part; rest zero
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(BPF_MAP_TYPE_ARRAY, 4, 4, 1), 16)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(BPF_MAP_CREATE), attr,
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if fd >= 0:
        os.close(fd)
        return Check(name, True, True, "created and closed a 1-entry array map")
    err = ctypes.get_errno()
    why = {errno.ENOSYS: "kernel built without CONFIG_BPF_SYSCALL",
           errno.EPERM: "not permitted (not root, or kernel lockdown)"}.get(err, os.strerror(err))
    return Check(name, False, True, f"BPF_MAP_CREATE failed: {errno.errorcode.get(err, err)}: "
                                    f"{why}")


def check_bcc(probes: Probes) -> Check:
    name = "bcc (python3-bpfcc)"
    if probes.import_error:
        return Check(name, False, True, f"cannot import bcc: {probes.import_error} (install "
                     "python3-bpfcc; a venv needs --system-site-packages: scripts/provision.sh)")
    import bcc
    version = getattr(bcc, "__version__", "?")
    return Check(name, True, True, f"bcc {version} from {os.path.dirname(bcc.__file__)}")


def header_release(build: Path) -> str | None:
    """The kernel release the headers in ``build`` are for (what uname -r would say)."""
    with contextlib.suppress(OSError):
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"',
                      (build / "include/generated/utsrelease.h").read_text())
        if m:
            return m.group(1)
    with contextlib.suppress(OSError):
        return (build / "include/config/kernel.release").read_text().strip()
    return None


def check_kernel_headers() -> Check:
    """The rule compile_bpf applies, so that the doctor passes exactly where enable compiles."""
    name = "kernel headers for bcc"
    try:
        build = bpf_build.check_kernel_headers()
    except bpf_build.KernelHeadersMissing as e:
        return Check(name, False, True, str(e))
    found = build.resolve()
    return Check(name, True, True, str(build) if found == build else f"{build} -> {found}")


def check_headers_version() -> Check:
    name = "kernel headers version"
    running = platform.release()
    try:
        release = header_release(bpf_build.check_kernel_headers().resolve())
    except bpf_build.KernelHeadersMissing:
        release = None
    if release is None:
        return Check(name, False, False, f"unknown (running {running}); programs that use "
                     "only uapi headers compile fine")
    if release == running:
        return Check(name, True, False, f"{release}, matches the running kernel")
    return Check(name, False, False, f"headers {release} but running {running}: a warning only, "
                 "programs that use only uapi headers compile fine")


def check_features(probes: Probes) -> list[Check]:
    """sched_cls and the helpers the datapath calls, each loaded by the verifier."""
    found = [features.sched_cls(probes)] + [features.helper(probes, h) for h in HELPERS]
    return [Check(f.name, f.ok, True, f.detail) for f in found]


def check_clsact(probes: Probes) -> list[Check]:
    """clsact on a veth in a throwaway netns, and a direct-action attach of the trivial program."""
    qdisc, attach = "clsact qdisc", "sched_cls attach (clsact ingress)"
    missing = [t for t in ("ip", "tc") if not which(t)]
    if missing:
        why = f"{' and '.join(missing)} not found (install iproute2)"
        return [Check(qdisc, False, True, why), Check(attach, False, True, f"not checked: {why}")]
    ns = NETNS_PREFIX + secrets.token_hex(3)
    made = run([which("ip"), "netns", "add", ns])
    if made.returncode != 0:
        why = f"cannot create netns {ns}: {first_line(made.stderr)}"
        return [Check(qdisc, False, True, why), Check(attach, False, True, f"not checked: {why}")]
    try:
        qdisc_check = clsact_in(ns, qdisc)
        return [qdisc_check, attach_in(ns, attach, probes, qdisc_check), tcx_in(ns, probes)]
    finally:
        run([which("ip"), "netns", "del", ns])


def clsact_in(ns: str, name: str) -> Check:
    steps = [[which("ip"), "-n", ns, "link", "add", "hrd0", "type", "veth", "peer", "name", "hrd1"],
             [which("tc"), "-n", ns, "qdisc", "add", "dev", "hrd0", "clsact"]]
    for argv in steps:
        proc = run(argv)
        if proc.returncode != 0:
            return Check(name, False, True, f"`{' '.join(argv[1:])}` failed: "
                                            f"{first_line(proc.stderr)} (needs CONFIG_NET_SCH_INGRESS)")
    shown = run([which("tc"), "-n", ns, "qdisc", "show", "dev", "hrd0"]).stdout
    if "clsact" not in shown:
        return Check(name, False, True, f"added but not listed: {first_line(shown)}")
    return Check(name, True, True, f"added to a veth in throwaway netns {ns} (removed)")


def attach_in(ns: str, name: str, probes: Probes, qdisc: Check) -> Check:
    fd = probes.fds.get(PROBE_FUNCS[SCHED_CLS])
    if not qdisc.ok or fd is None:
        return Check(name, False, True, "not checked: needs the clsact qdisc and the sched_cls "
                                        "program")
    from . import tc_attach
    try:
        tc_attach.attach(ns, "hrd0", fd, PROBE_FUNCS[SCHED_CLS], "ingress", mode="clsact")
    except Exception as e:  # TcError, or whatever else netlink answers: reported, not raised
        return Check(name, False, True, f"direct-action bpf filter refused: {e}")
    shown = run([which("tc"), "-n", ns, "filter", "show", "dev", "hrd0", "ingress"]).stdout
    if "direct-action" not in shown:
        return Check(name, False, True, f"attached but not listed: {first_line(shown)}")
    return Check(name, True, True, "direct-action bpf filter attached as enable attaches "
                                   "where TCX is missing (tc_attach.attach)")


def tcx_in(ns: str, probes: Probes) -> Check:
    """The trivial program attached with TCX to the throwaway veth, listed, and detached:
    what enable does where the kernel has TCX (else it attaches clsact filters)."""
    name = features.TCX
    found = features.tcx()
    if not found.ok:
        return Check(name, False, False, found.detail)
    fd = probes.fds.get(PROBE_FUNCS[SCHED_CLS])
    if fd is None:
        return Check(name, False, False, "not checked: needs the sched_cls program")
    from . import tc_attach
    try:
        tc_attach.attach(ns, "hrd0", fd, PROBE_FUNCS[SCHED_CLS], "ingress", mode="tcx")
        listed = [a.kind for a in tc_attach.attached(ns, "hrd0", "ingress")]
        tc_attach.detach(ns, "hrd0", "ingress")
    except Exception as e:  # TcError, or whatever else the kernel answers: reported
        return Check(name, False, False, f"BPF_PROG_ATTACH tcx_ingress refused: {e} (enable "
                                         "attaches clsact filters instead)")
    if listed != ["tcx"]:
        return Check(name, False, False, f"attached but listed as {listed}")
    return Check(name, True, False, "BPF_PROG_ATTACH to tcx_ingress of a veth, listed and "
                                    "detached: enable attaches with TCX")


def check_tool(name: str, tool: str, required: bool, why: str,
               version_args: list[str] | None = None, expect: str | None = None) -> Check:
    path = which(tool)
    if path is None:
        return Check(name, False, required, f"{tool} not found ({why})")
    if version_args is None:
        return Check(name, True, required, path)
    proc = run([path, *version_args])
    version = first_line(proc.stdout + proc.stderr)
    if proc.returncode != 0 or (expect and expect not in version):
        return Check(name, False, required, f"{path} {' '.join(version_args)}: {version or 'no output'}"
                                            f" ({why})")
    return Check(name, True, required, f"{path}: {version}")


def tool_checks() -> list[Check]:
    return [
        check_tool("netperf", "netperf", True, "hostrouting bench; Debian non-free, "
                   "Ubuntu multiverse", ["-V"]),
        check_tool("netserver", "netserver", True, "hostrouting bench; package netperf"),
        check_tool("iptables-nft backend", "iptables-nft", True,
                   "legacy routing's MASQUERADE; package iptables", ["--version"], "nf_tables"),
        check_tool("iptables-legacy backend", "iptables-legacy", False,
                   "comparisons with the legacy backend; package iptables", ["--version"], "legacy"),
        check_tool("conntrack tool", "conntrack", False,
                   "inspecting conntrack entries; package conntrack", ["--version"]),
        check_tool("nft", "nft", False, "inspecting the nf_tables ruleset; package nftables",
                   ["--version"]),
    ]


def check_xtables_refusal() -> Check:
    """Can the rule guard refuse x_tables writes in the kernel (else it polls them)?"""
    from . import xtables_refusal
    name = "x_tables refusal (cgroup/setsockopt)"
    where = xtables_refusal.cgroup2_root()
    if where is None:
        return Check(name, False, False, "no cgroup v2 hierarchy mounted: iptables-legacy rules "
                                         "in node namespaces are polled and reverted instead")
    try:
        bpf = bpf_build.compile_bpf(xtables_refusal.SOURCE)
        try:
            bpf_build.load_program(bpf, xtables_refusal.PROGRAM,
                                   xtables_refusal.BPF_PROG_TYPE_CGROUP_SOCKOPT,
                                   attach_type=libbpf.BPF_CGROUP_SETSOCKOPT)
        finally:
            bpf.cleanup()
    except bpf_build.BpfBuildError as e:
        return Check(name, False, False, f"{first_line(str(e))}: iptables-legacy rules in node "
                                         "namespaces are polled and reverted instead")
    return Check(name, True, False, f"{xtables_refusal.PROGRAM} loads; cgroup v2 root {where}")


def check_bpf_lsm() -> Check:
    from .rule_guard import bpf_lsm_status
    ok, detail = bpf_lsm_status()
    return Check("BPF LSM", ok, False, detail)


def run_checks() -> list[Check]:
    checks = [check_root(), check_bpf_syscall()]
    probes = Probes()
    try:
        checks += [check_bcc(probes), check_kernel_headers(), check_headers_version(),
                   *check_features(probes)]
        checks += check_clsact(probes)
    finally:
        probes.close()
    if not probes.import_error:
        checks.append(check_xtables_refusal())
    return checks + [check_bpf_lsm()] + tool_checks()


# ---------------------------------------------------------------- output

def print_table(checks: list[Check]) -> None:
    from rich.table import Table
    from rich.text import Text

    from . import cli_output
    console = cli_output.console(highlight=False)
    table = Table(title="hostrouting doctor", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail")
    for c in checks:
        if c.ok:
            result = Text("pass", style="green")
        elif c.required:
            result = Text("FAIL", style="bold red")
        else:
            result = Text("warn", style="yellow")
        table.add_row(c.check, result, Text(c.detail))
    console.print(table)
    failed = [c.check for c in checks if c.required and not c.ok]
    warned = sum(1 for c in checks if not c.required and not c.ok)
    if failed:
        console.print(Text(f"not fit: {len(failed)} required check(s) failed: "
                           f"{', '.join(failed)}", style="bold red"))
    else:
        console.print(Text(f"fit for eBPF host routing ({len(checks)} checks, "
                           f"{warned} warning(s))", style="green"))


def run_doctor(json_output: bool = False) -> int:
    """Run every check, print a table (or JSON); 1 when a required check failed, else 0."""
    checks = run_checks()
    if json_output:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print_table(checks)
    return 1 if any(c.required and not c.ok for c in checks) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datapath.doctor", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list of checks")
    return run_doctor(parser.parse_args(argv).json)


if __name__ == "__main__":
    sys.exit(main())
