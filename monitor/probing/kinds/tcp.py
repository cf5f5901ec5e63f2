"""The tcp probe: a connection is made, nothing is sent."""

from __future__ import annotations

import time
from typing import ClassVar
from urllib.parse import urlsplit

from monitor.probing.abc import ProbeContext
from monitor.probing.kinds.http_exchange import connect_only
from monitor.probing.probe import Probe, ProbeResult
from monitor.probing.workers import Job


def address(url: str, *, tls: bool) -> tuple[str, int]:
    """Host and port of `url`; without a port, 443 for https and TLS probes, else 80."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" or tls else 80)
    return parts.hostname or "", port


class TcpKind:
    tls: ClassVar[bool] = False

    def job(self, url: str, probe: Probe, context: ProbeContext) -> Job | None:
        host, port = address(url, tls=self.tls)
        cap, timeout = probe.max_body_bytes, probe.timeout
        return Job(0, host, port, self.tls, probe.tls_verify, None, cap, timeout)

    async def run(
        self, url: str, probe: Probe, context: ProbeContext, at: float, started: float
    ) -> ProbeResult:
        host, port = address(url, tls=self.tls)
        tls = await context.tls(probe) if self.tls else None
        expires = await connect_only(host, port, context=tls)
        return ProbeResult(
            at=at,
            response_time=time.perf_counter() - started,
            connected=True,
            certificate_expires_at=expires,
        )
