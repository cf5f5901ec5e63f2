"""Probing sharded over replicas (DESIGN.md §8): HealthCheckers over one PostgreSQL database,
each its own registry of the same instances, probing a real HTTP target that counts requests.

Each instance is probed by the replica owning its shard alone; every replica shows its
health; one leaving hands its share to another, which goes on from the stored state
(no second `health.changed`, so no second alert); the rules sum over `replica`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.cluster.shards import SHARDS, owners, shard_of
from monitor.config import parse_config
from monitor.health import HealthBook, HealthChecker, MaintenanceCalendar, ProbeResults
from monitor.health.metrics import ProbeMetrics, render
from monitor.health.states_abc import StoredHealth
from monitor.health.stores.sqlite import SqliteResultStore
from monitor.health.stores.states_postgres import CHANNEL, PgHealthStateStore
from monitor.probing.prober import Prober
from monitor.slo import render_rules
from monitor.storage.database import Database
from monitor.storage.postgres import Listener, PgDatabase
from registry import Catalog, HealthState, Instance, ProbeSpec
from registry.stores.sqlite import SqliteRegistryStore
from scheduler import Event, EventBus, Scheduler

from .conftest import until
from .pg import PostgresCluster
from .test_rules import CONFIG, alerts, run_tests

SERVICE = "payments"
NAMES = [f"p{i}" for i in range(12)]
PROBE = ProbeSpec.model_validate(
    {
        "type": "http",
        "interval": "100ms",
        "down_interval": "100ms",
        "timeout": "500ms",
        "failure_threshold": 2,
        "success_threshold": 2,
    }
)


class Target:
    """An HTTP target answering /i/<name>, counting requests by name; statuses settable,
    DOWN failing from the start."""

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.status: dict[str, int] = {}
        app = web.Application()
        app.router.add_get("/i/{name}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _answer(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] += 1
        return web.Response(status=self.status.get(name, 503 if name == DOWN else 200))

    def instance(self, name: str) -> Instance:
        probe = ProbeSpec(path=f"/i/{name}")
        return Instance(service=SERVICE, id=name, url=str(self.server.make_url("/")), probe=probe)


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    target = Target()
    await target.server.start_server()
    yield target
    await target.server.close()


@dataclass
class Replica:
    """One replica's health parts: its registry (a SQLite file of its own, the same
    instances), book, checker and metrics; the health states on the shared database."""

    name: str
    url: str  # the shared database
    checker: HealthChecker
    book: HealthBook
    events: list[Event]
    metrics: ProbeMetrics
    stack: contextlib.AsyncExitStack

    def announced(self, instance: str) -> list[tuple[str, str]]:
        """The health.changed events this replica published for `instance`: (from, to)."""
        return [
            (e.data["from"], e.data["to"]) for e in self.events if e.data["instance"] == instance
        ]

    def probes(self) -> dict[str, float]:
        """Probes counted in this replica's metrics, by instance (the ones it exports)."""
        text = render(self.metrics.snapshot())
        counted: dict[str, float] = collections.defaultdict(float)
        for family in text_string_to_metric_families(text):
            if family.name == "hms_probe":
                for sample in family.samples:
                    assert sample.labels["replica"] == self.name
                    counted[sample.labels["instance"]] += sample.value
        return dict(counted)

    def state(self, instance: str) -> HealthState:
        return self.book.state_of((SERVICE, instance))


async def start_replica(
    name: str, url: str, tmp_path: Path, instances: Iterable[Instance], shards: Collection[int]
) -> Replica:
    stack = contextlib.AsyncExitStack()
    database = Database(tmp_path / f"{name}.db")
    await database.open()
    stack.push_async_callback(database.close)
    pg = PgDatabase(url, application_name=name)
    await pg.open()
    stack.push_async_callback(pg.close)
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe("health.changed", sink=events.append)
    book = HealthBook(bus=bus, calendar=MaintenanceCalendar([]), dependencies={})
    catalog = Catalog(SqliteRegistryStore(database), health=book)
    await catalog.load(static=instances)
    prober = Prober()
    await prober.start()
    stack.push_async_callback(prober.close)
    scheduler = Scheduler(CollectorRegistry())
    checker = HealthChecker(
        catalog=catalog,
        book=book,
        prober=prober,
        store=ProbeResults(SqliteResultStore(database)),
        scheduler=scheduler,
        defaults=PROBE,
        service_probes={},
        states=PgHealthStateStore(pg),
    )
    checker.set_shards(shards)
    await checker.open()
    scheduler.start()
    stack.callback(scheduler.shutdown)
    checker.start()
    stack.push_async_callback(checker.close)
    shared = checker.shared
    assert shared is not None
    listener = Listener(url, [CHANNEL], lambda _, __: shared.apply_remote(), shared.resync)
    listener.start()
    stack.push_async_callback(listener.stop)
    await asyncio.wait_for(listener.connected.wait(), 10)
    metrics = ProbeMetrics(checker, lambda: [], replica=name)
    return Replica(name, url, checker, book, events, metrics, stack)


async def stop(replica: Replica) -> None:
    """Close the replica's parts; a close that hangs fails the test instead."""
    await asyncio.wait_for(replica.stack.aclose(), 15)


def split(members: list[str]) -> dict[str, set[int]]:
    """Each member's shards, as the membership hands them out."""
    owned: dict[str, set[int]] = {m: set() for m in members}
    for shard, owner in enumerate(owners(members)):
        assert owner is not None
        owned[owner].add(shard)
    return owned


def owner_of(name: str, owned: dict[str, set[int]]) -> str:
    return next(m for m, shards in owned.items() if shard_of(SERVICE, name) in shards)


OWNED = split(["a", "b"])
DOWN = next(f"down{i}" for i in range(100) if owner_of(f"down{i}", OWNED) == "a")


@pytest.fixture
async def replicas(
    postgres: PostgresCluster, target: Target, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, Replica], dict[str, set[int]]]]:
    url = postgres.database()
    owned = OWNED
    instances = [target.instance(name) for name in [*NAMES, DOWN]]
    started: dict[str, Replica] = {}
    try:
        for member, shards in owned.items():
            started[member] = await start_replica(member, url, tmp_path, instances, shards)
        yield started, owned
    finally:
        for replica in started.values():
            await stop(replica)


async def test_each_instance_is_probed_by_the_replica_owning_its_shard_alone(
    replicas: tuple[dict[str, Replica], dict[str, set[int]]], target: Target
) -> None:
    started, owned = replicas
    assert all(any(owner_of(n, owned) == m for n in NAMES) for m in owned)  # both have some

    async def all_probed_a_few_times() -> bool:
        return all(target.hits[name] >= 5 for name in NAMES)

    await until(all_probed_a_few_times)
    counted = {member: replica.probes() for member, replica in started.items()}
    for name in NAMES:
        owner = owner_of(name, owned)
        other = "b" if owner == "a" else "a"
        assert name not in counted[other]  # not probed there, not exported there
        # Every request the target saw was one of the owner's probes (one may be in flight).
        assert counted[owner][name] <= target.hits[name] <= counted[owner][name] + 1


async def test_every_replica_shows_the_health_and_only_the_prober_announces_it(
    replicas: tuple[dict[str, Replica], dict[str, set[int]]], target: Target
) -> None:
    started, _ = replicas
    a, b = started["a"], started["b"]  # a probes DOWN

    await eventually(lambda: b.state(DOWN) is HealthState.CRITICAL)
    assert a.state(DOWN) is HealthState.CRITICAL
    assert a.announced(DOWN) == [("unknown", "critical")]
    assert b.announced(DOWN) == []
    # Each shows the other's instances too.
    await eventually(lambda: all(r.state(n) is HealthState.PASSING for r in (a, b) for n in NAMES))


async def test_a_leaving_replicas_share_is_probed_by_another_from_the_stored_state(
    replicas: tuple[dict[str, Replica], dict[str, set[int]]], target: Target
) -> None:
    started, _ = replicas
    a, b = started["a"], started["b"]  # a probes DOWN
    await eventually(lambda: b.state(DOWN) is HealthState.CRITICAL)
    assert a.announced(DOWN) == [("unknown", "critical")]

    # a leaves: b owns every shard, and probes a's share from the next slot on.
    await stop(started.pop("a"))
    hits = target.hits[DOWN]
    b.checker.set_shards(range(SHARDS))
    await eventually(lambda: b.probes().get(DOWN, 0) >= 3)
    assert target.hits[DOWN] >= hits + 3
    # It went on from "critical" with its counters: no second announcement, no flap.
    assert b.state(DOWN) is HealthState.CRITICAL
    assert b.announced(DOWN) == []

    target.status[DOWN] = 200  # recovers: announced once, by the replica probing it now
    await eventually(lambda: b.state(DOWN) is HealthState.PASSING)
    assert b.announced(DOWN) == [("critical", "passing")]


async def test_a_replica_that_loses_a_shard_stops_probing_it_at_once(
    replicas: tuple[dict[str, Replica], dict[str, set[int]]], target: Target
) -> None:
    started, owned = replicas
    a, b = started["a"], started["b"]
    mine = [n for n in NAMES if owner_of(n, owned) == "a"]
    await eventually(lambda: all(target.hits[n] >= 2 for n in mine))
    a.checker.set_shards(set())
    b.checker.set_shards(range(SHARDS))
    assert a.probes() == {}  # nothing exported for instances probed elsewhere now
    await eventually(lambda: all(b.probes().get(n, 0) >= 3 for n in mine))
    # From the handover on every request is one of b's probes (a handover may add one of a's).
    before = dict(target.hits)
    counted = b.probes()
    await asyncio.sleep(0.5)
    after = b.probes()
    for n in mine:
        assert target.hits[n] - before[n] <= after[n] - counted[n] + 1


async def eventually(check: Callable[[], bool]) -> None:
    """`until` for a plain condition."""

    async def holds() -> bool:
        return check()

    await until(holds)


async def test_a_restarted_replica_goes_on_from_the_stored_state_without_announcing_it(
    replicas: tuple[dict[str, Replica], dict[str, set[int]]],
    target: Target,
    tmp_path: Path,
) -> None:
    started, owned = replicas
    await eventually(lambda: started["a"].state(DOWN) is HealthState.CRITICAL)
    url = started["a"].url
    await stop(started.pop("a"))

    instances = [target.instance(n) for n in [*NAMES, DOWN]]
    again = started["a"] = await start_replica("a", url, tmp_path / "again", instances, owned["a"])
    assert again.state(DOWN) is HealthState.CRITICAL  # before its first probe
    await eventually(lambda: again.probes().get(DOWN, 0) >= 3)
    assert again.state(DOWN) is HealthState.CRITICAL
    assert again.announced(DOWN) == []


async def test_a_new_owner_counts_on_from_the_stored_failures(
    postgres: PostgresCluster, target: Target, tmp_path: Path
) -> None:
    """Stored: passing, with 2 of 3 failures already seen (its last owner left then). The
    new owner's first failure is the third: critical at once, not after three more."""
    url = postgres.database()
    spec = {"interval": "1s", "down_interval": "1s", "failure_threshold": 3}
    slow = ProbeSpec.model_validate({"path": "/i/p0", **spec})
    instance = Instance(service=SERVICE, id="p0", url=str(target.server.make_url("/")), probe=slow)
    pg = PgDatabase(url)
    await pg.open()
    store = PgHealthStateStore(pg)
    await store.open()
    left = StoredHealth(
        service=SERVICE,
        instance="p0",
        state=HealthState.PASSING,
        successes=0,
        failures=2,
        reason="probe passed",
        last_probe=None,
    )
    await store.save([left], [])
    await pg.close()
    target.status["p0"] = 503

    replica = await start_replica("b", url, tmp_path, [instance], range(SHARDS))
    try:
        assert replica.state("p0") is HealthState.PASSING  # before its first probe
        await eventually(lambda: replica.probes().get("p0", 0) >= 1)
        assert replica.state("p0") is HealthState.CRITICAL
        assert replica.announced("p0") == [("passing", "critical")]
    finally:
        await stop(replica)


def test_a_handover_keeps_one_instance_down_alert_and_its_for(tmp_path: Path) -> None:
    """p1 critical throughout, exported by replica a, then (a died) by b: still one
    HmsInstanceDown, firing once `for: 2m` is over, not pending anew from the handover."""
    rules = tmp_path / "rules.yml"
    rules.write_text(render_rules(parse_config(CONFIG)))
    health = 'hms_instance_health{{service="payments",instance="p1",state="critical",replica="{}"}}'
    suppressed = 'hms_instance_suppressed{{service="payments",instance="p1",replica="{}"}}'
    before, after = "1 1 1 stale", "_ _ _ 1 1 1 1 1"
    down = {
        "exp_labels": {
            "severity": "page",
            "service": "payments",
            "instance": "p1",
            "state": "critical",
            "team": "money",
        },
        "exp_annotations": {
            "summary": "payments/p1 is critical",
            "description": "Probes of p1 have been failing for 2 minutes. "
            "Instances whose dependency is down are not reported.",
            "runbook_url": "docs/runbooks.md#hmsinstancedown",
        },
    }
    run_tests(
        tmp_path,
        rules,
        [
            {"series": health.format("a"), "values": before},
            {"series": suppressed.format("a"), "values": before.replace("1", "0")},
            {"series": health.format("b"), "values": after},
            {"series": suppressed.format("b"), "values": after.replace("1", "0")},
        ],
        alert_tests=(
            alerts("HmsInstanceDown", "1m", []),
            alerts("HmsInstanceDown", "3m", [down]),
            alerts("HmsInstanceDown", "4m", [down]),
        ),
    )
