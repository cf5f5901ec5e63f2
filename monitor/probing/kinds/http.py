"""The http probe: the lean exchange on a fresh connection (in a probe worker,
probing/worker.py, or on the loop, http_exchange.py), aiohttp when the probe keeps
connections alive or follows redirects."""

from __future__ import annotations

import time
from contextvars import ContextVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from monitor.probing.abc import ProbeContext
from monitor.probing.kinds.http_exchange import HttpTarget, certificate_expiry, exchange
from monitor.probing.probe import Probe, ProbeRequestError, ProbeResult
from monitor.probing.workers import Job
from registry.model import encode_request_target, request_problem

MAX_CACHED_TARGETS = 100_000
USER_AGENT = "hms-mgmt-probe/1"


class HttpKind:
    def job(self, url: str, probe: Probe, context: ProbeContext) -> Job | None:
        if probe.keepalive or probe.follow_redirects:
            return None
        target = _target(context, url, probe)
        cap, timeout = probe.max_body_bytes, probe.timeout
        return Job(
            0,
            target.host,
            target.port,
            target.tls,
            probe.tls_verify,
            target.request,
            cap,
            timeout,
            probe.reads_body,
        )

    async def run(
        self, url: str, probe: Probe, context: ProbeContext, at: float, started: float
    ) -> ProbeResult:
        if probe.keepalive or probe.follow_redirects:
            return await _through_aiohttp(url, probe, context, at, started)
        target = _target(context, url, probe)
        tls = await context.tls(probe) if target.tls else None
        answer = await exchange(target, cap=probe.max_body_bytes, context=tls)
        return ProbeResult(
            at=at,
            response_time=time.perf_counter() - started,
            connected=True,
            status=answer.status,
            body=answer.body,
            certificate_expires_at=answer.certificate_expires_at,
        )


def open_sessions(context: ProbeContext) -> None:
    """The fresh and pooled aiohttp sessions; the prober closes them."""
    headers = {"User-Agent": USER_AGENT}
    fresh = _CertificateRecorder(force_close=True, use_dns_cache=False, limit=0)
    pooled = _CertificateRecorder(limit=0, ttl_dns_cache=10)
    # DummyCookieJar: probes are stateless, a cookie from one must not change the next.
    context.fresh = aiohttp.ClientSession(
        connector=fresh, headers=headers, cookie_jar=aiohttp.DummyCookieJar()
    )
    context.pooled = aiohttp.ClientSession(
        connector=pooled, headers=headers, cookie_jar=aiohttp.DummyCookieJar()
    )


def check_request(target: str, headers: tuple[tuple[str, str], ...]) -> None:
    """Raises ProbeRequestError when `target` or a header would not be one request."""
    problem = request_problem(target or "/", headers)  # an empty path is sent as /
    if problem is not None:
        raise ProbeRequestError(problem)


def build_target(
    url: str, method: str, path: str | None, headers: tuple[tuple[str, str], ...], agent: str
) -> HttpTarget:
    """Raises ProbeRequestError for a path or header that cannot be sent as it is.

    Registrations and config are validated already; this holds for anything stored
    before that validation existed, and for URLs (urlsplit keeps CR/LF)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = path if path is not None else (parts.path or "/")
    if path is None and parts.query:
        target += "?" + parts.query
    check_request(target, headers)
    host_header = f"[{host}]" if ":" in host else host
    if parts.port:
        host_header += f":{parts.port}"
    # A configured Host (virtual hosting) replaces ours: two Host lines are invalid.
    host_header = next((v for n, v in headers if n.lower() == "host"), host_header)
    lines = [
        f"{method} {encode_request_target(target)} HTTP/1.1",
        f"Host: {host_header}",
        f"User-Agent: {agent}",
        "Accept: */*",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers if name.lower() != "host"),
    ]
    try:
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:  # a host name outside Latin-1 (an IDN written as Unicode)
        raise ProbeRequestError("the request has characters outside Latin-1") from None
    return HttpTarget(host, port, tls, request)


def _target(context: ProbeContext, url: str, probe: Probe) -> HttpTarget:
    """The request's bytes, built once per target and kept."""
    key = (url, probe.method, probe.path, probe.headers)
    target = context.targets.get(key)
    if target is None:
        if len(context.targets) >= MAX_CACHED_TARGETS:
            context.targets.clear()
        target = build_target(url, probe.method, probe.path, probe.headers, USER_AGENT)
        context.targets[key] = target
    return target


async def _through_aiohttp(
    url: str, probe: Probe, context: ProbeContext, at: float, started: float
) -> ProbeResult:
    session = context.pooled if probe.keepalive else context.fresh
    assert session is not None, "Prober.start() first"
    check_request(probe.path or urlsplit(url).path, probe.headers)
    target = _with_path(url, probe.path)
    seen: list[float | None] = []
    _CERTIFICATES.set(seen)  # this task's context: concurrent probes do not mix
    tls = await context.tls(probe) if target.startswith("https:") else True
    async with session.request(
        probe.method,
        target,
        headers=dict(probe.headers),
        allow_redirects=probe.follow_redirects,
        ssl=tls,
        auto_decompress=True,
    ) as response:
        body = await response.content.read(probe.max_body_bytes)
        return ProbeResult(
            at=at,
            response_time=time.perf_counter() - started,
            connected=True,
            status=response.status,
            body=body,
            certificate_expires_at=seen.pop() if seen else None,
        )


_CERTIFICATES: ContextVar[list[float | None] | None] = ContextVar("certificates", default=None)


class _CertificateRecorder(aiohttp.TCPConnector):
    """Notes the peer certificate's expiry when a connection is handed out; a small
    response releases (and with force_close, closes) it before the caller could look."""

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        seen = _CERTIFICATES.get()
        if seen is not None:
            seen.append(certificate_expiry(connection.transport))
        return connection


def _with_path(url: str, path: str | None) -> str:
    if path is None:
        return url
    target = encode_request_target(path)
    parts = urlsplit(url)
    return parts._replace(path=target.split("?", 1)[0], query=target.partition("?")[2]).geturl()
