"""Self-registration for Python services: register at startup, heartbeat, deregister at exit.

    from hms_mgmt import Registration

    async with Registration("http://127.0.0.1:9797", "payments", "payments-1",
                            url="http://127.0.0.1:8001", ttl="30s"):
        ...  # serve

or, in an aiohttp app: `app.cleanup_ctx.append(registration_ctx(...same arguments...))`.

The daemon may be down when the service starts, or restart while it runs: the
client keeps retrying with capped exponential backoff, re-registers when a
heartbeat answers 404, and never raises into the service it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from .durations import Duration, duration_text, seconds

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
MAX_BACKOFF = 30.0


class Rejected(Exception):
    """The daemon answered, but refused the registration (bad body, token, conflict)."""


class Registration:
    """Keeps one instance registered while the `async with` block runs."""

    def __init__(
        self,
        registry_url: str,
        service: str,
        instance_id: str,
        *,
        url: str | None,
        ttl: Duration | None = "30s",
        tags: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        probe: Mapping[str, Any] | None = None,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        base = registry_url.rstrip("/")
        self.endpoint = f"{base}/v1/services/{quote(service, safe='')}/instances/" + quote(
            instance_id, safe=""
        )
        self.body: dict[str, Any] = {"tags": list(tags), "meta": dict(meta or {})}
        if url is not None:  # may be absent with `probe: {type: none}` (a worker, a batch job)
            self.body["url"] = url
        if ttl is not None:
            self.body["ttl"] = ttl if ttl == "default" else duration_text(ttl)
        if probe is not None:
            self.body["probe"] = dict(probe)
        self.ttl = None if ttl is None or ttl == "default" else seconds(ttl)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.max_backoff = max_backoff
        self.registered = asyncio.Event()
        self.last_error: str | None = None
        self._session = session
        self._owns_session = session is None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Registration:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            )
        self._task = asyncio.create_task(self._keep_registered(), name="registry-client")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._deregister()
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()

    async def _keep_registered(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._register()
                backoff = 0.5
                await self._heartbeat_until_lost()
            except (aiohttp.ClientError, TimeoutError, Rejected) as exc:
                self.registered.clear()
                self.last_error = str(exc) or type(exc).__name__
                log.warning("registry: %s; retrying in %.1fs", self.last_error, backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.max_backoff)

    async def _register(self) -> None:
        async with self._http().put(self.endpoint, json=self.body, headers=self.headers) as resp:
            if resp.status not in (200, 201):
                raise Rejected(f"register answered {resp.status}: {await resp.text()}")
            body = await resp.json()
        if body.get("ttl"):
            self.ttl = seconds(body["ttl"])  # "default" resolved
        self.last_error = None
        self.registered.set()
        log.info("registered at %s", self.endpoint)

    async def _heartbeat_until_lost(self) -> None:
        """Renew at ttl/3 with jitter; return when the daemon forgot us (404)."""
        if self.ttl is None:
            await asyncio.Event().wait()  # no lease: nothing to renew
        assert self.ttl is not None
        while True:
            await asyncio.sleep(self.ttl / 3 * random.uniform(0.8, 1.0))
            url = self.endpoint + "/heartbeat"
            async with self._http().post(url, headers=self.headers) as resp:
                if resp.status == 404:
                    log.info("registry lost %s; registering again", self.endpoint)
                    self.registered.clear()
                    return
                if resp.status != 200:
                    raise Rejected(f"heartbeat answered {resp.status}: {await resp.text()}")

    async def _deregister(self) -> None:
        if not self.registered.is_set():
            return
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with self._http().delete(
                self.endpoint, headers=self.headers, timeout=timeout
            ) as resp:
                if resp.status not in (204, 404):
                    log.warning("deregister answered %s", resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not deregister %s: %s", self.endpoint, exc)
        self.registered.clear()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use Registration as `async with`")
        return self._session


def registration_ctx(
    registry_url: str, service: str, instance_id: str, **kwargs: Any
) -> Callable[[web.Application], AsyncIterator[None]]:
    """For `app.cleanup_ctx`: registered while the aiohttp app runs."""

    async def registered(app: web.Application) -> AsyncIterator[None]:
        async with Registration(registry_url, service, instance_id, **kwargs):
            yield

    return registered
