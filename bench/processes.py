"""CPU and memory of a process and every process it runs (the daemon's probe workers)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                queue.extend(int(child) for child in task.read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU of `pid` and every process it runs (those alive now)."""
    total = 0.0
    for process in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and every process it runs."""
    total = 0.0
    for process in descendants(pid):
        with contextlib.suppress(OSError):
            total += rss_mb(process)
    return total
