"""A small cffi (ABI mode) binding to the system's libbpf.so.1 (libbpf 1.1 API).

Only what the project needs: BPF_PROG_TEST_RUN, object info for programs and
maps (with programs' run-time stats), BPF_ENABLE_STATS, fds from ids, raw-bytes
map operations, and ring-buffer reading. Every
libbpf call that fails raises OSError with the errno (libbpf 1.x returns
-errno and sets errno). File descriptors this module opens are wrapped in
`Fd`, a context manager that closes them.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import cffi

ffi = cffi.FFI()
ffi.cdef("""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

/* libbpf 1.1, bpf.h */
struct bpf_test_run_opts {
	size_t sz;		/* size of this struct for forward/backward compatibility */
	const void *data_in;
	void *data_out;
	__u32 data_size_in;
	__u32 data_size_out;	/* in: max length of data_out; out: length of data_out */
	const void *ctx_in;
	void *ctx_out;
	__u32 ctx_size_in;
	__u32 ctx_size_out;
	__u32 retval;		/* out: return code of the BPF program */
	int repeat;
	__u32 duration;		/* out: average per repetition in ns */
	__u32 flags;
	__u32 cpu;
	__u32 batch_size;
};

/* uapi linux/bpf.h (6.1); __aligned_u64 is a plain __u64 on x86-64 */
struct bpf_prog_info {
	__u32 type;
	__u32 id;
	__u8 tag[8];
	__u32 jited_prog_len;
	__u32 xlated_prog_len;
	__u64 jited_prog_insns;
	__u64 xlated_prog_insns;
	__u64 load_time;
	__u32 created_by_uid;
	__u32 nr_map_ids;
	__u64 map_ids;
	char name[16];
	__u32 ifindex;
	__u32 gpl_compatible:1;
	__u32 _pad_gpl:31;	/* unnamed in uapi */
	__u64 netns_dev;
	__u64 netns_ino;
	__u32 nr_jited_ksyms;
	__u32 nr_jited_func_lens;
	__u64 jited_ksyms;
	__u64 jited_func_lens;
	__u32 btf_id;
	__u32 func_info_rec_size;
	__u64 func_info;
	__u32 nr_func_info;
	__u32 nr_line_info;
	__u64 line_info;
	__u64 jited_line_info;
	__u32 nr_jited_line_info;
	__u32 line_info_rec_size;
	__u32 jited_line_info_rec_size;
	__u32 nr_prog_tags;
	__u64 prog_tags;
	__u64 run_time_ns;
	__u64 run_cnt;
	__u64 recursion_misses;
	__u32 verified_insns;
	__u32 attach_btf_obj_id;
	__u32 attach_btf_id;
};

struct bpf_map_info {
	__u32 type;
	__u32 id;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;
	char name[16];
	__u32 ifindex;
	__u32 btf_vmlinux_value_type_id;
	__u64 netns_dev;
	__u64 netns_ino;
	__u32 btf_id;
	__u32 btf_key_type_id;
	__u32 btf_value_type_id;
	__u32 _pad;		/* unnamed in uapi */
	__u64 map_extra;
};

/* uapi linux/bpf.h (6.1): the ctx of BPF_PROG_TEST_RUN for skb programs;
 * the __bpf_md_ptr members are 8-byte slots, written here as __u64. */
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
	__u32 data;
	__u32 data_end;
	__u32 napi_id;
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 data_meta;
	__u64 flow_keys;
	__u64 tstamp;
	__u32 wire_len;
	__u32 gso_segs;
	__u64 sk;
	__u32 gso_size;
	__u8 tstamp_type;
	__u8 _pad[3];
	__u64 hwtstamp;
};

int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_map_get_fd_by_id(__u32 id);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
/* map_type is enum bpf_map_type; opts may be NULL */
int bpf_map_create(int map_type, const char *map_name, __u32 key_size, __u32 value_size,
                   __u32 max_entries, const void *opts);
int bpf_prog_get_next_id(__u32 start_id, __u32 *next_id);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values,
                         __u32 *count, const void *opts);
int bpf_map_get_next_id(__u32 start_id, __u32 *next_id);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_delete_elem(int fd, const void *key);
/* attach_type is enum bpf_attach_type; opts may be NULL */
int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
/* libbpf 1.1 bpf.h; later releases add fields after replace_prog_fd (sz tells them apart) */
struct bpf_prog_attach_opts {
	size_t sz;
	unsigned int flags;
	int replace_prog_fd;
};
int bpf_prog_attach_opts(int prog_fd, int target, int type,
                         const struct bpf_prog_attach_opts *opts);
int bpf_prog_detach2(int prog_fd, int attachable_fd, int type);
/* uapi union bpf_attr, the BPF_PROG_QUERY part as of Linux 6.6 (libbpf 1.1 knows no link_ids) */
struct hr_prog_query_attr {
	__u32 target;		/* fd, or ifindex (TCX) */
	__u32 attach_type;
	__u32 query_flags;
	__u32 attach_flags;
	__u64 prog_ids;
	__u32 count;
	__u32 _pad;
	__u64 prog_attach_flags;
	__u64 link_ids;
	__u64 link_attach_flags;
	__u64 revision;
};
long syscall(long number, ...);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int libbpf_num_possible_cpus(void);
/* type is enum bpf_stats_type; returns an fd: stats are collected while it is open */
int bpf_enable_stats(int type);

struct ring_buffer;
struct ring_buffer_opts;
typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
				     const struct ring_buffer_opts *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
""")

_lib = None

# uapi enum bpf_map_type values used here
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                    BPF_MAP_TYPE_LRU_PERCPU_HASH}

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


def lib():
    """The loaded libbpf.so.1 (opened on first use)."""
    global _lib
    if _lib is None:
        try:
            _lib = ffi.dlopen("libbpf.so.1")
        except OSError as e:
            raise OSError(_errno.ENOENT, f"cannot open libbpf.so.1 (install libbpf1): {e}") from e
    return _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret  # libbpf 1.x: -errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class Fd:
    """An owned file descriptor; closes on exit of a with-block or on close()."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("file descriptor closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Fd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass

    def __int__(self) -> int:
        return self.fileno()

    def __repr__(self) -> str:
        return f"Fd({self.fd})"


def _fdnum(fd) -> int:
    return fd.fileno() if hasattr(fd, "fileno") else int(fd)


# -- BPF_PROG_TEST_RUN --------------------------------------------------------------------

@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data_out: bytes
    duration: int       # ns, average per repetition

    __test__ = False    # not a pytest class


def skb_ctx(ifindex: int = 0, ingress_ifindex: int = 0, mark: int = 0, priority: int = 0,
            gso_size: int = 0, gso_segs: int = 0) -> bytes:
    """A struct __sk_buff for prog_test_run (only the fields the kernel accepts as input)."""
    ctx = ffi.new("struct __sk_buff *")
    ctx.ifindex = ifindex
    ctx.ingress_ifindex = ingress_ifindex
    ctx.mark = mark
    ctx.priority = priority
    ctx.gso_size = gso_size
    ctx.gso_segs = gso_segs
    return bytes(ffi.buffer(ctx))


def prog_test_run(prog_fd, data: bytes, ctx: bytes | None = None, repeat: int = 1,
                  out_room: int = 512) -> TestRunResult:
    """Run a loaded program once (or `repeat` times) on `data`, in the caller's netns."""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    data_in = ffi.from_buffer(bytes(data))
    out = ffi.new("char[]", len(data) + out_room)
    opts.data_in = data_in
    opts.data_size_in = len(data)
    opts.data_out = out
    opts.data_size_out = len(out)
    keep = []
    if ctx is not None:
        ctx_in = ffi.from_buffer(bytes(ctx))
        keep.append(ctx_in)
        opts.ctx_in = ctx_in
        opts.ctx_size_in = len(ctx)
    opts.repeat = repeat
    _check(lib().bpf_prog_test_run_opts(_fdnum(prog_fd), opts), "BPF_PROG_TEST_RUN")
    return TestRunResult(retval=opts.retval,
                         data_out=bytes(ffi.buffer(out, opts.data_size_out)),
                         duration=opts.duration)


# -- object info ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    type: int
    tag: str
    map_ids: tuple[int, ...]
    run_time_ns: int = 0    # total time in the program; moves only while BPF stats are on
    run_cnt: int = 0        # runs counted meanwhile


@dataclass(frozen=True)
class MapInfo:
    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


def prog_info(prog_fd) -> ProgInfo:
    fd = _fdnum(prog_fd)
    info = ffi.new("struct bpf_prog_info *")
    ln = ffi.new("__u32 *", ffi.sizeof(info[0]))
    _check(lib().bpf_obj_get_info_by_fd(fd, info, ln), "BPF_OBJ_GET_INFO_BY_FD (prog)")
    n = info.nr_map_ids
    ids: tuple[int, ...] = ()
    if n:
        arr = ffi.new("__u32[]", n)
        info2 = ffi.new("struct bpf_prog_info *")
        info2.nr_map_ids = n
        info2.map_ids = int(ffi.cast("uintptr_t", arr))
        ln[0] = ffi.sizeof(info2[0])
        _check(lib().bpf_obj_get_info_by_fd(fd, info2, ln), "BPF_OBJ_GET_INFO_BY_FD (prog)")
        ids = tuple(arr[i] for i in range(min(n, info2.nr_map_ids)))
    return ProgInfo(id=info.id, name=ffi.string(info.name).decode(), type=info.type,
                    tag=bytes(info.tag).hex(), map_ids=ids, run_time_ns=info.run_time_ns,
                    run_cnt=info.run_cnt)


def map_info(map_fd) -> MapInfo:
    info = ffi.new("struct bpf_map_info *")
    ln = ffi.new("__u32 *", ffi.sizeof(info[0]))
    _check(lib().bpf_obj_get_info_by_fd(_fdnum(map_fd), info, ln), "BPF_OBJ_GET_INFO_BY_FD (map)")
    return MapInfo(id=info.id, name=ffi.string(info.name).decode(), type=info.type,
                   key_size=info.key_size, value_size=info.value_size,
                   max_entries=info.max_entries, map_flags=info.map_flags)


def prog_fd_by_id(prog_id: int) -> Fd:
    return Fd(_check(lib().bpf_prog_get_fd_by_id(prog_id), f"BPF_PROG_GET_FD_BY_ID {prog_id}"))


def map_fd_by_id(map_id: int) -> Fd:
    return Fd(_check(lib().bpf_map_get_fd_by_id(map_id), f"BPF_MAP_GET_FD_BY_ID {map_id}"))


def obj_pin(fd, path: str) -> None:
    """BPF_OBJ_PIN: the object (program or map) stays as long as `path` in a bpffs does."""
    _check(lib().bpf_obj_pin(_fdnum(fd), path.encode()), f"BPF_OBJ_PIN {path}")


def obj_get(path: str) -> Fd:
    """BPF_OBJ_GET: an fd of the object pinned at `path`."""
    return Fd(_check(lib().bpf_obj_get(path.encode()), f"BPF_OBJ_GET {path}"))


def map_create(map_type: int, name: str, key_size: int, value_size: int,
               max_entries: int) -> Fd:
    """BPF_MAP_CREATE with default flags."""
    return Fd(_check(lib().bpf_map_create(map_type, name.encode(), key_size, value_size,
                                          max_entries, ffi.NULL), f"BPF_MAP_CREATE {name}"))


def _ids(next_id) -> list[int]:
    ids, cur = [], 0
    nxt = ffi.new("__u32 *")
    while True:
        ret = next_id(cur, nxt)
        if ret < 0 and -ret == _errno.ENOENT:
            return ids
        _check(ret, "BPF_*_GET_NEXT_ID")
        cur = nxt[0]
        ids.append(cur)


def prog_ids() -> list[int]:
    """Ids of every BPF program loaded on the machine (a census, for leak checks)."""
    return _ids(lib().bpf_prog_get_next_id)


def map_ids() -> list[int]:
    """Ids of every BPF map on the machine."""
    return _ids(lib().bpf_map_get_next_id)


# uapi enum bpf_stats_type
BPF_STATS_RUN_TIME = 0


def enable_stats(stats_type: int = BPF_STATS_RUN_TIME) -> Fd:
    """BPF_ENABLE_STATS: the kernel counts run time and runs of every program while the
    returned fd is open (kernel.bpf_stats_enabled itself is left as it is)."""
    return Fd(_check(lib().bpf_enable_stats(stats_type), "BPF_ENABLE_STATS"))


def num_possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


# -- raw map operations ---------------------------------------------------------------------

def percpu_value_size(value_size: int) -> int:
    """Bytes a lookup of a per-CPU map returns: each CPU's slot rounded up to 8 bytes."""
    return ((value_size + 7) // 8 * 8) * num_possible_cpus()


def map_lookup(map_fd, key: bytes, value_size: int) -> bytes | None:
    """Value for `key`, or None when absent. For per-CPU maps pass percpu_value_size()."""
    value = ffi.new("char[]", value_size)
    ret = lib().bpf_map_lookup_elem(_fdnum(map_fd), ffi.from_buffer(bytes(key)), value)
    if ret < 0 and -ret == _errno.ENOENT:
        return None
    _check(ret, "BPF_MAP_LOOKUP_ELEM")
    return bytes(ffi.buffer(value))


def map_update(map_fd, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(_fdnum(map_fd), ffi.from_buffer(bytes(key)),
                                     ffi.from_buffer(bytes(value)), flags),
           "BPF_MAP_UPDATE_ELEM")


def map_delete(map_fd, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    ret = lib().bpf_map_delete_elem(_fdnum(map_fd), ffi.from_buffer(bytes(key)))
    if ret < 0 and -ret == _errno.ENOENT:
        return False
    _check(ret, "BPF_MAP_DELETE_ELEM")
    return True


def map_keys(map_fd, key_size: int) -> Iterator[bytes]:
    """All keys of a map (a hash map changing meanwhile may skip or repeat some)."""
    fd = _fdnum(map_fd)
    cur = None
    nxt = ffi.new("char[]", key_size)
    while True:
        ret = lib().bpf_map_get_next_key(fd, ffi.NULL if cur is None else ffi.from_buffer(cur),
                                         nxt)
        if ret < 0 and -ret == _errno.ENOENT:
            return
        _check(ret, "BPF_MAP_GET_NEXT_KEY")
        cur = bytes(ffi.buffer(nxt))
        yield cur


def map_items(map_fd, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    for key in list(map_keys(map_fd, key_size)):
        value = map_lookup(map_fd, key, value_size)
        if value is not None:
            yield key, value


_ENOTSUPP = 524  # the kernel's internal "operation not supported", as BPF returns it


def map_items_batch(map_fd, key_size: int, value_size: int,
                    batch: int = 8192) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash-type map, `batch` at a time (BPF_MAP_LOOKUP_BATCH):
    one system call per batch instead of two per key (a 500k-entry NAT table dumped
    key by key costs seconds). Falls back to map_items where the kernel lacks it."""
    fd = _fdnum(map_fd)
    keys = ffi.new("char[]", key_size * batch)
    values = ffi.new("char[]", value_size * batch)
    token_in, token_out = ffi.new("char[8]"), ffi.new("char[8]")
    count = ffi.new("__u32 *")
    out: list[tuple[bytes, bytes]] = []
    first = True
    while True:
        count[0] = batch
        ret = lib().bpf_map_lookup_batch(fd, ffi.NULL if first else token_in, token_out, keys,
                                         values, count, ffi.NULL)
        if ret < 0 and -ret != _errno.ENOENT:
            if first and -ret in (_errno.EINVAL, _ENOTSUPP):     # a kernel without batches
                return list(map_items(map_fd, key_size, value_size))
            _check(ret, "BPF_MAP_LOOKUP_BATCH")
        kbuf, vbuf = ffi.buffer(keys), ffi.buffer(values)
        for i in range(count[0]):
            out.append((bytes(kbuf[i * key_size:(i + 1) * key_size]),
                        bytes(vbuf[i * value_size:(i + 1) * value_size])))
        if ret < 0:                     # ENOENT: that was the last batch
            return out
        ffi.memmove(token_in, token_out, 8)
        first = False


# uapi enum bpf_attach_type values used here
BPF_CGROUP_SETSOCKOPT = 22
BPF_TCX_INGRESS = 46        # Linux 6.6
BPF_TCX_EGRESS = 47

# BPF_PROG_ATTACH flags
BPF_F_REPLACE = 1 << 2

_NR_BPF = 321               # x86-64
_BPF_PROG_QUERY = 16


def link_create(prog_fd, target_fd, attach_type: int) -> Fd:
    """A bpf_link attaching the program to the target (a cgroup fd, ...): detached when
    the last fd of the link closes, so it never outlives its owner."""
    return Fd(_check(lib().bpf_link_create(_fdnum(prog_fd), _fdnum(target_fd), attach_type,
                                            ffi.NULL), "bpf_link_create"))


def prog_attach(prog_fd, target: int, attach_type: int, replace_fd=None) -> None:
    """BPF_PROG_ATTACH without a link (for TCX, target is an ifindex of the calling
    thread's netns); with replace_fd, that program is replaced in place (BPF_F_REPLACE)."""
    opts = ffi.new("struct bpf_prog_attach_opts *")
    opts.sz = ffi.sizeof("struct bpf_prog_attach_opts")
    if replace_fd is not None:
        opts.flags = BPF_F_REPLACE
        opts.replace_prog_fd = _fdnum(replace_fd)
    _check(lib().bpf_prog_attach_opts(_fdnum(prog_fd), target, attach_type, opts),
           "BPF_PROG_ATTACH")


def prog_detach(prog_fd, target: int, attach_type: int) -> bool:
    """BPF_PROG_DETACH of that program; False when it was not attached there."""
    ret = lib().bpf_prog_detach2(_fdnum(prog_fd), target, attach_type)
    if ret < 0 and -ret == _errno.ENOENT:
        return False
    _check(ret, "BPF_PROG_DETACH")
    return True


def prog_query(target: int, attach_type: int, room: int = 64) -> list[tuple[int, int]]:
    """(program id, link id or 0) of every program on a multi-program hook (TCX: target is
    an ifindex of the calling thread's netns), in the order they run. A raw bpf(2) call:
    libbpf 1.1 does not ask for link ids."""
    while True:
        attr = ffi.new("struct hr_prog_query_attr *")
        progs, links = ffi.new("__u32[]", room), ffi.new("__u32[]", room)
        attr.target, attr.attach_type, attr.count = target, attach_type, room
        attr.prog_ids = int(ffi.cast("uintptr_t", progs))
        attr.link_ids = int(ffi.cast("uintptr_t", links))
        ret = lib().syscall(ffi.cast("long", _NR_BPF), ffi.cast("int", _BPF_PROG_QUERY),
                            ffi.cast("void *", attr), ffi.cast("unsigned int", ffi.sizeof(attr[0])))
        if ret < 0:
            err = ffi.errno
            if err == _errno.ENOSPC:
                room *= 4
                continue
            raise OSError(err, f"BPF_PROG_QUERY: {os.strerror(err)}")
        return [(progs[i], links[i]) for i in range(attr.count)]


# -- ring buffer ----------------------------------------------------------------------------

class RingBuffer:
    """Read records of a BPF ring buffer map (by fd) with libbpf's ring_buffer API.

    `callback(data: bytes)` runs for each record during poll()/consume(). Use as a
    context manager; close() frees libbpf's state (the map fd stays the caller's).
    """

    def __init__(self, map_fd, callback: Callable[[bytes], None]):
        self._callback = callback
        self._error: BaseException | None = None

        def sample(_ctx, data, size):
            try:
                self._callback(bytes(ffi.buffer(data, size)))
            except BaseException as e:  # never unwind through C
                self._error = e
                return -1
            return 0

        self._cb = ffi.callback("int(void *, void *, size_t)", sample)
        rb = lib().ring_buffer__new(_fdnum(map_fd), self._cb, ffi.NULL, ffi.NULL)
        if rb == ffi.NULL:
            err = ffi.errno or _errno.EINVAL
            raise OSError(err, f"ring_buffer__new: {os.strerror(err)}")
        self._rb = rb

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms for records; returns how many were consumed."""
        ret = lib().ring_buffer__poll(self._rb, timeout_ms)
        self._raise_pending()
        if ret < 0 and -ret == _errno.EINTR:
            return 0
        return _check(ret, "ring_buffer__poll")

    def consume(self) -> int:
        """Consume what is there now without waiting."""
        ret = lib().ring_buffer__consume(self._rb)
        self._raise_pending()
        return _check(ret, "ring_buffer__consume")

    def close(self) -> None:
        if getattr(self, "_rb", None) is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
