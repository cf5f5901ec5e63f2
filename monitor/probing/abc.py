"""The probe kind interface: what every probe type (kinds/) gives the prober."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from monitor.probing.kinds.http_exchange import HttpTarget
from monitor.probing.kinds.http_wire import insecure_context
from monitor.probing.probe import Probe, ProbeResult
from monitor.probing.workers import Job

if TYPE_CHECKING:
    import aiohttp


@dataclass(kw_only=True, eq=False)
class ProbeContext:
    """What the kinds of one Prober share: TLS contexts, client sessions, built requests.

    The prober opens the sessions in `start` and closes them in `close`."""

    insecure: ssl.SSLContext = field(default_factory=insecure_context)
    fresh: aiohttp.ClientSession | None = None  # a new connection per request
    pooled: aiohttp.ClientSession | None = None  # keepalive: true
    targets: dict[tuple[object, ...], HttpTarget] = field(default_factory=dict)
    # Made on the first verified TLS probe run in the loop: the system's CA certificates
    # are ~0.8 MB of RSS, and most daemons run such probes in a worker or not at all.
    _verifying: ssl.SSLContext | None = None
    _loading: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def tls(self, probe: Probe) -> ssl.SSLContext:
        if not probe.tls_verify:
            return self.insecure
        if self._verifying is None:
            async with self._loading:
                if self._verifying is None:
                    # Reading the certificates takes 30-90 ms: not on the loop.
                    self._verifying = await asyncio.to_thread(ssl.create_default_context)
        return self._verifying


class ProbeKind(Protocol):
    """One probe type. Its methods may raise; the prober turns every failure into a
    result with `error` set and bounds `run` by the probe's timeout."""

    def job(self, url: str, probe: Probe, context: ProbeContext) -> Job | None:
        """What a probe worker process runs for this probe (it times the job out
        itself), or None when only the loop can run it."""
        ...

    async def run(
        self, url: str, probe: Probe, context: ProbeContext, at: float, started: float
    ) -> ProbeResult:
        """Probe `url` in the loop. `at` is the wall clock and `started` the
        perf_counter when the probe began, before it waited for a slot."""
        ...
