"""An open-loop heartbeat flood: `python -m tests.flood URL RATE SECONDS CONNECTIONS INSTANCES`.

Open loop, as real overload is: each connection writes its share of requests on a fixed
schedule (pipelined, HTTP/1.1) whether or not the answers have come, so a slow server
faces a growing backlog instead of a politely waiting client. Prints one JSON line:
requests sent, answers by status, and how many were still unanswered at the end.
Used by tests/test_overload.py and bench/overload.py; it only talks to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

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


def main() -> None:
    import logging
    import resource

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # writes after the server hung up
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 connections need room
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    url, rate, seconds, connections, instances = sys.argv[1:6]
    result = asyncio.run(flood(url, float(rate), float(seconds), int(connections), int(instances)))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
