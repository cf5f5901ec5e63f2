"""Probe workers, the daemon's side: processes that do the network part of probes.

A probe's connect, send, read and close cost the event loop more than anything
else the daemon does for it (about 0.25 ms of loop time each), and a fleet of
10,000 instances probed every 10 s asks for 1,000 a second: a quarter of the
loop that serves registrations and heartbeats. So the daemon sends each probe
(`Job`: where to connect, the request's bytes already built and checked) to a
worker process over a pipe, and gets back its `Answer` (status, a capped body,
timings, the error); conditions, health, SLOs and storage stay in the daemon.
Both ends batch: every job or answer ready within BATCH_DELAY goes as one frame,
so a thousand probes a second cost each side about a hundred writes and reads a
second, not a thousand (a pipe write and the wake-up it causes on the other side
cost more than marshalling the job). An answer carries the body only when a
condition reads it, and the daemon's side watches for a stalled worker with one
timer per worker, not one per job.

The worker process is probing/worker.py; the frames between them, frames.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from monitor.probing.frames import BATCH_DELAY, Batch, FrameReader
from monitor.probing.kinds.http_wire import short_text

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a worker that ended is started again; doubles
WATCH_EVERY = 1.0  # seconds between checks for a job its worker should have answered


class Job(NamedTuple):
    """A probe for a worker, sent as a plain tuple in this order (worker.py reads it so)."""

    id: int
    host: str
    port: int
    tls: bool  # TLS: with a certificate check when `verify`
    verify: bool
    request: bytes | None  # None: connect (and handshake), nothing sent: tcp and tls probes
    cap: int  # body bytes read at most
    timeout: float
    body: bool = True  # the answer carries the body (read either way): a condition reads it


class Answer(NamedTuple):
    """A worker's answer to a Job, sent as a plain tuple in this order."""

    id: int
    at: float  # wall clock at the start
    response_time: float
    connected: bool
    status: int | None
    body: bytes
    certificate_expires_at: float | None
    error: str | None


class _Batcher:
    """Everything `add`ed within `delay` seconds of the first is written as one frame."""

    def __init__(self, write: Callable[[bytes], None], delay: float = BATCH_DELAY) -> None:
        self._write, self._delay = write, delay
        self._batch = Batch()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: tuple[object, ...], size: int = 0) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._flush)
        if self._batch.add(item, size):
            self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        frame = self._batch.take()
        if frame is not None:
            self._write(frame)


class WorkerGone(Exception):
    """The worker running a probe exited, or stalled and was killed, before answering."""


# Takes a job's answer, or None: its worker exited, or stalled and was killed, first.
Done = Callable[[Answer | None], object]


def _tell(done: Done, answer: Answer | None) -> None:
    try:
        done(answer)
    except Exception:  # the taker's fault must not stop the answers behind it
        log.exception("a probe's answer could not be taken")


class _Pipe(asyncio.SubprocessProtocol):
    def __init__(self, pool: ProbeWorkers, slot: int) -> None:
        self.pool, self.slot = pool, slot
        # Jobs sent and not answered: who takes the answer, when (loop time) the worker
        # has stalled if it has not answered, and that limit in seconds (for the log).
        self.pending: dict[int, tuple[Done, float, float]] = {}
        self._watch: asyncio.TimerHandle | None = None
        self.frames = FrameReader(self._answer)
        self.transport: asyncio.SubprocessTransport | None = None
        self.jobs: _Batcher | None = None
        self.gone = asyncio.Event()
        self.started = time.monotonic()
        self.usable = True  # False once no answer can come: no job is sent to it any more

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or not isinstance(data, bytes):
            return
        try:
            self.frames.feed(data)
        except Exception as exc:  # a frame we cannot read: this pipe is out of step for good
            self.kill(f"sent a frame the daemon cannot read ({short_text(exc)})")

    def _answer(self, item: Any) -> None:
        waiting = self.pending.pop(item[0], None)
        if waiting is None:
            return
        try:
            answer = Answer(*item)
        except TypeError:  # out of step: the pipe is killed, and this job failed with it
            _tell(waiting[0], None)
            raise
        _tell(waiting[0], answer)

    def send(self, job: tuple[object, ...], limit: float, done: Done) -> None:
        """Send `job` (a Job as a plain tuple); `done` takes its answer. The worker has
        stalled if it has not answered within `limit` s."""
        loop = asyncio.get_running_loop()
        self.pending[cast(int, job[0])] = (done, loop.time() + limit, limit)
        assert self.jobs is not None
        self.jobs.add(job)
        if self._watch is None:
            self._watch = loop.call_later(WATCH_EVERY, self._check)

    def _check(self) -> None:
        """One timer a worker, not one a job: kill the worker once a job is overdue (the
        worker times each probe out itself, so an overdue answer means it stalled)."""
        self._watch = None
        now = asyncio.get_running_loop().time()
        for _, deadline, limit in self.pending.values():
            if deadline < now:
                self.kill(f"did not answer a probe within {limit:g}s")
                self._fail_pending()
                return
        if self.pending:
            self._watch = asyncio.get_running_loop().call_later(WATCH_EVERY, self._check)

    def kill(self, why: str) -> None:
        """Stop using this worker and end it; its probes in flight raise WorkerGone."""
        if self.pool.retire(self):
            log.warning("probe worker %d %s; killing it", self.slot, why)
        if self.transport is not None and self.transport.get_returncode() is None:
            self.transport.kill()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:  # no answer can come any more (every one sent has been read)
            self._fail_pending()

    def process_exited(self) -> None:
        self._fail_pending()
        self.gone.set()
        self.pool.exited(self)

    def _fail_pending(self) -> None:
        # Out of use first: a job's `done` may send another at once (a probe waiting for a
        # slot, prober.Slots), which must go to another worker or none, never to this one.
        self.usable = False
        self.pool.withdraw(self)
        pending, self.pending = self.pending, {}
        for done, _, _ in pending.values():
            _tell(done, None)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


def _worker_argv() -> list[str]:
    """`-P`: the working directory does not go first on the worker's path, so a
    `monitor` package wherever the daemon was started cannot stand in for ours. `-S`: no
    `site` (its .pth files' import hooks cost ~0.7 MB of RSS); the daemon's path, which
    `site` made, comes in PYTHONPATH (`_worker_environment`)."""
    return [sys.executable, "-P", "-S", "-m", "monitor.probing.worker"]


def _worker_environment() -> dict[str, str]:
    """The daemon's own module path, in its order: the worker imports exactly the
    modules the daemon did (a checkout, an installed wheel, a venv alike)."""
    return os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


class ProbeWorkers:
    """`count` probe worker processes; `run` sends a job to the one with the fewest in
    flight. A worker that exits, stalls (no answer within a job's timeout plus
    `grace`) or sends what cannot be read is killed and started again, after a
    delay that doubles while they keep failing (1 s to a minute); its probes in
    flight raise WorkerGone."""

    def __init__(self, count: int, *, grace: float = 5.0) -> None:
        self.count, self.grace = count, grace
        self._pipes: list[_Pipe | None] = [None] * count
        self._live: list[_Pipe] = []  # the pipes in use, kept as they start and end
        self._failures = [0] * count
        self._restarts: set[asyncio.Task[None]] = set()
        self._ids = 0
        self._closing = False

    @property
    def ready(self) -> bool:
        return bool(self._live)

    async def start(self) -> None:
        for slot in range(self.count):
            try:
                await self._spawn(slot)
            except OSError as exc:
                log.error("probe worker %d could not start: %s", slot, exc)
                self._restart(slot)

    async def _spawn(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        pipe = _Pipe(self, slot)
        transport, _ = await loop.subprocess_exec(
            lambda: pipe,
            *_worker_argv(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the daemon's own stderr: a worker's traceback lands in its log
            env=_worker_environment(),
        )
        # uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance check.
        stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
        pipe.jobs = _Batcher(stdin.write)
        if self._closing:
            transport.kill()
            return
        self._pipes[slot] = pipe
        self._refresh()

    def retire(self, pipe: _Pipe) -> bool:
        """Take `pipe` out of use (it is ending); False if it already was."""
        if self._pipes[pipe.slot] is not pipe:
            return False
        self._pipes[pipe.slot] = None
        self._refresh()
        if not self._closing:
            # A worker that lived a minute was fine: its successor starts at once.
            lived = time.monotonic() - pipe.started
            self._failures[pipe.slot] = 0 if lived > 60 else self._failures[pipe.slot] + 1
            self._restart(pipe.slot)
        return True

    def withdraw(self, pipe: _Pipe) -> None:
        """Send `pipe` no more jobs (its answers can no longer come); `retire` follows."""
        self._refresh()

    def _refresh(self) -> None:
        self._live = [pipe for pipe in self._pipes if pipe is not None and pipe.usable]

    def exited(self, pipe: _Pipe) -> None:
        code = pipe.transport.get_returncode() if pipe.transport else None
        if self.retire(pipe) and not self._closing:  # closing ends them: no news
            log.warning("probe worker %d exited (code %s); starting another", pipe.slot, code)

    def _restart(self, slot: int) -> None:
        task = asyncio.get_running_loop().create_task(self._respawn(slot))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _respawn(self, slot: int) -> None:
        while not self._closing:
            await asyncio.sleep(min(60.0, RESTART_DELAY * 2 ** max(0, self._failures[slot] - 1)))
            try:
                await self._spawn(slot)
                return
            except OSError as exc:
                self._failures[slot] += 1
                log.error("probe worker %d could not start: %s", slot, exc)

    def submit(self, job: Job, done: Done) -> None:
        """Send `job` to the worker with the fewest in flight; `done` takes its answer on
        the loop, or None when no worker runs or its worker ends or stalls first."""
        live = self._live
        if not live:
            _tell(done, None)
            return
        pipe = live[0] if len(live) == 1 else min(live, key=lambda p: len(p.pending))
        self._ids += 1
        pipe.send((self._ids, *job[1:]), job.timeout + self.grace, done)

    async def run(self, job: Job) -> Answer:
        """`submit`, awaited. Raises WorkerGone when no worker runs, or its worker ends
        or stalls first."""
        future: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()

        def done(answer: Answer | None) -> None:
            if not future.done():
                future.set_result(answer)

        self.submit(job, done)
        answer = await future
        if answer is None:
            raise WorkerGone()
        return answer

    async def close(self) -> None:
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        pipes = [pipe for pipe in self._pipes if pipe is not None and pipe.transport is not None]
        for pipe in pipes:
            stdin = pipe.transport.get_pipe_transport(0) if pipe.transport else None
            if stdin is not None:
                stdin.close()  # end of input: the worker exits
        await asyncio.gather(*(self._ended(pipe) for pipe in pipes))
        self._pipes = [None] * self.count
        self._live = []

    @staticmethod
    async def _ended(pipe: _Pipe) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pipe.gone.wait(), 2.0)
        if pipe.transport is not None:
            if pipe.transport.get_returncode() is None:
                pipe.transport.kill()
            pipe.transport.close()
