"""Register, update, heartbeat, lapse, removal, deregistration: real HTTP, real SQLite."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from monitor.config import Config

from .conftest import BOTH_STORES, AppClient, FakeClock, metric_families

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

PAYMENTS_1 = "/v1/services/payments/instances/payments-1"
STATIC_PAYMENTS = [
    {"name": "payments", "instances": [{"id": "static-1", "url": "http://127.0.0.1:9"}]}
]


async def register(client: AppClient, path: str = PAYMENTS_1, **body: Any) -> Any:
    body.setdefault("url", "http://127.0.0.1:8001")
    resp = await client.put(path, json=body)
    return resp.status, await resp.json()


async def instance(client: AppClient, service: str, instance_id: str) -> dict[str, Any] | None:
    resp = await client.get(f"/v1/services/{service}")
    body = await resp.json()
    return next((i for i in body["instances"] if i["id"] == instance_id), None)


async def listed_instance(
    client: AppClient, service: str = "payments", instance_id: str = "payments-1"
) -> dict[str, Any]:
    """The instance as GET /v1/services/{service} lists it; it must be there."""
    found = await instance(client, service, instance_id)
    assert found is not None, f"{service}/{instance_id} is not listed"
    return found


async def test_register_creates_then_updates_idempotently(daemon: AppClient) -> None:
    status, created = await register(daemon, tags=["tier1"], meta={"zone": "a"})
    assert status == 201
    assert created["url"] == "http://127.0.0.1:8001"
    assert created["tags"] == ["tier1"]
    assert created["meta"] == {"zone": "a"}
    assert created["health"] == "unknown"

    status, same = await register(daemon, tags=["tier1"], meta={"zone": "a"})
    assert status == 200
    assert same["registered_at"] == created["registered_at"]

    status, moved = await register(daemon, url="http://127.0.0.1:8002")
    assert status == 200
    assert moved["url"] == "http://127.0.0.1:8002"
    listed = await listed_instance(daemon)
    assert listed["url"] == "http://127.0.0.1:8002"


async def test_register_without_ttl_has_no_lease(daemon: AppClient, clock: FakeClock) -> None:
    await register(daemon)
    clock.advance(86_400 * 30)
    listed = await listed_instance(daemon)
    assert listed["lease"] is None
    assert listed["health"] == "unknown"


async def test_default_ttl_comes_from_config(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(defaults={"lease": {"ttl": "45s"}}))
    _, body = await register(client, ttl="default")
    assert body["ttl"] == "45s"


async def test_lease_lapses_to_critical_at_exactly_ttl(daemon: AppClient, clock: FakeClock) -> None:
    await register(daemon, ttl="30s")
    clock.advance(29.999)
    before = await listed_instance(daemon)
    assert before["health"] == "unknown"

    clock.advance(0.001)
    after = await listed_instance(daemon)
    assert after["health"] == "critical"
    assert after["lease"]["lapsed"] is True


async def test_heartbeat_renews_the_lease(daemon: AppClient, clock: FakeClock) -> None:
    await register(daemon, ttl="30s")
    for _ in range(5):
        clock.advance(20)
        resp = await daemon.post(PAYMENTS_1 + "/heartbeat")
        assert resp.status == 200
    clock.advance(29)
    listed = await listed_instance(daemon)
    assert listed["health"] == "unknown"
    assert listed["lease"]["expires_in"] == 1.0


async def test_heartbeat_brings_a_lapsed_instance_back(daemon: AppClient, clock: FakeClock) -> None:
    await register(daemon, ttl="10s")
    clock.advance(15)
    resp = await daemon.post(PAYMENTS_1 + "/heartbeat")
    assert resp.status == 200
    body = await resp.json()
    assert body["lease"]["lapsed"] is False
    assert body["health"] == "unknown"


async def test_lapsed_instance_is_removed_deregister_after_later(
    daemon: AppClient, clock: FakeClock
) -> None:
    await register(daemon, ttl="10s", deregister_after="1m")
    clock.advance(10 + 59)
    assert await instance(daemon, "payments", "payments-1") is not None

    clock.advance(1)
    assert await instance(daemon, "payments", "payments-1") is None
    resp = await daemon.post(PAYMENTS_1 + "/heartbeat")
    assert resp.status == 404


async def test_expirations_are_counted_in_metrics(daemon: AppClient, clock: FakeClock) -> None:
    await register(daemon, ttl="10s")
    await daemon.post(PAYMENTS_1 + "/heartbeat")
    clock.advance(10)
    families = await metric_families(daemon)
    assert families["hms_registry_expirations"].samples[0].value == 1
    assert families["hms_registry_heartbeats"].samples[0].value == 1
    critical = [
        s.value
        for s in families["hms_registry_instances"].samples
        if s.labels["health"] == "critical"
    ]
    assert critical == [1]


async def test_heartbeat_for_unknown_instance_is_404(daemon: AppClient) -> None:
    resp = await daemon.post(PAYMENTS_1 + "/heartbeat")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_deregister_removes_the_instance(daemon: AppClient) -> None:
    await register(daemon)
    resp = await daemon.delete(PAYMENTS_1)
    assert resp.status == 204
    assert await instance(daemon, "payments", "payments-1") is None
    again = await daemon.delete(PAYMENTS_1)
    assert again.status == 404


async def test_static_and_registered_instances_live_side_by_side(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(services=STATIC_PAYMENTS))
    await register(client)
    body = await (await client.get("/v1/services/payments")).json()
    assert [(i["id"], i["static"]) for i in body["instances"]] == [
        ("payments-1", False),
        ("static-1", True),
    ]


async def test_static_instances_cannot_be_changed_over_the_api(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(services=STATIC_PAYMENTS))
    path = "/v1/services/payments/instances/static-1"
    for resp in (
        await client.delete(path),
        await client.put(path, json={"url": "http://127.0.0.1:10"}),
        await client.post(path + "/heartbeat"),
    ):
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "conflict"
    assert (await instance(client, "payments", "static-1")) is not None


async def test_configured_service_is_listed_before_any_instance_registers(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(services=[{"name": "ledger"}]))
    body = await (await client.get("/v1/services")).json()
    assert body["services"] == [
        {
            "name": "ledger",
            "instances": 0,
            "health": {"passing": 0, "warning": 0, "critical": 0, "maintenance": 0, "unknown": 0},
            "tags": [],
        }
    ]


async def test_list_services_counts_instances_by_health(
    daemon: AppClient, clock: FakeClock
) -> None:
    await register(daemon, ttl="10s")
    await register(daemon, "/v1/services/payments/instances/payments-2")
    await register(daemon, "/v1/services/ach/instances/ach-1", tags=["tier2"])
    clock.advance(10)
    body = await (await daemon.get("/v1/services")).json()
    by_name = {s["name"]: s for s in body["services"]}
    assert by_name["payments"]["instances"] == 2
    assert by_name["payments"]["health"]["critical"] == 1
    assert by_name["payments"]["health"]["unknown"] == 1
    assert by_name["ach"]["tags"] == ["tier2"]


async def test_health_filter_on_a_service(daemon: AppClient, clock: FakeClock) -> None:
    await register(daemon, ttl="10s")
    await register(daemon, "/v1/services/payments/instances/payments-2")
    clock.advance(10)
    resp = await daemon.get("/v1/services/payments", params={"health": "critical"})
    body = await resp.json()
    assert [i["id"] for i in body["instances"]] == ["payments-1"]


async def test_unknown_service_lists_no_instances(daemon: AppClient) -> None:
    resp = await daemon.get("/v1/services/nobody")
    assert resp.status == 200
    assert (await resp.json())["instances"] == []


async def test_concurrent_writes_to_one_instance_end_in_one_consistent_state(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    import asyncio

    config = make_config()
    client = await start_daemon(config)
    urls = [f"http://127.0.0.1:{8000 + i}" for i in range(30)]
    writes = [client.put(PAYMENTS_1, json={"url": url}) for url in urls]
    writes += [client.delete(PAYMENTS_1) for _ in range(10)]
    await asyncio.gather(*writes)
    in_memory = await instance(client, "payments", "payments-1")
    await client.close()

    restarted = await start_daemon(config)
    on_disk = await instance(restarted, "payments", "payments-1")
    assert (in_memory or {}).get("url") == (on_disk or {}).get("url")
