"""GET /v1/sd in Prometheus' http_sd format, checked by a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import AppClient, FakeClock, require_tool
from .processes import free_port, running_daemon, running_prometheus
from .test_registry import register


async def test_empty_registry_is_an_empty_list(daemon: AppClient) -> None:
    resp = await daemon.get("/v1/sd")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == []


async def test_one_group_per_instance_with_hms_labels(daemon: AppClient) -> None:
    await register(
        daemon,
        "/v1/services/payments/instances/p1",
        url="https://pay.internal:8443/base",
        tags=["tier1", "eu"],
        meta={"metrics_path": "/stats", "team": "money"},
    )
    groups = await (await daemon.get("/v1/sd")).json()
    assert groups == [
        {
            "targets": ["pay.internal:8443"],
            "labels": {
                "__meta_hms_service": "payments",
                "__meta_hms_instance": "p1",
                "__meta_hms_health": "unknown",
                "__meta_hms_tags": ",tier1,eu,",
                "__scheme__": "https",
                "__metrics_path__": "/stats",
                "__meta_hms_meta_metrics_path": "/stats",
                "__meta_hms_meta_team": "money",
            },
        }
    ]


async def test_default_ports_and_metrics_path(daemon: AppClient) -> None:
    await register(daemon, "/v1/services/a/instances/1", url="http://a.internal")
    await register(daemon, "/v1/services/b/instances/1", url="https://b.internal")
    await register(daemon, "/v1/services/c/instances/1", url="http://[::1]:9000")
    groups = await (await daemon.get("/v1/sd")).json()
    assert [g["targets"] for g in groups] == [["a.internal:80"], ["b.internal:443"], ["[::1]:9000"]]
    assert {g["labels"]["__metrics_path__"] for g in groups} == {"/metrics"}


async def test_order_is_stable_and_filters_apply(daemon: AppClient, clock: FakeClock) -> None:
    for path in (
        "/v1/services/b/instances/2",
        "/v1/services/a/instances/9",
        "/v1/services/b/instances/1",
    ):
        await register(daemon, path, ttl="10s" if path.endswith("/2") else None)
    clock.advance(10)

    def pairs(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [
            (g["labels"]["__meta_hms_service"], g["labels"]["__meta_hms_instance"]) for g in groups
        ]

    everything = pairs(await (await daemon.get("/v1/sd")).json())
    assert everything == [("a", "9"), ("b", "1"), ("b", "2")]
    only_b = pairs(await (await daemon.get("/v1/sd", params={"service": "b"})).json())
    assert only_b == [("b", "1"), ("b", "2")]
    critical = pairs(await (await daemon.get("/v1/sd", params={"health": "critical"})).json())
    assert critical == [("b", "2")]


async def test_real_prometheus_discovers_the_targets(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    target_port = free_port()  # nothing listens: Prometheus only has to discover it
    with running_daemon(tmp_path) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            body = {
                "url": f"http://127.0.0.1:{target_port}",
                "tags": ["tier1"],
                "meta": {"metrics_path": "/custom", "team": "money"},
            }
            async with http.put("/v1/services/payments/instances/p1", json=body) as resp:
                assert resp.status == 201

        config = {
            "global": {"scrape_interval": "1h"},
            "scrape_configs": [
                {
                    "job_name": "hms",
                    "http_sd_configs": [{"url": f"{daemon.url}/v1/sd", "refresh_interval": "1s"}],
                    "relabel_configs": [
                        {"source_labels": ["__meta_hms_service"], "target_label": "service"},
                        {"source_labels": ["__meta_hms_meta_team"], "target_label": "team"},
                    ],
                }
            ],
        }
        with running_prometheus(prometheus, tmp_path, config) as url:
            target = await wait_for_target(url, timeout=30)
    assert target["scrapeUrl"] == f"http://127.0.0.1:{target_port}/custom"
    assert target["labels"]["service"] == "payments"
    assert target["labels"]["team"] == "money"
    assert target["discoveredLabels"]["__meta_hms_tags"] == ",tier1,"


async def wait_for_target(prometheus_url: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(prometheus_url + "/api/v1/targets") as resp:
                    text = await resp.text()
                if resp.status == 200:  # a Prometheus still starting answers 503 in text
                    targets = json.loads(text)["data"]["activeTargets"]
                    if targets:
                        return dict(targets[0])
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("Prometheus discovered no target from /v1/sd")
