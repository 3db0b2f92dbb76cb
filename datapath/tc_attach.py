"""Attach and detach TC BPF programs (clsact, direct-action) inside a named netns.

Every function opens its own netlink socket in the namespace with
`IPRoute(netns=name, flags=0)` (so a missing namespace is an error, not a new
empty one) and closes it before returning.

Our filter is identified by a fixed priority and handle (FILTER_PRIO,
FILTER_HANDLE) on the clsact hook, protocol all: attaching again replaces the
program atomically, and detaching removes that filter only, leaving filters
others added. The clsact qdisc is created when absent; `attach` says whether
it did, and `detach(..., remove_qdisc=True)` removes it again, so the device
returns to exactly its previous state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netns_lab import faults

FILTER_PRIO = 1
FILTER_HANDLE = 1
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}   # ffff:fff2 / ffff:fff3
CLSACT_HANDLE = 0xFFFF0000


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


def attach(netns: str, ifname: str, prog_fd: int, prog_name: str,
           direction: str = "ingress") -> bool:
    """Attach a sched_cls program (direct action) to a device's clsact hook.

    Returns True when this call created the clsact qdisc (pass it to detach()).
    An earlier filter of ours on the same hook is replaced.
    """
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
    """Remove our filter from the hook; remove the clsact qdisc too when asked.

    Returns True when a filter of ours was there. Pass remove_qdisc=True only
    when attach() created the qdisc (it takes any other filters with it).
    """
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


@dataclass(frozen=True)
class Attached:
    """A program on an attach point: how (``tc``: a clsact filter), its id and name, and
    what names the attachment (for tc: the filter's priority and handle)."""
    kind: str
    prog_id: int
    name: str
    handle: str

    @property
    def ours(self) -> bool:
        return self.kind == "tc" and self.handle == f"{FILTER_PRIO}:{FILTER_HANDLE:#x}"


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


def attached(netns: str, ifname: str, direction: str = "ingress") -> list[Attached]:
    """The programs this project attached to the hook (however it attached them); a
    missing namespace or device raises TcError."""
    return [a for a in _filters(netns, ifname, direction) if a.ours]


def attached_programs(netns: str, ifname: str, direction: str = "ingress") -> list[tuple[int, str]]:
    """(prog_id, name) of every BPF filter on the hook, ours or not, in filter order."""
    return [(a.prog_id, a.name) for a in _filters(netns, ifname, direction)]
