"""CPU time and memory of a server's process tree, split by role (psutil; benchmarks only).

Roles: "http" (processes that accept HTTP connections), "worker" (inference workers), "main"
(the process we started), "other" (multiprocessing manager, resource tracker ...). This server
names its processes (`onnxship-http0`, `onnxship-worker1` ... in /proc/<pid>/comm); for any other
server (e.g. an older checkout) the roles are guessed: spawned multiprocessing children are
workers, forked children that hold a listening TCP socket are HTTP servers.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import psutil

ROLES = ("http", "worker", "main", "other")


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def role(process: psutil.Process, root_pid: int) -> str:
    try:
        name = process.name()
        if name.startswith("onnxship-"):
            kind = {"work": "worker"}.get(k := name[len("onnxship-"):].rstrip("0123456789"), k)
            return kind if kind in ROLES else "other"
        if process.pid == root_pid:
            return "main"
        cmdline = " ".join(process.cmdline())
        if "resource_tracker" in cmdline:
            return "other"
        if "multiprocessing.spawn" in cmdline or "spawn_main" in cmdline:
            return "worker"
        if any(c.status == psutil.CONN_LISTEN for c in process.net_connections(kind="tcp")):
            # LitServe's manager process is forked after the socket is bound, before the workers
            root = psutil.Process(root_pid)
            spawned = [c.create_time() for c in root.children() if "spawn_main" in " ".join(c.cmdline())]
            return "other" if spawned and process.create_time() < min(spawned) else "http"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return "other"


@dataclass
class CpuSample:
    by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds of processes alive now
    self_seconds: float = 0.0  # this (load generator) process

    def minus(self, earlier: CpuSample) -> CpuSample:
        roles = set(self.by_role) | set(earlier.by_role)
        return CpuSample({r: max(0.0, self.by_role.get(r, 0.0) - earlier.by_role.get(r, 0.0)) for r in roles},
                         self.self_seconds - earlier.self_seconds)

    @property
    def server_seconds(self) -> float:
        return sum(self.by_role.values())


class RoleCache:
    """Roles are looked up once per pid (net_connections is slow)."""

    def __init__(self, root_pid: int | None):
        self.root_pid = root_pid
        self.roles: dict[int, str] = {}

    def sample(self) -> CpuSample:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        sample = CpuSample({}, usage.ru_utime + usage.ru_stime)
        if self.root_pid is None:
            return sample
        for process in tree(self.root_pid):
            try:
                if process.pid not in self.roles:
                    self.roles[process.pid] = role(process, self.root_pid)
                times = process.cpu_times()
                kind = self.roles[process.pid]
                sample.by_role[kind] = sample.by_role.get(kind, 0.0) + times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return sample


def rss_bytes(pid: int) -> int:
    """Resident memory of the whole tree (sum of RSS: shared pages count once per process)."""
    total = 0
    for process in tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def pids_by_role(pid: int) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for process in tree(pid):
        found.setdefault(role(process, pid), []).append(process.pid)
    return found
