"""An open-loop heartbeat flood: `python -m tests.flood URL RATE SECONDS CONNECTIONS INSTANCES`.

Open loop, as real overload is: each connection writes its share of requests on a fixed
schedule (pipelined, HTTP/1.1) whether or not the answers have come, so a slow server
faces a growing backlog instead of a politely waiting client. Prints one JSON line:
requests sent, answers by status, and how many were still unanswered at the end.
Used by tests/test_overload.py and bench/overload.py, which also share the helpers
below (run a flood, time /healthz, register the flooded instances); 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

ROOT = Path(__file__).resolve().parent.parent

TICK = 0.01  # seconds between writes on each connection


def request(host: str, instance: int) -> bytes:
    return (
        f"POST /v1/services/flood/instances/i{instance}/heartbeat HTTP/1.1\r\n"
        f"Host: {host}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def connection(
    host: str, port: int, rate: float, seconds: float, instances: range, statuses: Counter[int]
) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    sent = answered = 0
    done = asyncio.Event()

    async def read() -> None:
        nonlocal answered
        buffer = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buffer += chunk
            # Count status lines; the bodies are small and never contain one.
            while (start := buffer.find(b"HTTP/1.1 ")) >= 0 and len(buffer) >= start + 12:
                statuses[int(buffer[start + 9 : start + 12])] += 1
                answered += 1
                buffer = buffer[start + 12 :]
            if done.is_set() and answered >= sent:
                break

    reading = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    started = loop.time()
    owed = 0.0
    try:
        while (now := loop.time()) - started < seconds:
            owed += rate * TICK
            batch, owed = int(owed), owed - int(owed)
            if batch:
                writer.write(b"".join(request(host, instances[(sent + k) % len(instances)])
                                      for k in range(batch)))  # fmt: skip
                sent += batch
            await asyncio.sleep(max(0.0, TICK - (loop.time() - now)))
        done.set()
        await asyncio.wait_for(reading, timeout=10)
    except (TimeoutError, ConnectionError):
        reading.cancel()
    finally:
        writer.close()
    return sent, answered


async def flood(url: str, rate: float, seconds: float, connections: int, instances: int) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    assert host == "127.0.0.1", "the flood only ever targets 127.0.0.1"
    statuses: Counter[int] = Counter()
    share = range(instances)
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            connection(host, port, rate / connections, seconds, share, statuses)
            for _ in range(connections)
        ),
        return_exceptions=True,
    )
    finished = [r for r in results if isinstance(r, tuple)]
    sent = sum(s for s, _ in finished)
    answered = sum(a for _, a in finished)
    return {
        "sent": sent,
        "answered": answered,
        "unanswered": sent - answered,
        "seconds": round(time.monotonic() - started, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed_connections": len(results) - len(finished),
    }


async def run(
    url: str, rate: float, seconds: float, connections: int, instances: int
) -> dict[str, Any]:
    """This module as a process of its own (so it does not share a loop with the caller)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.flood", url, str(rate), str(seconds), str(connections),
        str(instances), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=seconds + 60)
    result: dict[str, Any] = json.loads(out)
    return result


async def healthz_latencies(url: str, seconds: float, timeout: float = 30.0) -> list[float]:
    """/healthz every 20 ms over one keep-alive connection, as a load balancer would (ms)."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            async with http.get("/healthz") as resp:
                assert resp.status == 200
                await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


async def register_many(
    http: aiohttp.ClientSession, service: str, count: int, body: dict[str, Any]
) -> None:
    """PUT instances i0..i<count-1>, 32 at a time; a 503 (shed) is retried, as
    registry.client does."""
    gate = asyncio.Semaphore(32)

    async def put(i: int) -> None:
        for _ in range(50):
            async with gate, http.put(f"/v1/services/{service}/instances/i{i}", json=body) as r:
                if r.status != 503:
                    assert r.status in (200, 201), await r.text()
                    return
            await asyncio.sleep(0.1)
        raise AssertionError("registration refused 50 times")

    await asyncio.gather(*(put(i) for i in range(count)))


def main() -> None:
    import logging

    from monitor.cli import raise_open_file_limit

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # writes after the server hung up
    raise_open_file_limit()  # 1,000 connections need room
    url, rate, seconds, connections, instances = sys.argv[1:6]
    result = asyncio.run(flood(url, float(rate), float(seconds), int(connections), int(instances)))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
