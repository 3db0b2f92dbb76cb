"""Events, as Kubernetes records them: time, type, reason, object, message.

Every significant change to a lab (enable, disable, a refused or forced
enable, a blocked iptables rule, programs attached or detached) is appended to
the lab's event log, ``<state dir>/labs/<lab>.events.jsonl``, one JSON object
per line. Appends of one line are atomic for O_APPEND writes of this size, so
several processes (the CLI, the rule guard) can record into the same log.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

from netns_lab.state import events_path, labs_dir

NORMAL, WARNING = "Normal", "Warning"


def log_path(lab: str):
    return events_path(lab)


def record(lab: str, type_: str, reason: str, obj: str, message: str, **details) -> dict:
    event = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
             "type": type_, "reason": reason, "object": obj, "message": message}
    if details:
        event["details"] = details
    labs_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path(lab), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)
    return event


def read(lab: str) -> list[dict]:
    try:
        with open(log_path(lab)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def follow(lab: str, poll_s: float = 0.2):
    """Yield events as they are appended (the existing ones first), until interrupted."""
    path = log_path(lab)
    offset = 0
    while True:
        try:
            with open(path) as f:
                f.seek(offset)
                while line := f.readline():
                    if not line.endswith("\n"):
                        break  # a line still being written: read it next time
                    offset += len(line.encode())
                    yield json.loads(line)
        except FileNotFoundError:
            pass
        time.sleep(poll_s)


def format_event(event: dict) -> str:
    return (f"{event['time']}  {event['type']:<7}  {event['reason']:<22} {event['object']:<18} "
            f"{event['message']}")

