"""Overload against a real daemon process: 1,000 probe targets that never answer, a called
service that never answers, a notification receiver that is down, and a heartbeat flood
at twice the benchmarked rate. The daemon stays responsive, refuses with 503 rather than
letting requests time out, and catches up afterwards.

Latency bounds here are generous on purpose (a noisy 2-core CI machine runs the flood
too); `python -m bench.overload` reports the figures precisely."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import until
from .flood import healthz_latencies, percentile, register_many
from .flood import run as run_flood
from .processes import DaemonProcess, free_port, running_daemon

HUNG_TARGETS = 1000
FLOOD_INSTANCES = 1000
BENCHMARKED_HEARTBEATS = 16_607  # per second, bench/registry on this class of machine
GENEROUS_P99_MS = 500.0  # the goal is 100 ms (bench/overload.py); CI machines are noisy
SHEDDING = {"overload_lag": "25ms"}  # the shipped default (the test helpers turn it off)


async def hung_server() -> tuple[asyncio.Server, int, list[int]]:
    """Accepts, reads, never answers: what a wedged service looks like from outside."""
    accepted = [0]

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


@pytest.fixture
async def wedged() -> AsyncIterator[int]:
    server, port, _ = await hung_server()
    yield port
    server.close()


def stuck_config(hung_port: int, dead_port: int) -> dict[str, Any]:
    return {
        "services": [
            {
                "name": "hung",
                "probe": {
                    "type": "http",
                    "path": "/health",
                    "interval": "1s",
                    "timeout": "500ms",
                    "failure_threshold": 1,
                },
            },
            {"name": "wedged", "instances": [{"id": "w1", "url": f"http://127.0.0.1:{hung_port}"}]},
        ],
        "notifications": [
            {
                "name": "down",
                "url": f"http://127.0.0.1:{dead_port}/hook",  # nothing listens there
                "events": ["health.changed", "workflow.failed"],
                "retry": {"max_attempts": 3, "backoff": "100ms"},
            }
        ],
        "workflows": [
            {
                "name": "Stuck",
                "steps": [
                    {
                        "name": "call",
                        "call": {"service": "wedged", "path": "/never"},
                        "timeout": "300ms",
                        "retry": {"max_attempts": 2, "backoff": "50ms"},
                    }
                ],
            }
        ],
    }


async def metric(http: aiohttp.ClientSession, name: str, *labels: str) -> float:
    """The sum of the samples of `name` that carry every one of `labels` (`key="value"`)."""
    async with http.get("/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    )


async def start(http: aiohttp.ClientSession, workflow: str) -> int:
    """POST a start; a 503 (shed) is retried, as callers of the SDK retry its Unavailable:
    the status it ended with."""
    for _ in range(50):
        async with http.post(f"/v1/workflows/{workflow}", json={}) as resp:
            if resp.status != 503:
                return resp.status
            assert "Retry-After" in resp.headers
        await asyncio.sleep(0.1)
    return 503


async def test_hung_targets_a_wedged_service_and_a_dead_receiver_do_not_stall_it(
    tmp_path: Path, wedged: int
) -> None:
    config = stuck_config(wedged, free_port())
    with running_daemon(tmp_path, server=SHEDDING, **config) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            await register_many(http, "hung", HUNG_TARGETS, {"url": f"http://127.0.0.1:{wedged}"})
            # Right after 1,000 new targets' first probes the loop may lag past
            # overload_lag: a start is then refused with 503 and Retry-After, never left
            # hanging, and a client that retries gets it in.
            statuses = await asyncio.gather(*(start(http, "Stuck") for _ in range(100)))
            assert statuses == [202] * 100
            latencies = await healthz_latencies(daemon.url, 5.0, timeout=10)
            p99 = percentile(latencies, 0.99)
            print(f"\n/healthz with {HUNG_TARGETS} hung targets: p99 {p99:.1f} ms")
            assert p99 < GENEROUS_P99_MS

            async def caught_up() -> bool:
                async with http.get("/v1/health", params={"service": "hung"}) as r:
                    states = [i["state"] for i in (await r.json())["instances"]]
                async with http.get("/v1/processes", params={"status": "failed"}) as r:
                    failed = (await r.json())["processes"]
                return states.count("critical") == HUNG_TARGETS and len(failed) == 100

            await until(caught_up, timeout=30)
            async with http.get("/v1/processes/" + "x" * 24) as r:
                assert r.status == 404  # still answering everything else
            retried = await metric(http, "hms_notifications_total", 'name="down"', "retried")
            assert retried > 0
            assert await metric(http, "hms_probe_total", 'service="hung"') >= HUNG_TARGETS


@pytest.mark.parametrize("connections", [64, 1000])
async def test_a_heartbeat_flood_at_twice_the_benchmarked_rate_is_shed_and_survived(
    tmp_path: Path, connections: int
) -> None:
    with running_daemon(tmp_path, server=SHEDDING) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            body = {"url": "http://127.0.0.1:9", "ttl": "120s"}
            await register_many(http, "flood", FLOOD_INSTANCES, body)
            flood = asyncio.create_task(
                run_flood(daemon.url, 2 * BENCHMARKED_HEARTBEATS, 4.0, connections, FLOOD_INSTANCES)
            )
            await asyncio.sleep(0.5)  # the flood is on
            latencies = await healthz_latencies(daemon.url, 3.0, timeout=10)
            result = await flood
            print(
                f"\nflood over {connections} connections: {result}; "
                f"/healthz p50 {sorted(latencies)[len(latencies) // 2]:.1f} ms, "
                f"p99 {percentile(latencies, 0.99):.1f} ms"
            )
            assert percentile(latencies, 0.99) < GENEROUS_P99_MS
            # Served or refused, never anything else; what was refused was told so at once.
            assert set(result["statuses"]) <= {"200", "503"}
            assert result["statuses"].get("200", 0) > 0
            assert result["failed_connections"] == 0
            await caught_up(http, daemon)


async def caught_up(http: aiohttp.ClientSession, daemon: DaemonProcess) -> None:
    """After the flood: beats and registrations work, and no lease was lost to it."""

    async def beats() -> bool:
        async with http.post("/v1/services/flood/instances/i7/heartbeat") as r:
            return r.status == 200

    await until(beats, timeout=15)
    async with http.put("/v1/services/after/instances/a", json={"url": "http://127.0.0.1:9"}) as r:
        assert r.status == 201
    async with http.get("/v1/services/flood", params={"health": "critical"}) as r:
        assert (await r.json())["instances"] == []
    async with http.get("/v1/services/flood") as r:
        assert len((await r.json())["instances"]) == FLOOD_INSTANCES
    assert "Traceback" not in daemon.log.read_text()
