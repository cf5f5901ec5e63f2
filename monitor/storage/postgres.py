"""PostgreSQL, shared by every replica: one writing connection that group-commits, as the
SQLite file's writer does, one reading connection, versioned migrations per store, and
LISTEN for what other replicas changed.

Sync psycopg on dedicated threads, not its async API: the stores' write functions are
plain callables run inside one transaction per batch (the SQLite stores' shape), so a batch
of 500 heartbeats costs one round of COMMIT; on the asyncio API each statement would be an
await on the event loop that also serves the API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from monitor.storage.riders import Carried, carried, locks, run_batch
from registry import Overloaded, StoreUnavailable
from registry.stores.pg import Blind

from .database import (
    MAX_BATCH,
    MAX_PENDING_WRITES,
    STORAGE_LOG_INTERVAL,
    DatabaseError,
    refused,
    settle,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_Write = tuple[Callable[[psycopg.Connection[Any]], Any], "asyncio.Future[Any]"]

# How long a connection attempt may take; a dead server is seen at once, a black hole in 3 s.
CONNECT_TIMEOUT = 3
RECONNECT_BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0)
LIVENESS = 10.0  # seconds a LISTEN connection goes without a round trip to its server
# Every connection this process opens carries it as its application_name (a suffix may say
# which): the leader terminates the sessions of a member it saw go stale (paused, cut off),
# so they neither pin PostgreSQL's NOTIFY queue nor hold connection slots until TCP gives
# up (monitor/cluster/stores/postgres.py).
SESSION_TAG = f"hms-mgmt/{secrets.token_hex(6)}"
SCHEMA_TABLE = "hms_schema"


class PgDatabase:
    """The daemon's PostgreSQL: `read` and `write` take the same kind of function as the
    SQLite `Database`'s, given a psycopg connection instead.

    `write` returns after the COMMIT (a 2xx is durable); writes queued meanwhile share the
    next transaction, and a batch in which one write fails is replayed with a savepoint per
    write so the others still commit. A broken connection fails its batch with
    StoreUnavailable (503), marks the store unwritable and is reopened with backoff on the
    next write or read; nothing is retried behind the caller's back: a write whose COMMIT
    was lost in flight is reported failed, and the stores' writes are idempotent upserts
    for the caller to retry. A write function may run twice (the replay), so it must have
    no effect beyond its transaction (no session-level lock or setting)."""

    def __init__(self, url: str, *, application_name: str = SESSION_TAG) -> None:
        self.url = url
        self._application_name = application_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-write")
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-read")
        self._conn: psycopg.Connection[Any] | None = None
        self._read_conn: psycopg.Connection[Any] | None = None
        self._pending: list[_Write] = []
        self._closing = False
        self._opened = False
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.writable = True
        self.failed_commits = 0
        self._logged: dict[str, float] = {}

    @property
    def path(self) -> str:
        """Where the data is, for messages (the URL without its password)."""
        return _redacted(self.url)

    @property
    def is_open(self) -> bool:
        return self._opened and self._writer is not None and not self._writer.done()

    def _may_log(self, what: str) -> bool:
        now = time.monotonic()
        if now - self._logged.get(what, -math.inf) < STORAGE_LOG_INTERVAL:
            return False
        self._logged[what] = now
        return True

    def connect(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        """A new connection to the database (also for LISTEN and the cluster's lease)."""
        try:
            return psycopg.connect(
                self.url,
                autocommit=autocommit,
                connect_timeout=CONNECT_TIMEOUT,
                application_name=self._application_name,
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to {self.path}: {exc}") from exc

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(
                self._executor,
                lambda: self.connect(autocommit=True),  # see _batch_transaction
            )
            self._read_conn = await loop.run_in_executor(
                self._read_executor, lambda: self.connect(autocommit=True)
            )
            await loop.run_in_executor(self._executor, self._ensure_schema_table)
        except StoreUnavailable as exc:
            await self._close_connections()
            raise DatabaseError(str(exc)) from exc
        self._opened = True
        self._writer = asyncio.create_task(self._write_loop(), name="pg-writer")

    def _ensure_schema_table(self) -> None:
        conn = self._require_conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [SCHEMA_TABLE])
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )

    async def migrate(self, component: str, steps: Sequence[str]) -> None:
        """Bring `component`'s tables to version len(steps), applying the steps not yet
        applied, each once, under a lock so replicas starting together apply them once.
        A database whose version is newer than this code's is refused: an older replica
        must not write into tables it does not know."""

        def migrate(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [SCHEMA_TABLE])
            row = conn.execute(
                f"SELECT version FROM {SCHEMA_TABLE} WHERE component = %s",  # noqa: S608
                [component],
            ).fetchone()
            version = row[0] if row else 0
            if version > len(steps):
                raise DatabaseError(
                    f"{self.path}: the {component} tables are at version {version}, newer "
                    f"than this hms-mgmt's {len(steps)}; upgrade hms-mgmt before starting it"
                )
            for step in steps[version:]:
                conn.execute(step)  # our own DDL constants
            conn.execute(
                f"INSERT INTO {SCHEMA_TABLE} (component, version) VALUES (%s, %s) "  # noqa: S608
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                [component, len(steps)],
            )

        # Alone, not in a group commit: a failing DDL must not cost other writes their batch.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._transaction, migrate)

    def _transaction(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = self._usable_conn()
        with conn.transaction():
            return fn(conn)

    async def close(self) -> None:
        """Commit what is queued, then close. Writes after this point are refused."""
        self._closing = True
        if self._writer is not None:
            self._wakeup.set()
            await self._writer
            self._writer = None
        await self._close_connections()
        self._opened = False
        self._executor.shutdown(wait=True)
        self._read_executor.shutdown(wait=True)

    async def _close_connections(self) -> None:
        loop = asyncio.get_running_loop()
        conn, self._conn = self._conn, None
        read_conn, self._read_conn = self._read_conn, None
        if conn is not None:
            await loop.run_in_executor(self._executor, conn.close)
        if read_conn is not None:
            await loop.run_in_executor(self._read_executor, read_conn.close)

    async def read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `fn` on the reading connection (autocommit: each statement sees the latest
        committed state)."""
        self._require_opened()

        def run() -> T:
            # A read is safe to repeat: one whose connection died (a server restart since
            # the last read) runs once more on a new connection before it fails.
            for attempt in (1, 2):
                conn = self._read_conn
                if conn is None or conn.closed or conn.broken:
                    conn = self._read_conn = self.connect(autocommit=True)
                try:
                    return fn(conn)
                except psycopg.OperationalError as exc:
                    if not conn.broken:
                        raise
                    if attempt == 2:
                        raise StoreUnavailable(f"storage unavailable: {exc}") from exc
            raise AssertionError("unreachable")

        return await asyncio.get_running_loop().run_in_executor(self._read_executor, run)

    async def write(self, fn: Callable[[psycopg.Connection[Any]], T], *, ride: bool = True) -> T:
        """Run `fn` inside a transaction; return once it is committed. The request's audit
        record goes with it (storage/riders.py) unless `ride` is False."""
        self._require_opened()
        if self._closing:
            raise DatabaseError("database is closing")
        if len(self._pending) >= MAX_PENDING_WRITES:
            raise Overloaded(f"{len(self._pending)} changes are waiting for the database; retry")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((carried(fn) if ride else fn, future))
        self._wakeup.set()
        return await future

    def _require_opened(self) -> None:
        if not self._opened:
            raise DatabaseError("database is not open")

    def _require_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise DatabaseError("database is not open")
        return self._conn

    def _usable_conn(self) -> psycopg.Connection[Any]:
        """The writing connection, reopened if the last one broke (on the writer thread)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._conn = None
            self._conn = self.connect(autocommit=True)  # see _batch_transaction
            conn = self._conn
        return conn

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._commit_batch(batch)
            if self._closing:
                return

    async def _commit_batch(self, batch: list[_Write]) -> None:
        fns = [fn for fn, _ in batch]
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, fns
            )
            if not self.writable:
                self.writable = True
                if self._may_log("recovered"):
                    log.warning("storage: %s accepts writes again", self.path)
        except (psycopg.OperationalError, StoreUnavailable) as exc:
            self.failed_commits += 1
            if self.writable:
                self.writable = False
                log_failure = log.error if self._may_log("failed") else log.debug
                log_failure(
                    "storage: writes to %s fail (%s); changes are refused with 503 until it "
                    "answers again",
                    self.path,
                    exc,
                )
            outcomes = refused(exc, len(batch))
        except Exception as exc:  # not the database gone: a bug, or a session left in a
            # state this code does not expect. The batch is refused (503), the next one
            # starts on a new connection, and the writer goes on.
            log.exception("storage: a batch of %d writes to %s failed", len(batch), self.path)
            await asyncio.get_running_loop().run_in_executor(self._executor, self._drop_conn)
            outcomes = refused(exc, len(batch))
        settle(batch, outcomes)

    def _drop_conn(self) -> None:
        """Close the writing connection (on the writer thread); the next write reopens it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _run_batch(
        self, fns: list[Callable[[psycopg.Connection[Any]], Any]]
    ) -> list[tuple[bool, Any]]:
        """One transaction for the batch; replayed with a savepoint per write if one
        write failed (a constraint, a fenced claim), so only that one fails."""
        conn = self._usable_conn()
        # Before any row: a lock awaited while holding rows another replica's batch wants,
        # held by that batch, would deadlock the two (the audit lock, riders.Ordered).
        begin = _begin(tuple(locks(fns)))
        try:
            with _batch_transaction(conn, begin):
                if not (PIPELINES and all(map(_blind, fns))):
                    return run_batch(conn, fns)
                with conn.pipeline():  # a failure is raised at its end, the batch replayed
                    return run_batch(conn, fns)
        except Exception:
            if conn.broken:
                raise
            log.debug("a write in a batch of %d failed; replaying each", len(fns))
        outcomes: list[tuple[bool, Any]] = []
        with _batch_transaction(conn, begin):
            for fn in fns:
                try:
                    with conn.transaction():  # a savepoint
                        outcomes.append((True, fn(conn)))
                except Exception as exc:
                    if conn.broken:
                        raise
                    outcomes.append((False, exc))
        return outcomes


# libpq 14 and newer (psycopg's binary wheels bring one); without, every batch waits per write.
PIPELINES = psycopg.Pipeline.is_supported()
if not PIPELINES:
    log.info("libpq %s has no pipeline mode: batches wait for each write", psycopg.pq.version())


def _blind(fn: Callable[[Any], Any]) -> bool:
    """A write pipelined with its batch's others (registry.stores.pg.Blind); its rider,
    written at the batch's end, may read (a fetch in a pipeline waits for the results)."""
    return isinstance(fn.fn if isinstance(fn, Carried) else fn, Blind)


@functools.lru_cache(maxsize=64)
def _begin(keys: tuple[str, ...]) -> sql.Composed:
    """BEGIN, then the advisory locks a batch's ordered writes need (riders.Ordered): one
    simple query, so one round trip where psycopg's BEGIN and a SELECT per lock took two
    or more (the audit trail's lock is taken by every batch carrying a record)."""
    lock = sql.SQL("SELECT pg_advisory_xact_lock(hashtext({}))")
    return sql.SQL("; ").join([sql.SQL("BEGIN"), *(lock.format(sql.Literal(k)) for k in keys)])


@contextlib.contextmanager
def _batch_transaction(conn: psycopg.Connection[Any], begin: sql.Composed) -> Iterator[None]:
    """A batch's transaction on the writing connection, which is in autocommit mode so
    that psycopg sends no BEGIN of its own: `begin` opens it (`_begin`), COMMIT ends it,
    ROLLBACK on any error. Inside it `conn.transaction()` is a savepoint."""
    try:
        conn.execute(begin)  # a lock wait may fail after BEGIN (lock_timeout, a cancel)
        yield
    except BaseException:
        if not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")  # on failure the server has rolled back: nothing to undo


def notify(conn: psycopg.Connection[Any], channel: str, payload: str) -> None:
    """Tell every replica's listener, at this transaction's COMMIT (never before)."""
    conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])


def _redacted(url: str) -> str:
    """postgresql://user:secret@host/db → postgresql://user@host/db"""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


class Listener:
    """LISTEN on `channels` over a connection of its own, for as long as it runs.

    `on_notify(channel, payload)` hears each notification; `on_connect()` runs after every
    (re)connection, LISTEN included, so the caller re-reads what it may have missed while
    the connection was down: NOTIFY is not stored, so the read is what makes it reliable."""

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        on_connect: Callable[[], Any],
    ) -> None:
        self._url = url
        self._channels = tuple(channels)
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT,
                    application_name=f"{SESSION_TAG} listen",
                )
            except psycopg.Error as exc:
                delay = RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)]
                failures += 1
                log.debug("LISTEN: cannot connect (%s); again in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            try:
                async with conn:
                    for channel in self._channels:
                        await conn.execute(f'LISTEN "{channel}"')
                    result = self._on_connect()
                    if asyncio.iscoroutine(result):
                        await result
                    failures = 0
                    self.connected.set()
                    while True:
                        async for note in conn.notifies(timeout=LIVENESS):
                            self._on_notify(note.channel, note.payload)
                        # A server lost without a FIN or RST (its host gone, a failover)
                        # leaves this connection open and silent for good: a round trip that
                        # does not come back in time has it replaced.
                        try:
                            async with asyncio.timeout(CONNECT_TIMEOUT):
                                await conn.execute("SELECT 1")
                        except TimeoutError:
                            raise ConnectionError(f"no answer in {CONNECT_TIMEOUT}s") from None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the re-read too (the server still starting): again
                delay = RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)]
                failures += 1
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
