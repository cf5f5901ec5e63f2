"""The one SQLite file: opened in WAL mode, written through a group-committing thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from monitor.storage.riders import carried, run_batch, settled
from registry import Overloaded, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
_Write = tuple[Callable[[sqlite_utils.Database], Any], "asyncio.Future[Any]"]

# 'HMS\0': marks the file as ours, so a foreign database is refused rather than written into.
APPLICATION_ID = 0x484D5300
MAX_BATCH = 512
# Writes queued behind the one committing; past this a write is refused (503 overloaded)
# instead of waiting seconds for its turn. A commit takes 1-5 ms; 20k is several batches.
MAX_PENDING_WRITES = 20_000
CHECKPOINT_INTERVAL = 1.0
STORAGE_LOG_INTERVAL = 60.0
# The writer's page cache, KiB (SQLite's default is 2,000). Pages it drops are read again
# from the kernel's page cache, a few µs against a commit's fsync; with 10,000 probed
# instances SQLite held 2.4 MB of the daemon's memory (sqlite3_memory_used), now 0.9 MB.
CACHE_KIB = 512


class DatabaseError(Exception):
    """The database file cannot be used (foreign, corrupt, unwritable)."""


class Database:
    """A single SQLite connection on a dedicated thread.

    Every call runs on that thread, so the event loop never blocks on I/O.
    Writes submitted while a transaction is committing are grouped into the
    next one (group commit): one fsync serves a whole batch, and a write that
    fails rolls back alone (the batch is replayed with a savepoint per write).
    `write` returns only after the COMMIT, which is what makes a 2xx durable.

    WAL checkpoints run on a second connection and thread, never inside a
    commit: an automatic checkpoint fsyncs the main file and would stall every
    write queued behind it.
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite_utils.Database | None = None
        self._pending: list[_Write] = []
        self._closing = False
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._checkpoint_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal")
        self._checkpointer: asyncio.Task[None] | None = None
        self._commits = 0
        self.writable = True  # False from a failed commit (disk full, read-only) to a good one
        self.failed_commits = 0
        self._logged: dict[str, float] = {}

    def _may_log(self, what: str) -> bool:
        now = time.monotonic()
        if now - self._logged.get(what, -math.inf) < STORAGE_LOG_INTERVAL:
            return False
        self._logged[what] = now
        return True

    @property
    def is_open(self) -> bool:
        return self._db is not None and self._writer is not None and not self._writer.done()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._executor, self._connect)
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        checkpoints = await loop.run_in_executor(self._checkpoint_executor, self._connect_raw)
        self._checkpointer = asyncio.create_task(
            self._checkpoint_loop(checkpoints), name="sqlite-checkpointer"
        )

    def _connect_raw(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    async def _checkpoint_loop(self, conn: sqlite3.Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL)
                if self._commits:
                    self._commits = 0
                    await loop.run_in_executor(self._checkpoint_executor, _checkpoint, conn)
        finally:
            await loop.run_in_executor(self._checkpoint_executor, conn.close)

    def _connect(self) -> sqlite_utils.Database:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path))
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and app_id != APPLICATION_ID:
                raise DatabaseError(
                    f"{self.path} is a SQLite database of another application "
                    f"(application_id {app_id:#x}); refusing to write into it"
                )
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DatabaseError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # see the class docstring
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise DatabaseError(f"{self.path}: not a usable SQLite database: {exc}") from exc
        except DatabaseError:
            conn.close()
            raise
        return sqlite_utils.Database(conn)

    async def close(self) -> None:
        """Commit what is queued, then close. Writes after this point are refused."""
        self._closing = True
        if self._writer is not None:
            self._wakeup.set()
            await self._writer
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._db is not None:
            db = self._db
            self._db = None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)
        self._checkpoint_executor.shutdown(wait=True)

    async def read(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn` on the database thread (outside any write transaction)."""
        db = self._require_open()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, db)

    async def write(self, fn: Callable[[sqlite_utils.Database], T], *, ride: bool = True) -> T:
        """Run `fn` inside a transaction; return once it is committed to disk. The
        request's audit record goes with it (storage/riders.py) unless `ride` is False."""
        self._require_open()
        if self._closing:
            raise DatabaseError("database is closing")
        if len(self._pending) >= MAX_PENDING_WRITES:
            raise Overloaded(f"{len(self._pending)} changes are waiting for the disk; retry")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((carried(fn) if ride else fn, future))
        self._wakeup.set()
        return await future

    def _require_open(self) -> sqlite_utils.Database:
        if self._db is None:
            raise DatabaseError("database is not open")
        return self._db

    def _take_batch(self) -> list[_Write]:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        return batch

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._commit_batch(self._take_batch())
            if self._closing:
                return

    async def _commit_batch(self, batch: list[_Write]) -> None:
        db = self._require_open()
        fns = [fn for fn, _ in batch]
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, _run_batch, db, fns
            )
            self._commits += 1
            if not self.writable:
                self.writable = True
                if self._may_log("recovered"):
                    log.warning("storage: %s accepts writes again", self.path)
        except Exception as exc:  # the COMMIT itself failed: nothing in the batch is durable
            self.failed_commits += 1
            if self.writable:
                self.writable = False
                # A nearly full disk flaps (what fits still commits): a line a minute at most.
                log_failure = log.error if self._may_log("failed") else log.debug
                log_failure(
                    "storage: writes to %s fail (%s); changes are refused with 503 and reads "
                    "still work; free space or fix permissions and it recovers by itself",
                    self.path,
                    exc,
                )
            outcomes = refused(exc, len(batch))
        settle(batch, outcomes)


def refused(exc: BaseException, count: int) -> list[tuple[bool, Any]]:
    """The outcomes of a batch whose COMMIT failed: nothing in it is durable (503)."""
    unavailable = StoreUnavailable(f"storage unavailable, change not made: {exc}")
    unavailable.__cause__ = exc
    return [(False, unavailable)] * count


def settle(
    batch: Sequence[tuple[Any, asyncio.Future[Any]]], outcomes: list[tuple[bool, Any]]
) -> None:
    """Answer each write of a batch with its outcome (a caller gone meanwhile is skipped,
    but a committed write's rider is announced all the same)."""
    for (fn, future), (ok, value) in zip(batch, outcomes, strict=True):
        if ok:
            settled(fn)
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _checkpoint(conn: sqlite3.Connection) -> None:
    try:
        # PASSIVE never waits for the writer; the WAL restarts once fully copied back.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as exc:
        log.warning("WAL checkpoint failed (will retry): %s", exc)


def _run_batch(
    db: sqlite_utils.Database, fns: list[Callable[[sqlite_utils.Database], Any]]
) -> list[tuple[bool, Any]]:
    """Commit a batch in one transaction. Optimistic: savepoints cost as much as the
    writes, so they are used only to replay a batch in which some write failed."""
    try:
        with db.atomic():
            return run_batch(db, fns)  # the requests' audit records at its end
    except sqlite3.OperationalError:
        raise  # the database itself is failing (disk full, read-only): nothing can commit
    except Exception:
        log.debug("a write in a batch of %d failed; replaying each in a savepoint", len(fns))
    outcomes: list[tuple[bool, Any]] = []
    with db.atomic():
        for fn in fns:
            try:
                with db.atomic():
                    outcomes.append((True, fn(db)))
            except Exception as exc:
                outcomes.append((False, exc))
    return outcomes
