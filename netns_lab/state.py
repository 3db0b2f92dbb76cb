"""What a lab should be: its intent, written before anything is created.

A lab's record (``<state dir>/labs/<lab>.json``) holds intent only: the
topology, the namespaces it is made of (listed before the first one exists),
and per node the routing wanted, ``desired``: ``legacy``, ``ebpf`` or
``absent``. What the kernel has now is never recorded: it is read from the
kernel (datapath/observe.py) and brought to ``desired`` by steps that are
each safe to repeat (datapath/converge.py), so a record cannot go stale when
a command is killed half-way. ``phase`` says whether ``lab up`` finished.

The directory lives under /run (tmpfs), as named network namespaces do, so
both vanish together on reboot. ``HOSTROUTING_STATE_DIR`` moves it (tests use
that to stay apart). Every file of a lab is named ``<lab>.<something>``
(record, its ``.json.tmp``, ``.lock``, ``.events.jsonl``, the guard's
``.guard`` pidfile), and ``lab down`` removes them all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MODES = ("legacy", "ebpf", "absent")
LOCK_TIMEOUT_S = float(os.environ.get("HOSTROUTING_LOCK_TIMEOUT", "120"))


def state_dir() -> Path:
    return Path(os.environ.get("HOSTROUTING_STATE_DIR", "/run/ebpf-hostrouting"))


#: Where a lab's BPF objects are pinned (a bpffs), one directory per lab: what only a pin
#: keeps (a program array's entries, datapath/host_routing.py) lasts until lab down.
BPF_PIN_ROOT = Path("/sys/fs/bpf/ebpf-hostrouting")


def lab_pin_dir(name: str) -> Path:
    return BPF_PIN_ROOT / name


def remove_lab_pins(name: str) -> None:
    """Unpin every BPF object of the lab (the kernel frees what nothing else holds)."""
    pins = lab_pin_dir(name)
    with contextlib.suppress(FileNotFoundError):    # or removed meanwhile by another command
        for pin in list(pins.iterdir()):
            pin.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        pins.rmdir()


def pinned_lab_names() -> list[str]:
    """Labs that have a pin directory (the pin root is the machine's: any state directory's)."""
    try:
        return sorted(p.name for p in BPF_PIN_ROOT.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def labs_dir() -> Path:
    return state_dir() / "labs"


def events_path(name: str) -> Path:
    """The lab's event log (written by datapath.events), removed with the lab."""
    return labs_dir() / f"{name}.events.jsonl"


def guard_pidfile(name: str) -> Path:
    """The rule guard's pid, start time and mechanisms; its mtime is the guard's heartbeat."""
    return labs_dir() / f"{name}.guard"


GUARD_MODULE = "datapath.rule_guard"


def guard_pidfile_arg(argv: list[str], name: str) -> str | None:
    """The --pidfile of a rule guard of lab ``name``, read from a command line of the one
    shape rule_guard.start() gives it (``<python> -m datapath.rule_guard --lab <name>
    --pidfile <path> ...``); None for any other command line, whatever words it holds."""
    if argv[1:6] == ["-m", GUARD_MODULE, "--lab", name, "--pidfile"] and len(argv) > 6:
        return argv[6]
    return None


def lab_files(name: str) -> list[Path]:
    """Every file of the lab in the state directory (lab names have no dots)."""
    d = labs_dir()
    return sorted(d.glob(f"{name}.*")) if d.is_dir() else []


class LabStateError(RuntimeError):
    """A lab that does not exist, or exists already."""


@dataclass
class LabState:
    name: str
    topology: dict
    # per node name: "legacy", "ebpf" or "absent" (the lab is being removed)
    desired: dict = field(default_factory=dict)
    phase: str = "building"  # building -> ready; building after a crash means lab up was killed
    namespaces: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    # user firewall rules in node namespaces an operator accepted with enable --force
    forced_rules: list[str] = field(default_factory=list)
    # "<netns>/<device>" of the clsact qdiscs the lab adds, claimed before each is added (as
    # namespaces are listed before they exist): legacy removes exactly these
    qdiscs: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return labs_dir() / f"{self.name}.json"

    @property
    def mode(self) -> str:
        """The mode every node should be in ("mixed" when they differ)."""
        modes = set(self.desired.values())
        return modes.pop() if len(modes) == 1 else "mixed"

    def desire(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.desired = {node["name"]: mode for node in self.topology["nodes"]}

    def save(self) -> None:
        labs_dir().mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Every file of the lab but its lock (lab_lock removes that, still holding it)."""
        for path in lab_files(self.name):
            if path.suffix != ".lock":
                path.unlink(missing_ok=True)


def load_state(name: str) -> LabState:
    path = labs_dir() / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        from .builder import lab_namespaces    # (builder imports this module)
        if lab_namespaces(name):
            raise LabStateError(f"no record of lab {name!r} in {labs_dir()}, but namespaces "
                                f"of it exist (the state directory was wiped, or "
                                "HOSTROUTING_STATE_DIR differs from when it was made); remove "
                                f"them with: hostrouting lab down --lab {name}") from None
        raise LabStateError(f"no lab named {name!r} (see: hostrouting lab show --all)") from None
    except (OSError, ValueError) as e:
        raise LabStateError(f"lab {name!r}: unreadable state file {path}: {e}; remove the lab "
                            f"with: hostrouting lab down --lab {name}") from None
    known = {f.name for f in fields(LabState)}
    if not isinstance(data, dict) or set(data) - known or \
            not {"name", "topology", "desired"} <= set(data):
        raise LabStateError(f"lab {name!r}: state file {path} is not one this version writes "
                            f"(a lab made by an older version?); remove the lab with: "
                            f"hostrouting lab down --lab {name}")
    return LabState(**data)


def lab_names() -> list[str]:
    d = labs_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def stray_lab_names() -> list[str]:
    """Labs with files in the state directory but no record (a killed lab down)."""
    d = labs_dir()
    if not d.is_dir():
        return []
    return sorted({p.name.split(".", 1)[0] for p in d.iterdir() if "." in p.name}
                  - set(lab_names()))


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text or "unknown"


@contextlib.contextmanager
def lab_lock(name: str, timeout: float | None = None):
    """Serialise changes to one lab across processes (released on any exit).

    The holder writes its pid and command into the lock file, so a command that
    gives up after ``timeout`` seconds (HOSTROUTING_LOCK_TIMEOUT, default 120)
    names who holds it. When the block leaves no lab behind (it was removed, or
    never made), the lock file goes too, still under the lock: a waiter then
    holds a lock on a removed file, which locks nothing; so after every flock
    the locked file is checked to still be the file at the path (same inode),
    and the lock taken again otherwise.
    """
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    labs_dir().mkdir(parents=True, exist_ok=True)
    path = labs_dir() / f"{name}.lock"
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LabStateError(f"lab {name!r} is locked by {_holder(path)}; gave "
                                            f"up after {timeout:g}s (wait for it, or stop it)"
                                            ) from None
                    time.sleep(0.05)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)        # the file we locked was removed or replaced: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(_my_argv())[:200]})\n".encode(), 0)
        yield
    finally:
        try:
            if not (labs_dir() / f"{name}.json").exists():
                path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def _my_argv() -> list[str]:
    try:
        return Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []
