"""Events across replicas (DESIGN §8): a bus subscriber on any replica (an SSE stream, the
status page's change log) sees what was published on any other.

Two kinds travel, each its own way:

- Stored events (`POST /v1/events/{topic}`, `publish` steps: written by the replica that
  runs the engine) come back from the event store. Their write sends NOTIFY
  `hms_events` with the id at COMMIT; every other replica then reads the events after its
  bus position and hands them to its bus in id order, with their ids, so `Last-Event-ID`
  means the same on every replica. A poll every POLL seconds and a read after each
  reconnect of the listener catch what a lost notification missed.
- The daemon's own news (`health.*`, `slo.*`, `workflow.*`: never stored) travels in the
  notification itself, batched, from the replica that published it, on NEWS_CHANNEL. It
  is as best-effort as it is on one daemon's bus: a payload over PostgreSQL's limit
  (MAX_PAYLOAD) or a batch the database refused is not relayed, and is logged. Not
  `audit.*`: a NOTIFY payload is open to any role that may connect, and the audit trail is
  for `audit:read` holders only (DESIGN §3); stored, it would travel by id as the rest.

Relayed events are `remote` on the bus: the notifier leaves them to the replica where they
were published (its outbox row), and `hms_events_published_total` counts them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psycopg
from prometheus_client import CollectorRegistry, Counter

from scheduler import Event, EventBus
from scheduler.bus import READABLE_TOPICS, Subscription
from workflows.stores.postgres import EVENTS_CHANNEL

from .storage.postgres import CONNECT_TIMEOUT, RECONNECT_BACKOFF, SESSION_TAG, Listener

log = logging.getLogger(__name__)

NEWS_CHANNEL = "hms_news"
MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses a NOTIFY payload of 8,000 or more
POLL = 1.0  # seconds between reads of the event store behind the notifications
PAGE = 1000  # stored events read at a time
QUEUE = 10_000  # news waiting to be sent; the oldest is dropped beyond it
SEND_EVERY = 0.05  # seconds news gathers before it is sent in one NOTIFY commit
QUEUE_CHECK = 10.0  # seconds between looks at PostgreSQL's NOTIFY queue
QUEUE_LIMIT = 0.5  # of it used: no more news (stored events' notifications need the rest)
_SEND = "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload"

ReadAfter = Callable[[int, int, int], Awaitable[list[tuple[int, str, bytes, float, str | None]]]]


class EventRelay:
    """`read_after(seq, upto, limit)` is the event store's `events_after`; `last_seq()` its
    `last_event_seq`; `engine_here()` whether this replica runs the engine (then it stored
    and delivered every stored event itself, and reads none back). `metrics`: where
    `hms_events_relay_unsent_total` counts the news not relayed."""

    def __init__(
        self,
        bus: EventBus,
        url: str,
        *,
        read_after: ReadAfter,
        last_seq: Callable[[], Awaitable[int]],
        engine_here: Callable[[], bool],
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self._bus, self._url = bus, url
        self._origin = secrets.token_hex(8)  # its own news comes back to it: not relayed
        self._read_after, self._last_seq, self._engine_here = read_after, last_seq, engine_here
        self._news: deque[str] = deque(maxlen=QUEUE)
        self._send_wake = asyncio.Event()
        self._read_wake = asyncio.Event()
        self._read_lock = asyncio.Lock()
        self._listener = Listener(url, [EVENTS_CHANNEL, NEWS_CHANNEL], self._heard, self.catch_up)
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.unsent = 0  # news not relayed: too big, the NOTIFY queue half full, or refused
        self._unsent = Counter(
            "hms_events_relay_unsent",
            "The daemon's own events (health.*, slo.*, workflow.*) not relayed to the other "
            "replicas: over PostgreSQL's payload limit, its NOTIFY queue half full, or refused",
            registry=metrics,
        )

    async def start(self) -> None:
        if self._bus.position == 0 and not self._engine_here():  # from now: no old events
            self._bus.start_after(await self._last_seq())
        # local_only: it sends this replica's own news, never what others relayed here.
        self._subscription = self._bus.subscribe(
            [f"{prefix}*" for prefix in READABLE_TOPICS],
            name="relay",
            sink=self._outgoing,
            local_only=True,
        )
        self._listener.start()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="relay-send"),
            asyncio.create_task(self._read_loop(), name="relay-read"),
        ]

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._listener.stop()

    @property
    def connected(self) -> asyncio.Event:
        return self._listener.connected

    # -- stored events: read back -------------------------------------------------------

    async def catch_up(self) -> None:
        """Hand the bus every stored event after its position (none while the engine runs
        here: it delivered them as it stored them)."""
        async with self._read_lock:
            while not self._engine_here():
                rows = await self._read_after(self._bus.position, 2**63 - 1, PAGE)
                for seq, topic, data, at, actor in rows:
                    if self._engine_here():  # it opened meanwhile: the rest are its own
                        return
                    self._bus.relay(topic, orjson.loads(data), at, seq, actor)
                if len(rows) < PAGE:
                    return

    async def _read_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL):
                    await self._read_wake.wait()
            self._read_wake.clear()
            try:
                await self.catch_up()
            except Exception as exc:  # storage down: the next poll reads on
                log.debug("cannot read the events of other replicas (%s); retrying", exc)

    def _heard(self, channel: str, payload: str) -> None:
        if channel == EVENTS_CHANNEL:
            self._read_wake.set()
            return
        try:
            topic, origin, body = payload.split(" ", 2)
            # Decoded only when someone here takes it (most news has no reader on most
            # replicas: the topic and origin come first for that).
            if origin != self._origin and self._bus.wants_relayed(topic):
                at, data = orjson.loads(body)
                self._bus.relay(topic, data, float(at), None)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            log.warning("ignored a malformed notification on %s", NEWS_CHANNEL)

    # -- the daemon's news: sent -------------------------------------------------------

    def _drop(self, count: int) -> None:
        self.unsent += count
        self._unsent.inc(count)

    def _outgoing(self, event: Event) -> None:
        if event.stored:
            return
        # "<topic> <origin> [time, data]": a replica reads the first two before decoding.
        payload = b"%s %s %s" % (
            event.topic.encode(),
            self._origin.encode(),
            orjson.dumps([event.time, event.data]),
        )
        if len(payload) > MAX_PAYLOAD:
            self._drop(1)
            log.debug("%s is too big to relay (%d bytes)", event.topic, len(payload))
            return
        if len(self._news) == QUEUE:
            self._drop(1)
        self._news.append(payload.decode())
        self._send_wake.set()

    async def _send_loop(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT,
                    application_name=f"{SESSION_TAG} relay",
                ) as conn:
                    # Best effort: no commit of news waits for the WAL to reach the disk.
                    await conn.execute("SET synchronous_commit = off")
                    failures, checked, full = 0, -QUEUE_CHECK, False
                    while True:
                        await self._send_wake.wait()
                        # Each send is a commit that takes PostgreSQL's one NOTIFY lock, which
                        # every replica's writes that notify queue for: a few a second.
                        await asyncio.sleep(SEND_EVERY)
                        self._send_wake.clear()
                        batch = list(self._news)
                        self._news.clear()
                        now = asyncio.get_running_loop().time()
                        if now - checked >= QUEUE_CHECK:
                            full = await self._queue_full(conn, full)
                            checked = now
                        if full:
                            self._drop(len(batch))
                            continue
                        try:
                            await conn.execute(_SEND, [NEWS_CHANNEL, batch])
                        except psycopg.Error:
                            self._drop(len(batch))
                            raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)]
                # Once per outage: the retries of an hour-long one would be thousands of lines.
                log_failure = log.warning if failures == 0 else log.debug
                failures += 1
                log_failure("cannot relay news to other replicas (%s); retrying", exc)
                await asyncio.sleep(delay)

    async def _queue_full(self, conn: psycopg.AsyncConnection[Any], was: bool) -> bool:
        """Whether PostgreSQL's NOTIFY queue is past QUEUE_LIMIT. A listener that stays
        connected but reads nothing (a paused replica) pins it; once full, every NOTIFY
        fails, the one in each event write too. News is best effort: it stops first."""
        cursor = await conn.execute("SELECT pg_notification_queue_usage()")
        row = await cursor.fetchone()
        full = row is not None and float(row[0]) >= QUEUE_LIMIT
        if full and not was:
            log.warning(
                "PostgreSQL's NOTIFY queue is %.0f%% full (a listener reads nothing): news "
                "is not relayed to other replicas until it drains",
                float(row[0]) * 100 if row is not None else 0.0,
            )
        elif was and not full:
            log.warning("PostgreSQL's NOTIFY queue drained: news is relayed again")
        return full
