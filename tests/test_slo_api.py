"""SLOs in the running daemon: the API, events, metrics and a restart."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config
from monitor.keys import BUS
from scheduler import Event

from .conftest import BOTH_STORES, AppClient, FakeClock, metric_families

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

PROBE = {"type": "http", "interval": "100ms", "down_interval": "100ms", "timeout": "300ms"}
SERVICES = [
    {
        "name": "payments",
        "slos": [
            {"name": "availability", "objective": 99.9},
            {"name": "latency", "objective": 99, "latency_threshold": "300ms"},
        ],
    },
    {"name": "ledger"},
]


@pytest.fixture
async def probing(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    """A daemon with the payments SLOs, probing every 100 ms."""
    return await start_daemon(make_config(services=SERVICES, defaults={"probe": PROBE}))


async def slos(client: AppClient, service: str = "payments") -> dict[str, Any]:
    resp = await client.get(f"/v1/services/{service}/slos")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return {slo["name"]: slo for slo in body["slos"]}


async def probe_for_a_while(client: AppClient, target: TestServer, path: str) -> None:
    body = {"url": str(target.make_url("/")), "probe": {"path": path}}
    assert (await client.put("/v1/services/payments/instances/p1", json=body)).status == 201
    await asyncio.sleep(0.8)  # several probes


async def test_no_data_yet_is_null_not_100_percent(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(services=SERVICES))
    availability = (await slos(client))["availability"]
    assert availability["sli"] is None
    assert availability["error_budget_remaining"] is None
    assert availability["sla"]["current"]["availability_percent"] is None
    assert availability["sla"]["current"]["allowed_minutes"] > 0


async def test_slis_come_from_the_probes(
    probing: AppClient, target: TestServer, clock: FakeClock
) -> None:
    client = probing
    await probe_for_a_while(client, target, "/ok")
    clock.advance(60)  # the minute closes
    report = await slos(client)
    assert report["availability"]["sli"] == 1.0
    assert report["availability"]["burn_rates"]["5m"] == 0.0
    assert report["availability"]["error_budget_remaining"] == 1.0
    assert report["latency"]["kind"] == "latency"
    assert report["availability"]["sla"]["current"]["availability_percent"] == 100.0


async def test_a_failing_service_burns_its_budget_and_says_so(
    probing: AppClient, target: TestServer, clock: FakeClock
) -> None:
    client = probing
    events: list[Event] = []
    client.app[BUS].subscribe("slo.*", events.append, name="test")
    await probe_for_a_while(client, target, "/fail")
    clock.advance(60)
    report = await slos(client)
    assert report["availability"]["sli"] == 0.0
    assert report["availability"]["burn_rates"]["1h"] == pytest.approx(1000.0)
    assert report["availability"]["error_budget_remaining"] < 0
    await asyncio.sleep(0.05)
    topics = {(e.topic, e.data.get("severity")) for e in events if e.data["slo"] == "availability"}
    assert ("slo.burn", "page") in topics
    assert ("slo.budget_exhausted", None) in topics


async def test_slo_metrics_are_exposed(
    probing: AppClient, target: TestServer, clock: FakeClock
) -> None:
    client = probing
    await probe_for_a_while(client, target, "/ok")
    open_minute = await metric_families(client)
    assert not open_minute["hms_slo_sli_ratio"].samples  # nothing closed yet: no sample
    assert open_minute["hms_slo_objective_ratio"].samples
    clock.advance(60)  # the text is rendered once a minute; the next minute has values
    families = await metric_families(client)
    for name in (
        "hms_slo_objective_ratio",
        "hms_slo_sli_ratio",
        "hms_slo_burn_rate",
        "hms_slo_error_budget_remaining_ratio",
        "hms_sla_availability_ratio",
    ):
        assert families[name].samples, name
    windows = {s.labels["window"] for s in families["hms_slo_sli_ratio"].samples}
    assert {"5m", "1h", "3d", "30d"} <= windows


async def test_unknown_service_is_404_and_one_without_slos_is_empty(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config(services=SERVICES))
    assert (await client.get("/v1/services/nobody/slos")).status == 404
    assert (await slos(client, "ledger")) == {}


async def test_slo_history_survives_a_restart(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
    clock: FakeClock,
) -> None:
    config = make_config(services=SERVICES, defaults={"probe": PROBE})
    first = await start_daemon(config)
    await probe_for_a_while(first, target, "/ok")
    clock.advance(60)
    before = (await slos(first))["availability"]
    await first.close()

    second = await start_daemon(config)
    after = (await slos(second))["availability"]
    assert after["sli"] == before["sli"] == 1.0
    assert after["sla"]["current"] == before["sla"]["current"]


async def test_a_gzip_scrape_is_one_member_with_the_same_slo_lines(
    probing: AppClient, target: TestServer, clock: FakeClock
) -> None:
    client = probing
    await probe_for_a_while(client, target, "/ok")
    clock.advance(60)
    plain = await (await client.get("/metrics")).read()
    resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    # One gzip member, as every HTTP client expects (the SLO part is deflated once a minute).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    text = inflater.decompress(await resp.read())
    assert inflater.eof and not inflater.unused_data

    def slo_lines(body: bytes) -> list[bytes]:
        return [line for line in body.splitlines() if line.startswith((b"hms_slo", b"hms_sla"))]

    assert slo_lines(text) == slo_lines(plain)
    assert b'hms_slo_sli_ratio{service="payments",slo="availability",window="5m"} 1.0' in text
    assert b"hms_probe_total{" in text
