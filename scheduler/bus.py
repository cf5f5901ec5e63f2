"""The in-process event bus: publish by topic, subscribe by topic glob.

Publishing never waits: each subscription has its own bounded queue and its
own task, so a slow or failing subscriber delays nobody else. When a queue is
full the oldest event is dropped (and counted), as a bus that blocks the
health checker because a webhook is slow would be worse than a lost event.

Event ids are positions in the stored stream. An event the event store keeps
takes a fresh id (`reserve` before it is stored, then `publish(reserved=...)`);
every other event carries the id of the last stored event delivered before
it. So a client that saw id N has seen every stored event up to N, and
"after N" (SSE `Last-Event-ID`) means the same thing across restarts. Stored
events are delivered in id order even when their writes finish out of order:
one whose earlier reservation is still being written is held until it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

# The daemon publishes these itself (health, SLO burn, process lifecycle); nobody else may.
AUDIT_TOPICS = "audit."
DAEMON_TOPICS = ("health.", "slo.", "workflow.", "registry.", AUDIT_TOPICS)
# Of those, what whoever may read sees; audit.* is not (DESIGN §3: audit:read holders only).
READABLE_TOPICS = tuple(topic for topic in DAEMON_TOPICS if topic != AUDIT_TOPICS)

log = logging.getLogger(__name__)

Handler = Callable[["Event"], Awaitable[None] | None]
Sink = Callable[["Event"], None]
DEFAULT_QUEUE = 10_000
MAX_ROUTES = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    id: int
    topic: str
    data: Mapping[str, Any]
    time: float = field(default_factory=time.time)
    stored: bool = False  # kept by the event store under `id` (else: the daemon's own news)
    # Published on another replica and relayed here (monitor/relay.py): subscribers that act
    # on an event once for the cluster (the notifier) leave it to the replica it came from.
    remote: bool = False
    # Who published a stored event (a token's name; workflows' `NewEvent.actor`): delivered
    # beside its data, never in it. None: the daemon's own news, or an event stored before.
    actor: str | None = None


def matches(patterns: Sequence[str], topic: str) -> bool:
    return any(fnmatchcase(topic, pattern) for pattern in patterns)


class Subscription:
    """A queue of the events whose topic matches one of `patterns`.

    With a handler, a task owned by the subscription feeds it every event;
    with a sink, publish calls it at once (it must neither block nor raise: it
    keeps its own bounded queue); with neither, the owner iterates the
    subscription (`async for event in sub`). `local_only`: events relayed from other
    replicas (`Event.remote`) do not reach it, so a subscriber that acts once for the
    cluster never queues them beside its own (a relayed burst would push those out).
    """

    def __init__(
        self,
        bus: EventBus,
        patterns: Sequence[str],
        handler: Handler | None,
        name: str,
        queue_size: int,
        sink: Sink | None = None,
        local_only: bool = False,
    ) -> None:
        self.bus, self.patterns, self.name = bus, tuple(patterns), name
        self.local_only = local_only
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self._sink = sink
        self._task: asyncio.Task[None] | None = None
        if handler is not None:
            self._task = asyncio.create_task(self._feed(handler), name=f"bus:{name}")

    def offer(self, event: Event) -> None:
        if event.remote and self.local_only:
            return
        if self._sink is not None:
            try:
                self._sink(event)
            except Exception:
                log.exception("subscriber %s failed on %s", self.name, event.topic)
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("subscriber %s is behind; %d event(s) dropped", self.name, self.dropped)
        self.queue.put_nowait(event)

    async def _feed(self, handler: Handler) -> None:
        while True:
            event = await self.queue.get()
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("subscriber %s failed on %s", self.name, event.topic)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()

    async def close(self) -> None:
        self.bus._unsubscribe(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class EventBus:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._subscriptions: list[Subscription] = []
        self._routes: dict[str, list[Subscription]] = {}  # topic -> matching subscriptions
        self._ids = itertools.count(1)
        self._position = 0  # the last stored event delivered
        self._reserved: set[int] = set()  # ids being stored
        self._last_reserved = 0
        self._held: dict[int, Event] = {}  # stored, waiting for an earlier reservation
        self.published: Counter[str] = Counter()
        # Which label an event's topic counts under: topics come from clients too, so the
        # composition root maps those it does not know to "other" (a bounded label set).
        self.label: Callable[[str], str] = lambda topic: topic

    @property
    def position(self) -> int:
        """The id of the last stored event delivered: every stored event up to it has been."""
        return self._position

    @property
    def reserved_through(self) -> int:
        """The last id given out: every event published from now has a higher one."""
        return self._last_reserved

    def start_after(self, last_stored: int) -> None:
        """Continue the ids of the stored stream (at start, before anything is published)."""
        self._ids = itertools.count(last_stored + 1)
        self._position = self._last_reserved = last_stored

    def reserve(self) -> int:
        """An id for an event about to be stored; `publish(reserved=)` or `release` it."""
        event_id = self._last_reserved = next(self._ids)
        self._reserved.add(event_id)
        return event_id

    def release(self, event_id: int) -> None:
        """A reservation that was not stored (a duplicate, a failed write)."""
        self._reserved.discard(event_id)
        self._deliver_held()

    def subscribe(
        self,
        patterns: str | Sequence[str],
        handler: Handler | None = None,
        *,
        name: str = "subscriber",
        queue_size: int = DEFAULT_QUEUE,
        sink: Sink | None = None,
        local_only: bool = False,
    ) -> Subscription:
        if isinstance(patterns, str):
            patterns = [patterns]
        subscription = Subscription(self, patterns, handler, name, queue_size, sink, local_only)
        self._subscriptions.append(subscription)
        self._routes.clear()
        return subscription

    def publish(
        self,
        topic: str,
        data: Mapping[str, Any],
        *,
        reserved: int | None = None,
        actor: str | None = None,
    ) -> Event:
        """Hand the event to every matching subscriber; never waits, never raises.

        `reserved`: the id `reserve` gave this event, now stored; `actor`: who published it."""
        if reserved is None:
            event = Event(id=self._position, topic=topic, data=data, time=self._clock())
            self._deliver(event)
            return event
        now = self._clock()
        event = Event(id=reserved, topic=topic, data=data, time=now, stored=True, actor=actor)
        self._reserved.discard(reserved)
        self._held[reserved] = event
        self._deliver_held()
        return event

    def relay(
        self,
        topic: str,
        data: Mapping[str, Any],
        at: float,
        stored: int | None,
        actor: str | None = None,
    ) -> None:
        """An event another replica published (monitor/relay.py): `stored`, its id in the
        event store (delivered once, in id order: one at or below `position` was already);
        None for the other replica's own news, which carries this bus's position. `actor`:
        who published a stored one."""
        if stored is None:
            self._deliver(Event(id=self._position, topic=topic, data=data, time=at, remote=True))
            return
        if stored <= self._position or stored in self._reserved:
            return
        self._position = stored
        self._deliver(
            Event(id=stored, topic=topic, data=data, time=at, stored=True, remote=True, actor=actor)
        )

    def _deliver_held(self) -> None:
        while self._held:
            first = min(self._held)
            if self._reserved and min(self._reserved) < first:
                return  # an earlier stored event is still being written
            self._position = max(self._position, first)
            self._deliver(self._held.pop(first))

    def wants(self, topic: str) -> bool:
        """Whether an event on `topic` would reach any subscriber (else its data need not
        even be built)."""
        return bool(self._targets(topic))

    def wants_relayed(self, topic: str) -> bool:
        """Whether an event relayed from another replica on `topic` would reach anyone here
        (a subscriber that is not `local_only`): else the relay need not even decode it."""
        return any(not s.local_only for s in self._targets(topic))

    def _deliver(self, event: Event) -> None:
        topic = event.topic
        if not event.remote:  # counted where it was published
            self.published[self.label(topic)] += 1
        for subscription in self._targets(topic):
            subscription.offer(event)

    def _targets(self, topic: str) -> list[Subscription]:
        targets = self._routes.get(topic)
        if targets is None:
            targets = [s for s in self._subscriptions if matches(s.patterns, topic)]
            if len(self._routes) >= MAX_ROUTES:  # topics come from clients too: stay bounded
                self._routes.clear()
            self._routes[topic] = targets
        return targets

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()

    def _unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)
        self._routes.clear()
