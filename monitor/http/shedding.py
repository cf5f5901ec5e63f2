"""Load shedding: answer 503 at once while the event loop is overloaded.

Everything in the daemon shares one event loop, so the sign of overload is the
loop's lag: how late a timer set for 10 ms from now actually runs. Under a
flood it grows with the number of requests waiting for their turn, and every
request (including `/healthz`) waits that long. While it is above
`server.overload_lag`, requests are refused with 503 and `Retry-After` before
routing, auth or body parsing, which costs a fraction of serving them, so the
loop catches up; probes, timers and processes keep running. Leases do not
lapse while heartbeats are being refused (the catalog pauses expiry and renews
every lease when shedding stops). Liveness,
readiness and `/metrics` are always served, so orchestrators and Prometheus
see the overload instead of a dead daemon. Shedding stops once the lag is
under half the threshold, and starts only after three samples in a row are
over it (hysteresis: one slow moment is not overload).

Durable writes have their own bound: a write queue deeper than
MAX_PENDING_WRITES answers 503 rather than queueing seconds of commits
(monitor/storage/database.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.http.errors import Handler
from monitor.http.routes.operations import table as operations

SAMPLE_INTERVAL = 0.01
HIGH_SAMPLES = 3
# Declared with `shed=False` beside their handlers: /healthz, /readyz, /metrics.
NEVER_SHED = frozenset(route.path for route in operations.routes if not route.shed)
RETRY_AFTER = "1"
BODY = (
    b'{"error":{"code":"overloaded","message":"the daemon is overloaded; '
    b'retry after the Retry-After seconds","details":null}}'
)


class LoadShedder:
    def __init__(self, max_lag: float, metrics: CollectorRegistry) -> None:
        self.max_lag = max_lag
        self.lag = 0.0
        self.shedding = False
        self._high = 0
        self._listeners: list[Callable[[bool], None]] = []
        self.task: asyncio.Task[None] | None = None
        self._shed = Counter(
            "hms_http_shed",
            "Requests refused with 503 because the daemon was overloaded",
            ["reason"],
            registry=metrics,
        )
        self._shed.labels("loop_lag")
        Gauge(
            "hms_event_loop_lag_seconds",
            "How late the event loop ran a timer, last sample (every 10 ms)",
            registry=metrics,
        ).set_function(lambda: self.lag)

    @property
    def enabled(self) -> bool:
        return self.max_lag > 0

    def middleware(self) -> Middleware:
        @web.middleware
        async def shed(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.shedding and request.path not in NEVER_SHED:
                self._shed.labels("loop_lag").inc()
                response = web.Response(
                    status=503,
                    body=BODY,
                    content_type="application/json",
                    headers={"Retry-After": RETRY_AFTER},
                )
                # And hang up: requests pipelined behind this one are dropped unread, and a
                # client that comes back pays for a new connection, which slows a flood.
                response.force_close()
                return response
            return await handler(request)

        return shed

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Called with True when shedding starts and False when it stops."""
        self._listeners.append(listener)

    def sample(self, lag: float) -> None:
        self.lag = lag
        if not self.enabled:  # measured for the gauge only
            return
        was = self.shedding
        if lag > self.max_lag:
            self._high += 1
            # One slow moment (a GC pass, a big page) is not overload; three in a row are.
            self.shedding = self.shedding or self._high >= HIGH_SAMPLES
        else:
            self._high = 0
            if lag < self.max_lag / 2:
                self.shedding = False
        if self.shedding != was:
            for listener in self._listeners:
                listener(self.shedding)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + SAMPLE_INTERVAL
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.sample(max(0.0, loop.time() - expected))

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: measure while the app runs."""
        self.task = asyncio.create_task(self.run(), name="loop-lag")
        yield
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
