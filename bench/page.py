"""Status page benchmark: render times at 10,000 instances, SSE fan-out to 100 browsers.

A daemon process with 10,000 registered instances in 100 services (one of
them with 1,000, so its page is a full 500-row page). Timed from the client:
`/`, a 100-instance service page and the 1,000-instance one, medians of 20,
next to the same-sized HTML served as bytes by a bare aiohttp app (the floor).

Fan-out: 100 SSE connections (`/v1/events`), events published at 100/s for
10 s; the daemon's CPU with the browsers connected minus its CPU for the same
publishing with none, as a share of one core. Goals: pages < 200 ms, fan-out
< 5% of a core at 100 state changes/s.

    python -m bench.page
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.registry import daemon_argv, free_port, register_many, server, write_daemon_config

SERVICES = 100
INSTANCES = 10_000
BIG = 1_000
BROWSERS = 100
RATE = 100
SECONDS = 10.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_get(http: aiohttp.ClientSession, url: str, runs: int = 20) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        async with http.get(url) as resp:
            body = await resp.read()
            assert resp.status == 200, resp.status
        times.append(time.perf_counter() - start)
        size = len(body)
    return statistics.median(times), size


async def floor(size: int) -> float:
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
            median, _ = await timed_get(http, f"http://127.0.0.1:{port}/")
    finally:
        await runner.cleanup()
    return median


async def publish_for(http: aiohttp.ClientSession, url: str, seconds: float) -> int:
    sent, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        async with http.post(f"{url}/v1/events/bench.changed", json={"n": sent}) as resp:
            assert resp.status == 202
        sent += 1
        await asyncio.sleep(max(0.0, sent / RATE - (time.perf_counter() - start)))
    del elapsed
    return sent


async def fan_out(url: str, pid: int) -> tuple[float, float, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
        before = cpu_seconds(pid)
        await publish_for(http, url, SECONDS)
        alone = (cpu_seconds(pid) - before) / SECONDS
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

        browsers = [asyncio.create_task(browser()) for _ in range(BROWSERS)]
        await asyncio.sleep(1.0)
        before = cpu_seconds(pid)
        sent = await publish_for(http, url, SECONDS)
        with_browsers = (cpu_seconds(pid) - before) / SECONDS
        await asyncio.sleep(0.5)
        for task in browsers:
            task.cancel()
        await asyncio.gather(*browsers, return_exceptions=True)
        await streams.close()
    return alone, with_browsers, received[0] / max(1, sent * BROWSERS)


async def measure(url: str, pid: int) -> None:
    per_service = (INSTANCES - BIG) // (SERVICES - 1)
    start = time.perf_counter()
    await register_many(url, "big", BIG)
    for n in range(SERVICES - 1):
        await register_many(url, f"svc-{n:02d}", per_service, connections=16)
    print(f"registered {INSTANCES:,} instances in {time.perf_counter() - start:.1f} s")
    async with aiohttp.ClientSession() as http:
        for label, path in (
            ("/ (100 services, 10,000 instances)", "/"),
            ("/services/svc-00 (101 instances)", "/services/svc-00"),
            ("/services/big (500 of 1,000 instances)", "/services/big"),
        ):
            median, size = await timed_get(http, url + path)
            bare = await floor(size)
            print(
                f"  {label:42} {median * 1000:6.1f} ms  ({size / 1024:.0f} KiB; "
                f"bare aiohttp, same bytes: {bare * 1000:.1f} ms)  goal < 200 ms"
            )
    alone, with_browsers, per_browser = await fan_out(url, pid)
    print(
        f"  SSE fan-out, {BROWSERS} browsers, {RATE} events/s: daemon CPU "
        f"{alone * 100:.1f}% of a core without browsers, {with_browsers * 100:.1f}% with -> "
        f"fan-out {(with_browsers - alone) * 100:.1f}% of a core (goal < 5%); "
        f"browsers received {per_browser:.1%} of the events"
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hms-bench-page-") as tmp:
        directory = Path(tmp)
        port = free_port()
        config = write_daemon_config(directory, port)
        url = f"http://127.0.0.1:{port}"
        print(f"bench.page: python {sys.version.split()[0]}, {os.cpu_count()} cores")
        with server(daemon_argv(config), url, directory / "daemon.log") as daemon:
            asyncio.run(measure(url, daemon.pid))


if __name__ == "__main__":
    main()
