"""Status page benchmark: render times at 10,000 instances, heartbeats beside page loads, SSE.

A daemon process with 10,000 registered instances in 100 services (one of
them with 1,000, so its page is a full 500-row page). Timed from the client:
`/`, a 100-instance service page and the 1,000-instance one, medians of 20,
next to the same-sized HTML served as bytes by a bare aiohttp app (the floor).

Heartbeats beside page loads: 1,000 of the instances renew their leases at
500/s (16 connections, paced: a fleet's steady renewals, not a flood), each
timed, for 10 s without page loads and 10 s with `/` loaded once a second.
One person opening the status page must not cost a fleet its latency.

Fan-out: 100 SSE connections (`/v1/events`), events published at 100/s for
10 s; the daemon's CPU with the browsers connected minus its CPU for the same
publishing with none, as a share of one core. Goals: pages < 200 ms, heartbeat
p99 < 20 ms with the page loaded, fan-out < 5% of a core at 100 state changes/s.

    python -m bench.page [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.http import Retries, send
from bench.processes import cpu_seconds
from bench.registry import daemon_argv, free_port, register_many, server, write_daemon_config
from tests.flood import percentile


@dataclass(frozen=True, kw_only=True)
class Sizes:
    services: int = 100
    instances: int = 10_000
    big: int = 1_000
    browsers: int = 100
    rate: int = 100  # events/s
    seconds: float = 10.0
    beating: int = 1_000  # instances of `big` that heartbeat
    beat_rate: float = 500.0
    beat_connections: int = 16
    runs: int = 20  # page loads per median


# Tiny, a few seconds: the bench still runs end to end (tests/test_bench_smoke.py).
SMOKE = Sizes(
    services=5, instances=300, big=100, browsers=5, seconds=1.0, beating=100, beat_rate=200.0,
    beat_connections=4, runs=3,
)  # fmt: skip


async def timed_get(
    http: aiohttp.ClientSession, url: str, runs: int = 20, retries: Retries | None = None
) -> tuple[float, int]:
    """Median seconds of `runs` GETs, and the body's size. A 503 (the daemon shedding load)
    is waited out as Retry-After asks, and that wait is part of the time: people wait too."""
    times, size = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        body = await send(http, "GET", url, ok=(200,), retries=retries)
        times.append(time.perf_counter() - start)
        size = len(body)
    return statistics.median(times), size


async def floor(size: int, runs: int) -> float:
    """The same number of bytes from a bare aiohttp handler: what HTTP alone costs."""
    from aiohttp import web

    body = b"x" * size

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            median, _ = await timed_get(http, f"http://127.0.0.1:{port}/", runs)
    finally:
        await runner.cleanup()
    return median


async def heartbeats(url: str, sizes: Sizes, *, load_page: bool) -> tuple[list[float], int, int]:
    """Paced heartbeats for `sizes.seconds` (latencies in ms), with `/` loaded once a
    second when `load_page`; also how many were refused (503) and how many pages loaded."""
    latencies: list[float] = []
    refused = [0, 0]  # answered 200, not
    connector = aiohttp.TCPConnector(limit=sizes.beat_connections + 1)
    per_connection = sizes.beat_rate / sizes.beat_connections
    async with aiohttp.ClientSession(url, connector=connector) as http:
        stop = time.perf_counter() + sizes.seconds

        async def beat(first: int) -> None:
            n, started = first, time.perf_counter()
            while (now := time.perf_counter()) < stop:
                path = f"/v1/services/big/instances/i{n % sizes.beating}/heartbeat"
                async with http.post(path) as resp:
                    await resp.read()
                    refused[resp.status != 200] += 1
                latencies.append((time.perf_counter() - now) * 1000)
                n += sizes.beat_connections
                due = started + (n - first) / sizes.beat_connections / per_connection
                await asyncio.sleep(max(0.0, due - time.perf_counter()))

        async def pages() -> int:
            loaded = 0
            while time.perf_counter() < stop:
                await send(http, "GET", "/", ok=(200,))
                loaded += 1
                await asyncio.sleep(1.0)
            return loaded

        beats = [beat(k) for k in range(sizes.beat_connections)]
        if load_page:
            *_, loaded = await asyncio.gather(*beats, pages())
        else:
            await asyncio.gather(*beats)
            loaded = 0
    return latencies, refused[1], loaded


async def publish_for(http: aiohttp.ClientSession, url: str, seconds: float, rate: int) -> int:
    sent, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        async with http.post(f"{url}/v1/events/bench.changed", json={"n": sent}) as resp:
            assert resp.status == 202
        sent += 1
        await asyncio.sleep(max(0.0, sent / rate - (time.perf_counter() - start)))
    return sent


async def fan_out(url: str, pid: int, sizes: Sizes) -> tuple[float, float, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
        before = cpu_seconds(pid)
        await publish_for(http, url, sizes.seconds, sizes.rate)
        alone = (cpu_seconds(pid) - before) / sizes.seconds
        received = [0]
        # Their own pool: 100 open streams would take every connection of the default one.
        streams = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=0)
        )

        async def browser() -> None:
            async with streams.get(f"{url}/v1/events?topics=bench.*") as resp:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        received[0] += 1

        browsers = [asyncio.create_task(browser()) for _ in range(sizes.browsers)]
        await asyncio.sleep(1.0)
        before = cpu_seconds(pid)
        sent = await publish_for(http, url, sizes.seconds, sizes.rate)
        with_browsers = (cpu_seconds(pid) - before) / sizes.seconds
        await asyncio.sleep(0.5)
        for task in browsers:
            task.cancel()
        await asyncio.gather(*browsers, return_exceptions=True)
        await streams.close()
    return alone, with_browsers, received[0] / max(1, sent * sizes.browsers)


def beat_line(latencies: list[float], refused: int) -> str:
    return (
        f"p50 {percentile(latencies, 0.5):6.2f} ms  p99 {percentile(latencies, 0.99):6.2f} ms  "
        f"max {max(latencies):6.1f} ms  ({len(latencies):,} heartbeats, {refused} refused)"
    )


async def measure(url: str, pid: int, sizes: Sizes) -> None:
    per_service = (sizes.instances - sizes.big) // (sizes.services - 1)
    start, retries = time.perf_counter(), Retries()
    await register_many(url, "big", sizes.big, retries=retries)
    for n in range(sizes.services - 1):
        await register_many(url, f"svc-{n:02d}", per_service, connections=16, retries=retries)
    print(
        f"registered {sizes.instances:,} instances in {time.perf_counter() - start:.1f} s "
        f"({retries.count} 503s waited out, as Retry-After asked)"
    )
    async with aiohttp.ClientSession() as http:
        shed = Retries()
        for label, path in (
            (f"/ ({sizes.services} services, {sizes.instances:,} instances)", "/"),
            (f"/services/svc-00 ({per_service} instances)", "/services/svc-00"),
            (f"/services/big (of {sizes.big:,} instances)", "/services/big"),
        ):
            median, size = await timed_get(http, url + path, sizes.runs, shed)
            bare = await floor(size, sizes.runs)
            print(
                f"  {label:42} {median * 1000:6.1f} ms  ({size / 1024:.0f} KiB; "
                f"bare aiohttp, same bytes: {bare * 1000:.1f} ms)  goal < 200 ms"
            )
        print(f"  (page loads answered 503 and retried after Retry-After: {shed.count})")
    print(
        f"  heartbeats at {sizes.beat_rate:,.0f}/s over {sizes.beat_connections} connections, "
        f"{sizes.seconds:.0f} s each"
    )
    alone, refused, _ = await heartbeats(url, sizes, load_page=False)
    print(f"    without page loads           {beat_line(alone, refused)}")
    beside, refused, loaded = await heartbeats(url, sizes, load_page=True)
    print(f"    `/` loaded once a second     {beat_line(beside, refused)}  ({loaded} page loads)")
    print("    goal: p99 < 20 ms with the page loaded")
    idle, with_browsers, per_browser = await fan_out(url, pid, sizes)
    print(
        f"  SSE fan-out, {sizes.browsers} browsers, {sizes.rate} events/s: daemon CPU "
        f"{idle * 100:.1f}% of a core without browsers, {with_browsers * 100:.1f}% with -> "
        f"fan-out {(with_browsers - idle) * 100:.1f}% of a core (goal < 5%); "
        f"browsers received {per_browser:.1%} of the events"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    sizes = SMOKE if parser.parse_args().smoke else Sizes()
    with tempfile.TemporaryDirectory(prefix="hms-bench-page-") as tmp:
        directory = Path(tmp)
        port = free_port()
        config = write_daemon_config(directory, port)
        url = f"http://127.0.0.1:{port}"
        print(f"bench.page: python {sys.version.split()[0]}, {os.cpu_count()} cores")
        with server(daemon_argv(config), url, directory / "daemon.log") as daemon:
            asyncio.run(measure(url, daemon.pid, sizes))


if __name__ == "__main__":
    main()
