"""A real PostgreSQL for the tests: its own cluster in a temp dir, on a free 127.0.0.1 port,
run as the `postgres` user when the tests run as root, removed at the end of the session.

Debian's `postgresql` package (installed by .ci/tools) keeps its programs in
/usr/lib/postgresql/<version>/bin, off PATH; they are looked up there too."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from .processes import free_port


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


class PostgresCluster:
    """One PostgreSQL server; each test takes a database of its own (`database()`)."""

    def __init__(self, initdb: str, pg_ctl: str, *, fsync: bool = False) -> None:
        self._initdb, self._pg_ctl, self._fsync = initdb, pg_ctl, fsync
        self.directory = Path(tempfile.mkdtemp(prefix="hms-pg-"))
        self.data = self.directory / "data"
        self.sockets = self.directory / "sockets"
        self.log = self.directory / "postgres.log"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self.sockets.mkdir()
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.directory, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            self._initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.start()

    def start(self) -> None:
        # fsync off for tests: a test run need not survive a power cut, only a server crash
        # (`pg_ctl -m immediate`), which the OS page cache outlives. Benches keep it on.
        durability = "" if self._fsync else "-c fsync=off -c full_page_writes=off "
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            f"{durability}-c max_connections=400 -c shared_buffers=64MB"
        )
        self._run(
            self._pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(self._pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        """Stops the server as a crash would (`-m immediate`) and starts it again."""
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def refuse_connections(self, url: str) -> None:
        """Ends every session of `url`'s database and refuses new ones: the database is gone
        for whoever uses it."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [name],
            )

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
