"""What each lab created, recorded before it is created.

A lab's record (``<state dir>/labs/<lab>.json``) lists every namespace the lab
will create before the first one exists, so ``lab down`` can remove all of it
after a crash or SIGKILL at any point. The directory lives under /run (tmpfs),
as named network namespaces do, so both vanish together on reboot.
``HOSTROUTING_STATE_DIR`` moves it (tests use that to stay apart).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("HOSTROUTING_STATE_DIR", "/run/ebpf-hostrouting"))


def labs_dir() -> Path:
    return state_dir() / "labs"


def events_path(name: str) -> Path:
    """The lab's event log (written by datapath.events), removed with the lab."""
    return labs_dir() / f"{name}.events.jsonl"


class LabStateError(RuntimeError):
    """A lab that does not exist, or exists already."""


@dataclass
class LabState:
    name: str
    topology: dict
    mode: str = "legacy"
    phase: str = "building"  # building -> ready; anything else means a crash
    namespaces: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    # Per node: what the datapath attached, so it can be detached exactly.
    datapath: dict = field(default_factory=dict)
    # The daemon that blocks new firewall rules while in eBPF mode (0: none).
    guard_pid: int = 0
    # How it blocks, per backend, as it reported when it started.
    guard_backends: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return labs_dir() / f"{self.name}.json"

    def save(self) -> None:
        labs_dir().mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        events_path(self.name).unlink(missing_ok=True)


def load_state(name: str) -> LabState:
    path = labs_dir() / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabStateError(f"no lab named {name!r} (see: hostrouting lab show --all)") from None
    except (OSError, ValueError) as e:
        raise LabStateError(f"lab {name!r}: unreadable state file {path}: {e}") from None
    return LabState(**data)


def lab_names() -> list[str]:
    d = labs_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


@contextlib.contextmanager
def lab_lock(name: str):
    """Serialise changes to one lab across processes (released on any exit).

    When the block leaves no lab behind (it was removed, or never made), the
    lock file goes too, still under the lock: a lab leaves no file in the
    state directory. A process that was waiting then holds a lock on the
    removed file and finds no lab, which is what it would have found anyway.
    """
    labs_dir().mkdir(parents=True, exist_ok=True)
    path = labs_dir() / f"{name}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            if not (labs_dir() / f"{name}.json").exists():
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
