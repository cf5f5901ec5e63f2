"""The ScheduleStore contract, run against every implementation (workflows/abc.py): what
workflows/schedules.py relies on to know, after a restart, which tick was missed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry import StoreUnavailable
from workflows.abc import ScheduleMark, ScheduleStore
from workflows.stores.postgres_schedules import PgScheduleStore
from workflows.stores.sqlite_schedules import SqliteScheduleStore

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[ScheduleStore]] = {
    "sqlite": sqlite_factory(SqliteScheduleStore),
    "postgres": postgres_factory(PgScheduleStore),
}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[ScheduleStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


def mark(workflow: str = "Nightly", tick: float = 3600.0, cron: str = "0 * * * *") -> ScheduleMark:
    return ScheduleMark(workflow=workflow, cron=cron, timezone="Europe/Paris", tick=tick)


async def test_a_mark_replaces_the_last_one_of_its_workflow(
    backing: Backing[ScheduleStore],
) -> None:
    store = backing.store
    await store.create_tables()  # again: safe
    assert await store.marks() == []
    await store.mark(mark(tick=3600.0))
    await store.mark(mark("Weekly", tick=60.0))
    await store.mark(mark(tick=7200.0, cron="0 2 * * *"))
    assert sorted(await store.marks(), key=lambda m: m.workflow) == [
        mark(tick=7200.0, cron="0 2 * * *"),
        mark("Weekly", tick=60.0),
    ]


async def test_marks_outlive_the_store_that_wrote_them(
    backend: str, tmp_path: Path, backing: Backing[ScheduleStore]
) -> None:
    await backing.store.mark(mark(tick=7200.0))
    async with factory_for(FACTORIES, backend)(tmp_path) as reopened:  # a restart, or a replica
        await reopened.store.create_tables()
        assert await reopened.store.marks() == [mark(tick=7200.0)]


async def test_a_forgotten_mark_is_gone(backing: Backing[ScheduleStore]) -> None:
    store = backing.store
    await store.mark(mark())
    await store.forget("Nightly")
    await store.forget("Never")  # nothing to forget: no error
    assert await store.marks() == []


async def test_a_mark_that_cannot_be_written_raises_store_unavailable(
    backing: Backing[ScheduleStore],
) -> None:
    await backing.break_storage()
    with pytest.raises(StoreUnavailable):
        await backing.store.mark(mark())
