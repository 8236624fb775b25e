"""Finding this machine's processes through /proc, so tests stop exactly what they started.

Never `ray stop` (it kills every Ray on the machine): a test gives the processes it starts a marker
variable in their environment and stops the PIDs that carry it.
"""
from __future__ import annotations

import os
from pathlib import Path


def pids_with_env(name: str, value: str | set[str]) -> list[int]:
    """PIDs of this user's processes whose environment holds name=value, or name=v for a v in the set
    value (this process excluded)."""
    values = {value} if isinstance(value, str) else set(value)
    needles = {f"{name}={v}".encode() for v in values}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needles.intersection(env):
            pids.append(int(entry))
    return pids


def children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process on the machine."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, their children, ...)."""
    kids, out, todo = children_map(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    """The command line of pid, arguments joined by spaces ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
