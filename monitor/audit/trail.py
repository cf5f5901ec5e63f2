"""The audit trail: who changed what, when, and who tried and was refused (DESIGN §3).

A change's record rides in the change's own transaction (`mount`, storage/riders.py):
a crash keeps both or neither. Changes that write nothing else (a sign-in, a config
reload) get a transaction of their own (`record`). Refusals (401, 403) are counted in
memory and written once a second, one row per actor, action and minute with its count, so
a flood of bad tokens adds a row a minute, not a row a request.

Each record written goes on the bus as `audit.recorded` (to `audit:read` holders only,
http/auth.py) and to the log, by the token's name: never the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from monitor.audit.abc import REFUSED, AuditQuery, AuditRecord, AuditStore
from monitor.storage.riders import Mounted, mount
from registry import StoreUnavailable
from scheduler import EventBus

log = logging.getLogger(__name__)

TOPIC = "audit.recorded"
FLUSH_INTERVAL = 1.0
# Refusal rows not yet written while the database is down: past this, new actors' refusals
# are only counted in the log (an attacker inventing names cannot grow memory either).
MAX_UNWRITTEN = 10_000


class AuditTrail:
    def __init__(
        self, store: AuditStore, bus: EventBus, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self._bus = bus
        self._clock = clock
        self._refusals: dict[tuple[int, str, str], AuditRecord] = {}
        self._announced: set[tuple[int, str, str]] = set()
        self.dropped = 0  # refusals neither written nor kept (MAX_UNWRITTEN)

    def now(self) -> float:
        return self._clock()

    def mount(self, record: AuditRecord) -> Mounted:
        """`record` is written with the next write this request makes (if it makes one),
        until `unmount`; told to the log and the bus as soon as that write commits (a
        waited start's record is heard when the process starts, not when it answers)."""
        return mount(self.store.rider(record), committed=lambda: self.written(record))

    def written(self, record: AuditRecord) -> None:
        """A record is durable (its id is set): tell the bus, and the log at debug level
        (the trail is where records are read; a line per registration at info level cost
        the loop ~27 µs each and buried the log of a fleet registering)."""
        log.debug(
            "audit: %s %s %s -> %d", record.actor, record.action, record.target, record.outcome
        )
        if self._bus.wants(TOPIC):  # a notification or an audit reader's stream
            self._bus.publish(TOPIC, record.json())

    async def record(self, record: AuditRecord) -> None:
        """A record in its own transaction (raises StoreUnavailable if it cannot be kept)."""
        await self.store.add(record)
        self.written(record)

    async def reloaded(self, by: str, applied: bool, path: str) -> None:
        """A config reload tried by `by` (`sighup`, `config-file`): 200 applied, 422 refused.
        Best effort: a reload does not fail because the trail's database is down."""
        record = AuditRecord(
            time=self._clock(),
            actor=by,
            action="config.reload",
            target=path,
            outcome=200 if applied else 422,
        )
        try:
            await self.record(record)
        except StoreUnavailable as exc:
            log.error("audit: the config reload by %s could not be recorded: %s", by, exc)

    def refused(self, record: AuditRecord) -> None:
        """A 401 or 403: counted now, written within a second (`flush`)."""
        minute = int(record.time // 60)
        key = (minute, record.actor, REFUSED)
        held = self._refusals.get(key)
        if held is not None:
            held.count += 1
            return
        if len(self._refusals) >= MAX_UNWRITTEN:
            self.dropped += 1
            return
        record.action = REFUSED
        self._refusals[key] = record

    async def flush(self) -> None:
        """Write the refusals counted since the last flush; kept for the next on failure."""
        if not self._refusals:
            return
        taken, self._refusals = self._refusals, {}
        by_minute: dict[int, list[AuditRecord]] = {}
        for (minute, _, _), record in taken.items():
            by_minute.setdefault(minute, []).append(record)
        for minute, records in sorted(by_minute.items()):
            try:
                await self.store.add_refusals(records, minute)
            except StoreUnavailable:
                for record in records:  # counts add up with what came meanwhile
                    key = (minute, record.actor, REFUSED)
                    held = self._refusals.setdefault(key, record)
                    if held is not record:
                        held.count += record.count
                continue
            except Exception:  # a row no database takes: lost, but never the loop with it
                log.exception("audit: %d refusal row(s) could not be written", len(records))
                continue
            for record in records:
                key = (minute, record.actor, REFUSED)
                if key not in self._announced:  # a row a minute on the bus too
                    self._announced.add(key)
                    self.written(record)
        if self.dropped:
            log.warning(
                "audit: %d refusal(s) were not counted (%d rows waiting)",
                self.dropped,
                MAX_UNWRITTEN,
            )
            self.dropped = 0
        current = int(self._clock() // 60)
        self._announced = {key for key in self._announced if key[0] >= current - 1}

    async def run(self) -> None:
        """Flush refusals every second, until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def list(self, query: AuditQuery) -> list[AuditRecord]:
        return await self.store.list(query)

    async def prune(self, retention: float) -> int:
        return await self.store.prune(self._clock() - retention)
