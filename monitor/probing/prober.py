"""The prober: runs each probe through its kind (kinds/), in a probe worker when
one can take it, each bounded by its own timeout.

A fresh connection per probe by default, so DNS, connect and the TLS
handshake are exercised every time (what users feel when the pool is cold);
`keepalive: true` reuses connections for services where that is the point.
A probe never raises: every failure is a result with `error` set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import aiohttp

from monitor.probing.abc import ProbeContext
from monitor.probing.kinds.http import open_sessions
from monitor.probing.kinds.http_wire import ProbeProtocolError, describe_os_error, short_text
from monitor.probing.kinds.table import KINDS
from monitor.probing.probe import Probe, ProbeRequestError, ProbeResult
from monitor.probing.workers import Answer, Job, ProbeWorkers, WorkerGone

log = logging.getLogger(__name__)

MAX_LOGGED_FAULTS = 1000


class Slots:
    """At most `limit` probes in flight: `try_take` one at once or not at all, `take` one
    when it is given back, or `queue` a callback handed one then (first come, first
    served, futures and callbacks alike)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiting: deque[asyncio.Future[None] | Callable[[], object]] = deque()
        self._handing = False  # in give's loop: a give from a callback only frees a slot

    def __len__(self) -> int:
        """How many wait for a slot."""
        return len(self._waiting)

    def try_take(self) -> bool:
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # `give` hands its slot over by setting the result
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot, cancelled before it could use it
            raise

    def queue(self, holder: Callable[[], object]) -> None:
        """`holder()` is called holding a slot once one is given back (it gives it back
        itself, and must not raise): a probe waiting without a task or a future."""
        self._waiting.append(holder)

    def give(self) -> None:
        self._free += 1
        if self._handing:
            return  # a holder gave its slot back at once (its worker is gone): handed below
        self._handing = True
        try:
            while self._free > 0 and self._waiting:
                waiter = self._waiting.popleft()
                if isinstance(waiter, asyncio.Future):
                    if not waiter.done():
                        self._free -= 1
                        waiter.set_result(None)
                else:
                    self._free -= 1
                    waiter()
        finally:
            self._handing = False


class Prober:
    """Runs probes; bounded global concurrency; owns the HTTP client sessions."""

    def __init__(self, *, concurrency: int = 1000, workers: int = 0) -> None:
        """`workers`: probe worker processes doing the network part of fresh-connection
        http, tcp and tls probes (worker.py); 0 runs every probe in the loop."""
        self._slots = Slots(concurrency)
        self._workers = ProbeWorkers(workers) if workers else None
        self._context = ProbeContext()
        self._logged: set[tuple[str, str]] = set()  # (url, fault) already in the log
        self._held: set[asyncio.Task[None]] = set()  # probes queued for a worker that ended

    async def start(self) -> None:
        if self._workers is not None:
            await self._workers.start()
        open_sessions(self._context)

    async def close(self) -> None:
        for task in list(self._held):
            task.cancel()
        await asyncio.gather(*self._held, return_exceptions=True)
        if self._workers is not None:
            await self._workers.close()
        for session in (self._context.fresh, self._context.pooled):
            if session is not None:
                await session.close()

    def send(self, url: str, probe: Probe, done: Callable[[ProbeResult], object]) -> bool:
        """Hand the probe of `url` to a worker process, at once or, every slot taken, when
        one is given back; `done` takes its result on the loop, within `probe.timeout`
        (plus the batching, plus that wait). False when a worker cannot run it (none, or a
        kind or setting only the loop runs): `run` it.

        The way a fleet is probed: no task, future or timer of its own per probe, also
        while the workers are saturated (a probe then waits as a callback)."""
        workers = self._workers
        if workers is None or not workers.ready:
            return False
        try:
            job = KINDS[probe.type].job(url, probe, self._context)
        except Exception:  # `run` turns it into a result with the reason
            job = None
        if job is None:
            return False

        def submit() -> None:
            if not workers.ready:  # its worker ended while it waited: the loop runs it
                self._run_held(url, probe, done)
                return
            at, started = time.time(), time.perf_counter()

            def answered(answer: Answer | None) -> None:
                self._slots.give()
                if answer is None:  # not run again here: the request may have been sent
                    done(_failed(at, started, "probe worker ended before answering"))
                else:
                    done(self._result(url, answer))

            workers.submit(job, answered)  # never raises: no worker answers None

        if self._slots.try_take():
            submit()
        else:
            self._slots.queue(submit)
        return True

    def _run_held(self, url: str, probe: Probe, done: Callable[[ProbeResult], object]) -> None:
        """`url` probed by a task that holds a slot already (given back when it ends)."""

        async def held() -> None:
            try:
                result = await self._probe(url, probe, time.time(), time.perf_counter())
            finally:
                self._slots.give()
            try:
                done(result)
            except Exception:
                log.exception("a probe's result could not be taken")

        task = asyncio.create_task(held(), name=f"probe:{url}")
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def run(self, url: str, probe: Probe) -> ProbeResult:
        """Probe `url`; returns within `probe.timeout` (plus scheduling), never raises."""
        at, started = time.time(), time.perf_counter()
        await self._slots.take()
        try:
            return await self._probe(url, probe, at, started)
        finally:
            self._slots.give()

    async def _probe(self, url: str, probe: Probe, at: float, started: float) -> ProbeResult:
        """The probe, holding a slot: in a worker when one runs, else on the loop."""
        try:
            kind = KINDS[probe.type]
            if self._workers is not None and self._workers.ready:
                job = kind.job(url, probe, self._context)
                if job is not None:
                    return await self._remote(self._workers, url, job)
            async with asyncio.timeout(probe.timeout):
                return await kind.run(url, probe, self._context, at, started)
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
        return _failed(at, started, error)

    def _log_fault(self, url: str, kind: str, error: str) -> None:
        """One line per target and kind of fault, not a traceback every interval."""
        if (url, kind) in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_FAULTS:
            self._logged.clear()
        self._logged.add((url, kind))
        log.warning("probe of %s failed unexpectedly (%s): %s", url, kind, error)

    async def _remote(self, workers: ProbeWorkers, url: str, job: Job) -> ProbeResult:
        """The probe run by a worker process, which times it out itself. Raises WorkerGone."""
        return self._result(url, await workers.run(job))  # bounded: a stalled one is killed

    def _result(self, url: str, answer: Answer) -> ProbeResult:
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


def _failed(at: float, started: float, error: str) -> ProbeResult:
    return ProbeResult(
        at=at, response_time=time.perf_counter() - started, connected=False, error=error
    )


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
