"""A probe worker process: `python -m monitor.probing.worker`, started by the daemon
(workers.py). It reads jobs from stdin and writes answers to stdout (frames.py).

Its loop is its own, over `selectors`, not asyncio: the worker counts in the
daemon's RSS (bench.registry sums every process the daemon runs), and asyncio with
`ssl` and uvloop made a worker 22 MB where the interpreter alone is 10. `ssl` loads
with the first TLS job, resolver threads with the first host that is not an address.

Each probe is a small state machine on a non-blocking socket: connect (to each of
the host's addresses in turn, as asyncio does), the TLS handshake, send, read until
http_wire.ResponseReader has the response. The job's timeout bounds all of it,
resolution included. Answers wait up to BATCH_DELAY for company, as the jobs did.

A job is a plain tuple in workers.Job's order: id, host, port, tls, verify, request
(None: connect only), cap, timeout, body. An answer, in workers.Answer's order: id,
at, response_time, connected, status, body, certificate_expires_at, error.
"""

from __future__ import annotations

import errno
import heapq
import os
import selectors
import socket
import sys
import time
from collections import deque

from monitor.probing.frames import BATCH_DELAY, Batch, FrameReader
from monitor.probing.kinds.http_wire import (
    ProbeProtocolError,
    ResponseReader,
    describe_os_error,
    insecure_context,
    peer_certificate_expiry,
    short_text,
)

TYPE_CHECKING = False  # typing itself is not imported: the worker stays small
if TYPE_CHECKING:
    import ssl
    from typing import Any

    Address = tuple[int, int, int, str, Any]  # as socket.getaddrinfo gives them

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
RECEIVE = 64 * 1024  # bytes a recv asks for
JOBS_READ = 256 * 1024  # bytes a read of the daemon's pipe asks for
RESOLVERS = 4  # threads for getaddrinfo, started on the first host name
# Finished probes leave the timeout heap when they reach its head; past this many
# behind a live one, and half the heap, they are swept out: at 1,000 probes/s with a
# 1 h timeout they would hold gigabytes.
SWEEP_FINISHED = 1024
IN_PROGRESS = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN}
# Where a probe is.
RESOLVING, CONNECTING, HANDSHAKING, SENDING, READING = range(5)


class _Probe:
    __slots__ = (
        "addresses",
        "at",
        "body",
        "cap",
        "done",
        "errors",
        "events",
        "expires",
        "host",
        "id",
        "phase",
        "port",
        "request",
        "response",
        "sent",
        "sock",
        "started",
        "timeout",
        "tls",
        "verify",
    )

    def __init__(self, job: tuple[Any, ...]) -> None:
        (
            self.id,
            self.host,
            self.port,
            self.tls,
            self.verify,
            self.request,
            self.cap,
            self.timeout,
            self.body,
        ) = job
        self.at, self.started = time.time(), time.perf_counter()
        self.phase = RESOLVING
        self.addresses: list[Address] = []
        self.errors: list[OSError] | None = None  # from addresses that would not connect
        self.sock: socket.socket | None = None
        self.events = 0  # what the selector waits for on `sock`; 0: not registered
        self.response: ResponseReader | None = None
        self.sent = 0
        self.expires: float | None = None
        self.done = False


class _Worker:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.closed = False
        self.timeouts: list[tuple[float, int, _Probe]] = []
        self.finished = 0  # probes in `timeouts` that are done
        self.sequence = 0
        self.answers = Batch()
        self.flush_at: float | None = None  # when `answers` goes (None: it is empty)
        self.out = bytearray()  # answers the pipe to the daemon has not taken yet
        self.frames = FrameReader(self.take)
        # Made on the first TLS job: the verifying one holds the system's CA certificates (~1 MB).
        self.contexts: dict[bool, ssl.SSLContext] = {}
        self.resolver: _Resolver | None = None
        os.set_blocking(0, False)
        os.set_blocking(1, False)
        self.selector.register(0, READ, self._read_jobs)

    def run(self) -> None:
        select, timeouts = self.selector.select, self.timeouts
        while not self.closed:
            wake = timeouts[0][0] if timeouts else None
            if self.flush_at is not None and (wake is None or self.flush_at < wake):
                wake = self.flush_at
            for key, mask in select(None if wake is None else max(0.0, wake - time.monotonic())):
                if type(key.data) is _Probe:
                    self._advance(key.data)
                else:
                    key.data(mask)
            now = time.monotonic()
            # Out of the heap: probes due (timed out now) and, at its head, finished ones,
            # so the next wait is for the first live deadline, not a wake-up per probe.
            while timeouts and (timeouts[0][0] <= now or timeouts[0][2].done):
                probe = heapq.heappop(timeouts)[2]
                if not probe.done:
                    self._finish(probe, f"timeout after {probe.timeout:g}s")
                self.finished -= 1
            if self.finished > SWEEP_FINISHED and 2 * self.finished > len(timeouts):
                timeouts[:] = [item for item in timeouts if not item[2].done]
                heapq.heapify(timeouts)
                self.finished = 0
            if self.flush_at is not None and self.flush_at <= now:
                self._flush()

    # -- jobs in, answers out ---------------------------------------------------------

    def _read_jobs(self, mask: int) -> None:
        try:
            data = os.read(0, JOBS_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the daemon closed the pipe or exited: so do we
            self.closed = True
            return
        try:
            self.frames.feed(data)
        except Exception:  # out of step with the daemon: end, it starts another
            import traceback

            print("probe worker: unreadable frame from the daemon", file=sys.stderr)
            traceback.print_exc()
            self.closed = True

    def take(self, job: tuple[Any, ...]) -> None:
        probe = _Probe(job)
        self.sequence += 1
        heapq.heappush(self.timeouts, (time.monotonic() + probe.timeout, self.sequence, probe))
        try:
            addresses = _numeric(probe.host, probe.port)
            if addresses is None:
                if self.resolver is None:
                    self.resolver = _Resolver(self)
                self.resolver.resolve(probe)
                return
            probe.addresses = addresses
            self._connect(probe)
        except Exception as exc:
            self._failed(probe, exc)

    def resolved(self, probe: _Probe, addresses: list[Address] | BaseException) -> None:
        if probe.done:  # timed out while its name was being resolved
            return
        try:
            if isinstance(addresses, BaseException):
                raise addresses
            probe.addresses = addresses
            self._connect(probe)
        except Exception as exc:
            self._failed(probe, exc)

    def _answer(self, reply: tuple[object, ...], size: int) -> None:
        if self.flush_at is None:
            self.flush_at = time.monotonic() + BATCH_DELAY
        if self.answers.add(reply, size):
            self._flush()

    def _flush(self) -> None:
        self.flush_at = None
        frame = self.answers.take()
        if frame is not None:
            self._write(frame)

    def _write(self, data: bytes) -> None:
        if self.out:
            self.out += data
            return
        try:
            written = os.write(1, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the daemon is gone
            self.closed = True
            return
        if written < len(data):
            self.out += data[written:]
            self.selector.register(1, WRITE, self._drain)

    def _drain(self, mask: int) -> None:
        try:
            written = os.write(1, self.out)
        except BlockingIOError:
            return
        except OSError:
            self.closed = True
            return
        del self.out[:written]
        if not self.out:
            self.selector.unregister(1)

    # -- one probe ----------------------------------------------------------------------

    def _advance(self, probe: _Probe) -> None:
        """Its socket is ready for what the probe waits for."""
        try:
            phase = probe.phase
            if phase == READING:
                self._receive(probe)
            elif phase == CONNECTING:
                self._connected(probe)
            elif phase == HANDSHAKING:
                self._handshake(probe)
            else:
                self._send(probe)
        except Exception as exc:
            self._failed(probe, exc)

    def _connect(self, probe: _Probe) -> None:
        """Connect to the next of the probe's addresses; raise when none is left."""
        while probe.addresses:
            family, kind, proto, _, address = probe.addresses.pop(0)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                _failure(probe, exc)
                continue
            sock.setblocking(False)
            probe.sock, probe.phase = sock, CONNECTING
            code = sock.connect_ex(address)
            if code in IN_PROGRESS:
                self._want(probe, WRITE)
                return
            if code == 0:
                self._start(probe)
                return
            _failure(probe, OSError(code, os.strerror(code)))
            self._close(probe)
        raise _connect_error(probe.errors or [])

    def _connected(self, probe: _Probe) -> None:
        assert probe.sock is not None
        code = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            self._start(probe)
            return
        _failure(probe, OSError(code, os.strerror(code)))
        self._close(probe)
        self._connect(probe)

    def _start(self, probe: _Probe) -> None:
        """Connected: the handshake under TLS, else the request."""
        if probe.tls:
            self._unwatch(probe)  # wrapping hands the descriptor to a new socket object
            assert probe.sock is not None
            context = self._context(probe.verify)
            probe.sock = context.wrap_socket(
                probe.sock, server_hostname=probe.host, do_handshake_on_connect=False
            )
            probe.phase = HANDSHAKING
            self._handshake(probe)
        else:
            self._begin(probe)

    def _handshake(self, probe: _Probe) -> None:
        import ssl  # loaded already: the context that wrapped the socket made it

        sock = probe.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except OSError as exc:
            if wants := _wants(exc):
                self._want(probe, wants)
                return
            if _closed(exc):
                # Closed in the handshake (a balancer with no backend): worded as the
                # daemon's loop words it, so a probe fails alike wherever it ran.
                raise ConnectionResetError() from None
            raise
        probe.expires = peer_certificate_expiry(sock)
        self._begin(probe)

    def _begin(self, probe: _Probe) -> None:
        if probe.request is None:  # a tcp or tls probe: connected is all it asks
            self._finish(probe, None)
            return
        probe.response = ResponseReader(probe.cap)
        probe.phase = SENDING
        self._send(probe)

    def _send(self, probe: _Probe) -> None:
        assert probe.sock is not None and probe.request is not None
        request = probe.request[probe.sent :] if probe.sent else probe.request
        try:
            probe.sent += probe.sock.send(request)
        except BlockingIOError:
            self._want(probe, WRITE)
            return
        except OSError as exc:
            if not (wants := _wants(exc)):
                raise
            self._want(probe, wants)
            return
        if probe.sent < len(probe.request):
            self._want(probe, WRITE)
            return
        probe.phase = READING
        self._want(probe, READ)

    def _receive(self, probe: _Probe) -> None:
        sock, response = probe.sock, probe.response
        assert sock is not None and response is not None
        while True:  # under TLS a read may leave more decrypted than it returned
            try:
                data = sock.recv(RECEIVE)
            except BlockingIOError:
                self._want(probe, READ)
                return
            except OSError as exc:
                if wants := _wants(exc):
                    self._want(probe, wants)
                    return
                if response.head_end < 0 and not _closed(exc):
                    raise
                # TLS closed, or cut off in the body: what came is the answer, as in asyncio.
                data = b""
            if not data:
                response.end()
                self._finish(probe, None)
                return
            if response.feed(data):
                self._finish(probe, None)
                return

    def _failed(self, probe: _Probe, exc: BaseException) -> None:
        reason = describe_os_error(exc) or short_text(exc)
        if isinstance(exc, (OSError, ProbeProtocolError)):
            self._finish(probe, reason)
        else:  # one probe's fault must not end the worker
            self._finish(probe, f"probe failed: {reason}")

    def _finish(self, probe: _Probe, error: str | None) -> None:
        if probe.done:
            return
        probe.done = True
        self.finished += 1
        self._close(probe)
        elapsed = time.perf_counter() - probe.started
        status, body, expires = None, b"", None
        if error is None:
            expires = probe.expires
            if probe.response is not None:
                status, body = probe.response.status, probe.response.body()
        # It may wait in `timeouts` a while yet (run() drops it): only what the heap needs.
        probe.response = probe.request = probe.errors = None
        if not probe.body:
            body = b""
        reply = (probe.id, probe.at, elapsed, error is None, status, body, expires, error)
        self._answer(reply, len(body))

    # -- sockets ------------------------------------------------------------------------

    def _want(self, probe: _Probe, events: int) -> None:
        if probe.events == events:
            return
        if probe.events:
            self.selector.modify(probe.sock, events, probe)  # type: ignore[arg-type]
        else:
            self.selector.register(probe.sock, events, probe)  # type: ignore[arg-type]
        probe.events = events

    def _unwatch(self, probe: _Probe) -> None:
        if probe.events:
            self.selector.unregister(probe.sock)  # type: ignore[arg-type]
            probe.events = 0

    def _close(self, probe: _Probe) -> None:
        if probe.sock is not None:
            self._unwatch(probe)
            probe.sock.close()
            probe.sock = None

    def _context(self, verify: bool) -> ssl.SSLContext:
        context = self.contexts.get(verify)
        if context is None:
            import ssl

            make = ssl.create_default_context if verify else insecure_context
            context = self.contexts[verify] = make()
        return context


class _Resolver:
    """getaddrinfo in threads (it blocks), as asyncio runs it in its executor: each
    result is queued and a byte on a pipe wakes the worker's loop to take it."""

    def __init__(self, worker: _Worker) -> None:
        import queue
        import threading

        self.worker = worker
        self.jobs: queue.SimpleQueue[_Probe] = queue.SimpleQueue()
        self.results: deque[tuple[_Probe, list[Address] | BaseException]] = deque()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        worker.selector.register(self.wake_read, READ, self._take)
        for _ in range(RESOLVERS):
            threading.Thread(target=self._serve, daemon=True).start()

    def resolve(self, probe: _Probe) -> None:
        self.jobs.put(probe)

    def _serve(self) -> None:
        while True:
            probe = self.jobs.get()
            if probe.done:  # timed out while queued: a slow name must not hold the others up
                continue
            result: list[Address] | BaseException
            try:
                result = list(socket.getaddrinfo(probe.host, probe.port, type=socket.SOCK_STREAM))
            except Exception as exc:
                result = exc
            self.results.append((probe, result))
            # Not contextlib.suppress: the worker imports no more than it must.
            try:  # noqa: SIM105
                os.write(self.wake_write, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def _take(self, mask: int) -> None:
        try:
            while os.read(self.wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while self.results:
            self.worker.resolved(*self.results.popleft())


def _numeric(host: str, port: int) -> list[Address] | None:
    """The address itself when `host` is one (no resolution needed), else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        address = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]
    return None


def _failure(probe: _Probe, error: OSError) -> None:
    if probe.errors is None:
        probe.errors = []
    probe.errors.append(error)


def _connect_error(errors: list[OSError]) -> OSError:
    """What asyncio raises when no address would connect: the error, when all agree."""
    if not errors:
        return OSError("no address to connect to")
    first = str(errors[0])
    if all(str(error) == first for error in errors):
        return errors[0]
    return OSError(f"Multiple exceptions: {', '.join(str(error) for error in errors)}")


def _wants(exc: OSError) -> int:
    """READ or WRITE when `exc` is TLS asking to wait for the socket, else 0."""
    ssl = sys.modules.get("ssl")
    if ssl is None:
        return 0
    if isinstance(exc, ssl.SSLWantReadError):
        return READ
    if isinstance(exc, ssl.SSLWantWriteError):
        return WRITE
    return 0


def _closed(exc: OSError) -> bool:
    """`exc` is TLS's word for the end of the stream (with or without close_notify)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, (ssl.SSLZeroReturnError, ssl.SSLEOFError))


def main() -> None:
    sys.stdout = sys.stderr  # fd 1 carries frames; a stray print must not corrupt them
    try:  # noqa: SIM105
        _Worker().run()
    except KeyboardInterrupt:  # Ctrl-C reaches the daemon's whole process group
        pass


if __name__ == "__main__":
    main()
