"""Three daemon processes on one PostgreSQL (DESIGN §8), killed, paused and cut off from the
database for real. Outcomes only, with generous bounds: the timings are bench/cluster.py's."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .pg import PostgresCluster
from .processes import DaemonProcess, free_port, write_config
from .services import Recorder

LEASE = 2.0


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


def eventually(check: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    """`check()`'s first truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            value = check()
            if value:
                return value
        assert time.monotonic() < deadline, f"not reached in {timeout}s"
        time.sleep(every)


class Replicas:
    """N daemons sharing one database, named r1..rN."""

    def __init__(self, directory: Path, url: str, count: int, **sections: Any) -> None:
        self.database = url
        self.daemons: dict[str, DaemonProcess] = {}
        for n in range(1, count + 1):
            name = f"r{n}"
            home = directory / name
            home.mkdir()
            port = free_port()
            config = write_config(
                home,
                port,
                storage={"url": url},
                cluster={"replica_id": name, "lease": f"{LEASE}s"},
                **sections,
            )
            self.daemons[name] = DaemonProcess(config, port, home / "daemon.log")

    def start(self) -> None:
        for daemon in self.daemons.values():
            daemon.start(timeout=30)

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()

    def url(self, name: str) -> str:
        return self.daemons[name].url

    def sessions(self) -> set[str]:
        """The daemons' session tags among the database's sessions (one per process)."""
        with psycopg.connect(self.database, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT DISTINCT split_part(application_name, ' ', 1) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'hms-mgmt/%'"
            ).fetchall()
        return {row[0] for row in rows}

    def cluster(self, name: str) -> dict[str, Any]:
        status, body = call(self.url(name) + "/v1/cluster", timeout=5)
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    def leader(self, among: list[str] | None = None, other_than: str | None = None) -> str:
        """The leader every replica of `among` agrees on (one that is not `other_than`)."""
        names = among or list(self.daemons)

        def agreed() -> str | None:
            seen = {self.cluster(name)["leader"] for name in names}
            if len(seen) != 1 or None in seen or other_than in seen:
                return None
            return seen.pop()

        leader: str = eventually(agreed)
        return leader


@pytest.fixture
def replicas(postgres: PostgresCluster, tmp_path: Path) -> Iterator[Replicas]:
    always = [{"services": ["upkeep"], "start": "00:00", "duration": "24h"}]
    group = Replicas(tmp_path, postgres.database(), 3, maintenance=always)
    group.start()
    yield group
    group.stop()


def register(url: str, service: str, instance: str, target: str = "http://127.0.0.1:9") -> int:
    status, _ = call(f"{url}/v1/services/{service}/instances/{instance}", "PUT", {"url": target})
    return status


def test_one_leader_and_every_member_listed(replicas: Replicas) -> None:
    leader = replicas.leader()

    def views() -> list[dict[str, Any]] | None:
        seen = [replicas.cluster(name) for name in replicas.daemons]
        return seen if all(len(view["members"]) == 3 for view in seen) else None

    views = eventually(views)  # each learns of the others at its next renewal
    assert {view["self"] for view in views} == {"r1", "r2", "r3"}
    for view in views:
        members = {m["replica_id"]: m for m in view["members"]}
        assert set(members) == {"r1", "r2", "r3"}
        assert sum(len(m["shards"]) for m in members.values()) == 256
    assert len({view["epoch"] for view in views}) == 1
    assert leader in {"r1", "r2", "r3"}


def test_a_killed_leader_is_replaced_with_a_higher_epoch(replicas: Replicas) -> None:
    leader = replicas.leader()
    epoch = replicas.cluster(leader)["epoch"]
    replicas.daemons[leader].kill()
    survivors = [name for name in replicas.daemons if name != leader]
    new_leader = replicas.leader(survivors, other_than=leader)
    view = replicas.cluster(new_leader)
    assert view["epoch"] > epoch
    assert eventually(
        lambda: leader not in {m["replica_id"] for m in replicas.cluster(new_leader)["members"]}
    )


def test_a_paused_leader_fences_itself_and_rejoins_as_a_follower(replicas: Replicas) -> None:
    leader = replicas.leader()
    epoch = replicas.cluster(leader)["epoch"]
    process = replicas.daemons[leader].process
    assert process is not None
    eventually(lambda: len(replicas.sessions()) == 3)
    process.send_signal(signal.SIGSTOP)
    try:
        survivors = [name for name in replicas.daemons if name != leader]
        new_leader = replicas.leader(survivors, other_than=leader)
        # Its database sessions are ended by the new leader, not left for TCP to give up on
        # (a paused LISTEN connection pins PostgreSQL's NOTIFY queue; slots stay taken).
        eventually(lambda: len(replicas.sessions()) == 2)
    finally:
        process.send_signal(signal.SIGCONT)
    # Back from the pause it answers with the new leader and epoch, never as leader itself.
    view = eventually(lambda: (v := replicas.cluster(leader))["leader"] == new_leader and v)
    assert view["epoch"] > epoch
    assert eventually(lambda: b"hms_cluster_leader" in metrics(replicas.url(leader)))
    assert f'hms_cluster_leader{{replica="{leader}"}} 0.0'.encode() in metrics(replicas.url(leader))
    # It reconnected: its writes are taken again, and nobody ends its new sessions.
    assert eventually(lambda: register(replicas.url(leader), "pay", "after") == 201)
    time.sleep(2 * LEASE)
    assert len(replicas.sessions()) == 3
    assert register(replicas.url(leader), "pay", "later") == 201


def metrics(url: str) -> bytes:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body


def test_a_registration_on_one_replica_is_seen_and_wakes_the_others(replicas: Replicas) -> None:
    assert register(replicas.url("r1"), "pay", "p0") == 201
    eventually(lambda: call(replicas.url("r2") + "/v1/services/pay")[0] == 200)
    # The poll behind NOTIFY re-reads a change once more within a second or two (one more
    # wake, harmless to a client comparing indexes): the index settles, then block on it.
    time.sleep(2.5)
    with urllib.request.urlopen(replicas.url("r2") + "/v1/services/pay", timeout=5) as first:
        index = int(first.headers["X-Registry-Index"])
    woken: list[tuple[int, Any]] = []
    blocking = f"{replicas.url('r2')}/v1/services/pay?index={index}&wait=20s"
    waiter = threading.Thread(target=lambda: woken.append(call(blocking, timeout=30)))
    waiter.start()
    time.sleep(0.3)
    assert not woken
    assert register(replicas.url("r1"), "pay", "p1") == 201
    waiter.join(25)
    assert woken and woken[0][0] == 200
    assert sorted(i["id"] for i in woken[0][1]["instances"]) == ["p0", "p1"]
    for name in ("r2", "r3"):
        _, seen = call(replicas.url(name) + "/v1/services/pay")
        assert sorted(i["id"] for i in seen["instances"]) == ["p0", "p1"]

    assert call(replicas.url("r3") + "/v1/services/pay/instances/p1", "DELETE")[0] in (200, 204)
    assert eventually(
        lambda: all(
            [i["id"] for i in call(replicas.url(name) + "/v1/services/pay")[1]["instances"]]
            == ["p0"]
            for name in ("r1", "r2")
        )
    )


def test_a_database_restart_answers_503_meanwhile_and_loses_nothing_acknowledged(
    replicas: Replicas, postgres: PostgresCluster
) -> None:
    acknowledged: list[str] = []
    refused = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal refused
        n = 0
        while not stop.is_set():
            n += 1
            name = f"i{n}"
            status = register(replicas.url(f"r{n % 3 + 1}"), "pay", name)
            if status in (200, 201):
                acknowledged.append(name)
            elif status == 503:
                refused += 1
            else:
                raise AssertionError(f"{status} for {name}")
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    with contextlib.ExitStack() as stack:
        stack.callback(thread.join, 30)
        stack.callback(stop.set)
        thread.start()
        time.sleep(0.5)
        postgres.stop("immediate")
        time.sleep(1.0)
        postgres.start()
        # Every replica takes writes again.
        for name in replicas.daemons:
            eventually(lambda name=name: register(replicas.url(name), "after", name) in (200, 201))
        time.sleep(0.5)
    assert refused > 0  # the outage was seen as 503s, not hangs or 500s

    def listed(name: str) -> set[str]:
        return {i["id"] for i in call(replicas.url(name) + "/v1/services/pay")[1]["instances"]}

    for name in replicas.daemons:
        eventually(lambda name=name: set(acknowledged) <= listed(name))


def test_a_killed_replicas_probes_are_taken_over_each_instance_probed_once_per_slot(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    target = Recorder()
    group = Replicas(
        tmp_path, postgres.database(), 3, defaults={"probe": {"type": "http", "interval": "1s"}}
    )
    try:
        group.start()
        group.leader()
        for n in range(30):
            assert register(group.url("r1"), "pay", f"p{n}", f"{target.url}/p{n}") in (200, 201)
        eventually(lambda: len(target.paths()) == 30)
        time.sleep(2)
        before = {n: target.count(f"/p{n}") for n in range(30)}
        time.sleep(5)
        # Steady state: one replica per instance, one probe a second (never 3 a second).
        for n in range(30):
            assert target.count(f"/p{n}") - before[n] <= 7, n
        group.daemons["r2"].kill()
        time.sleep(LEASE + 2)
        after_kill = {n: target.count(f"/p{n}") for n in range(30)}
        time.sleep(5)
        for n in range(30):  # every instance, r2's share too, is probed again
            assert 3 <= target.count(f"/p{n}") - after_kill[n] <= 8, n
    finally:
        group.stop()
        target.close()


def test_fifty_running_workflows_all_finish_across_a_kill_of_the_leader(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    service = Recorder()
    steps = [
        {"name": "validate", "call": {"service": "svc", "path": "/validate"}},
        {"name": "pay", "delay": "2s", "call": {"service": "svc", "path": "/pay"}},
        {"name": "notify", "call": {"service": "svc", "path": "/notify"}},
    ]
    group = Replicas(
        tmp_path,
        postgres.database(),
        3,
        services=[{"name": "svc", "instances": [{"id": "s1", "url": service.url}]}],
        workflows=[{"name": "Grant", "steps": steps}],
    )
    try:
        group.start()
        leader = group.leader()
        names = list(group.daemons)
        ids = []
        for n in range(50):  # through every replica: the followers forward to the leader
            status, body = call(f"{group.url(names[n % 3])}/v1/workflows/Grant", "POST", {})
            assert status == 202, body
            ids.append(body["id"])
        eventually(lambda: len(set(service.keys("/validate"))) == 50)
        group.daemons[leader].kill()  # every process is waiting out its delay before `pay`
        survivor = next(name for name in names if name != leader)

        def finished() -> bool:  # (503 while no leader is known: the new one is taking over)
            answers = [call(f"{group.url(survivor)}/v1/processes/{i}") for i in ids]
            return all(status == 200 and body["status"] == "completed" for status, body in answers)

        eventually(finished, timeout=60, every=0.5)
    finally:
        group.stop()
        service.close()
    for path in ("/validate", "/pay", "/notify"):
        keys = service.keys(path)
        assert sorted(set(keys)) == sorted(f"{i}/{path[1:]}" for i in ids)  # each process's
        # A step runs twice only when the leader died while it was under way, with its key.
        assert len(keys) - len(set(keys)) <= 3, path


def test_only_the_leader_exports_the_cluster_wide_gauges(replicas: Replicas) -> None:
    leader = replicas.leader()
    assert register(replicas.url("r1"), "pay", "p1") == 201
    sample = b'hms_registry_instances{health="unknown",service="pay"} 1'
    eventually(lambda: sample in metrics(replicas.url(leader)))
    assert b'hms_maintenance{service="upkeep"} 1' in metrics(replicas.url(leader))
    for name in replicas.daemons:
        if name != leader:  # they list the instance, but a sum over replicas counts it once
            assert call(replicas.url(name) + "/v1/services/pay")[0] == 200
            assert b"hms_registry_instances{" not in metrics(replicas.url(name))
            assert b"hms_maintenance{" not in metrics(replicas.url(name))


class Stream:
    """`GET /v1/events` read in a thread: the events (parsed `data:` lines) as they come."""

    def __init__(self, url: str, topics: str, last_event_id: int | None = None) -> None:
        request = urllib.request.Request(f"{url}/v1/events?topics={topics}")
        if last_event_id is not None:
            request.add_header("Last-Event-ID", str(last_event_id))
        self.events: list[dict[str, Any]] = []
        self._answer = urllib.request.urlopen(request, timeout=30)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed meanwhile
            for line in self._answer:
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[6:]))

    def topics(self) -> list[str]:
        return [event["topic"] for event in self.events]

    def close(self) -> None:
        self._answer.close()


def test_every_replicas_event_stream_sees_what_any_replica_published(
    replicas: Replicas,
) -> None:
    target = Recorder()
    leader = replicas.leader()
    names = list(replicas.daemons)
    streams = {name: Stream(replicas.url(name), "news.*,health.changed") for name in names}
    try:
        time.sleep(1)  # each stream subscribed
        follower = next(name for name in names if name != leader)
        # A stored event, published through a follower (the leader stores it): every
        # replica's stream has it, with one id.
        status, body = call(f"{replicas.url(follower)}/v1/events/news.posted", "POST", {"n": 1})
        assert status == 202, body
        first = body["id"]
        eventually(lambda: all("news.posted" in s.topics() for s in streams.values()))
        for stream in streams.values():
            [event] = [e for e in stream.events if e["topic"] == "news.posted"]
            assert (event["id"], event["data"]) == (first, {"n": 1})
        # The daemon's own news: one replica probes the instance and announces its health;
        # the streams of the others show it too, once.
        probe = {"type": "http", "interval": "1s"}
        put = {"url": f"{target.url}/ok", "probe": probe}
        status, _ = call(f"{replicas.url(leader)}/v1/services/pay/instances/p1", "PUT", put)
        assert status == 201
        eventually(lambda: all("health.changed" in s.topics() for s in streams.values()))
        time.sleep(1)
        for stream in streams.values():
            changes = [e["data"] for e in stream.events if e["topic"] == "health.changed"]
            assert [(c["instance"], c["to"]) for c in changes] == [("p1", "passing")]
        # A follower's stream resumes after an id as the leader's does.
        status, body = call(f"{replicas.url(leader)}/v1/events/news.posted", "POST", {"n": 2})
        assert status == 202, body
        resumed = Stream(replicas.url(follower), "news.*", last_event_id=first)
        try:
            eventually(lambda: [e["data"] for e in resumed.events] == [{"n": 2}])
        finally:
            resumed.close()
    finally:
        for stream in streams.values():
            stream.close()
        target.close()


def test_every_stream_has_each_stored_event_once_in_order_across_a_paused_leader(
    replicas: Replicas,
) -> None:
    """Leadership moves away from a paused leader and it comes back as a follower: the
    streams of all three replicas, the paused one's too, get every stored event once, in
    id order, whichever replica runs the engine when it is published."""
    names = list(replicas.daemons)
    leader = replicas.leader()
    others = [name for name in names if name != leader]
    streams = {name: Stream(replicas.url(name), "news.*") for name in names}
    published: list[int] = []

    def publish(through: str, n: int) -> None:
        def accepted() -> bool:
            status, body = call(f"{replicas.url(through)}/v1/events/news.posted", "POST", {"n": n})
            if status == 202:
                published.append(body["id"])
            return status == 202

        eventually(accepted)  # 503 while the engine moves: the client tries again

    try:
        time.sleep(1)  # each stream subscribed
        publish(others[0], 1)
        process = replicas.daemons[leader].process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        try:
            new_leader = replicas.leader(others, other_than=leader)
            publish(next(name for name in others if name != new_leader), 2)
            publish(new_leader, 3)
        finally:
            process.send_signal(signal.SIGCONT)
        eventually(lambda: replicas.cluster(leader)["leader"] == new_leader)
        publish(leader, 4)
        publish(others[1], 5)

        def everywhere() -> bool:
            return all(len(s.events) >= len(published) for s in streams.values())

        eventually(everywhere)
        time.sleep(1)  # anything more (a duplicate) would have come by now
        for name, stream in streams.items():
            got = [(e["id"], e["data"]["n"]) for e in stream.events]
            assert got == [(i, n) for n, i in enumerate(published, 1)], name
    finally:
        for stream in streams.values():
            stream.close()
