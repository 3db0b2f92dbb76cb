"""`hostrouting doctor`: its JSON shape, that this machine passes the required checks,
that a missing feature is named precisely, and that the root netns is left alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest

from datapath import bpf_build, doctor, features
from tests import rootns

REQUIRED = {"running as root", "bpf() syscall", "bcc (python3-bpfcc)", "kernel headers for bcc",
            "sched_cls program loads", "bpf_redirect_peer", "bpf_redirect_neigh",
            "bpf_fib_lookup", "clsact qdisc", "sched_cls attach (clsact ingress)", "netperf",
            "netserver", "iptables-nft backend"}
WARNINGS = {"kernel headers version", "iptables-legacy backend", "conntrack tool", "nft",
            "x_tables refusal (cgroup/setsockopt)", "BPF LSM", "TCX attach"}


def doctor_netns() -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(doctor.NETNS_PREFIX)] \
        if os.path.isdir("/run/netns") else []


@pytest.fixture(scope="module")
def json_run():
    """One JSON run for the module, with the root netns snapshotted around it."""
    before = rootns.snapshot()
    proc = subprocess.run([sys.executable, "-m", "datapath.doctor", "--json"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    after = rootns.snapshot()
    return proc, before, after


def test_json_shape(json_run):
    proc, _, _ = json_run
    checks = json.loads(proc.stdout)
    assert isinstance(checks, list) and checks
    for c in checks:
        assert set(c) == {"check", "ok", "required", "detail"}, c
        assert isinstance(c["check"], str) and c["check"]
        assert isinstance(c["ok"], bool) and isinstance(c["required"], bool)
        assert isinstance(c["detail"], str) and c["detail"]
    names = [c["check"] for c in checks]
    assert len(names) == len(set(names))
    assert {c["check"] for c in checks if c["required"]} == REQUIRED
    assert {c["check"] for c in checks if not c["required"]} == WARNINGS


def test_required_checks_pass_here(json_run):
    proc, _, _ = json_run
    checks = json.loads(proc.stdout)
    failed = [c for c in checks if c["required"] and not c["ok"]]
    assert failed == [], failed
    assert proc.returncode == 0
    assert proc.stderr == "", "bcc or the verifier leaked onto stderr"


def test_x_tables_refusal_is_checked_and_passes_here(json_run):
    """This kernel loads cgroup/setsockopt programs and has a cgroup v2 root (the rule guard
    refuses iptables-legacy writes with them); BPF LSM is reported, never claimed blindly."""
    proc, _, _ = json_run
    checks = {c["check"]: c for c in json.loads(proc.stdout)}
    refusal = checks["x_tables refusal (cgroup/setsockopt)"]
    assert refusal["ok"], refusal
    try:
        lsm = open("/sys/kernel/security/lsm").read().split(",")
    except OSError:
        lsm = []
    assert checks["BPF LSM"]["ok"] == ("bpf" in lsm)


def test_tcx_is_checked_by_attaching(json_run):
    """TCX (Linux >= 6.6) is a warning when missing: enable attaches clsact filters then.
    Where the kernel answers tcx queries, the doctor attaches a program with TCX for real."""
    proc, _, _ = json_run
    tcx = {c["check"]: c for c in json.loads(proc.stdout)}["TCX attach"]
    assert tcx["ok"] == features.tcx().ok, tcx
    if tcx["ok"]:
        assert "BPF_PROG_ATTACH to tcx_ingress" in tcx["detail"]


def test_missing_tcx_is_a_warning_naming_the_kernel(monkeypatch):
    from datapath import libbpf

    def old_kernel(*_):
        raise OSError(22, "BPF_PROG_QUERY: Invalid argument")
    monkeypatch.setattr(libbpf, "prog_query", old_kernel)
    check = doctor.tcx_in("unused", features.Probes.__new__(features.Probes))
    assert (check.ok, check.required) == (False, False)
    assert "Linux >= 6.6" in check.detail and "clsact" in check.detail


def test_root_netns_untouched(json_run):
    _, before, after = json_run
    assert rootns.diff(before, after) == []
    # under xdist another test's doctor may hold its throwaway namespace for its own run: that
    # one goes within seconds, a leaked one stays
    deadline = time.monotonic() + 20
    while doctor_netns() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert doctor_netns() == []


def test_table_output_and_exit_code(capsys):
    links = rootns.snapshot()["links"]
    assert doctor.run_doctor() == 0
    out = capsys.readouterr().out
    assert "hostrouting doctor" in out
    assert "bpf_redirect_peer" in out and "pass" in out
    assert "fit for eBPF host routing" in out
    assert rootns.snapshot()["links"] == links
    assert doctor_netns() == []


def test_headers_check_names_the_directory():
    check = doctor.check_kernel_headers()
    assert check.ok, check.detail
    assert f"/lib/modules/{os.uname().release}/build" in check.detail
    version = doctor.check_headers_version()
    assert not version.required
    if not version.ok:
        assert "uapi" in version.detail and os.uname().release in version.detail


def test_headers_check_is_the_rule_enable_compiles_by(monkeypatch):
    """Headers bcc could reach another way (here BCC_KERNEL_SOURCE; or kheaders) satisfied the
    doctor while compile_bpf refused to start: now the doctor fails with compile_bpf's error."""
    monkeypatch.setenv("BCC_KERNEL_SOURCE", f"/lib/modules/{os.uname().release}/build")
    monkeypatch.setattr(platform, "release", lambda: "0.0.0-no-headers")
    with pytest.raises(bpf_build.KernelHeadersMissing) as refused:
        bpf_build.compile_bpf("probe.c", text="int f(struct __sk_buff *skb) { return 0; }")
    check = doctor.check_kernel_headers()
    assert not check.ok and check.required
    assert check.detail == str(refused.value)
    assert "0.0.0-no-headers" in check.detail


def test_unknown_helper_is_named_with_the_kernel_it_needs():
    log = "0: R1=ctx() R10=fp0\n1: (85) call unknown#155\ninvalid func unknown#155\n"
    assert features.explain_rejection("Invalid argument", log, "5.10") == \
        "rejected by the verifier (helper unknown, needs Linux >= 5.10)"


def test_a_helper_the_verifier_rejects_fails_the_doctor(monkeypatch, capsys):
    """A helper number no kernel knows stands in for a kernel without bpf_redirect_peer."""
    monkeypatch.setattr(features, "PROBE_SOURCE",
                        features.PROBE_SOURCE.replace("(void *)155", "(void *)9999"))
    assert doctor.run_doctor(json_output=True) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    peer = checks["bpf_redirect_peer"]
    assert not peer["ok"] and peer["required"]
    assert peer["detail"] == ("bpf_redirect_peer: rejected by the verifier "
                              "(helper unknown, needs Linux >= 5.10)")
    assert checks["bpf_redirect_neigh"]["ok"]


def test_a_missing_optional_tool_is_a_warning(monkeypatch, capsys):
    real_which = doctor.which
    monkeypatch.setattr(doctor, "which", lambda t: None if t == "nft" else real_which(t))
    assert doctor.run_doctor(json_output=True) == 0
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["nft"] == {"check": "nft", "ok": False, "required": False,
                             "detail": "nft not found (inspecting the nf_tables ruleset; "
                                       "package nftables)"}


def test_status_probes_the_kernel_once_per_boot(monkeypatch, tmp_path):
    """`status` asks features.known(): the verifier's answer is kept, so later calls load no
    probe program; an answer bcc could not get (no compile) is not kept."""
    monkeypatch.setenv("HOSTROUTING_STATE_DIR", str(tmp_path))
    real_probes, made = features.Probes, []

    def counted():
        made.append(1)
        return real_probes()
    monkeypatch.setattr(features, "Probes", counted)
    first = features.known()
    assert [f.name for f in first] == [features.SCHED_CLS, *features.HELPERS]
    assert all(f.ok for f in first), first
    assert features.known() == first and len(made) == 1

    monkeypatch.setattr(features, "PROBE_SOURCE", "this is not C")   # other probes: asked again
    unanswered = features.known()
    assert len(made) == 2 and not any(f.ok for f in unanswered)
    assert "could not compile" in unanswered[0].detail
    features.known()
    assert len(made) == 3, "an answer without the verifier's word was kept"
