"""CPU time of the host and of a server's processes, from Linux /proc, to tell who saturated.

Off Linux these return None and the report leaves the figures out.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def host_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole host since boot, or None without /proc/stat."""
    try:
        fields = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def host_busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of all the host's cores that were busy between two ``host_ticks()``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields after the command name


def _children(pid: int) -> list[int]:
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def process_tree(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants that are alive now (e.g. a server's workers)."""
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen or _stat(pid) is None:
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds used so far by these processes (None if none is alive)."""
    total, alive = 0, False
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            alive = True
            total += int(fields[11]) + int(fields[12])
    return total / TICKS if alive else None
