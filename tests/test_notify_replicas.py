"""Notifications across replicas: two notifiers (two replicas' parts) over one outbox and a
real webhook receiver. A dead replica's deliveries are sent by the one that adopts them,
under the same delivery id; one taken for dead that wakes up does not send them again; one
transition seen by two replicas goes out once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import Notification
from monitor.notify import Delivery, Notifier, OutboxStore, SqliteOutboxStore
from monitor.notify.stores.postgres import PgOutboxStore
from scheduler import EventBus

from .conftest import until
from .contracts import Factory, factory_for, postgres_factory, sqlite_database, sqlite_factory
from .services import Receiver

FACTORIES: dict[str, Factory[OutboxStore]] = {
    "sqlite": sqlite_factory(SqliteOutboxStore),
    "postgres": postgres_factory(PgOutboxStore),
}
HOUR = 3600.0


class Replica:
    """One replica's notifier and what the test reads of it."""

    def __init__(self, notifier: Notifier, bus: EventBus, metrics: CollectorRegistry) -> None:
        self.notifier, self.bus, self.metrics = notifier, bus, metrics

    def count(self, result: str) -> float:
        value = self.metrics.get_sample_value(
            "hms_notifications_total", {"name": "ops", "result": result}
        )
        return value or 0.0


@pytest.fixture
def replicas(backend: str, tmp_path: Path, receiver: Receiver) -> Callable[..., Any]:
    """Notifiers over one outbox (each its own connection to it), sending to `receiver`."""
    factory = factory_for(FACTORIES, backend)

    @asynccontextmanager
    async def start(
        owner: str, *, backoff: str, clock: Callable[[], float] = time.time
    ) -> AsyncIterator[Replica]:
        notification = Notification.model_validate(
            {
                "name": "ops",
                "url": receiver.url,
                "events": ["grant.*"],
                "retry": {"max_attempts": 5, "backoff": backoff, "max_backoff": backoff},
            }
        )
        async with AsyncExitStack() as stack:
            backing = await stack.enter_async_context(factory(tmp_path))
            bus, metrics = EventBus(), CollectorRegistry()
            notifier = Notifier(
                [notification],
                outbox=backing.store,
                bus=bus,
                metrics=metrics,
                in_maintenance=lambda _: False,
                clock=clock,
                owner=lambda: owner,
            )
            await notifier.start()
            stack.push_async_callback(notifier.close)
            yield Replica(notifier, bus, metrics)

    return start


def delivery_ids(receiver: Receiver) -> list[str]:
    return [headers["X-Hms-Delivery"] for headers, _ in receiver.received]


async def test_a_dead_replicas_delivery_is_sent_by_its_adopter_under_the_same_id(
    replicas: Callable[..., Any], receiver: Receiver
) -> None:
    receiver.statuses = [503]
    async with replicas("a/1", backoff="1h") as dead:
        dead.bus.publish("grant.paid", {"process": "p-1"})

        async def retry_stored() -> bool:
            return dead.count("retried") == 1

        await until(retry_stored)  # its retry waits an hour in the outbox; then it dies

    later = time.time() + HOUR  # the retry is due on the adopter's clock
    async with replicas("b/1", backoff="1h", clock=lambda: later) as adopter:
        assert len(receiver.received) == 1  # a new replica does not send others' rows
        assert await adopter.notifier.adopt(["a/1"]) == 1

        async def sent() -> bool:
            return adopter.count("sent") == 1

        await until(sent)
        assert await adopter.notifier.adopt(["a/1"]) == 0  # sent and gone
    first, second = receiver.received
    assert delivery_ids(receiver)[0] == delivery_ids(receiver)[1]
    assert first[1] == second[1]


async def test_an_event_relayed_from_another_replica_is_sent_by_that_replica_alone(
    replicas: Callable[..., Any], receiver: Receiver
) -> None:
    """Every replica's bus gets every event (monitor/relay.py); only the one where it was
    published keeps a delivery for it."""
    async with replicas("a/1", backoff="1s") as origin, replicas("b/1", backoff="1s") as other:
        origin.bus.publish("grant.paid", {"process": "p-1"})
        other.bus.relay("grant.paid", {"process": "p-1"}, time.time(), None)

        async def sent() -> bool:
            return origin.count("sent") == 1

        await until(sent)
        await origin.notifier.close()  # nothing more in flight anywhere
        await other.notifier.close()
    assert len(receiver.received) == 1
    assert other.count("sent") == 0


async def test_a_replica_taken_for_dead_does_not_send_what_was_adopted(
    replicas: Callable[..., Any], receiver: Receiver
) -> None:
    """Paused past its lease: the others adopt its rows. When its retry timer fires it
    finds the row gone to another replica and drops the delivery."""
    receiver.statuses = [503]
    async with replicas("a/1", backoff="2s") as paused:
        paused.bus.publish("grant.paid", {"process": "p-1"})

        async def retry_stored() -> bool:
            return paused.count("retried") == 1

        await until(retry_stored)
        later = time.time() + HOUR
        async with replicas("b/1", backoff="2s", clock=lambda: later) as adopter:
            assert await adopter.notifier.adopt(["a/1"]) == 1

            async def sent() -> bool:
                return adopter.count("sent") == 1

            await until(sent)

            async def dropped() -> bool:
                return paused.count("taken") == 1

            await until(dropped)  # its retry (1 to 2 s after the first attempt) came and went
    assert len(receiver.received) == 2  # the first attempt, then the adopter's
    assert len(set(delivery_ids(receiver))) == 1
    assert paused.count("sent") == 0


async def test_one_transition_seen_by_two_replicas_goes_out_once(
    replicas: Callable[..., Any], receiver: Receiver
) -> None:
    """During a handover two replicas may probe one instance and both see it change."""
    async with replicas("a/1", backoff="1h") as a, replicas("b/1", backoff="1h") as b:
        for replica in (a, b):
            replica.bus.publish("grant.paid", {"process": "p-1"})

        async def both_handled() -> bool:
            handled = a.count("sent") + b.count("sent") + a.count("deduped") + b.count("deduped")
            return handled == 2

        await until(both_handled)
        assert a.count("sent") + b.count("sent") == 1
    assert len(receiver.received) == 1


async def test_an_sqlite_outbox_from_before_owners_keeps_its_deliveries(tmp_path: Path) -> None:
    """An upgraded daemon (owner '', the default) sends what the old one left undelivered."""
    old_table = (
        "CREATE TABLE notification_outbox (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "topic TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, due REAL NOT NULL)"
    )

    def leave_one(db: Any) -> None:
        db.execute(old_table)
        db.execute(
            "INSERT INTO notification_outbox VALUES ('d1', 'ops', 'grant.paid', x'7b7d', 2, 5.0)"
        )

    async with sqlite_database(tmp_path) as database:
        await database.write(leave_one)
        store = SqliteOutboxStore(database)
        await store.create_tables()
        assert await store.load("") == [
            Delivery(id="d1", name="ops", topic="grant.paid", body=b"{}", attempts=2, due=5.0)
        ]
