"""Calls from steps to registered services: pick an instance, call it, classify the outcome.

Instances come from the registry at call time, round-robin, skipping critical
and suppressed ones; a connection error fails over to the next instance
within the same attempt. Every attempt of a step carries the same
`Idempotency-Key: <process id>/<step name>`, so a service can make a retried
or replayed call harmless.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson

from registry.model import request_problem
from registry.storable import load_json

# (instance id, base URL) of the instances a step may call now, in a stable order.
Candidates = Callable[[str], list[tuple[str, str]]]
# Told of every call made: (service, whether it served the call, seconds of the answer).
CallObserver = Callable[[str, bool, float], None]
MAX_RESPONSE_BYTES = 1 << 20
ERROR_BODY_BYTES = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CallResult:
    ok: bool
    status: int | None = None
    output: Any = None  # the JSON response (or {"text": ...} when not JSON)
    error: str | None = None
    instance: str | None = None
    retryable: bool = True
    timed_out: bool = False
    body: str | None = None  # a failing answer's first KiB, for the process's `error`
    elapsed: float = 0.0  # seconds from sending to the whole answer read (`[RESPONSE_TIME]`)
    raw: bytes = b""  # the answer as read (a reference, not a copy): `expect`'s `[BODY]`


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: str
    body: Any
    headers: Mapping[str, str]
    retry_on: frozenset[int]


def served(result: CallResult, retry_on: frozenset[int]) -> bool:
    """Whether the service did its part, for its SLIs: it answered, with neither a 5xx nor
    a status the step retries (`retry_on`, 429 by default). A 4xx it means, or a 2xx that
    fails the step's `expect`, is the service's business answer, not a failure of it; no
    instance to call, a failed connection and a timeout are."""
    status = result.status
    return status is not None and status < 500 and status not in retry_on


class ServiceCaller:
    def __init__(self, candidates: Candidates, observe: CallObserver | None = None) -> None:
        """`observe` hears of each call made (a step's attempt, a compensation's), once,
        after failover: what the process felt. A request never sent is not counted."""
        self._candidates = candidates
        self._observe = observe
        self._turns: dict[str, itertools.count[int]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector, json_serialize=lambda v: orjson.dumps(v).decode()
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        body: Any,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 (one budget over failover attempts)
        retry_on: frozenset[int],
    ) -> CallResult:
        problem = request_problem(path, headers.items())
        if problem is not None:
            # Paths and headers are rendered from process input: a CR/LF there would
            # smuggle another request to the service. Never sent, and retrying cannot help.
            return CallResult(ok=False, error=f"request not sent: {problem}", retryable=False)
        # `url` holds the path until an instance is chosen.
        result = await self._failover(
            service, _Request(method, path, body, headers, retry_on), timeout
        )
        if self._observe is not None:
            self._observe(service, served(result, retry_on), result.elapsed)
        return result

    async def _failover(self, service: str, to_send: _Request, timeout: float) -> CallResult:  # noqa: ASYNC109
        instances = self._candidates(service)
        if not instances:
            return CallResult(ok=False, error=f"no passing instance of {service!r}")
        turn = next(self._turns.setdefault(service, itertools.count()))
        order = instances[turn % len(instances) :] + instances[: turn % len(instances)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = CallResult(ok=False, error="not called")
        for instance, url in order:
            left = deadline - loop.time()
            if left <= 0:
                break
            request = replace(to_send, url=url.rstrip("/") + to_send.url)
            last = await self._once(instance, request, left)
            if last.status is not None or last.timed_out:
                return last  # an answer (or a timeout): no failover, the call may have run
        return last

    async def _once(self, instance: str, request: _Request, timeout: float) -> CallResult:  # noqa: ASYNC109
        assert self._session is not None, "ServiceCaller.start() first"
        kwargs: dict[str, Any] = {"headers": dict(request.headers)}
        if request.body is not None:
            kwargs["json"] = request.body
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            async with asyncio.timeout(timeout):
                async with self._session.request(
                    request.method, request.url, allow_redirects=False, **kwargs
                ) as resp:
                    raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                    status = resp.status
        except TimeoutError:
            return CallResult(
                ok=False,
                error=f"timed out after {timeout:.3g}s",
                instance=instance,
                timed_out=True,
                elapsed=loop.time() - sent,
            )
        except aiohttp.ClientConnectionError as exc:
            error = f"connection failed: {exc}"
            return CallResult(ok=False, error=error, instance=instance, elapsed=loop.time() - sent)
        except aiohttp.ClientError as exc:
            error = f"bad response: {exc}"
            return CallResult(ok=False, error=error, instance=instance, elapsed=loop.time() - sent)
        elapsed = loop.time() - sent
        output = _output(raw)
        if 200 <= status < 300:
            return CallResult(
                ok=True, status=status, output=output, instance=instance, elapsed=elapsed, raw=raw
            )
        return CallResult(
            ok=False,
            status=status,
            output=output,
            error=f"HTTP {status}",
            instance=instance,
            retryable=status in request.retry_on,
            body=raw[:ERROR_BODY_BYTES].decode("utf-8", "replace") if raw else None,
            elapsed=elapsed,
            raw=raw,
        )


def _output(raw: bytes) -> Any:
    if len(raw) > MAX_RESPONSE_BYTES:
        return {"text": "(response over 1 MiB, not kept)"}
    if not raw:
        return None
    try:
        return load_json(raw)  # bounded like request bodies: the output is stored
    except ValueError:  # malformed, or unstorable as it is
        return {"text": raw.decode("utf-8", "replace")}
