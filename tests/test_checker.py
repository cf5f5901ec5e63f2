"""The daemon probing real targets: registration to health, metrics, results, no restart."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config

from .conftest import AppClient, metric_families, until

FAST = {"interval": "100ms", "down_interval": "50ms", "timeout": "300ms"}


@pytest.fixture
async def monitored(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    return await start_daemon(
        make_config(
            defaults={
                "probe": {"type": "http", **FAST, "failure_threshold": 2, "success_threshold": 2}
            },
            services=[
                {
                    "name": "payments",
                    "slos": [{"name": "latency", "objective": 99, "latency_threshold": "300ms"}],
                }
            ],
        )
    )


async def register(
    client: AppClient, target: TestServer, instance: str = "p1", **probe: Any
) -> None:
    body = {"url": str(target.make_url("/")), "probe": {"path": "/switchable", **probe}}
    resp = await client.put(f"/v1/services/payments/instances/{instance}", json=body)
    assert resp.status in (200, 201), await resp.text()


async def health(client: AppClient, instance: str = "p1") -> dict[str, Any]:
    body = await (await client.get("/v1/health", params={"service": "payments"})).json()
    return next(i for i in body["instances"] if i["instance"] == instance)


async def state_is(client: AppClient, state: str, instance: str = "p1") -> None:
    async def reached() -> bool:
        return (await health(client, instance))["state"] == state

    await until(reached)


async def test_a_registered_instance_is_probed_without_restart(
    monitored: AppClient, target: TestServer
) -> None:
    await register(monitored, target)
    await state_is(monitored, "passing")
    status = await health(monitored)
    assert status["last_probe"]["status"] == 200
    assert status["failing"] == []
    listed = await (
        await monitored.get("/v1/services/payments", params={"health": "passing"})
    ).json()
    assert [i["id"] for i in listed["instances"]] == ["p1"]
    sd = await (await monitored.get("/v1/sd", params={"health": "passing"})).json()
    assert sd[0]["labels"]["__meta_hms_health"] == "passing"


async def test_a_new_instance_with_a_long_interval_is_probed_at_once(
    monitored: AppClient, target: TestServer
) -> None:
    # Its first probe comes out of the probe budget (a registration burst shares it): one
    # new instance finds it with room, so it leaves `unknown` now, not an hour from now.
    await register(monitored, target, interval="1h")
    await state_is(monitored, "passing")


async def test_failing_target_turns_critical_with_what_failed(
    monitored: AppClient, target: TestServer
) -> None:
    await register(monitored, target, conditions=["[STATUS] == 200", "[BODY].status == UP"])
    await state_is(monitored, "passing")
    async with aiohttp.ClientSession() as http:
        await http.post(target.make_url("/status/503"))
    await state_is(monitored, "critical")
    status = await health(monitored)
    assert {"condition": "[STATUS] == 200", "observed": "503"} in status["failing"]
    # Critical at the threshold (2); probes every 50 ms may add one before we look.
    failures, _, rest = status["reason"].partition(" ")
    assert rest == "consecutive failures" and int(failures) >= 2


async def test_down_instances_are_probed_at_down_interval(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    probe = {"type": "http", "interval": "1h", "down_interval": "50ms", "timeout": "300ms"}
    client = await start_daemon(make_config(defaults={"probe": probe}))
    body = {"url": str(target.make_url("/")), "probe": {"path": "/fail"}}
    await client.put("/v1/services/payments/instances/p1", json=body)

    async def probed_often() -> bool:
        samples = (await metric_families(client))["hms_probe"].samples
        failures = [s.value for s in samples if s.labels.get("result") == "failure"]
        # Probes every 50 ms may add more between two looks; at least five is the point.
        return len(failures) == 1 and failures[0] >= 5

    await until(probed_often)  # five probes within seconds although interval is 1h


async def test_deregistered_instances_are_no_longer_probed(
    monitored: AppClient, target: TestServer
) -> None:
    await register(monitored, target)
    await state_is(monitored, "passing")
    await monitored.delete("/v1/services/payments/instances/p1")
    body = await (await monitored.get("/v1/health")).json()
    assert body["instances"] == []


async def test_a_new_instance_starts_its_probe_counters_at_zero(
    monitored: AppClient, target: TestServer
) -> None:
    """Counters live in shared arrays, a slot per instance: one freed by a departed
    instance is handed on zeroed, so nothing it counted shows under the next one."""

    async def counters(instance: str) -> dict[str, float]:
        samples = (await metric_families(monitored))["hms_probe"].samples
        return {s.labels["result"]: s.value for s in samples if s.labels["instance"] == instance}

    await register(monitored, target, "old", path="/fail")
    await state_is(monitored, "critical", "old")
    assert (await counters("old"))["failure"] >= 2
    await monitored.delete("/v1/services/payments/instances/old")
    await register(monitored, target, "new", type="none")  # never probed
    assert await counters("new") == {"success": 0, "failure": 0}
    families = await metric_families(monitored)
    assert not [s for s in families["hms_probe_success"].samples if s.labels["instance"] == "new"]
    assert not [
        s
        for s in families["hms_probe_duration_seconds"].samples
        if s.labels["instance"] == "new" and s.value != 0
    ]


async def test_a_hung_target_does_not_hold_up_a_healthy_one(
    monitored: AppClient, target: TestServer
) -> None:
    await register(monitored, target, "hung", path="/hang")
    await register(monitored, target, "healthy")
    await state_is(monitored, "passing", "healthy")
    await state_is(monitored, "critical", "hung")
    hung = await health(monitored, "hung")
    assert hung["last_probe"]["error"] == "timeout after 0.3s"


async def test_a_bad_condition_is_refused_at_registration(monitored: AppClient) -> None:
    body = {"url": "http://127.0.0.1:9", "probe": {"conditions": ["[STATUS] === 200"]}}
    resp = await monitored.put("/v1/services/payments/instances/p1", json=body)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["details"][0]["field"] == "probe"
    assert "[STATUS] === 200" in error["details"][0]["message"]


async def test_probe_metrics_parse_and_include_the_slo_threshold_bucket(
    monitored: AppClient, target: TestServer
) -> None:
    await register(monitored, target)
    await state_is(monitored, "passing")
    families = await metric_families(monitored)
    for name in (
        "hms_probe",
        "hms_probe_duration_seconds",
        "hms_probe_success",
        "hms_instance_health",
        "hms_instance_suppressed",
        "hms_scheduler_lateness_seconds",
    ):
        assert name in families, name
    buckets = {
        s.labels["le"]
        for s in families["hms_probe_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert "0.3" in buckets and "+Inf" in buckets
    states = {
        s.labels["state"]: s.value
        for s in families["hms_instance_health"].samples
        if s.labels["instance"] == "p1"
    }
    assert states == {
        "passing": 1.0,
        "warning": 0.0,
        "critical": 0.0,
        "maintenance": 0.0,
        "unknown": 0.0,
    }


async def test_results_reach_sqlite_in_batches(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    config = make_config(defaults={"probe": {"type": "http", **FAST}})
    client = await start_daemon(config)
    await register(client, target)
    await state_is(client, "passing")

    def stored() -> tuple[int, int]:
        with sqlite3.connect(config.storage.path) as db:
            count, ok = db.execute("SELECT count(*), sum(ok) FROM probe_results").fetchone()
        return int(count), int(ok or 0)

    async def flushed() -> bool:  # the flush job runs every second
        return stored()[0] >= 2

    await until(flushed)
    raw = stored()
    assert raw[0] == raw[1]
    await client.close()  # the current minute is written at shutdown
    with sqlite3.connect(config.storage.path) as db:
        count, successes, buckets = db.execute(
            "SELECT sum(count), sum(successes), max(buckets) FROM probe_minutes"
        ).fetchone()
    assert count >= raw[0] and successes == count
    assert '"+Inf"' in buckets


async def test_old_raw_results_and_minutes_are_pruned(tmp_path: Any) -> None:
    from monitor.health import RAW_RETENTION, ProbeResults, SqliteResultStore
    from monitor.probing import ProbeResult
    from monitor.storage import Database

    database = Database(tmp_path / "r.db")
    await database.open()
    try:
        store = ProbeResults(SqliteResultStore(database))
        await store.create_tables(0.0)
        now = 1_800_000_000.0
        for age in (RAW_RETENTION + 60, 60.0):
            result = ProbeResult(at=now - age, response_time=0.01, connected=True, status=200)
            store.add("pay", "p1", result, ok=True)
        await store.flush(now, everything=True)
        await store.prune(now, retention=86400.0)
        raw = await store.raw("pay", "p1")
        minutes = await store.minutes("pay", now - 10 * 86400, now)
    finally:
        await database.close()
    assert [round(now - r["at"]) for r in raw] == [60]
    assert len(minutes) == 1  # the 2-day-old minute is past a 1-day retention


async def test_health_can_be_filtered_by_state(monitored: AppClient, target: TestServer) -> None:
    await register(monitored, target, "up")
    await register(monitored, target, "down", path="/fail")
    await state_is(monitored, "passing", "up")
    await state_is(monitored, "critical", "down")
    resp = await monitored.get("/v1/health", params={"state": "critical,warning"})
    assert [i["instance"] for i in (await resp.json())["instances"]] == ["down"]
    bad = await monitored.get("/v1/health", params={"state": "sleepy"})
    assert bad.status == 400
    assert "state must be one or more of" in (await bad.json())["error"]["message"]


async def test_probes_in_maintenance_stay_out_of_the_slo_counters(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
    clock: Any,
) -> None:
    # The fake wall clock reads 2027-01-15T08:00:00Z; the window covers it.
    window = {"services": ["payments"], "at": "2027-01-15T07:30:00Z", "duration": "1h"}
    client = await start_daemon(
        make_config(defaults={"probe": {"type": "http", **FAST}}, maintenance=[window])
    )
    await register(client, target)
    await state_is(client, "maintenance")

    async def samples() -> dict[tuple[str, str], float]:
        families = await metric_families(client)
        return {
            (s.name, s.labels.get("result", "")): s.value
            for name in ("hms_probe", "hms_probe_success", "hms_probe_duration_seconds")
            for s in families[name].samples
        }

    async def probed_inside() -> bool:
        return (await samples()).get(("hms_probe_success", "")) == 1.0

    await until(probed_inside)  # probes run, the last result is reported
    inside = await samples()
    assert inside[("hms_probe_total", "success")] == 0
    assert inside[("hms_probe_duration_seconds_count", "")] == 0

    clock.advance(3600)  # past the window: probes count again

    async def counted_after() -> bool:
        return (await samples())[("hms_probe_total", "success")] >= 1

    await until(counted_after)
