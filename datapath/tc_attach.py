"""Attach and detach TC BPF programs inside a named netns: TCX, or a clsact filter.

Two ways to hang a sched_cls program on a device's ingress or egress:

- **TCX** (Linux >= 6.6): the program is attached to the device itself with
  BPF_PROG_ATTACH (BPF_TCX_INGRESS/EGRESS), without a bpf_link. Such an
  attachment lives exactly as long as the device, as a tc filter does: the CLI
  may exit, a namespace deleted by hand takes it with it, and nothing in bpffs
  has to be pinned, found or removed. Ours are the programs on the hook
  attached without a link (a link belongs to whoever holds it: Cilium, a
  test). Attaching again replaces ours in place (BPF_F_REPLACE).
- **clsact**: a direct-action bpf filter with a fixed priority and handle
  (FILTER_PRIO, FILTER_HANDLE) on the clsact hook, protocol all: attaching
  again replaces the program atomically, and detaching removes that filter
  only, leaving filters others added. The clsact qdisc is created when absent;
  `attach` says whether it did, and `detach(..., remove_qdisc=True)` removes
  it again, so the device returns to exactly its previous state.

`attach` uses TCX where the kernel has it (`default_mode()`;
HOSTROUTING_ATTACH=clsact|tcx forces one) and removes what is ours in the
other mode from the hook, so a hook holds one program of ours however it was
attached before; `detach` and `attached` see both.

Netlink calls open their own socket in the namespace with
`IPRoute(netns=name, flags=0)` (so a missing namespace is an error, not a new
empty one); TCX calls, which name the device by its ifindex in the caller's
namespace, run in a thread that enters the namespace (netns.call_in).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netns_lab import faults, netns as lab_netns

from . import libbpf

FILTER_PRIO = 1
FILTER_HANDLE = 1
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}   # ffff:fff2 / ffff:fff3
CLSACT_HANDLE = 0xFFFF0000
TCX_TYPES = {"ingress": libbpf.BPF_TCX_INGRESS, "egress": libbpf.BPF_TCX_EGRESS}
MODES = ("tcx", "clsact")
MODE_ENV = "HOSTROUTING_ATTACH"


class TcError(RuntimeError):
    """Attaching or detaching failed; the message names netns, device and hook."""


@contextlib.contextmanager
def _ipr(netns: str):
    try:
        ipr = IPRoute(netns=netns, flags=0)
    except (OSError, NetlinkError) as e:
        raise TcError(f"cannot open netns {netns!r}: {e}") from e
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr, netns: str, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise TcError(f"no device {ifname!r} in netns {netns}")
    return idx[0]


def _parent(direction: str) -> int:
    try:
        return PARENTS[direction]
    except KeyError:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}") from None


def _qdisc_kinds(ipr, idx: int) -> dict[int, str]:
    """handle -> kind of the qdiscs of a device."""
    return {q["handle"]: q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=idx)}


def has_clsact(netns: str, ifname: str) -> bool:
    with _ipr(netns) as ipr:
        return "clsact" in _qdisc_kinds(ipr, _index(ipr, netns, ifname)).values()


@functools.lru_cache(maxsize=1)
def tcx_missing() -> str | None:
    """Why this kernel cannot attach with TCX (None: it can); asked once per process."""
    from . import features
    found = features.tcx()
    return None if found.ok else found.detail


def default_mode() -> str:
    """"tcx" where the kernel has it, else "clsact"; HOSTROUTING_ATTACH=tcx|clsact|auto
    chooses (a bad value is a TcError)."""
    want = os.environ.get(MODE_ENV, "auto") or "auto"
    if want not in (*MODES, "auto"):
        raise TcError(f"{MODE_ENV}={want!r}: expected tcx, clsact or auto")
    if want == "auto":
        return "clsact" if tcx_missing() else "tcx"
    return want


def attach(netns: str, ifname: str, prog_fd: int, prog_name: str,
           direction: str = "ingress", mode: str | None = None) -> bool:
    """Attach a sched_cls program to a device's hook with TCX or as a clsact filter
    (mode; default: default_mode()), replacing a program of ours there and removing one
    attached the other way.

    Returns True when this call created the clsact qdisc (pass it to detach()).
    """
    mode = mode or default_mode()
    if mode not in MODES:
        raise ValueError(f"attach mode must be one of {', '.join(MODES)}, not {mode!r}")
    _parent(direction)
    if mode == "tcx":
        why = tcx_missing()
        if why:
            raise TcError(f"cannot attach {prog_name} to {ifname} in netns {netns} with TCX: "
                          f"{why}")
        _attach_tcx(netns, ifname, prog_fd, prog_name, direction)
        _detach_clsact(netns, ifname, direction)
        return False
    created = _attach_clsact(netns, ifname, prog_fd, prog_name, direction)
    _detach_tcx(netns, ifname, direction)
    return created


def _attach_clsact(netns: str, ifname: str, prog_fd: int, prog_name: str,
                   direction: str) -> bool:
    """The program as our direct-action filter on the clsact hook; True when this call
    created the qdisc."""
    parent = _parent(direction)
    where = f"{direction} of {ifname} in netns {netns}"
    with _ipr(netns) as ipr:
        idx = _index(ipr, netns, ifname)
        created = False
        kinds = _qdisc_kinds(ipr, idx)
        if "clsact" not in kinds.values():
            if kinds.get(CLSACT_HANDLE) == "ingress":
                raise TcError(f"{ifname} in netns {netns} has an 'ingress' qdisc; "
                              "clsact cannot be added next to it")
            try:
                faults.point(f"tc add clsact {netns}/{ifname}")
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                raise TcError(f"adding clsact to {ifname} in netns {netns}: {e}") from e
            created = True
        try:
            faults.point(f"tc attach {prog_name} {netns}/{ifname}")
            ipr.tc("replace-filter", "bpf", idx, FILTER_HANDLE, parent=parent,
                   prio=FILTER_PRIO, fd=prog_fd, name=prog_name, direct_action=True)
        except NetlinkError as e:
            if created:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", idx)
            raise TcError(f"attaching {prog_name} to {where}: {e}") from e
        return created


def detach(netns: str, ifname: str, direction: str = "ingress",
           remove_qdisc: bool = False) -> bool:
    """Remove our programs from the hook (TCX and clsact); remove the clsact qdisc too
    when asked.

    Returns True when a program of ours was there. Pass remove_qdisc=True only
    when attach() created the qdisc (it takes any other filters with it).
    """
    _parent(direction)
    removed = _detach_tcx(netns, ifname, direction)
    return _detach_clsact(netns, ifname, direction, remove_qdisc) or removed


def _detach_clsact(netns: str, ifname: str, direction: str, remove_qdisc: bool = False) -> bool:
    parent = _parent(direction)
    with _ipr(netns) as ipr:
        idx = _index(ipr, netns, ifname)
        removed = True
        try:
            faults.point(f"tc detach {netns}/{ifname}")
            ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise TcError(f"detaching from {direction} of {ifname} in netns {netns}: "
                              f"{e}") from e
            removed = False
        if remove_qdisc and "clsact" in _qdisc_kinds(ipr, idx).values():
            try:
                faults.point(f"tc del clsact {netns}/{ifname}")
                ipr.tc("del", "clsact", idx)
            except NetlinkError as e:
                raise TcError(f"removing clsact of {ifname} in netns {netns}: {e}") from e
        return removed


# -- TCX ---------------------------------------------------------------------------------------

def _in_netns(netns: str, ifname: str, fn):
    """fn(ifindex) run inside the namespace (TCX names the device by its ifindex there)."""
    with _ipr(netns) as ipr:       # the same errors as the netlink calls for a missing one
        idx = _index(ipr, netns, ifname)
    return lab_netns.call_in(netns, lambda: fn(idx))


def _tcx_entries(idx: int, direction: str) -> list[tuple[int, int]]:
    """(prog id, link id or 0) on the hook, in run order; [] on a kernel without TCX."""
    try:
        return libbpf.prog_query(idx, TCX_TYPES[direction])
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP) and tcx_missing():
            return []
        raise


def _attach_tcx(netns: str, ifname: str, prog_fd: int, prog_name: str, direction: str) -> None:
    kind = TCX_TYPES[direction]
    new_id = libbpf.prog_info(prog_fd).id

    def run(idx: int) -> None:
        ours = [p for p, link in _tcx_entries(idx, direction) if not link]
        if new_id in ours:          # attached already: the others of ours go
            ours.remove(new_id)
        elif ours:                  # in place of ours, not before or after it
            with libbpf.prog_fd_by_id(ours[0]) as old:
                faults.point(f"tcx replace {prog_name} {netns}/{ifname}")
                libbpf.prog_attach(prog_fd, idx, kind, replace_fd=old)
            ours = ours[1:]
        else:
            faults.point(f"tcx attach {prog_name} {netns}/{ifname}")
            libbpf.prog_attach(prog_fd, idx, kind)
        for prog_id in ours:
            _tcx_detach_one(netns, ifname, idx, kind, prog_id)
    try:
        _in_netns(netns, ifname, run)
    except OSError as e:
        raise TcError(f"attaching {prog_name} to {direction} of {ifname} in netns {netns} "
                      f"with TCX: {e.strerror or e}") from e


def _tcx_detach_one(netns: str, ifname: str, idx: int, kind: int, prog_id: int) -> bool:
    try:
        with libbpf.prog_fd_by_id(prog_id) as fd:
            faults.point(f"tcx detach {netns}/{ifname}")
            return libbpf.prog_detach(fd, idx, kind)
    except OSError as e:
        if e.errno == errno.ENOENT:     # unloaded meanwhile: detached with it
            return False
        raise


def _detach_tcx(netns: str, ifname: str, direction: str) -> bool:
    """Our TCX programs off the hook; True when there were some."""
    kind = TCX_TYPES[direction]

    def run(idx: int) -> bool:
        ours = [p for p, link in _tcx_entries(idx, direction) if not link]
        return any([_tcx_detach_one(netns, ifname, idx, kind, p) for p in ours])
    try:
        return _in_netns(netns, ifname, run)
    except OSError as e:
        raise TcError(f"detaching from {direction} of {ifname} in netns {netns} (TCX): "
                      f"{e.strerror or e}") from e


def _tcx(netns: str, ifname: str, direction: str) -> list["Attached"]:
    """Every program on the device's TCX hook, in run order."""
    def run(idx: int) -> list[tuple[int, int, str]]:
        out = []
        for prog_id, link in _tcx_entries(idx, direction):
            try:
                with libbpf.prog_fd_by_id(prog_id) as fd:
                    name = libbpf.prog_info(fd).name
            except OSError:         # detached and unloaded meanwhile
                continue
            out.append((prog_id, link, name))
        return out
    _parent(direction)
    try:
        found = _in_netns(netns, ifname, run)
    except OSError as e:
        raise TcError(f"listing the TCX {direction} programs of {ifname} in netns {netns}: "
                      f"{e.strerror or e}") from e
    return [Attached("tcx", prog_id, name, f"link {link}" if link else "")
            for prog_id, link, name in found]


@dataclass(frozen=True)
class Attached:
    """A program on an attach point: how (``tc``: a clsact filter; ``tcx``), its id and
    name, and what names the attachment (tc: the filter's priority and handle; tcx: its
    link, "" when attached without one)."""
    kind: str
    prog_id: int
    name: str
    handle: str

    @property
    def ours(self) -> bool:
        if self.kind == "tcx":
            return not self.handle
        return self.kind == "tc" and self.handle == f"{FILTER_PRIO}:{FILTER_HANDLE:#x}"

    @property
    def mode(self) -> str:
        """The attach mode, as default_mode() names it: tcx or clsact."""
        return "tcx" if self.kind == "tcx" else "clsact"


def _filters(netns: str, ifname: str, direction: str) -> list[Attached]:
    """Every BPF filter on the hook, in filter order.

    pyroute2 0.9.7 does not decode TCA_BPF_ID, so this reads `tc -json`.
    """
    _parent(direction)
    with _ipr(netns) as ipr:   # the same errors as the other calls for a missing netns/device
        _index(ipr, netns, ifname)
    proc = subprocess.run(["tc", "-json", "-n", netns, "filter", "show", "dev", ifname,
                           direction], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise TcError(f"tc filter show dev {ifname} {direction} in netns {netns}: "
                      f"{proc.stderr.strip()}")
    out = []
    for f in json.loads(proc.stdout or "[]"):
        opts = f.get("options") or {}
        prog = opts.get("prog") or {}
        if f.get("kind") == "bpf" and "id" in prog:
            handle = opts.get("handle", "")
            handle = f"{f.get('pref')}:{int(handle, 16):#x}" if handle else f"{f.get('pref')}:"
            out.append(Attached("tc", int(prog["id"]), prog.get("name") or opts.get("bpf_name", ""),
                                handle))
    return out


def _all(netns: str, ifname: str, direction: str) -> list[Attached]:
    """TCX programs then clsact filters: the order the kernel runs them in."""
    return _tcx(netns, ifname, direction) + _filters(netns, ifname, direction)


def attached(netns: str, ifname: str, direction: str = "ingress") -> list[Attached]:
    """The programs this project attached to the hook (TCX or clsact); a missing namespace
    or device raises TcError."""
    return [a for a in _all(netns, ifname, direction) if a.ours]


def attached_programs(netns: str, ifname: str, direction: str = "ingress") -> list[tuple[int, str]]:
    """(prog_id, name) of every BPF program on the hook (TCX, then clsact filters), ours or
    not, in the order they run."""
    return [(a.prog_id, a.name) for a in _all(netns, ifname, direction)]
