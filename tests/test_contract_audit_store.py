"""The AuditStore contract (monitor/audit/abc.py), run against every implementation: what
the trail (monitor/audit/trail.py) and GET /v1/audit rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from monitor.audit.abc import AuditQuery, AuditRecord, AuditStore
from monitor.audit.stores.postgres import PgAuditStore
from monitor.audit.stores.sqlite import SqliteAuditStore
from registry import StoreUnavailable

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[AuditStore]] = {
    "sqlite": sqlite_factory(SqliteAuditStore),
    "postgres": postgres_factory(PgAuditStore),
}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[AuditStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.open()
        yield opened


def record(
    at: float, actor: str = "admin", action: str = "instance.register", **kw: object
) -> AuditRecord:
    fields: dict[str, object] = {"target": "payments/p1", "outcome": 201} | kw
    return AuditRecord(time=at, actor=actor, action=action, **fields)  # type: ignore[arg-type]


async def test_records_come_back_in_order_with_ids_and_every_field(
    backing: Backing[AuditStore],
) -> None:
    store = backing.store
    await store.open()  # again: safe
    first = record(100.5, request_id="r1", client="10.0.0.9")
    await store.add(first)
    await store.add(record(101.0, actor="ops", action="process.cancel", target="p-1", outcome=202))
    assert first.id is not None
    listed = await store.list(AuditQuery())
    assert [r.id for r in listed] == sorted(r.id for r in listed if r.id is not None)
    assert listed[0] == first
    assert (listed[1].actor, listed[1].action, listed[1].target, listed[1].outcome) == (
        "ops",
        "process.cancel",
        "p-1",
        202,
    )


async def test_filters_prefixes_times_and_cursor(backing: Backing[AuditStore]) -> None:
    store = backing.store
    for n, (actor, action, target) in enumerate(
        [
            ("admin", "instance.register", "payments/p1"),
            ("ops", "instance.deregister", "payments/p1"),
            ("admin", "process.start", "Grant"),
            ("admin", "instance.register", "pay_ments/p2"),  # `_` is no wildcard
            ("admin", "instance.register", "payments%/p3"),
        ]
    ):
        await store.add(record(1000.0 + n, actor=actor, action=action, target=target))

    async def targets(**query: object) -> list[str]:
        return [r.target for r in await store.list(AuditQuery(**query))]  # type: ignore[arg-type]

    assert await targets(actor="ops") == ["payments/p1"]
    assert await targets(action="instance.*") == [
        "payments/p1",
        "payments/p1",
        "pay_ments/p2",
        "payments%/p3",
    ]
    assert await targets(target="payments/*") == ["payments/p1", "payments/p1"]
    assert await targets(target="payments%*") == ["payments%/p3"]
    assert await targets(since=1002.0, until=1004.0) == ["Grant", "pay_ments/p2"]
    page = await store.list(AuditQuery(limit=2))
    assert [r.target for r in page] == ["payments/p1", "payments/p1"]
    assert page[-1].id is not None
    rest = await store.list(AuditQuery(after=page[-1].id, limit=10))
    assert [r.target for r in rest] == ["Grant", "pay_ments/p2", "payments%/p3"]


async def test_refusals_of_a_minute_add_up_in_one_row_per_actor(
    backing: Backing[AuditStore],
) -> None:
    store = backing.store
    refused = "auth.refused"
    await store.add_refusals([record(600.0, "anonymous", refused, outcome=401, count=3)], 10)
    await store.add_refusals(
        [
            record(630.0, "anonymous", refused, outcome=401, count=2),
            record(631.0, "payments", refused, outcome=403),
        ],
        10,
    )
    await store.add_refusals([record(660.0, "anonymous", refused, outcome=401)], 11)
    rows = await store.list(AuditQuery(action=refused))
    assert [(r.actor, r.count, r.time) for r in rows] == [
        ("anonymous", 5, 600.0),  # the first of its minute keeps its time
        ("payments", 1, 631.0),
        ("anonymous", 1, 660.0),
    ]


async def test_prune_removes_by_age_only(backing: Backing[AuditStore]) -> None:
    store = backing.store
    for at in (10.0, 20.0, 30.0):
        await store.add(record(at))
    assert await store.prune(25.0) == 2
    assert [r.time for r in await store.list(AuditQuery())] == [30.0]


async def test_a_failing_database_refuses_the_record(backing: Backing[AuditStore]) -> None:
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await backing.store.add(record(1.0))


async def test_records_written_together_know_their_own_ids(backing: Backing[AuditStore]) -> None:
    """A batch's records are written at once (a statement per power of two records, 64
    at most, on SQLite, one statement of arrays on PostgreSQL); each learns the id its
    row took (the id `audit.recorded` carries)."""
    store = backing.store
    await store.add(record(99.0, request_id="before"))  # ids do not start at 1
    records = [record(100.0 + n, request_id=f"r{n}") for n in range(300)]
    riders = [store.rider(r) for r in records]
    await store._db.write(lambda conn: riders[0].write_all(conn, riders), ride=False)  # type: ignore[attr-defined]
    stored = {r.request_id: r.id for r in await store.list(AuditQuery(limit=1000))}
    assert {r.request_id: r.id for r in records} == {
        k: v for k, v in stored.items() if k != "before"
    }
    assert len(set(stored.values())) == 301


async def test_batches_of_every_size_know_their_ids(backing: Backing[AuditStore]) -> None:
    """Batches of 1 to 70 records (the statements they are split into differ with each
    size): every record learns its own row's id."""
    store = backing.store
    written = []
    for size in range(1, 71):
        records = [record(float(size), request_id=f"{size}-{n}") for n in range(size)]
        riders = [store.rider(r) for r in records]
        await store._db.write(lambda conn, rs=riders: rs[0].write_all(conn, rs), ride=False)  # type: ignore[attr-defined]
        written += records
    stored = {r.request_id: r.id for r in await store.list(AuditQuery(limit=5000))}
    assert len(stored) == sum(range(1, 71))
    assert {r.request_id: r.id for r in written} == stored


async def test_refusals_learn_the_id_of_their_minute_row(backing: Backing[AuditStore]) -> None:
    """The id `audit.recorded` carries for a refusal is its minute's row, new or added to."""
    store = backing.store
    refused = "auth.refused"
    first = record(600.0, "anonymous", refused, outcome=401)
    other = record(601.0, "payments", refused, outcome=403)
    await store.add_refusals([first, other], 10)
    again = record(630.0, "anonymous", refused, outcome=401, count=2)
    await store.add_refusals([again], 10)
    rows = {r.actor: r.id for r in await store.list(AuditQuery(action=refused))}
    assert (first.id, other.id, again.id) == (
        rows["anonymous"],
        rows["payments"],
        rows["anonymous"],
    )
    assert first.id is not None and first.id != other.id
