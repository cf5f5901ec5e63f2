"""The MemberStore contract (monitor/cluster/abc.py), run against every implementation:
what monitor/cluster/membership.py relies on to know the live members and the leader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from monitor.cluster.abc import MemberStore
from monitor.cluster.stores.postgres import PgMemberStore
from monitor.cluster.stores.sqlite import SqliteMemberStore

from .contracts import Backing, Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[MemberStore]] = {
    "sqlite": sqlite_factory(SqliteMemberStore),
    "postgres": postgres_factory(PgMemberStore),
}


@pytest.fixture
async def backing(backend: str, tmp_path: Path) -> AsyncIterator[Backing[MemberStore]]:
    async with factory_for(FACTORIES, backend)(tmp_path) as opened:
        await opened.store.create_tables()
        yield opened


async def test_a_member_that_joined_is_live_and_leads_alone(
    backing: Backing[MemberStore],
) -> None:
    store = backing.store
    await store.create_tables()  # again: safe
    await store.join("a/1", "a")
    view = await store.renew("a/1", 10.0)
    assert view is not None
    assert [(m.key, m.replica_id) for m in view.members] == [("a/1", "a")]
    assert view.leader == "a/1"
    again = await store.renew("a/1", 10.0)
    assert again is not None
    assert again.leader == "a/1" and again.epoch == view.epoch  # same holder, same epoch
    assert again.members[0].heartbeat_at >= view.members[0].heartbeat_at


async def test_a_key_never_joined_or_left_is_not_a_member(
    backing: Backing[MemberStore],
) -> None:
    store = backing.store
    assert await store.renew("ghost/1", 10.0) is None
    await store.join("a/1", "a")
    await store.leave("a/1")
    await store.leave("a/1")  # nothing left to leave: no error
    assert await store.renew("a/1", 10.0) is None
    await store.join("a/2", "a")  # the same replica, a new incarnation
    view = await store.renew("a/2", 10.0)
    assert view is not None
    assert [m.key for m in view.members] == ["a/2"]
    assert view.leader == "a/2"
