"""Loader and map access for bpf_c/host_routing.c.

`load(router_ip)` compiles the C file with bcc, loads `from_pod` and
`from_underlay` as sched_cls programs and writes the config. Nothing is pinned:
the programs (and through them the maps) live as long as a TC filter or an
open fd refers to them. A later process gets at the maps of an attached
program with `DatapathMaps.from_prog_id(prog_id)` (program id -> its map ids
-> map fds, matched by name).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from datapath import libbpf, shared_types as st
from datapath.bpf_build import BPF_DIR, compile_bpf, load_program

SOURCE = BPF_DIR / "host_routing.c"
PROGRAMS = ("from_pod", "from_underlay")
# IPv6: from_pod / from_underlay tail-call these through `progs6` (slots: enum hr_prog6)
PROGRAMS6 = tuple(sorted(st.PROG6_SLOTS, key=st.PROG6_SLOTS.get))
MAP_NAMES = ("endpoints", "config", "counters", "trace_events", "cluster_cidrs", "node_routes",
             "nat", "nat_frags", "pod_veths", "progs6", "endpoints6", "cluster_cidrs6",
             "node_routes6", "nat6", "nat6_frags")
# Every program uses these; the route maps only from_pod does.
REQUIRED_MAPS = ("endpoints", "config", "counters", "trace_events")

DEFAULT_NAT_MAX_FLOWS = 262144
MAX_NAT_MAX_FLOWS = 4 * 1024 * 1024

# what each map must look like (checked when reopening an attached program's maps)
_EXPECTED = {
    "endpoints": (libbpf.BPF_MAP_TYPE_HASH, 4, st.SIZEOF_ENDPOINT),
    "pod_veths": (libbpf.BPF_MAP_TYPE_ARRAY, 4, st.SIZEOF_POD_VETH),
    "config": (libbpf.BPF_MAP_TYPE_ARRAY, 4, st.SIZEOF_CONFIG),
    "counters": (libbpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, st.SIZEOF_COUNTER),
    "trace_events": (libbpf.BPF_MAP_TYPE_RINGBUF, 0, 0),
    "cluster_cidrs": (libbpf.BPF_MAP_TYPE_LPM_TRIE, st.SIZEOF_LPM_KEY, 4),
    "node_routes": (libbpf.BPF_MAP_TYPE_LPM_TRIE, st.SIZEOF_LPM_KEY, st.SIZEOF_ROUTE),
    "nat": (libbpf.BPF_MAP_TYPE_HASH, st.SIZEOF_NAT_KEY, st.SIZEOF_NAT_ENTRY),
    # fragmented datagrams through BPF SNAT (bpf_c/include/frag.h)
    "nat_frags": (libbpf.BPF_MAP_TYPE_LRU_HASH, st.ffi.sizeof("struct hr_frag_key"),
                  st.ffi.sizeof("struct hr_frag_entry")),
    "progs6": (libbpf.BPF_MAP_TYPE_PROG_ARRAY, 4, 4),
    "endpoints6": (libbpf.BPF_MAP_TYPE_HASH, st.SIZEOF_IN6, st.SIZEOF_ENDPOINT),
    "cluster_cidrs6": (libbpf.BPF_MAP_TYPE_LPM_TRIE, st.SIZEOF_LPM6_KEY, 4),
    "node_routes6": (libbpf.BPF_MAP_TYPE_LPM_TRIE, st.SIZEOF_LPM6_KEY, st.SIZEOF_ROUTE6),
    # IPv6 BPF SNAT (bpf_c/include/nat6.h)
    "nat6": (libbpf.BPF_MAP_TYPE_HASH, st.SIZEOF_NAT6_KEY, st.SIZEOF_NAT6_ENTRY),
    "nat6_frags": (libbpf.BPF_MAP_TYPE_LRU_HASH, st.SIZEOF_FRAG6_KEY,
                   st.ffi.sizeof("struct hr_frag_entry")),
}
#: family -> (its NAT map, key size, entry size); NatKey / NatEntry of either by their addresses
NAT_MAPS = {4: ("nat", st.SIZEOF_NAT_KEY, st.SIZEOF_NAT_ENTRY),
            6: ("nat6", st.SIZEOF_NAT6_KEY, st.SIZEOF_NAT6_ENTRY)}


class DatapathError(RuntimeError):
    """The loaded objects are not what this module expects (stale build, wrong program)."""


BPFFS = Path("/sys/fs/bpf")


def _mount_bpffs(path: Path) -> None:
    """A bpffs where `path` goes: the one at /sys/fs/bpf (mounted there if need be, as
    systemd does at boot), for paths below it."""
    if BPFFS not in path.parents:
        return
    with open("/proc/self/mounts") as f:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
            return
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True, capture_output=True,
                   timeout=10)


def _endpoint_key(ip: str) -> tuple[str, bytes]:
    """The endpoint map of an address's family, and its key there."""
    if ipaddress.ip_address(ip).version == 6:
        return "endpoints6", st.ip6_to_key(ip)
    return "endpoints", st.ip_to_key(ip)


class _BorrowedFd:
    """An fd owned by someone else (bcc): usable like libbpf.Fd, never closed here."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        pass


class DatapathMaps:
    """The four maps of a loaded datapath, by fd."""

    def __init__(self, fds: dict[str, object], ids: dict[str, int]):
        missing = [n for n in REQUIRED_MAPS if n not in fds]
        if missing:
            raise DatapathError(f"datapath maps missing: {', '.join(missing)}")
        self._fds = fds
        self.ids = dict(ids)
        for name, (mtype, ksz, vsz) in _EXPECTED.items():
            if name not in fds:
                continue
            info = libbpf.map_info(fds[name])
            if info.type != mtype or (ksz and (info.key_size, info.value_size) != (ksz, vsz)):
                raise DatapathError(
                    f"map {name!r} (id {info.id}) has type {info.type}, key {info.key_size} B, "
                    f"value {info.value_size} B; expected type {mtype}, key {ksz} B, "
                    f"value {vsz} B: was it built from another hostrouting_shared.h?")
        self.counter_entries = libbpf.map_info(fds["counters"]).max_entries

    # construction -------------------------------------------------------------------------

    @classmethod
    def from_prog_id(cls, prog_id: int) -> "DatapathMaps":
        """Reopen the maps of a loaded (e.g. TC-attached) program by its id."""
        fds: dict[str, object] = {}
        ids: dict[str, int] = {}
        try:
            with libbpf.prog_fd_by_id(prog_id) as pfd:
                pinfo = libbpf.prog_info(pfd)
            cls._open_maps(pinfo.map_ids, fds, ids)
            # the IPv6 programs' maps (endpoints6, ...), through the programs in `progs6`
            for prog6_id in cls._progs6_ids(fds.get("progs6")):
                with libbpf.prog_fd_by_id(prog6_id) as pfd:
                    cls._open_maps(libbpf.prog_info(pfd).map_ids, fds, ids)
            if not set(REQUIRED_MAPS) <= set(fds):
                raise DatapathError(
                    f"program {prog_id} ({pinfo.name}) does not use the datapath maps "
                    f"(found {sorted(fds)}, need {list(REQUIRED_MAPS)})")
            return cls(fds, ids)
        except BaseException:
            for fd in fds.values():
                fd.close()
            raise

    @staticmethod
    def _open_maps(map_ids, fds: dict[str, object], ids: dict[str, int]) -> None:
        """Open the maps of `map_ids` named in MAP_NAMES that fds does not have yet."""
        for map_id in map_ids:
            if map_id in ids.values():
                continue
            mfd = libbpf.map_fd_by_id(map_id)
            name = libbpf.map_info(mfd).name
            if name in MAP_NAMES and name not in fds:
                fds[name] = mfd
                ids[name] = map_id
            else:
                mfd.close()

    @staticmethod
    def _progs6_ids(progs6) -> list[int]:
        """Ids of the programs in a `progs6` array (a lookup from user space gives the id)."""
        if progs6 is None:
            return []
        found = [libbpf.map_lookup(progs6, slot.to_bytes(4, "little"), 4)
                 for slot in sorted(st.PROG6_SLOTS.values())]
        return [int.from_bytes(raw, "little") for raw in found if raw is not None]

    def progs6_ids(self) -> list[int]:
        """The IPv6 programs from_pod and from_underlay reach (an empty `progs6`: none)."""
        return self._progs6_ids(self._fds.get("progs6"))

    def pin_progs6(self, path: Path) -> None:
        """Pin `progs6` at `path` (in a bpffs, mounted at /sys/fs/bpf if none is there): the
        kernel empties a program array when no file descriptor or pin of it is left in user
        space, and the attached programs alone do not count. Replaces an older pin in one
        rename: the array it pinned stays full until then, never both gone."""
        _mount_bpffs(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = path.with_name(f"{path.name}_new")       # bpffs refuses dots
        new.unlink(missing_ok=True)                     # of a pin killed half-way
        libbpf.obj_pin(self._fds["progs6"], str(new))
        try:
            os.replace(new, path)
        except BaseException:
            new.unlink(missing_ok=True)
            raise

    @classmethod
    def from_bcc(cls, bpf) -> "DatapathMaps":
        fds = {n: _BorrowedFd(bpf.get_table(n.encode()).map_fd) for n in MAP_NAMES}
        ids = {n: libbpf.map_info(fd).id for n, fd in fds.items()}
        return cls(fds, ids)

    def close(self) -> None:
        for fd in self._fds.values():
            fd.close()

    def __enter__(self) -> "DatapathMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fd(self, name: str) -> int:
        if name not in self._fds:
            raise DatapathError(f"map {name!r} is not used by this program (reopen the maps "
                                "by from_pod's id: it uses every map)")
        return self._fds[name].fileno()

    # endpoints ------------------------------------------------------------------------------

    def set_endpoint(self, ip: str, ifindex: int, mac: str | bytes, node_mac: str | bytes) -> None:
        """The pod `ip` (IPv4, or IPv6: `endpoints6`) behind host-side veth `ifindex`: in the
        endpoint map and, for from_pod's spoof check, in `pod_veths` (a pod that moved to
        another veth leaves its old slot)."""
        name, key = _endpoint_key(ip)
        old = self._endpoint(ip)
        libbpf.map_update(self.fd(name), key, st.pack_endpoint(ifindex, mac, node_mac))
        if old is not None and old.ifindex != ifindex:
            self._clear_pod_veth(old.ifindex, ip)
        self._set_pod_veth(ifindex, ip, mac)

    def delete_endpoint(self, ip: str) -> bool:
        old = self._endpoint(ip)
        if old is not None:
            self._clear_pod_veth(old.ifindex, ip)
        name, key = _endpoint_key(ip)
        return libbpf.map_delete(self.fd(name), key)

    def _endpoint(self, ip: str) -> st.Endpoint | None:
        name, key = _endpoint_key(ip)
        raw = libbpf.map_lookup(self.fd(name), key, st.SIZEOF_ENDPOINT)
        return st.unpack_endpoint(raw) if raw is not None else None

    def pod_veth(self, ifindex: int) -> st.PodVeth | None:
        """Slot `ifindex` of `pod_veths`; None beyond the array or where the maps lack it."""
        if "pod_veths" not in self._fds or not 0 <= ifindex < st.POD_VETH_SLOTS:
            return None
        raw = libbpf.map_lookup(self.fd("pod_veths"), ifindex.to_bytes(4, "little"),
                                st.SIZEOF_POD_VETH)
        return None if raw is None else st.unpack_pod_veth(raw)

    def _write_pod_veth(self, ifindex: int, ip: str | None, mac: str | bytes,
                        ip6: str | None) -> None:
        value = (st.pack_pod_veth(ip, mac, ip6) if ip or ip6
                 else bytes(st.SIZEOF_POD_VETH))
        libbpf.map_update(self.fd("pod_veths"), ifindex.to_bytes(4, "little"), value)

    def _set_pod_veth(self, ifindex: int, ip: str, mac: str | bytes) -> None:
        """`ip` into the slot, beside the pod's address of the other family (kept while the
        slot's MAC is the same pod's)."""
        old = self.pod_veth(ifindex)
        if old is None:     # beyond the array: from_pod asks the endpoint maps
            return
        same_pod = old.mac == st.mac_to_str(st.mac_to_bytes(mac))
        ip4, ip6 = (old.ip, old.ip6) if same_pod else (None, None)
        if ipaddress.ip_address(ip).version == 6:
            ip6 = ip
        else:
            ip4 = ip
        self._write_pod_veth(ifindex, ip4, mac, ip6)

    def _clear_pod_veth(self, ifindex: int, ip: str) -> None:
        """Take `ip` out of slot `ifindex` if it still holds it (another pod may have it by
        now); a slot left without an address is emptied."""
        old = self.pod_veth(ifindex)
        if old is None:
            return
        addr = ipaddress.ip_address(ip)
        ip4, ip6 = old.ip, old.ip6
        if ip4 is not None and ipaddress.ip_address(ip4) == addr:
            ip4 = None
        elif ip6 is not None and ipaddress.ip_address(ip6) == addr:
            ip6 = None
        else:
            return
        self._write_pod_veth(ifindex, ip4, old.mac, ip6)

    def endpoints(self) -> dict[str, st.Endpoint]:
        """The IPv4 endpoints (endpoints6(): the IPv6 ones)."""
        return {st.key_to_ip(k): st.unpack_endpoint(v)
                for k, v in libbpf.map_items(self.fd("endpoints"), 4, st.SIZEOF_ENDPOINT)}

    def endpoints6(self) -> dict[str, st.Endpoint]:
        return {st.key_to_ip6(k): st.unpack_endpoint(v)
                for k, v in libbpf.map_items(self.fd("endpoints6"), st.SIZEOF_IN6,
                                             st.SIZEOF_ENDPOINT)}

    # routes ---------------------------------------------------------------------------------

    def set_cluster_cidr(self, cidr: str, deny_from_pod: bool = False) -> None:
        """A destination range inside the cluster (routed, never masqueraded); with
        deny_from_pod, pods may not send there (another node's host namespace)."""
        flags = st.CIDR_FLAGS["deny_from_pod"] if deny_from_pod else 0
        libbpf.map_update(self.fd("cluster_cidrs"), st.pack_lpm_key(cidr),
                          flags.to_bytes(4, "little"))

    def set_node_route(self, cidr: str, nexthop: str, ifindex: int) -> None:
        """Another node's pod CIDR, for when the kernel's FIB refuses (forwarding off)."""
        libbpf.map_update(self.fd("node_routes"), st.pack_lpm_key(cidr),
                          st.pack_route(nexthop, ifindex))

    def set_cluster_cidr6(self, cidr: str, deny_from_pod: bool = False) -> None:
        """set_cluster_cidr() for IPv6 (`cluster_cidrs6`)."""
        flags = st.CIDR_FLAGS["deny_from_pod"] if deny_from_pod else 0
        libbpf.map_update(self.fd("cluster_cidrs6"), st.pack_lpm6_key(cidr),
                          flags.to_bytes(4, "little"))

    def set_node_route6(self, cidr: str, nexthop: str, ifindex: int) -> None:
        """set_node_route() for IPv6 (`node_routes6`): nexthop a global IPv6 address."""
        libbpf.map_update(self.fd("node_routes6"), st.pack_lpm6_key(cidr),
                          st.pack_route6(nexthop, ifindex))

    # config ---------------------------------------------------------------------------------

    def config(self) -> st.Config:
        raw = libbpf.map_lookup(self.fd("config"), (0).to_bytes(4, "little"), st.SIZEOF_CONFIG)
        return st.unpack_config(raw)

    def set_config(self, router_ip: str, trace: bool = False, node_ip: str | None = None,
                   nat: dict[str, int] | None = None, router_ip6: str | None = None,
                   node_ip6: str | None = None) -> None:
        """router_ip: the pods' gateway; node_ip: the SNAT source (None: BPF SNAT off);
        router_ip6, node_ip6 the same for IPv6 (None: an IPv4-only lab; no IPv6 SNAT)."""
        libbpf.map_update(self.fd("config"), (0).to_bytes(4, "little"),
                          st.pack_config(router_ip, trace, node_ip, nat, router_ip6, node_ip6))

    def set_trace(self, on: bool) -> None:
        cfg = self.config()
        self.set_config(cfg.router_ip, on, cfg.node_ip, cfg.nat, cfg.router_ip6, cfg.node_ip6)

    # NAT table ------------------------------------------------------------------------------

    def nat_families(self) -> list[int]:
        """The families whose NAT table this datapath has: 4, and 6 once it has `nat6`."""
        return [f for f, (name, _, _) in NAT_MAPS.items() if name in self._fds]

    def nat_entries(self, family: int = 4) -> list[tuple[st.NatKey, st.NatEntry]]:
        return [(st.unpack_nat_key(k), st.unpack_nat_entry(v))
                for k, v in self.nat_raw_entries(family)]

    def nat_raw_entries(self, family: int = 4) -> list[tuple[bytes, bytes]]:
        """The family's NAT table as raw (key, value) bytes, for passes over large tables."""
        name, ksize, vsize = NAT_MAPS[family]
        return libbpf.map_items_batch(self.fd(name), ksize, vsize)

    def nat_lookup(self, key: st.NatKey) -> st.NatEntry | None:
        """The entry under `key`, in `nat` or (IPv6 addresses) `nat6`."""
        name, _, vsize = NAT_MAPS[st.nat_family(key.saddr)]
        raw = libbpf.map_lookup(self.fd(name), st.pack_nat_key(key), vsize)
        return None if raw is None else st.unpack_nat_entry(raw)

    def nat_delete(self, key: st.NatKey) -> bool:
        return libbpf.map_delete(self.fd(NAT_MAPS[st.nat_family(key.saddr)][0]),
                                 st.pack_nat_key(key))

    def nat_update(self, key: st.NatKey, entry: st.NatEntry) -> None:
        libbpf.map_update(self.fd(NAT_MAPS[st.nat_family(key.saddr)][0]), st.pack_nat_key(key),
                          st.pack_nat_entry(entry))

    def nat_capacity(self, family: int = 4) -> int:
        return libbpf.map_info(self._fds[NAT_MAPS[family][0]]).max_entries

    # counters -------------------------------------------------------------------------------

    def counters(self) -> dict[str, tuple[int, int]]:
        """reason name -> (packets, bytes), summed over all CPUs, both hooks and both
        families; every reason present."""
        return _summed(self.counters_by_family_hook(), lambda family, hook, reason: reason)

    def counters_by_hook(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(hook name, reason name) -> (packets, bytes), summed over all CPUs and both
        families; every pair present."""
        return _summed(self.counters_by_family_hook(), lambda family, hook, reason:
                       (hook, reason))

    def counters_by_family(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(family name "ipv4" / "ipv6", reason name) -> (packets, bytes), summed over all
        CPUs and both hooks; every pair present."""
        return _summed(self.counters_by_family_hook(), lambda family, hook, reason:
                       (family, reason))

    def counters_by_family_hook(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(family, hook, reason) -> (packets, bytes), summed over all CPUs; every triple
        present. A program built before a dimension counted what it has under the first
        family (ipv4) and hook (from_pod); the others read 0."""
        stride = (st.SIZEOF_COUNTER + 7) // 8 * 8
        size = libbpf.percpu_value_size(st.SIZEOF_COUNTER)
        out: dict[tuple[str, str, str], tuple[int, int]] = {}
        for family, family_name in sorted(st.FAMILY_NAMES.items()):
            for hook, hook_name in sorted(st.HOOK_NAMES.items()):
                for value, reason in st.REASON_NAMES.items():
                    index = st.counter_index(family, hook, value)
                    raw = (libbpf.map_lookup(self.fd("counters"), index.to_bytes(4, "little"),
                                             size)
                           if index < self.counter_entries else None)
                    pk = by = 0
                    for off in range(0, len(raw or b""), stride):
                        p, b = st.unpack_counter(raw[off:off + st.SIZEOF_COUNTER])
                        pk += p
                        by += b
                    out[(family_name, hook_name, reason)] = (pk, by)
        return out

    def reset_counters(self) -> None:
        """Every counter of every family and hook to 0."""
        size = libbpf.percpu_value_size(st.SIZEOF_COUNTER)
        slots = st.FAMILY_MAX * st.HOOK_MAX * st.REASON_MAX
        for index in range(min(slots, self.counter_entries)):
            libbpf.map_update(self.fd("counters"), index.to_bytes(4, "little"), bytes(size))

    # trace events ---------------------------------------------------------------------------

    def trace_reader(self, callback: Callable[[st.TraceEvent], None]) -> libbpf.RingBuffer:
        """A ring-buffer reader calling `callback(TraceEvent)`; poll() it, close() it.

        Events are only produced while set_trace(True) is in effect.
        """
        return libbpf.RingBuffer(self.fd("trace_events"),
                                 lambda raw: callback(st.unpack_trace_event(raw)))

    def read_trace_events(self, timeout_ms: int = 0) -> list[st.TraceEvent]:
        """Drain what is in the ring buffer now (waiting up to timeout_ms for a first one)."""
        events: list[st.TraceEvent] = []
        with self.trace_reader(events.append) as rb:
            if timeout_ms > 0:
                deadline = time.monotonic() + timeout_ms / 1000
                while not events:
                    left = int((deadline - time.monotonic()) * 1000)
                    if left <= 0:
                        break
                    rb.poll(left)
            rb.consume()
        return events


def _summed(counters: dict[tuple, tuple[int, int]], key: Callable[..., object]) -> dict:
    """counters_by_family_hook() summed into the keys key(family, hook, reason) gives, in
    the order they first come."""
    out: dict = {}
    for triple, (p, b) in counters.items():
        k = key(*triple)
        pk, by = out.get(k, (0, 0))
        out[k] = (pk + p, by + b)
    return out


@dataclass
class Program:
    name: str
    fd: int         # owned by the bcc module of the LoadedDatapath
    id: int


@dataclass
class LoadedDatapath:
    """Programs and maps of one load; keep it alive until the programs are attached."""

    bpf: object                          # bcc.BPF: owns the program and map fds
    programs: dict[str, Program]         # the attached ones (PROGRAMS)
    maps: DatapathMaps
    map_ids: dict[str, int] = field(default_factory=dict)
    programs6: dict[str, Program] = field(default_factory=dict)     # in `progs6` (PROGRAMS6)

    @property
    def from_pod(self) -> Program:
        return self.programs["from_pod"]

    @property
    def from_underlay(self) -> Program:
        return self.programs["from_underlay"]

    @property
    def prog_ids(self) -> dict[str, int]:
        return {n: p.id for n, p in self.programs.items()}

    def close(self) -> None:
        """Drop this process's fds (attached programs stay loaded through their filters)."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self) -> "LoadedDatapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(router_ip: str, source: Path = SOURCE, cflags: list[str] | None = None,
         trace: bool = False, node_ip: str | None = None, nat: dict[str, int] | None = None,
         nat_max_flows: int = DEFAULT_NAT_MAX_FLOWS, nat6_max_flows: int = 0,
         router_ip6: str | None = None, node_ip6: str | None = None) -> LoadedDatapath:
    """Compile and load both programs and the IPv6 programs they hand IPv6 to (in
    `progs6`), write config.

    router_ip is the pods' gateway; node_ip the address traffic leaving the
    cluster is source-NATed to (None: BPF SNAT off, such traffic goes to the
    stack); router_ip6 and node_ip6 the same for IPv6 (None: none); nat overrides
    shared_types.NAT_CONFIG_DEFAULTS; the NAT map holds
    two entries for each of nat_max_flows flows, the IPv6 NAT map for nat6_max_flows (0: an
    IPv4-only lab, a map of one entry: a hash map's memory is allocated when it is made).

    `progs6` is emptied by the kernel when the last file descriptor or pin of it from user
    space goes (a program array's entries hold programs, so nothing outlives its users):
    keep the LoadedDatapath open, or pin_progs6(), for IPv6 to reach the IPv6 programs.
    """
    # validate before spending a compile on it
    st.pack_config(router_ip, trace, node_ip, nat, router_ip6, node_ip6)
    if not 1 <= nat_max_flows <= MAX_NAT_MAX_FLOWS:
        raise ValueError(f"nat_max_flows must be 1..{MAX_NAT_MAX_FLOWS}, not {nat_max_flows}")
    bpf = compile_bpf(source, [f"-DHR_NAT_MAP_SIZE={2 * nat_max_flows}",
                               f"-DHR_NAT6_MAP_SIZE={max(1, 2 * nat6_max_flows)}", *(cflags or [])])
    try:
        programs, programs6 = {}, {}
        for names, into in ((PROGRAMS, programs), (PROGRAMS6, programs6)):
            for name in names:
                fd = load_program(bpf, name)
                into[name] = Program(name=name, fd=fd, id=libbpf.prog_info(fd).id)
        maps = DatapathMaps.from_bcc(bpf)
        for name, prog in programs6.items():
            libbpf.map_update(maps.fd("progs6"), st.PROG6_SLOTS[name].to_bytes(4, "little"),
                              prog.fd.to_bytes(4, "little"))
        maps.set_config(router_ip, trace, node_ip, nat, router_ip6, node_ip6)
    except BaseException:
        bpf.cleanup()
        raise
    return LoadedDatapath(bpf=bpf, programs=programs, maps=maps, map_ids=dict(maps.ids),
                          programs6=programs6)
