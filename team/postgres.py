"""PostgreSQL for the team stack: Debian's server binaries, one cluster under TEAM_DIR/postgres.

PostgreSQL refuses to run as root: as root the cluster runs as the Debian package's `postgres` user
(data directory owned by it), otherwise as the current user. It listens on 127.0.0.1 only; the
generated password (TEAM_DIR/secrets, mode 0600) is never put on a command line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from team.config import DATABASES, DB_USER, PG_HOST, Config, TeamError


def pg_bin(config: Config) -> Path:
    if config.pg_bin is not None:
        if not (config.pg_bin / "postgres").is_file():
            raise TeamError(f"TEAM_PG_BIN={config.pg_bin}: no postgres binary there", 2)
        return config.pg_bin
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not found:
        raise TeamError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/postgres): "
            "install them with `apt-get install -y postgresql` (or set TEAM_PG_BIN)", 2)
    return found[-1].parent


@dataclass(frozen=True)
class RunAs:
    """Who PostgreSQL runs as: `postgres` when we are root (it refuses root), else ourselves."""

    user: str | None = None
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)

    @classmethod
    def for_postgres(cls) -> "RunAs":
        if os.geteuid() != 0:
            return cls()
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise TeamError("running as root, and PostgreSQL refuses root: it needs the `postgres` user that "
                            "Debian's postgresql package creates (apt-get install -y postgresql)", 2) from None
        return cls(user="postgres", uid=entry.pw_uid, gid=entry.pw_gid)

    def popen_kwargs(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def unreachable_parent(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above `path` that user uid/gid cannot enter (None: all fine)."""
    for parent in reversed(path.parents):
        try:
            info = parent.stat()
        except OSError:
            return None  # does not exist yet: we create it
        if uid == 0:
            continue
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return parent
    return None


def password(config: Config) -> str:
    path = config.secrets / "postgres-password"
    if path.is_file():
        return path.read_text().strip()
    config.secrets.mkdir(parents=True, exist_ok=True)
    os.chmod(config.secrets, 0o700)
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def write_pgpass(config: Config) -> Path:
    """libpq's password file for MLflow's connection (mode 0600, or libpq ignores it)."""
    path = config.secrets / "pgpass"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{PG_HOST}:{config.pg_port}:*:{DB_USER}:{password(config)}\n")
    os.chmod(path, 0o600)
    return path


def init_cluster(config: Config, bindir: Path, run_as: RunAs) -> bool:
    """initdb once (False when the cluster already exists)."""
    if (config.data_dir / "PG_VERSION").is_file():
        return False
    blocked = unreachable_parent(config.pg_dir, run_as.uid, run_as.gid)
    if blocked is not None:
        raise TeamError(
            f"PostgreSQL runs as user {run_as.user or run_as.uid} and cannot enter {blocked} "
            f"(mode {stat.filemode(blocked.stat().st_mode)}): make it traversable (chmod o+x {blocked}) "
            "or set TEAM_DIR to a directory it can reach", 2)
    config.pg_dir.mkdir(parents=True, exist_ok=True)
    if run_as.user is not None:
        os.chown(config.pg_dir, run_as.uid, run_as.gid)
    os.chmod(config.pg_dir, 0o700)
    pwfile = config.pg_dir / ".initdb-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password(config) + "\n")
    if run_as.user is not None:
        os.chown(pwfile, run_as.uid, run_as.gid)
    try:
        done = subprocess.run(
            [str(bindir / "initdb"), "-D", str(config.data_dir), "-U", DB_USER, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"],
            cwd=config.pg_dir, capture_output=True, text=True, timeout=300, **run_as.popen_kwargs())
    finally:
        pwfile.unlink(missing_ok=True)
    (config.logs / "initdb.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        shutil.rmtree(config.data_dir, ignore_errors=True)
        raise TeamError(f"initdb failed (exit {done.returncode}):\n{done.stderr.strip() or done.stdout.strip()}")
    return True


def start_postgres(config: Config, bindir: Path, run_as: RunAs) -> subprocess.Popen:
    log = open(config.logs / "postgres.log", "ab")
    try:
        return subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(config.data_dir), "-p", str(config.pg_port),
             "-c", f"listen_addresses={PG_HOST}", "-c", "unix_socket_directories="],
            cwd=config.pg_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, **run_as.popen_kwargs())
    finally:
        log.close()


def pg_connect(config: Config, dbname: str = "postgres"):
    try:
        import psycopg
    except ImportError:
        raise TeamError("the PostgreSQL driver psycopg is missing: make install (requirements/pipeline.txt)", 2) from None
    return psycopg.connect(host=PG_HOST, port=config.pg_port, user=DB_USER, password=password(config),
                           dbname=dbname, connect_timeout=3, autocommit=True)


def pg_ready(config: Config) -> bool:
    try:
        with pg_connect(config):
            return True
    except TeamError:
        raise
    except Exception:
        return False


def ensure_databases(config: Config) -> list[str]:
    created = []
    with pg_connect(config) as connection:
        existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                connection.execute(f'CREATE DATABASE "{name}"')
                created.append(name)
    return created


