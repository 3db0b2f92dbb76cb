"""Loader and map access for bpf_c/host_routing.c.

`load(router_ip)` compiles the C file with bcc, loads `from_pod` and
`from_underlay` as sched_cls programs and writes the config. Nothing is pinned:
the programs (and through them the maps) live as long as a TC filter or an
open fd refers to them. A later process gets at the maps of an attached
program with `DatapathMaps.from_prog_id(prog_id)` (program id -> its map ids
-> map fds, matched by name).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from datapath import libbpf, shared_types as st
from datapath.bpf_build import BPF_DIR, compile_bpf, load_program

SOURCE = BPF_DIR / "host_routing.c"
PROGRAMS = ("from_pod", "from_underlay")
MAP_NAMES = ("endpoints", "config", "counters", "trace_events", "cluster_cidrs", "node_routes",
             "nat", "nat_frags", "pod_veths")
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
}


class DatapathError(RuntimeError):
    """The loaded objects are not what this module expects (stale build, wrong program)."""


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
            for map_id in pinfo.map_ids:
                mfd = libbpf.map_fd_by_id(map_id)
                name = libbpf.map_info(mfd).name
                if name in MAP_NAMES and name not in fds:
                    fds[name] = mfd
                    ids[name] = map_id
                else:
                    mfd.close()
            if not set(REQUIRED_MAPS) <= set(fds):
                raise DatapathError(
                    f"program {prog_id} ({pinfo.name}) does not use the datapath maps "
                    f"(found {sorted(fds)}, need {list(REQUIRED_MAPS)})")
            return cls(fds, ids)
        except BaseException:
            for fd in fds.values():
                fd.close()
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
        """The pod `ip` behind host-side veth `ifindex`: in `endpoints` and, for from_pod's
        spoof check, in `pod_veths` (a pod that moved to another veth leaves its old slot)."""
        old = self._endpoint(ip)
        libbpf.map_update(self.fd("endpoints"), st.ip_to_key(ip),
                          st.pack_endpoint(ifindex, mac, node_mac))
        if old is not None and old.ifindex != ifindex:
            self._clear_pod_veth(old.ifindex, ip)
        self._set_pod_veth(ifindex, st.pack_pod_veth(ip, mac))

    def delete_endpoint(self, ip: str) -> bool:
        old = self._endpoint(ip)
        if old is not None:
            self._clear_pod_veth(old.ifindex, ip)
        return libbpf.map_delete(self.fd("endpoints"), st.ip_to_key(ip))

    def _endpoint(self, ip: str) -> st.Endpoint | None:
        raw = libbpf.map_lookup(self.fd("endpoints"), st.ip_to_key(ip), st.SIZEOF_ENDPOINT)
        return st.unpack_endpoint(raw) if raw is not None else None

    def _set_pod_veth(self, ifindex: int, value: bytes) -> None:
        # beyond the array (or maps of a program without it): from_pod asks `endpoints`
        if "pod_veths" in self._fds and 0 <= ifindex < st.POD_VETH_SLOTS:
            libbpf.map_update(self.fd("pod_veths"), ifindex.to_bytes(4, "little"), value)

    def _clear_pod_veth(self, ifindex: int, ip: str) -> None:
        """Empty slot `ifindex` if it still holds `ip` (another pod may have it by now)."""
        if "pod_veths" not in self._fds or not 0 <= ifindex < st.POD_VETH_SLOTS:
            return
        raw = libbpf.map_lookup(self.fd("pod_veths"), ifindex.to_bytes(4, "little"),
                                st.SIZEOF_POD_VETH)
        if raw is not None and raw[:4] == st.ip_to_key(ip):
            self._set_pod_veth(ifindex, bytes(st.SIZEOF_POD_VETH))

    def endpoints(self) -> dict[str, st.Endpoint]:
        return {st.key_to_ip(k): st.unpack_endpoint(v)
                for k, v in libbpf.map_items(self.fd("endpoints"), 4, st.SIZEOF_ENDPOINT)}

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

    # config ---------------------------------------------------------------------------------

    def config(self) -> st.Config:
        raw = libbpf.map_lookup(self.fd("config"), (0).to_bytes(4, "little"), st.SIZEOF_CONFIG)
        return st.unpack_config(raw)

    def set_config(self, router_ip: str, trace: bool = False, node_ip: str | None = None,
                   nat: dict[str, int] | None = None) -> None:
        """router_ip: the pods' gateway; node_ip: the SNAT source (None: BPF SNAT off)."""
        libbpf.map_update(self.fd("config"), (0).to_bytes(4, "little"),
                          st.pack_config(router_ip, trace, node_ip, nat))

    def set_trace(self, on: bool) -> None:
        cfg = self.config()
        self.set_config(cfg.router_ip, on, cfg.node_ip, cfg.nat)

    # NAT table ------------------------------------------------------------------------------

    def nat_entries(self) -> list[tuple[st.NatKey, st.NatEntry]]:
        return [(st.unpack_nat_key(k), st.unpack_nat_entry(v))
                for k, v in self.nat_raw_entries()]

    def nat_raw_entries(self) -> list[tuple[bytes, bytes]]:
        """The NAT table as raw (key, value) bytes, for passes over large tables."""
        return libbpf.map_items_batch(self.fd("nat"), st.SIZEOF_NAT_KEY, st.SIZEOF_NAT_ENTRY)

    def nat_lookup(self, key: st.NatKey) -> st.NatEntry | None:
        raw = libbpf.map_lookup(self.fd("nat"), st.pack_nat_key(key), st.SIZEOF_NAT_ENTRY)
        return None if raw is None else st.unpack_nat_entry(raw)

    def nat_delete(self, key: st.NatKey) -> bool:
        return libbpf.map_delete(self.fd("nat"), st.pack_nat_key(key))

    def nat_update(self, key: st.NatKey, entry: st.NatEntry) -> None:
        libbpf.map_update(self.fd("nat"), st.pack_nat_key(key), st.pack_nat_entry(entry))

    def nat_capacity(self) -> int:
        return libbpf.map_info(self._fds["nat"]).max_entries

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
    programs: dict[str, Program]
    maps: DatapathMaps
    map_ids: dict[str, int] = field(default_factory=dict)

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
         nat_max_flows: int = DEFAULT_NAT_MAX_FLOWS, nat6_max_flows: int = 0) -> LoadedDatapath:
    """Compile and load both programs, write config.

    router_ip is the pods' gateway; node_ip the address traffic leaving the
    cluster is source-NATed to (None: BPF SNAT off, such traffic goes to the
    stack); nat overrides shared_types.NAT_CONFIG_DEFAULTS; the NAT map holds
    two entries for each of nat_max_flows flows, the IPv6 NAT map for nat6_max_flows (0: an
    IPv4-only lab, a map of one entry: a hash map's memory is allocated when it is made).
    """
    st.pack_config(router_ip, trace, node_ip, nat)  # validate before spending a compile on it
    if not 1 <= nat_max_flows <= MAX_NAT_MAX_FLOWS:
        raise ValueError(f"nat_max_flows must be 1..{MAX_NAT_MAX_FLOWS}, not {nat_max_flows}")
    bpf = compile_bpf(source, [f"-DHR_NAT_MAP_SIZE={2 * nat_max_flows}",
                               f"-DHR_NAT6_MAP_SIZE={max(1, 2 * nat6_max_flows)}", *(cflags or [])])
    try:
        programs = {}
        for name in PROGRAMS:
            fd = load_program(bpf, name)
            programs[name] = Program(name=name, fd=fd, id=libbpf.prog_info(fd).id)
        maps = DatapathMaps.from_bcc(bpf)
        maps.set_config(router_ip, trace, node_ip, nat)
    except BaseException:
        bpf.cleanup()
        raise
    return LoadedDatapath(bpf=bpf, programs=programs, maps=maps, map_ids=dict(maps.ids))
