"""How many cores this process may use, and how many tasks want one right now."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_loadavg: int | None = None  # a descriptor of /proc/loadavg kept open (pread needs no offset)


def runnable_tasks() -> int | None:
    """Tasks running or ready to run on the whole machine, the caller included (/proc/loadavg's
    "running/total", about 1 us); None where the OS does not say."""
    global _loadavg
    try:
        if _loadavg is None:
            _loadavg = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_loadavg, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def cores_to_spare(cores: int) -> int:
    """Cores nobody but the caller wants at this moment (0 when unknown)."""
    running = runnable_tasks()
    return 0 if running is None else max(0, cores - (running - 1))
