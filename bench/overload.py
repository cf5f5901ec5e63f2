"""Overload benchmark: /healthz latency while a heartbeat flood runs at twice capacity.

The capacity is measured first, in this run: the heartbeats/s the daemon answers
under an open-loop flood it cannot keep up with. Then floods at twice that rate,
over 64 connections (a pool of well-behaved clients) and over 1,000 (a swarm),
while /healthz is asked every 20 ms on its own keep-alive connection, as a load
balancer would. The peer is bare aiohttp on the same loop (uvloop) answering the
same requests with a constant and serving /healthz, with no shedding: what the
same flood does to an aiohttp service that does nothing about it.

    python -m bench.overload [--seconds 5] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from tests.flood import healthz_latencies, percentile
from tests.flood import run as run_flood

from .http import Retries
from .registry import daemon_argv, free_port, register_many, server, write_daemon_config

INSTANCES = 1000
SMOKE_INSTANCES = 100
SMOKE_RATE = 200.0
BARE = textwrap.dedent(
    """
    import sys, uvloop
    from aiohttp import web

    async def beat(request):
        return web.json_response({"ok": True})

    async def ok(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.post("/{tail:.*}", beat), web.get("/healthz", ok), web.get("/readyz", ok)])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=uvloop.new_event_loop())
    """
)


async def flood(
    url: str, rate: float, seconds: float, connections: int, instances: int
) -> dict[str, Any]:
    return await run_flood(url, rate, seconds, connections, instances)


async def under_flood(
    url: str, rate: float, seconds: float, connections: int, instances: int
) -> str:
    flooding = asyncio.create_task(flood(url, rate, seconds, connections, instances))
    await asyncio.sleep(0.5)
    latencies = await healthz_latencies(url, seconds - 1.0)
    result = await flooding
    statuses = result["statuses"]
    answered_per_s = result["answered"] / max(result["seconds"], 0.001)
    return (
        f"/healthz p50 {percentile(latencies, 0.5):6.1f} ms  p99 {percentile(latencies, 0.99):6.1f}"
        f" ms  max {max(latencies):6.1f} ms | flood: {result['sent']:,} sent, "
        f"{statuses.get('200', 0):,} ok, {statuses.get('503', 0):,} shed (503), "
        f"{result['unanswered']:,} dropped unread, {answered_per_s:,.0f} answers/s"
    )


async def capacity(url: str, seconds: float, instances: int) -> float:
    result = await flood(url, 60_000, seconds, 64, instances)
    return float(result["statuses"].get("200", 0)) / max(result["seconds"], 0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds, no peer")
    args = parser.parse_args()
    instances, floods = (SMOKE_INSTANCES, (16,)) if args.smoke else (INSTANCES, (64, 1000))
    if args.smoke:
        args.seconds = 1.5
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = write_daemon_config(workdir, port)
        print(f"Overload: heartbeats to {instances:,} instances, open loop, 2 cores shared")
        retries = Retries()
        with server(daemon_argv(config), url, workdir / "daemon.log"):
            asyncio.run(register_many(url, "flood", instances, retries=retries))
            # Smoke: a fixed, modest rate (measuring the capacity alone takes seconds).
            ceiling = SMOKE_RATE if args.smoke else asyncio.run(capacity(url, 3.0, instances))
            what = "smoke: a fixed rate, not measured" if args.smoke else "heartbeats/s"
            print(f"  hms-mgmt capacity under flood            {ceiling:10,.0f} {what}")
            rows = {}
            for connections in floods:
                rows[connections] = asyncio.run(
                    under_flood(url, 2 * ceiling, args.seconds, connections, instances)
                )
        if args.smoke:
            for connections, row in rows.items():
                print(f"  flood at 2x, {connections} connections: hms-mgmt {row}")
            return
        (workdir / "bare.py").write_text(BARE)
        bare_port = free_port()
        bare_url = f"http://127.0.0.1:{bare_port}"
        bare_rows = {}
        argv = [sys.executable, str(workdir / "bare.py"), str(bare_port)]
        with server(argv, bare_url, workdir / "bare.log"):
            for connections in floods:
                bare_rows[connections] = asyncio.run(
                    under_flood(bare_url, 2 * ceiling, args.seconds, connections, instances)
                )
        for connections in floods:
            print(f"  flood at 2x ({2 * ceiling:,.0f}/s), {connections} connections")
            print(f"    hms-mgmt      {rows[connections]}")
            print(f"    bare aiohttp  {bare_rows[connections]}")
        print("  goal: /healthz p99 < 100 ms during the flood; refused work answered 503 at once")


if __name__ == "__main__":
    main()
