"""Events relayed across replicas (monitor/relay.py) as clients and the notifier see them:
a stream resumed on a replica whose relay lags, what the notifier's queue holds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import orjson
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from monitor.config import Config
from monitor.keys import BUS, ENGINE
from monitor.relay import EventRelay
from scheduler import EventBus
from workflows.records import NewEvent
from workflows.stores.postgres import PgWorkflowStore

from .conftest import AppClient, until
from .contracts import postgres_database
from .pg import PostgresCluster
from .services import Receiver
from .test_notifications import notification
from .test_sse import next_event

STORES = ("postgres",)  # the relay runs on PostgreSQL alone


async def test_a_stream_resumed_on_a_lagging_replica_skips_the_events_the_client_saw(
    daemon: AppClient,
) -> None:
    """A client saw ids up to N on one replica and reconnects (a load balancer) to another
    whose relay has not read N yet: the relay brings N there later, and the client must
    not get it a second time (Last-Event-ID means the same on every replica)."""
    bus, store = daemon.app[BUS], daemon.app[ENGINE].store
    first = bus.position + 1
    for n in (1, 2, 3):  # stored by the replica running the engine; not relayed here yet
        data, at = orjson.dumps({"n": n}), time.time()
        await store.create(
            [],
            NewEvent(
                seq=first + n - 1, topic="news.posted", data=data, key=f"k{n}", published_at=at
            ),
        )
    seen = first + 1  # the client saw the first two on that other replica
    headers = {"Last-Event-ID": str(seen)}
    async with daemon.get("/v1/events", params={"topics": "news.*"}, headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"  # subscribed: live now
        for n in (1, 2, 3):  # what the relay hands the bus as it catches up (EventRelay)
            bus.relay("news.posted", {"n": n}, time.time(), first + n - 1)
        live = await next_event(stream)
    assert (int(live["id"]), live["data"]["data"]) == (first + 2, {"n": 3})


async def test_a_stored_event_reaches_another_replica_with_its_publisher(
    postgres: PostgresCluster,
) -> None:
    """What a stream on that replica shows beside the event's data (monitor/http/sse.py)."""
    url = postgres.database()
    async with postgres_database(url) as database:
        store = PgWorkflowStore(database)
        await store.create_tables()
        data = orjson.dumps({"n": 1})
        event = NewEvent(
            seq=1, topic="news.posted", data=data, key="k1", published_at=1.0, actor="alice"
        )
        await store.create([], event)
        here = EventBus()
        heard: list[tuple[str | None, dict[str, int]]] = []
        here.subscribe("news.*", name="stream", sink=lambda e: heard.append((e.actor, e.data)))
        await a_relay(here, url, store, engine_here=False).catch_up()
    assert heard == [("alice", {"n": 1})]


async def test_a_stream_resumed_after_an_id_the_database_never_stored_gets_its_events_live(
    daemon: AppClient,
) -> None:
    """A client of a database since replaced: its Last-Event-ID is beyond every id stored
    here, and the events stored from now reach it as they did before the relay."""
    headers = {"Last-Event-ID": "1000000"}
    async with daemon.get("/v1/events", params={"topics": "news.*"}, headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"
        await daemon.app[ENGINE].publish("news.posted", {"n": 1}, by="test")
        live = await next_event(stream)
    assert live["data"]["data"] == {"n": 1}


async def test_events_relayed_from_other_replicas_never_push_this_replicas_own_out_of_the_notifier(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    storage: dict[str, str],
    receiver: Receiver,
) -> None:
    """The notifier leaves relayed events to their own replica, yet they wait in its queue
    (10,000, the oldest dropped) beside the ones it must send. While its outbox write is
    slow, the leader's workflow news (a thousand steps a second) fills that queue and this
    replica's own health change, the one alert only it sends, is dropped."""
    client = await start_daemon(
        make_config(notifications=[notification(receiver, ["health.*", "workflow.*"])])
    )
    bus = client.app[BUS]
    with psycopg.connect(storage["url"]) as slow:  # the outbox write waits while this holds
        slow.execute("LOCK TABLE notification_outbox IN ACCESS EXCLUSIVE MODE")
        for instance in ("p1", "p2"):  # probed here: only this replica announces them
            change = {"service": "pay", "instance": instance, "from": "passing", "to": "critical"}
            bus.publish("health.changed", change)
        for step in range(12_000):  # the leader's news, relayed meanwhile
            bus.relay("workflow.step_completed", {"step": step}, time.time(), None)
            if step % 100 == 0:
                await asyncio.sleep(0)
        slow.rollback()

    async def both_sent() -> bool:
        return len(receiver.received) >= 2

    await until(both_sent)
    assert sorted(b["data"]["instance"] for b in receiver.bodies()) == ["p1", "p2"]


async def test_a_database_outage_is_logged_once_by_the_relay_not_at_every_retry(
    daemon: AppClient,
    postgres: PostgresCluster,
    storage: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While PostgreSQL is unreachable the relay's sender reconnects about once a second;
    an outage of an hour must not write thousands of warnings per replica (the storage
    layer says it once, and again when it recovers)."""
    name = storage["url"].rsplit("/", 1)[1]
    postgres.refuse_connections(storage["url"])
    try:
        daemon.app[BUS].publish("health.changed", {"service": "pay", "to": "critical"})
        await asyncio.sleep(4)  # news to send: the sender tries again and again meanwhile
    finally:
        with psycopg.connect(postgres.url(), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "monitor.relay" and r.levelno >= logging.WARNING
    ]
    assert len(warned) == 1, warned


async def test_a_database_role_without_access_to_the_events_cannot_read_the_audit_trail_live(
    daemon: AppClient, postgres: PostgresCluster, storage: dict[str, str]
) -> None:
    """audit.* goes to audit:read holders only (DESIGN §3). Stored events reach other
    replicas by id, their data behind the events table's privileges; the relay's news
    travels whole in NOTIFY payloads, which any role that may connect can LISTEN to."""
    role = f"reporting_{secrets.token_hex(4)}"
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")  # CONNECT only, as PUBLIC has it
    url = storage["url"].replace("postgresql://postgres@", f"postgresql://{role}@")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as outsider:
        await outsider.execute("LISTEN hms_news")
        bus = daemon.app[BUS]
        bus.publish("audit.recorded", {"actor": "alice", "action": "process.cancel"})
        bus.publish("health.changed", {"service": "pay", "to": "critical"})  # the end
        heard: list[str] = []
        async with asyncio.timeout(10):
            async for note in outsider.notifies():
                heard.append(note.payload)
                if "health.changed" in note.payload:
                    break
    assert not [payload for payload in heard if "audit." in payload]


def a_relay(
    bus: EventBus,
    url: str,
    store: PgWorkflowStore,
    *,
    engine_here: bool,
    metrics: CollectorRegistry | None = None,
) -> EventRelay:
    """A replica's relay; `engine_here`: it stores and delivers the events itself."""
    return EventRelay(
        bus,
        url,
        read_after=store.events_after,
        last_seq=store.last_event_seq,
        engine_here=lambda: engine_here,
        metrics=metrics,
    )


class FreezingProxy:
    """A TCP relay to PostgreSQL whose connections can go silent at once, open but passing
    nothing either way: what a client sees of a server lost without a FIN or RST (a host
    gone, a failover moving its address). Connections made after `freeze` pass again."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._frozen: set[asyncio.Task[None]] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._port)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            self._pumps.add(asyncio.create_task(self._pump(source, sink)))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()  # an end passes on: only a frozen connection stays open

    def freeze(self) -> None:
        """Every connection open now stops passing bytes (its sockets stay open)."""
        for pump in self._pumps:
            pump.cancel()
        self._frozen |= self._pumps
        self._pumps = set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps | self._frozen:
            pump.cancel()


async def test_news_reaches_a_replica_again_after_its_listening_connection_went_silent(
    postgres: PostgresCluster,
) -> None:
    """The relay's stored events have a poll behind their notifications; its news has only
    the listening connection. One that goes silent without closing (the server's host lost,
    a failover) must be noticed and replaced, or this replica never sees another replica's
    health change again while the database answers its other connections."""
    url = postgres.database()
    proxy = FreezingProxy(postgres.port)
    through = url.replace(f":{postgres.port}/", f":{await proxy.start()}/")
    async with postgres_database(url) as database:
        store = PgWorkflowStore(database)
        await store.create_tables()
        origin, here = EventBus(), EventBus()
        sender = a_relay(origin, url, store, engine_here=True)
        receiver = a_relay(here, through, store, engine_here=False)
        heard: list[int] = []
        here.subscribe("health.*", name="stream", sink=lambda e: heard.append(e.data["n"]))
        await sender.start()
        await receiver.start()
        try:
            await asyncio.wait_for(sender.connected.wait(), 10)
            await asyncio.wait_for(receiver.connected.wait(), 10)

            async def relayed(n: int) -> bool:
                origin.publish("health.changed", {"n": n})
                return n in heard

            await until(lambda: relayed(1))
            proxy.freeze()
            await until(lambda: relayed(2), timeout=40)
        finally:
            await receiver.stop()
            await sender.stop()
            await proxy.close()


async def test_news_stops_while_the_notify_queue_is_past_its_limit(
    postgres: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that stays connected but reads nothing (a paused replica) pins
    PostgreSQL's NOTIFY queue; once full, every NOTIFY fails, the one each stored event's
    write sends too. News is best effort, so it stops first: here with the limit at 0%."""
    import monitor.relay

    url = postgres.database()
    async with postgres_database(url) as database:
        store = PgWorkflowStore(database)
        await store.create_tables()
        origin, here, metrics = EventBus(), EventBus(), CollectorRegistry()
        sender, receiver = (
            a_relay(origin, url, store, engine_here=True, metrics=metrics),
            a_relay(here, url, store, engine_here=False),
        )
        relays = [sender, receiver]
        heard: list[int] = []
        here.subscribe("health.*", name="stream", sink=lambda e: heard.append(e.data["n"]))
        monkeypatch.setattr(monitor.relay, "QUEUE_LIMIT", 0.0)  # any use at all is too much
        for each in relays:
            await each.start()
        try:
            for each in relays:
                await asyncio.wait_for(each.connected.wait(), 10)
            origin.publish("health.changed", {"n": 1})

            async def dropped() -> bool:
                return sender.unsent == 1

            await until(dropped)
            await asyncio.sleep(0.5)
            assert heard == []
            assert metrics.get_sample_value("hms_events_relay_unsent_total") == 1.0
        finally:
            for each in relays:
                await each.stop()
