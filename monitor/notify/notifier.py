"""Notifications: bus events POSTed to webhooks, signed, rate-limited, retried from an outbox.

Flow: the bus hands each matching event to one subscription (its own queue, so a
slow receiver never slows a probe or a workflow). The notifier drops what must
not be sent (maintenance, dependency-suppressed instances), limits each
(notification, event, subject) to one delivery per `min_interval`, stores the
delivery in the outbox table and hands it to the receiver's worker. The outbox
row is the durable timer: a failed attempt moves its `due` time on with
backoff, a restart re-arms every row, success or the last attempt deletes it.

Across replicas (PostgreSQL) each row names its owner, the replica that sends it. Before
every attempt the owner claims its row, so a replica taken for dead (paused, cut off) whose
rows another one adopted (`adopt`) drops them instead of sending them a second time. The
outbox also remembers the last state sent per subject, so one transition seen by two
replicas (both probing an instance during a handover) is stored, and sent, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable, Collection, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from monitor.config import Notification
from monitor.convert import retry_from_config
from monitor.notify.abc import Delivery, DeliveryTaken, NotifyResult, OncePer, OutboxStore
from monitor.notify.events import fingerprint_of, subject_of
from monitor.notify.formats import FORMATS
from monitor.notify.signing import SIGNATURE_HEADER, sign
from registry import HealthState, StoreUnavailable
from scheduler import Event, EventBus
from scheduler.bus import Subscription, matches
from scheduler.retry import Retry

log = logging.getLogger(__name__)

RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
QUEUE_SIZE = 10_000
MAX_RECENT = 100_000
FIRST_PASS = (HealthState.UNKNOWN.value, HealthState.PASSING.value)


@dataclass(slots=True)
class _Recent:
    """What was last sent for one (notification, event, subject)."""

    sent_at: float
    fingerprint: str


@dataclass(slots=True)
class _Receiver:
    notification: Notification
    retry: Retry
    queue: asyncio.Queue[Delivery] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    worker: asyncio.Task[None] | None = None


def render_body(notification: Notification, event: Event) -> bytes:
    return FORMATS[notification.format](notification, event)


class Notifier:
    def __init__(
        self,
        notifications: Iterable[Notification],
        *,
        outbox: OutboxStore,
        bus: EventBus,
        metrics: CollectorRegistry,
        in_maintenance: Callable[[str], bool],
        clock: Callable[[], float],
        owner: Callable[[], str] = lambda: "",
    ) -> None:
        """`outbox`: where deliveries wait (their rows are the durable timers). `owner`: the
        name its rows are kept under: the replica's member key on PostgreSQL; on SQLite the
        default, the same at every start, so a restart finds the rows of the one before."""
        self._outbox, self._bus, self._clock = outbox, bus, clock
        self._owner_of = owner
        self._in_maintenance = in_maintenance
        self._counter = Counter(
            "hms_notifications",
            "Notifications by receiver and what became of them",
            ["name", "result"],
            registry=metrics,
        )
        self._receivers: dict[str, _Receiver] = {}
        self._recent: dict[tuple[str, str, str], _Recent] = {}
        self._unstored: set[str] = set()  # ids of deliveries whose save failed
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None
        self._session: aiohttp.ClientSession | None = None
        self._notifications = tuple(notifications)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "hms-mgmt-notifier"}, raise_for_status=False
        )
        await self._outbox.create_tables()
        await self.configure(self._notifications)
        for delivery in await self._outbox.load(self._owner_of()):
            self._arm(delivery)

    async def adopt(self, dead_owners: Collection[str]) -> int:
        """Take over the outbox rows of dead replicas (their member keys) and send them from
        here under the same delivery ids; the cluster calls this when it sees members die.
        Returns how many were adopted; raises StoreUnavailable when storage fails (the rows
        stay with the dead until a later call)."""
        if self._session is None:
            raise RuntimeError("the notifier adopts deliveries only once started")
        deliveries = await self._outbox.adopt(self._owner_of(), dead_owners)
        for delivery in deliveries:
            self._arm(delivery)
        if deliveries:
            log.info("notifications: adopted %d deliveries of %s", len(deliveries), dead_owners)
        return len(deliveries)

    async def adopt_orphans(self, live: Collection[str]) -> int:
        """Adopt the rows of every owner not among the `live` member keys: members seen
        dead while this replica watched, and those of an earlier life of the cluster (a
        whole restart leaves every row under a key no one has any more). A member that
        joined after this replica's last view may be taken for dead and lose its rows to
        this one: the claim before every attempt still sends each delivery once."""
        dead = await self._outbox.owners() - {*live, self._owner_of()}
        return await self.adopt(dead) if dead else 0

    async def configure(self, notifications: Iterable[Notification]) -> None:
        """Take a new set of notifications; deliveries to removed ones are dropped."""
        self._notifications = tuple(notifications)
        wanted = {n.name: n for n in self._notifications}
        for name in [n for n in self._receivers if n not in wanted]:
            worker = self._receivers.pop(name).worker
            if worker is not None:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        for name, notification in wanted.items():
            self._counter.labels(name, NotifyResult.SENT)
            self._counter.labels(name, NotifyResult.FAILED)
            retry = retry_from_config(notification.retry, RETRYABLE)
            if name in self._receivers:
                self._receivers[name].notification = notification
                self._receivers[name].retry = retry
                continue
            receiver = self._receivers[name] = _Receiver(notification, retry)
            receiver.worker = asyncio.create_task(self._work(receiver), name=f"notify-{name}")
        patterns = sorted({p for n in self._notifications for p in n.events})
        if self._subscription is None or self._subscription.patterns != tuple(patterns):
            old, self._subscription = self._subscription, None
            if old is not None:
                await old.close()
            if patterns:
                # A relayed event is notified by the replica it was published on (its outbox
                # row): it never waits in this queue beside the events this one must send.
                self._subscription = self._bus.subscribe(
                    patterns, self._on_event, name="notifier", local_only=True
                )

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()
        for timer in self._timers:
            timer.cancel()
        workers = [r.worker for r in self._receivers.values() if r.worker is not None]
        workers += self._tasks
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._session is not None:
            await self._session.close()

    # -- from event to delivery ---------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        for notification in self._notifications:
            if not matches(notification.events, event.topic):
                continue
            if self._suppressed(event):
                self._counter.labels(notification.name, NotifyResult.SUPPRESSED).inc()
                continue
            await self._limit(notification, event)

    def _suppressed(self, event: Event) -> bool:
        data = event.data
        if data.get("suppressed"):
            return True
        if event.topic == "health.changed" and (data.get("from"), data.get("to")) == FIRST_PASS:
            return True  # a new instance coming up is not news; one coming up failing is
        service = event.data.get("service")
        return isinstance(service, str) and self._in_maintenance(service)

    async def _limit(self, notification: Notification, event: Event) -> None:
        """The same state for the same subject goes out once per min_interval; news at once.
        What this notifier sent lately is known here; what other replicas sent, the outbox
        knows (`add`)."""
        subject = subject_of(event)
        key = (notification.name, event.topic, subject)
        now, fingerprint = self._clock(), fingerprint_of(event)
        interval = notification.min_interval.total_seconds()
        recent = self._recent.get(key)
        if (
            recent is not None
            and recent.fingerprint == fingerprint
            and now - recent.sent_at < interval
        ):
            self._counter.labels(notification.name, NotifyResult.DEDUPED).inc()
            return
        if len(self._recent) >= MAX_RECENT:  # subjects come from clients too: stay bounded
            self._recent.clear()
        self._recent[key] = _Recent(now, fingerprint)
        delivery = Delivery(
            id=secrets.token_hex(8),
            name=notification.name,
            topic=event.topic,
            body=render_body(notification, event),
            due=now,
        )
        once = OncePer(
            subject=f"{event.topic} {subject}", fingerprint=fingerprint, now=now, interval=interval
        )
        if await self._keep(delivery, once):
            self._arm(delivery)
        else:
            self._counter.labels(notification.name, NotifyResult.DEDUPED).inc()

    async def _keep(self, delivery: Delivery, once: OncePer) -> bool:
        """Store a new delivery; False when another replica already sent the same news. When
        storage fails (disk full is itself worth an alert), it is still sent, from memory
        only: at-least-once becomes best-effort until storage is back."""
        try:
            return await self._outbox.add(delivery, self._owner_of(), once=once)
        except StoreUnavailable:
            self._unstored.add(delivery.id)
            log.warning("notification %s: %s kept in memory only", delivery.name, delivery.id)
            return True

    async def _hold(self, delivery: Delivery) -> bool:
        """Store the delivery's attempts and due time if its row is still this notifier's:
        False when another replica adopted it (this one was taken for dead) or sent it, and
        it must not be sent from here. Storage failing, it goes on from memory."""
        try:
            if delivery.id in self._unstored:  # never stored: store it now
                await self._outbox.save(delivery, self._owner_of())
                self._unstored.discard(delivery.id)
            else:
                await self._outbox.claim(delivery, self._owner_of())
        except StoreUnavailable:
            log.debug("notification %s: %s goes on from memory", delivery.name, delivery.id)
        except DeliveryTaken:
            self._counter.labels(delivery.name, NotifyResult.TAKEN).inc()
            log.info("notification %s: %s is another replica's now", delivery.name, delivery.id)
            return False
        return True

    # -- delivery -------------------------------------------------------------------

    def _arm(self, delivery: Delivery) -> None:
        receiver = self._receivers.get(delivery.name)
        if receiver is None:  # removed from the config: its outbox rows go too
            self._spawn(self._forget(delivery))
            return
        delay = delivery.due - self._clock()
        if delay <= 0:
            _put(receiver, delivery)
            return
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            if timer is not None:
                self._timers.discard(timer)
            if (current := self._receivers.get(delivery.name)) is not None:
                _put(current, delivery)

        timer = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(timer)

    async def _work(self, receiver: _Receiver) -> None:
        """One worker per receiver: deliveries to it go in order, one at a time."""
        while True:
            delivery = await receiver.queue.get()
            try:
                await self._attempt(receiver.notification, receiver.retry, delivery)
            except Exception:
                log.exception("notification %s: delivery %s failed", delivery.name, delivery.id)

    async def _attempt(self, notification: Notification, retry: Retry, delivery: Delivery) -> None:
        delivery.attempts += 1
        if not await self._hold(delivery):  # claimed, this attempt counted, before it is made
            return
        status, error = await self._post(notification, delivery)
        if status is not None and 200 <= status < 300:
            self._counter.labels(notification.name, NotifyResult.SENT).inc()
            await self._forget(delivery)
            return
        retryable = status is None or status in retry.retry_on
        if retryable and delivery.attempts < retry.max_attempts:
            delivery.due = self._clock() + retry.delay(delivery.attempts, random.random())
            if not await self._hold(delivery):
                return
            self._counter.labels(notification.name, NotifyResult.RETRIED).inc()
            log.info(
                "notification %s: attempt %d failed (%s); next in %.0f s",
                notification.name,
                delivery.attempts,
                error,
                delivery.due - self._clock(),
            )
            self._arm(delivery)
            return
        self._counter.labels(notification.name, NotifyResult.FAILED).inc()
        log.warning(
            "notification %s: gave up on %s after %d attempt(s): %s",
            notification.name,
            delivery.topic,
            delivery.attempts,
            error,
        )
        await self._forget(delivery)

    async def _post(self, notification: Notification, delivery: Delivery) -> tuple[int | None, str]:
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            "X-Hms-Event": delivery.topic,
            "X-Hms-Delivery": delivery.id,
        }
        if notification.secret is not None:
            headers[SIGNATURE_HEADER] = sign(notification.secret.get_secret_value(), delivery.body)
        timeout = aiohttp.ClientTimeout(total=notification.timeout.total_seconds())
        try:
            async with self._session.post(
                str(notification.url), data=delivery.body, headers=headers, timeout=timeout
            ) as response:
                await response.read()
                return response.status, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None, str(exc) or type(exc).__name__

    async def _forget(self, delivery: Delivery) -> None:
        self._unstored.discard(delivery.id)
        try:
            await self._outbox.delete(delivery.id)
        except StoreUnavailable:  # the row outlives the delivery: resent after a restart
            log.debug("notification %s: %s stays in the outbox", delivery.name, delivery.id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("notification bookkeeping failed: %s", task.exception())


def _put(receiver: _Receiver, delivery: Delivery) -> None:
    try:
        receiver.queue.put_nowait(delivery)
    except asyncio.QueueFull:  # stays in the outbox; the next restart re-arms it
        log.warning("notification %s: queue full, delivery %s deferred", delivery.name, delivery.id)
