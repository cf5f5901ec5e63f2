"""Probes: http, tcp and tls checks of one instance, each bounded by its own timeout.

A fresh connection per probe by default, so DNS, connect and the TLS
handshake are exercised every time (what users feel when the pool is cold);
`keepalive: true` reuses connections for services where that is the point.
A probe never raises: every failure is a result with `error` set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from monitor.probing.conditions import MISSING, Condition, parse_conditions
from monitor.probing.kinds.http_wire import (
    HttpTarget,
    ProbeProtocolError,
    certificate_expiry,
    connect_only,
    describe_os_error,
    exchange,
    short_text,
)
from monitor.probing.worker import Job, ProbeWorkers, WorkerGone
from registry import ProbeSpec
from registry.model import encode_request_target, request_problem

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024
MAX_CACHED_TARGETS = 100_000
MAX_LOGGED_FAULTS = 1000
USER_AGENT = "hms-mgmt-probe/1"


@dataclass(frozen=True, kw_only=True)
class Probe:
    """Probe settings with every default filled in, conditions parsed."""

    type: Literal["http", "tcp", "tls", "none"] = "http"
    method: str = "GET"
    path: str | None = None  # None: the instance URL's own path
    headers: tuple[tuple[str, str], ...] = ()
    conditions: tuple[Condition, ...] = ()
    interval: float = 10.0
    timeout: float = 2.0
    down_interval: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 2
    warning_latency: float | None = None
    warning_certificate: float | None = None
    keepalive: bool = False
    tls_verify: bool = True
    follow_redirects: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY


DEFAULT_CONDITIONS: dict[str, tuple[str, ...]] = {
    "http": ("[STATUS] < 400",),
    "tcp": ("[CONNECTED] == true",),
}
DEFAULT_CONDITIONS["tls"] = DEFAULT_CONDITIONS["tcp"]
DEFAULT_CONDITIONS["none"] = ()


def resolve_probe(layers: Sequence[ProbeSpec | None]) -> Probe:
    """Merge probe settings, later layers winning: defaults, service, instance.

    Raises ConditionError for a condition that does not parse.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:  # iterating a model gives raw values (timedelta, not "10s")
            merged.update((name, value) for name, value in layer if value is not None)
    kind = merged.get("type", "http")
    texts = merged.pop("conditions", None) or DEFAULT_CONDITIONS[kind]
    if kind == "none":
        texts = ()
    for name in ("interval", "timeout", "down_interval", "warning_latency", "warning_certificate"):
        if isinstance(merged.get(name), timedelta):
            merged[name] = merged[name].total_seconds()
    if "headers" in merged:
        merged["headers"] = tuple(merged["headers"].items())
    return Probe(conditions=parse_conditions(texts), **merged)


@dataclass(slots=True, kw_only=True)
class ProbeResult:
    at: float  # wall clock at the start
    response_time: float  # seconds
    connected: bool
    status: int | None = None
    body: bytes = b""
    certificate_expires_at: float | None = None  # wall clock
    error: str | None = None
    _json: Any = field(default=MISSING, repr=False)

    @property
    def certificate_expires_in(self) -> float | None:
        if self.certificate_expires_at is None:
            return None
        return self.certificate_expires_at - self.at

    @property
    def body_text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def body_json(self) -> Any:
        if self._json is MISSING:
            try:
                self._json = json.loads(self.body) if self.body else None
            except ValueError:
                self._json = None
        return self._json


class ProbeRequestError(ValueError):
    """The probe's request cannot be built from its settings (a path or header that
    would not be one request): the probe fails with this reason, nothing is sent."""


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


class Prober:
    """Runs probes; bounded global concurrency; owns the HTTP client sessions."""

    def __init__(self, *, concurrency: int = 1000, workers: int = 0) -> None:
        """`workers`: probe worker processes doing the network part of fresh-connection
        http, tcp and tls probes (worker.py); 0 runs every probe in the loop."""
        self._slots = asyncio.Semaphore(concurrency)
        self._workers = ProbeWorkers(workers) if workers else None
        self._fresh: aiohttp.ClientSession | None = None
        self._pooled: aiohttp.ClientSession | None = None
        self._insecure = ssl.create_default_context()
        self._insecure.check_hostname = False
        self._insecure.verify_mode = ssl.CERT_NONE
        self._verifying = ssl.create_default_context()
        self._targets: dict[tuple[object, ...], HttpTarget] = {}
        self._logged: set[tuple[str, str]] = set()  # (url, fault) already in the log

    async def start(self) -> None:
        if self._workers is not None:
            await self._workers.start()
        headers = {"User-Agent": USER_AGENT}
        fresh = _CertificateRecorder(force_close=True, use_dns_cache=False, limit=0)
        pooled = _CertificateRecorder(limit=0, ttl_dns_cache=10)
        # DummyCookieJar: probes are stateless, a cookie from one must not change the next.
        self._fresh = aiohttp.ClientSession(
            connector=fresh, headers=headers, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._pooled = aiohttp.ClientSession(
            connector=pooled, headers=headers, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        if self._workers is not None:
            await self._workers.close()
        for session in (self._fresh, self._pooled):
            if session is not None:
                await session.close()

    async def run(self, url: str, probe: Probe) -> ProbeResult:
        """Probe `url`; returns within `probe.timeout` (plus scheduling), never raises."""
        at, started = time.time(), time.perf_counter()
        async with self._slots:
            try:
                if self._workers is not None and self._workers.ready and _lean(probe):
                    return await self._remote(self._workers, url, probe)
                async with asyncio.timeout(probe.timeout):
                    if _lean(probe):
                        return await self._http_lean(url, probe, at, started)
                    if probe.type == "http":
                        return await self._http(url, probe, at, started)
                    return await self._connect(url, probe, at, started)
            except TimeoutError:
                error = f"timeout after {probe.timeout:g}s"
            except WorkerGone:  # not run again here: the request may have been sent
                error = "probe worker ended before answering"
            except ProbeRequestError as exc:
                error = f"request not sent: {exc}"
            except (aiohttp.ClientError, OSError, ProbeProtocolError) as exc:
                error = _describe(exc)
            except Exception as exc:  # one probe's fault must not end its loop
                error = f"probe failed: {_describe(exc)}"
                self._log_fault(url, type(exc).__name__, error)
            return ProbeResult(
                at=at, response_time=time.perf_counter() - started, connected=False, error=error
            )

    def _log_fault(self, url: str, kind: str, error: str) -> None:
        """One line per target and kind of fault, not a traceback every interval."""
        if (url, kind) in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_FAULTS:
            self._logged.clear()
        self._logged.add((url, kind))
        log.warning("probe of %s failed unexpectedly (%s): %s", url, kind, error)

    async def _remote(self, workers: ProbeWorkers, url: str, probe: Probe) -> ProbeResult:
        """The probe run by a worker process, which times it out itself. Raises
        WorkerGone, ProbeRequestError."""
        if probe.type == "http":
            target = self._target(url, probe)
            host, port, tls, request = target.host, target.port, target.tls, target.request
        else:
            host, port = _address(url, probe)
            tls, request = probe.type == "tls", None
        cap, timeout = probe.max_body_bytes, probe.timeout
        job = Job(0, host, port, tls, probe.tls_verify, request, cap, timeout)
        answer = await workers.run(job)  # bounded: a stalled worker is killed
        if answer.error is not None and answer.error.startswith("probe failed:"):
            self._log_fault(url, "worker", answer.error)
        return ProbeResult(
            at=answer.at,
            response_time=answer.response_time,
            connected=answer.connected,
            status=answer.status,
            body=answer.body,
            certificate_expires_at=answer.certificate_expires_at,
            error=answer.error,
        )

    def _target(self, url: str, probe: Probe) -> HttpTarget:
        key = (url, probe.method, probe.path, probe.headers)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= MAX_CACHED_TARGETS:
                self._targets.clear()
            target = build_target(url, probe.method, probe.path, probe.headers, USER_AGENT)
            self._targets[key] = target
        return target

    async def _http_lean(self, url: str, probe: Probe, at: float, started: float) -> ProbeResult:
        target = self._target(url, probe)
        context = self._verifying if probe.tls_verify else self._insecure
        answer = await exchange(target, cap=probe.max_body_bytes, context=context)
        return ProbeResult(
            at=at,
            response_time=time.perf_counter() - started,
            connected=True,
            status=answer.status,
            body=answer.body,
            certificate_expires_at=answer.certificate_expires_at,
        )

    async def _http(self, url: str, probe: Probe, at: float, started: float) -> ProbeResult:
        session = self._pooled if probe.keepalive else self._fresh
        assert session is not None, "Prober.start() first"
        check_request(probe.path or urlsplit(url).path, probe.headers)
        target = _with_path(url, probe.path)
        context = self._verifying if probe.tls_verify else self._insecure
        seen: list[float | None] = []
        _CERTIFICATES.set(seen)  # this task's context: concurrent probes do not mix
        async with session.request(
            probe.method,
            target,
            headers=dict(probe.headers),
            allow_redirects=probe.follow_redirects,
            ssl=context if target.startswith("https:") else True,
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

    async def _connect(self, url: str, probe: Probe, at: float, started: float) -> ProbeResult:
        host, port = _address(url, probe)
        context = None
        if probe.type == "tls":
            context = self._verifying if probe.tls_verify else self._insecure
        expires = await connect_only(host, port, context=context)
        return ProbeResult(
            at=at,
            response_time=time.perf_counter() - started,
            connected=True,
            certificate_expires_at=expires,
        )


def _lean(probe: Probe) -> bool:
    """A fresh connection, one request, no redirects: what a probe worker can run."""
    return probe.type in ("tcp", "tls") or (
        probe.type == "http" and not (probe.keepalive or probe.follow_redirects)
    )


def _address(url: str, probe: Probe) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" or probe.type == "tls" else 80)
    return parts.hostname or "", port


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


def _describe(exc: BaseException) -> str:
    described = describe_os_error(exc)
    if described is not None:
        return described
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"certificate: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect: {exc.os_error.strerror or exc.os_error}"
    return short_text(exc)
