"""Membership of replicas over one PostgreSQL (monitor/cluster/membership.py): one leader at
a time, fenced by a growing epoch; a member whose database session dies is replaced at once,
one that stops renewing stops leading on its own clock before another may take over, and
comes back as a new member. Each Membership here has its own PgDatabase, as each replica
has. Then one daemon on SQLite, through its API, status command and page: itself alone,
leading, all shards; and the SLO burn events only the leader announces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import psycopg
import pytest
import yaml

from monitor import parse_config
from monitor.cluster.membership import Membership
from monitor.cluster.shards import SHARDS
from monitor.cluster.stores.postgres import MIGRATIONS, PgMemberStore
from monitor.commands.status import status_report
from monitor.keys import DATABASE
from monitor.slo import SloBook
from monitor.storage.database import DatabaseError
from monitor.storage.postgres import PgDatabase
from registry import StoreUnavailable
from scheduler import EventBus

from .conftest import AppClient, metric_families, until
from .pg import PostgresCluster

Join = Callable[..., Awaitable[Membership]]


@pytest.fixture
def url(postgres: PostgresCluster) -> str:
    return postgres.database()


@pytest.fixture
async def join(url: str) -> AsyncIterator[Join]:
    """Makes members of one new database; `start=False` joins without the renewal loop."""
    async with AsyncExitStack() as stack:

        async def make(name: str, *, lease: float, start: bool = True) -> Membership:
            database = PgDatabase(url, application_name=f"member-{name}")
            await database.open()
            stack.push_async_callback(database.close)
            store = PgMemberStore(database)
            await store.create_tables()
            membership = Membership(store, replica_id=name, lease=lease)
            if start:
                await membership.start()
                stack.push_async_callback(membership.stop)
            else:
                await membership.join()
                await membership.renew()
            return membership

        yield make


def leaders(members: list[Membership]) -> list[str]:
    return [m.replica_id for m in members if m.is_leader]


def terminate_sessions(url: str, application_name: str) -> None:
    """What kill -9 of a replica does to its database sessions."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )


async def test_members_agree_on_one_leader_and_on_the_shard_owners(join: Join) -> None:
    a = await join("a", lease=2.0)
    b = await join("b", lease=2.0)
    c = await join("c", lease=2.0)
    members = [a, b, c]
    heard: list[tuple[str, ...]] = []
    a.on_change(heard.append)

    async def settled() -> bool:
        return all(len(m.members) == 3 for m in members) and len(leaders(members)) == 1

    await until(settled)
    assert leaders(members) == ["a"]  # the first to join
    assert {m.leader for m in members} == {a.key}
    assert a.owners() == b.owners() == c.owners()
    assert {owner for owner in a.owners()} == {a.key, b.key, c.key}
    assert len(a.owners()) == SHARDS

    await b.stop()  # leaves at once: no lease to wait out
    await until(lambda: _true(a.keys == tuple(sorted((a.key, c.key)))))
    assert heard[-1] == tuple(sorted((a.key, c.key)))


async def _true(value: bool) -> bool:
    return value


async def test_a_leader_whose_session_dies_is_replaced_long_before_its_lease_ends(
    join: Join, url: str
) -> None:
    a = await join("a", lease=10.0)
    b = await join("b", lease=10.0)
    c = await join("c", lease=10.0)
    members = [a, b, c]
    await until(lambda: _true(all(len(m.members) == 3 for m in members)))
    first_epoch, dead_key = a.epoch, a.key
    assert leaders(members) == ["a"]

    terminate_sessions(url, "member-a")

    # Well within the 10 s lease: the dead session is what the others saw.
    await until(lambda: _true(leaders(members) in (["b"], ["c"])), timeout=5.0)
    new_leader = next(m for m in members if m.is_leader)
    assert new_leader.epoch > first_epoch
    assert dead_key not in new_leader.keys
    # The replica itself lives on: it rejoins as a new member, a follower.
    await until(lambda: _true(a.key != dead_key and a.key in new_leader.keys), timeout=5.0)
    assert not a.is_leader
    assert a.leader == new_leader.key


async def test_a_paused_leader_stops_leading_before_another_takes_over_then_rejoins(
    join: Join,
) -> None:
    paused = await join("p", lease=3.0, start=False)  # renews only when told: a SIGSTOP
    b = await join("b", lease=3.0)
    c = await join("c", lease=3.0)
    assert paused.is_leader
    first_epoch, old_key = paused.epoch, paused.key
    await until(lambda: _true(b.leader == old_key and c.leader == old_key))

    await until(lambda: _true(not paused.is_leader), timeout=5.0)
    # On its own clock it stopped while the database still grants it the lease.
    assert b.leader == old_key and c.leader == old_key
    assert not b.is_leader and not c.is_leader

    await until(lambda: _true(len(leaders([b, c])) == 1), timeout=10.0)
    assert max(b.epoch, c.epoch) > first_epoch
    await until(lambda: _true(old_key not in b.keys))

    await paused.renew()  # SIGCONT: seen dead, so a new member and a follower
    assert paused.key != old_key
    assert not paused.is_leader
    assert paused.leader in (b.key, c.key)
    assert paused.key in paused.keys and len(paused.keys) == 3


async def test_a_sqlite_daemon_is_its_own_cluster_alone_and_leads_it(daemon: AppClient) -> None:
    response = await daemon.get("/v1/cluster")
    assert response.status == 200
    body = await response.json()
    assert body["self"] == body["leader"]
    assert body["epoch"] == 0
    [member] = body["members"]
    assert member["replica_id"] == body["self"]
    assert member["shards"] == list(range(SHARDS))
    assert member["heartbeat_at"] > 0

    families = await metric_families(daemon)
    assert families["hms_cluster_members"].samples[0].value == 1
    [leader] = families["hms_cluster_leader"].samples
    assert leader.labels == {"replica": body["self"]} and leader.value == 1

    document = await (await daemon.get("/openapi.json")).json()
    assert document["paths"]["/v1/cluster"]["get"]["operationId"] == "cluster"


async def test_status_lists_the_replicas_with_the_leader(daemon: AppClient) -> None:
    body = await (await daemon.get("/v1/cluster")).json()
    report = await asyncio.to_thread(status_report, str(daemon.make_url("")).rstrip("/"), None)
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("REPLICA"))
    assert lines[header + 1].split() == [
        body["self"],
        "(answered)",
        "leader",
        str(SHARDS),
    ]


async def test_the_status_page_lists_the_replicas(daemon: AppClient) -> None:
    body = await (await daemon.get("/v1/cluster")).json()
    page = await (await daemon.get("/")).text()
    row = page[page.index(f'<tr data-replica="{body["self"]}">') :]
    row = row[: row.index("</tr>")]
    assert "<td>leader</td>" in row and f"<td>{SHARDS}</td>" in row


async def test_through_a_database_outage_members_lead_nothing_then_rejoin(
    join: Join, url: str, postgres: PostgresCluster
) -> None:
    a = await join("a", lease=2.0)
    b = await join("b", lease=2.0)
    await until(lambda: _true(len(a.members) == len(b.members) == 2))
    old_keys, old_epoch = {a.key, b.key}, a.epoch

    postgres.refuse_connections(url)
    await until(lambda: _true(a.keys == (a.key,) and b.keys == (b.key,)))
    assert leaders([a, b]) == []  # each alone, fenced: no singleton job anywhere

    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} ALLOW_CONNECTIONS true")
    await until(lambda: _true(len(a.members) == len(b.members) == 2 and len(leaders([a, b])) == 1))
    assert not {a.key, b.key} & old_keys  # seen dead meanwhile: new members
    assert max(a.epoch, b.epoch) > old_epoch


def test_only_the_leader_announces_an_slo_burning_and_a_new_leader_does_not_repeat_it(
    tmp_path: Path,
) -> None:
    service = {"name": "ach", "slos": [{"name": "calls", "objective": 99.5, "source": "calls"}]}
    config = parse_config(yaml.safe_dump({"services": [service]}), base_dir=tmp_path)
    leads = {"leader": True, "follower": False}
    buses = {name: EventBus() for name in leads}
    books = {
        name: SloBook(config.services, bus=buses[name], publishes=lambda name=name: leads[name])
        for name in leads
    }
    for book in books.values():
        for second in range(10):
            book.record_call("ach", 60_000.0 + second, served=False, seconds=0.1)
        book.evaluate(60_000.0 + 120)
    assert sum(buses["leader"].published.values()) >= 2  # burn and budget exhausted
    assert sum(buses["follower"].published.values()) == 0
    [follower_status] = books["follower"].statuses("ach", 60_000.0 + 120) or []
    assert follower_status["error_budget_remaining"] < 0  # its ledger follows all the same

    leads.update(leader=False, follower=True)  # the follower takes over
    books["follower"].evaluate(60_000.0 + 180)
    assert sum(buses["follower"].published.values()) == 0  # announced once, by the old leader


async def test_a_long_write_does_not_cost_the_leader_its_lease(
    postgres: PostgresCluster,
    make_config: Callable[..., object],
    start_daemon: Callable[..., Awaitable[AppClient]],
) -> None:
    """Renewals have a connection of their own: a write that takes longer than the lease
    on the stores' connection (a take-over of many processes, a prune) leaves the leader
    leading."""
    config = make_config(storage={"url": postgres.database()}, cluster={"lease": "1s"})
    client = await start_daemon(config)
    before = await (await client.get("/v1/cluster")).json()
    assert before["leader"] == before["self"]
    database = client.app[DATABASE]
    write = asyncio.create_task(database.write(lambda conn: conn.execute("SELECT pg_sleep(2)")))
    leading = []
    while not write.done():
        families = await metric_families(client)
        leading.append(families["hms_cluster_leader"].samples[0].value)
        await asyncio.sleep(0.1)
    await write
    assert leading and set(leading) == {1.0}  # never in doubt while the write took 2 leases


async def test_a_replica_back_from_an_outage_longer_than_the_lease_keeps_its_new_sessions(
    url: str,
) -> None:
    """A database restart (or a cut-off) longer than the lease: the members' rows are stale
    and their locks gone with their sessions. A replica that has reconnected but not yet
    rejoined is healthy: the leader reaping its old row must not end its new sessions (its
    old ones are gone already), or its writes fail with 503 once more."""
    async with AsyncExitStack() as stack:

        async def replica(tag: str, key: str) -> PgMemberStore:
            members_db = PgDatabase(url, application_name=f"{tag} cluster")
            await members_db.open()
            stack.push_async_callback(members_db.close)
            members = PgMemberStore(members_db, session=tag)
            await members.create_tables()
            await members.join(key, key)
            return members

        a = await replica("hms-mgmt/aaaaaaaaaaaa", "a1")
        b = await replica("hms-mgmt/bbbbbbbbbbbb", "b1")
        view = await a.renew("a1", 2.0)
        assert view is not None and view.leader == "a1"

        # The outage ends b's sessions, fails its renewal, and outlasts the lease.
        terminate_sessions(url, "hms-mgmt/bbbbbbbbbbbb cluster")
        with pytest.raises(StoreUnavailable):
            await b.renew("b1", 2.0)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "UPDATE cluster_members SET heartbeat_at = heartbeat_at - 60 WHERE key = %s", ["b1"]
            )
        # b is back: its main database reconnected; its next renewal is not yet due.
        b_main = PgDatabase(url, application_name="hms-mgmt/bbbbbbbbbbbb")
        await b_main.open()
        stack.push_async_callback(b_main.close)
        view = await a.renew("a1", 2.0)  # the leader, first back, reaps b1
        assert view is not None and [m.key for m in view.members] == ["a1"]

        assert await b_main.write(lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)
        assert await b.renew("b1", 2.0) is None  # reaped: b joins again as a new member


async def test_cluster_tables_from_before_the_session_column_upgrade_and_refuse_older_code(
    url: str,
) -> None:
    """A database whose cluster tables are at version 3 (no session column) takes the new
    column with its members in place; then a daemon from before it is refused."""
    before = MIGRATIONS[:3]
    old = PgDatabase(url, application_name="old")
    await old.open()
    try:
        await old.migrate("cluster", before)
        await old.write(
            lambda conn: conn.execute(
                "INSERT INTO cluster_members (key, replica_id, joined_at, heartbeat_at) "
                "VALUES ('old1', 'old', 0, 0)"
            )
        )
    finally:
        await old.close()
    new = PgDatabase(url, application_name="hms-mgmt/cccccccccccc cluster")
    await new.open()
    try:
        members = PgMemberStore(new, session="hms-mgmt/cccccccccccc")
        await members.create_tables()
        await members.join("new1", "new")
        view = await members.renew("new1", 2.0)
        # The old member, stale and without a session tag, is reaped and nothing is ended.
        assert view is not None and [m.key for m in view.members] == ["new1"]
        with pytest.raises(DatabaseError, match="at version 4, newer than this hms-mgmt's 3"):
            await new.migrate("cluster", before)
    finally:
        await new.close()


async def test_a_leader_that_may_not_end_a_stale_members_sessions_still_renews(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas under different roles: the leader may not end another role's sessions. It
    says so, and its renewal (its lease, the reaping) still commits."""
    name = url.rsplit("/", 1)[1]
    setup = PgDatabase(url)
    await setup.open()
    try:
        await PgMemberStore(setup).create_tables()
    finally:
        await setup.close()
    with psycopg.connect(url, autocommit=True) as conn:
        for role in ("a", "b"):
            conn.execute(f"CREATE ROLE {name}_{role} LOGIN")
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {name}_{role}")
            conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}_{role}")
            conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name}_{role}")
    async with AsyncExitStack() as stack:

        async def replica(role: str) -> PgMemberStore:
            tag = f"hms-mgmt/{role * 12}"
            role_url = url.replace("postgres@", f"{name}_{role}@", 1)
            members_db = PgDatabase(role_url, application_name=f"{tag} cluster")
            await members_db.open()
            stack.push_async_callback(members_db.close)
            members = PgMemberStore(members_db, session=tag)
            await members.join(f"{role}1", role)
            return members

        a = await replica("a")
        await replica("b")
        view = await a.renew("a1", 2.0)
        assert view is not None and view.leader == "a1"
        with psycopg.connect(url, autocommit=True) as conn:  # b is paused
            conn.execute("UPDATE cluster_members SET heartbeat_at = 0 WHERE key = 'b1'")

        view = await a.renew("a1", 2.0)
        assert view is not None and view.leader == "a1"
        assert [m.key for m in view.members] == ["a1"]
        assert "cannot end the sessions of a stale member" in caplog.text
        view = await a.renew("a1", 2.0)
        assert view is not None and view.leader == "a1"
