"""The lean HTTP probe on the daemon's own loop: one fresh connection, one request.

Used when no probe worker runs (or none is ready); the workers run the same
exchange on their own loop (probing/worker.py). Both read the response with
http_wire.ResponseReader.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import cast

from monitor.probing.kinds.http_wire import (
    ProbeProtocolError,
    ResponseReader,
    peer_certificate_expiry,
)


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """Where to connect and the request's bytes, built and checked by the daemon
    (probes.build_target)."""

    host: str
    port: int
    tls: bool
    request: bytes


@dataclass(slots=True)
class HttpAnswer:
    status: int
    body: bytes
    certificate_expires_at: float | None


class _Exchange(asyncio.Protocol):
    def __init__(self, request: bytes, cap: int, done: asyncio.Future[None]) -> None:
        self.request, self.done = request, done
        self.response = ResponseReader(cap)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            complete = self.response.feed(data)
        except ProbeProtocolError as exc:
            self._finish(exc)
            return
        if complete:
            self._finish(None)

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        try:
            self.response.end()
        except ProbeProtocolError as end:
            self._finish(exc or end)
        else:
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def exchange(target: HttpTarget, *, cap: int, context: ssl.SSLContext | None) -> HttpAnswer:
    """Connect, send, read. Raises OSError/ssl errors/ProbeProtocolError; the caller times out."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, protocol = await loop.create_connection(
        lambda: _Exchange(target.request, cap, done),
        target.host,
        target.port,
        ssl=context if target.tls else None,
        server_hostname=target.host if target.tls else None,
    )
    try:
        expires = certificate_expiry(transport) if target.tls else None
        await done
        response = protocol.response
        return HttpAnswer(response.status, response.body(), expires)
    finally:
        transport.close()


async def connect_only(host: str, port: int, *, context: ssl.SSLContext | None) -> float | None:
    """Connect (and handshake with `context`), then close: a tcp or tls probe. Returns the
    certificate's expiry under TLS. Raises OSError/ssl errors; the caller times out."""
    _, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None
    )
    try:
        return certificate_expiry(writer.transport) if context else None
    finally:
        writer.close()


def certificate_expiry(transport: asyncio.BaseTransport | None) -> float | None:
    """When the peer's certificate expires (wall clock); None without a verified TLS peer."""
    if transport is None:
        return None
    return peer_certificate_expiry(transport.get_extra_info("ssl_object"))
