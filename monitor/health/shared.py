"""Health states shared by replicas: the prober stores each instance's state as it moves,
the others apply it, so any replica answers with the same health and a new owner goes on
from where the old one was (its counters too: a handover does not flap alerts).

Writes are rare: a row is written when the state changes or the count towards the next
change moves (a failure short of `failure_threshold`, a success short of
`success_threshold`), never for one more probe in a steady state; they are batched, one
transaction for all that moved meanwhile. Reads: what changed, when a notification says so (the
root's Listener calls `apply_remote`) and every second behind it; everything after each
reconnect (`resync`); an instance new to this replica, its row."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import orjson

from monitor.health.book import UP, Failure, HealthBook, Tracker, Verdict
from monitor.health.states_abc import HealthStateStore, Key, StoredHealth
from monitor.probing.probe import ProbeResult
from registry import HealthState

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
# A poll re-reads this much before the last one: a write stamped earlier may commit later.
POLL_OVERLAP = 5.0
RETRY_DELAY = 1.0
LOG_INTERVAL = 60.0

Mark = tuple[HealthState, int]


def mark(state: HealthState, successes: int, failures: int) -> Mark:
    """What a stored row must follow: the state, and the count towards leaving it (the
    other count only grows while the state holds, and is not worth a write per probe)."""
    if state in UP or state is HealthState.UNKNOWN:
        return state, failures
    return state, successes


class SharedHealth:
    def __init__(self, store: HealthStateStore, book: HealthBook, owns: Callable[[Key], bool]):
        self._store, self._book, self._owns = store, book, owns
        self._marks: dict[Key, Mark] = {}  # as last stored or applied
        self._dirty: dict[Key, StoredHealth | None] = {}  # None: delete
        self._probed: set[Key] = set()  # owned and probed here: the stored rows are older
        self._wanted: set[Key] = set()
        self._everything = True  # the first read takes every row
        self._since: float | None = None
        self._save_wake = asyncio.Event()
        self._read_wake = asyncio.Event()
        self._read_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._logged = 0.0
        self._restored: dict[Key, StoredHealth] | None = None

    async def open(self) -> None:
        """Create the table and read every stored state, for `restore` to hand out as the
        checker tracks each instance at start: a restarted replica goes on from them
        before its first probe, not from `unknown`."""
        await self._store.open()
        rows, now = await self._store.changed(None)
        self._restored = {row.key: row for row in rows}
        self._since, self._everything = now - POLL_OVERLAP, False

    def restore(self, key: Key) -> None:
        """`key` is new to this replica: apply its stored state (now if read at open)."""
        if self._restored is None:
            self.want(key)
            return
        row = self._restored.pop(key, None)
        if row is not None:
            self._apply([row])

    def start(self) -> None:
        self._restored = None  # the rest are gone from the registry
        self._tasks = [
            asyncio.create_task(self._save_loop(), name="health-states-save"),
            asyncio.create_task(self._read_loop(), name="health-states-read"),
        ]

    async def close(self) -> None:
        """Stop reading; store what is queued (a new owner goes on from it)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(Exception):
            await self._save()

    # -- the prober's side ---------------------------------------------------------

    def observe(self, key: Key, tracker: Tracker) -> None:
        """After a probe of `key` here: store its state if it moved."""
        self._probed.add(key)
        now = mark(tracker.state, tracker.successes, tracker.failures)
        if self._marks.get(key) == now:
            return
        self._marks[key] = now
        self._dirty[key] = _stored(key, tracker)
        self._save_wake.set()

    def forget(self, key: Key, *, owned: bool) -> None:
        """`key` deregistered; its owner deletes its row."""
        self._marks.pop(key, None)
        self._probed.discard(key)
        if owned:
            self._dirty[key] = None
            self._save_wake.set()
        else:
            self._dirty.pop(key, None)

    def release(self, keys: Iterable[Key]) -> None:
        """No longer probed here: their new owner's rows apply from now on."""
        self._probed.difference_update(keys)

    # -- the other replicas' side --------------------------------------------------

    def want(self, key: Key) -> None:
        """Read `key`'s stored state (an instance new to this replica)."""
        self._wanted.add(key)
        self._read_wake.set()

    def apply_remote(self) -> None:
        """Another replica stored states (a notification): read what changed."""
        self._read_wake.set()

    async def resync(self) -> None:
        """Read every stored state (after a reconnect: notifications may have been lost)."""
        self._everything = True
        try:
            await self._read()
        except Exception as exc:  # never into the Listener: the read loop tries again
            self._log("cannot read health states (%s); retrying", exc)

    async def _read_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read_wake.wait(), POLL_INTERVAL)
            self._read_wake.clear()
            try:
                await self._read()
            except Exception as exc:  # storage down: the next poll tries again
                self._log("cannot read health states (%s); retrying", exc)

    async def _read(self) -> None:
        async with self._read_lock:
            keys, self._wanted = self._wanted, set()
            everything, self._everything = self._everything, False
            try:
                if keys and not everything:
                    self._apply(await self._store.load(sorted(keys)))
                rows, now = await self._store.changed(None if everything else self._since)
            except BaseException:
                self._wanted |= keys
                self._everything |= everything
                raise
            self._apply(rows)
            self._since = now - POLL_OVERLAP

    def _apply(self, rows: Iterable[StoredHealth]) -> None:
        for row in rows:
            key = row.key
            if key in self._probed and self._owns(key):
                continue  # this replica probes it: its own state is newer
            self._marks[key] = mark(row.state, row.successes, row.failures)
            result, verdict = _decode(row.last_probe)
            self._book.apply(
                key,
                row.state,
                successes=row.successes,
                failures=row.failures,
                reason=row.reason,
                result=result,
                verdict=verdict,
            )

    # -- writing -------------------------------------------------------------------

    async def _save_loop(self) -> None:
        while True:
            await self._save_wake.wait()
            self._save_wake.clear()
            try:
                await self._save()
            except Exception as exc:  # kept for the next go (StoreUnavailable: 503 elsewhere)
                self._log("cannot store health states (%s); retrying", exc)
                self._save_wake.set()
                await asyncio.sleep(RETRY_DELAY)

    async def _save(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        states = [row for row in dirty.values() if row is not None]
        gone = [key for key, row in dirty.items() if row is None]
        try:
            await self._store.save(states, gone)
        except BaseException:
            for key, row in dirty.items():  # newer ones queued meanwhile win
                self._dirty.setdefault(key, row)
            raise

    def _log(self, message: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_INTERVAL:
            self._logged = now
            log.warning(message, exc)


def _stored(key: Key, tracker: Tracker) -> StoredHealth:
    result, verdict = tracker.result, tracker.verdict
    last_probe = None
    if result is not None:
        last_probe = orjson.dumps(
            {
                "at": result.at,
                "response_time": result.response_time,
                "connected": result.connected,
                "status": result.status,
                "certificate_expires_at": result.certificate_expires_at,
                "error": result.error,
                "ok": verdict.ok if verdict else None,
                "failing": [[f.condition, f.observed] for f in verdict.failing] if verdict else [],
                "warning": verdict.warning if verdict else None,
            }
        ).decode()
    return StoredHealth(
        service=key[0],
        instance=key[1],
        state=tracker.state,
        successes=tracker.successes,
        failures=tracker.failures,
        reason=tracker.reason,
        last_probe=last_probe,
    )


def _decode(last_probe: str | None) -> tuple[ProbeResult | None, Verdict | None]:
    if last_probe is None:
        return None, None
    data = orjson.loads(last_probe)
    result = ProbeResult(
        at=data["at"],
        response_time=data["response_time"],
        connected=data["connected"],
        status=data["status"],
        certificate_expires_at=data["certificate_expires_at"],
        error=data["error"],
    )
    if data["ok"] is None:
        return result, None
    failing = tuple(Failure(condition, observed) for condition, observed in data["failing"])
    return result, Verdict(data["ok"], failing, data["warning"])
