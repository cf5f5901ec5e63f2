"""HTTP for the benches as a real client does it: a 503 with Retry-After is waited out.

The daemon sheds load (503 `overloaded`, Retry-After) when a burst outruns it;
a registering fleet waits and comes back, as registry.client does. A bench that
treats that answer as fatal measures nothing, so every bench writes through here.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

import aiohttp

RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER = 5.0  # seconds; a longer ask is capped (the bench has a deadline)
DEFAULT_RETRY_AFTER = 0.2  # when the 503 says nothing
GIVE_UP_AFTER = 120.0


def retry_after(headers: Any) -> float:
    """Seconds to wait, from Retry-After (delta-seconds; an HTTP date counts as unknown)."""
    try:
        seconds = float(headers.get("Retry-After", DEFAULT_RETRY_AFTER))
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def get_json(url: str, timeout: float = 30.0) -> Any:
    """A blocking GET for a bench's polling loop, 429/503 waited out as `send` does: the
    daemon sheds reads too while a burst (a recovery, a flood) outruns it."""
    give_up = time.monotonic() + GIVE_UP_AFTER
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the bench's)
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRY_STATUSES or time.monotonic() > give_up:
                raise
            time.sleep(retry_after(exc.headers))


class Retries:
    """Counts the refusals waited out (a bench prints them: shedding is part of the figure)."""

    def __init__(self) -> None:
        self.count = 0


async def send(
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    *,
    json: Any = None,
    ok: Iterable[int] = (200, 201, 202, 204),
    retries: Retries | None = None,
    give_up_after: float = GIVE_UP_AFTER,
) -> bytes:
    """One request, retried after Retry-After while the answer is 429/503; the body of the
    first other answer, which must be one of `ok` (else RuntimeError naming it)."""
    deadline = time.monotonic() + give_up_after
    while True:
        async with http.request(method, path, json=json) as resp:
            body = await resp.read()
            if resp.status not in RETRY_STATUSES or time.monotonic() > deadline:
                if resp.status not in ok:
                    raise RuntimeError(f"{method} {path}: {resp.status} {body[:300]!r}")
                return body
            wait = retry_after(resp.headers)
        if retries is not None:
            retries.count += 1
        await asyncio.sleep(wait)


async def put_all(
    url: str,
    items: Iterable[tuple[str, Any]],
    *,
    connections: int = 64,
    retries: Retries | None = None,
) -> float:
    """PUT every (path, body) over `connections` connections; seconds it took."""
    started = time.perf_counter()
    queue = iter(items)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(url, connector=connector) as http:

        async def worker() -> None:
            for path, body in queue:
                await send(http, "PUT", path, json=body, retries=retries)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return time.perf_counter() - started
