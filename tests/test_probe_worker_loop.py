"""The probe worker's own loop (monitor/probing/worker.py) answers as the daemon's loop does.

The worker runs probes on non-blocking sockets without asyncio; the daemon runs the
same probes on its uvloop when no worker is ready. Each case here is probed both
ways against a real server and must give the same status, body and error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from monitor.probing import Probe, ProbeResult, resolve_probe
from monitor.probing.frames import FrameReader, encode
from monitor.probing.prober import Prober
from monitor.probing.workers import _worker_argv, _worker_environment
from registry import ProbeSpec

from .conftest import require_tool
from .processes import ROOT, free_port
from .targets import chunked, self_signed, start_target


def http(path: str = "/", **settings: object) -> Probe:
    return resolve_probe([ProbeSpec.model_validate({"path": path, **settings})])


async def odd_server() -> TestServer:
    """Answers a plain server would not: chunked, cut off mid-body, a query echoed."""

    async def cut_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 5000)
        assert request.transport is not None
        request.transport.close()
        return response

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"q": request.query.get("q"), "h": request.headers.get("X-Probe")})

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/cut-off", cut_off)
    app.router.add_get("/echo", echo)
    app.router.add_get("/no-content", no_content)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@contextlib.asynccontextmanager
async def started(*probers: Prober) -> AsyncIterator[None]:
    for prober in probers:
        await prober.start()
    try:
        for _ in range(200):  # every worker ready
            if all(p._workers is None or p._workers.ready for p in probers):
                break
            await asyncio.sleep(0.05)
        yield
    finally:
        for prober in probers:
            await prober.close()


def seen(result: ProbeResult, probe: Probe) -> tuple[Any, ...]:
    """What a user sees of a result: the body only when a condition reads it (a worker
    sends it back for those alone)."""
    body = result.body if probe.reads_body else None
    return (result.status, result.connected, result.error, body)


CASES: dict[str, Callable[[str, str], tuple[str, Probe]]] = {
    "ok": lambda target, odd: (target, http("/ok", conditions=["[BODY].status == UP"])),
    "503": lambda target, odd: (target, http("/fail")),
    "hung": lambda target, odd: (target, http("/hang", timeout="300ms")),
    "hung up before the head": lambda target, odd: (target, http("/hang-up")),
    "redirect not followed": lambda target, odd: (target, http("/redirect")),
    "body capped": lambda target, odd: (target, http("/big", max_body_bytes=1000)),
    "chunked": lambda target, odd: (odd, http("/chunked", conditions=["[BODY].n == 42"])),
    "cut off in the body": lambda target, odd: (
        odd,
        http("/cut-off", conditions=["[BODY] == pat(x*)"]),
    ),
    "204": lambda target, odd: (odd, http("/no-content")),
    "query and header": lambda target, odd: (
        odd,
        http("/echo?q=1", headers={"X-Probe": "yes"}, conditions=["[BODY].h == yes"]),
    ),
    "a host name": lambda target, odd: (
        target.replace("127.0.0.1", "localhost"),
        http("/ok", conditions=["[BODY].status == UP"]),
    ),
    "refused": lambda target, odd: (f"http://127.0.0.1:{free_port()}/", http("/")),
    "tcp": lambda target, odd: (target, resolve_probe([ProbeSpec(type="tcp")])),
    "tcp refused": lambda target, odd: (
        f"http://127.0.0.1:{free_port()}/",
        resolve_probe([ProbeSpec(type="tcp")]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_worker_answers_as_the_loop_does(case: str) -> None:
    """On uvloop, as `serve` runs: the loop's errors are worded as uvloop words them."""

    async def both_ways() -> tuple[tuple[Any, ...], tuple[Any, ...], ProbeResult]:
        target, odd = await start_target(), await odd_server()
        on_loop, in_worker = Prober(), Prober(workers=1)
        try:
            async with started(on_loop, in_worker):
                url, probe = CASES[case](str(target.make_url("/")), str(odd.make_url("/")))
                loop_result = await on_loop.run(url, probe)
                worker_result = await in_worker.run(url, probe)
        finally:
            await target.close()
            await odd.close()
        return seen(loop_result, probe), seen(worker_result, probe), worker_result

    on_loop, in_worker, result = uvloop.run(both_ways())
    assert in_worker == on_loop
    if case.startswith(("hung", "refused", "tcp refused")):
        assert result.error is not None
    else:
        assert result.error is None and result.connected


def closing_listener(read_hello: bool) -> socket.socket:
    """Accepts, then closes (after reading the client's first bytes, or at once): a TLS
    port with nothing behind it, as a balancer without a backend is."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                if read_hello:
                    conn.recv(65536)
                conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    return listener


TLS_CASES = {
    "unverified": ("served", "http", False),
    "untrusted": ("served", "http", True),
    "tls unverified": ("served", "tls", False),
    "closed at once": ("closed", "http", False),
    "closed after the hello": ("closed after hello", "http", False),
    "tls closed at once": ("closed", "tls", False),
    "tls closed after the hello": ("closed after hello", "tls", False),
}


@pytest.mark.parametrize("case", sorted(TLS_CASES))
def test_the_worker_answers_tls_as_the_loop_does(case: str, tmp_path: Path) -> None:
    server_kind, probe_type, verify = TLS_CASES[case]
    probe = resolve_probe(
        [ProbeSpec.model_validate({"type": probe_type, "tls_verify": verify, "path": "/ok"})]
    )

    async def both_ways() -> tuple[tuple[Any, ...], tuple[Any, ...], ProbeResult]:
        listener, target = None, None
        if server_kind == "served":
            require_tool("openssl")
            target = await start_target(self_signed(tmp_path))
            url = str(target.make_url("/"))
        else:
            listener = closing_listener(read_hello=server_kind == "closed after hello")
            url = f"https://127.0.0.1:{listener.getsockname()[1]}/"
        on_loop, in_worker = Prober(), Prober(workers=1)
        try:
            async with started(on_loop, in_worker):
                loop_result = await on_loop.run(url, probe)
                worker_result = await in_worker.run(url, probe)
        finally:
            if target is not None:
                await target.close()
            if listener is not None:
                listener.close()
        return seen(loop_result, probe), seen(worker_result, probe), worker_result

    on_loop, in_worker, result = uvloop.run(both_ways())
    assert in_worker == on_loop
    if case in ("unverified", "tls unverified"):
        assert result.error is None and result.connected
    elif case == "untrusted":
        assert result.error is not None and result.error.startswith("certificate:")
    else:
        assert result.error is not None


async def test_a_probe_the_worker_cannot_finish_in_time_times_out_while_others_answer(
    target: TestServer,
) -> None:
    """Hung probes and quick ones at once: every quick one answers, every hung one
    times out at its own timeout (the worker's loop is never held by one probe)."""
    in_worker = Prober(workers=1)
    async with started(in_worker):
        url = str(target.make_url("/"))
        hung = [in_worker.run(url, http("/hang", timeout="500ms")) for _ in range(20)]
        quick = [in_worker.run(url, http("/ok")) for _ in range(200)]
        results = await asyncio.gather(*hung, *quick)
    assert [r.error for r in results[:20]] == ["timeout after 0.5s"] * 20
    assert [r.status for r in results[20:]] == [200] * 200


def start_worker(argv: list[str] | None = None) -> subprocess.Popen[bytes]:
    """A worker as the daemon starts one (or run by `argv`, in the same environment)."""
    return subprocess.Popen(
        argv or _worker_argv(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=_worker_environment(),
    )


def read_answers(worker: subprocess.Popen[bytes], count: int) -> list[tuple[Any, ...]]:
    answers: list[tuple[Any, ...]] = []
    frames = FrameReader(answers.append)
    assert worker.stdout is not None
    while len(answers) < count:
        data = os.read(worker.stdout.fileno(), 1 << 20)
        assert data, f"the worker ended after {len(answers)} answers"
        frames.feed(data)
    return answers


async def in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)


async def test_answers_wait_in_the_worker_while_the_daemon_does_not_read() -> None:
    """50 answers of 200 KB are far more than a pipe holds: the worker keeps what the
    daemon has not read, goes on probing meanwhile (a later job reaches its server
    before the daemon reads a byte), and every answer arrives whole."""
    late_seen = asyncio.Event()

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 200_000)

    async def late(request: web.Request) -> web.Response:
        late_seen.set()
        return web.Response(body=b"late")

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/late", late)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    port = server.port
    assert port is not None

    def request(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()

    jobs: list[tuple[object, ...]] = [
        (n, "127.0.0.1", port, False, False, request("/big"), 200_000, 5.0, True) for n in range(50)
    ]
    worker = start_worker()
    try:
        assert worker.stdin is not None
        worker.stdin.write(encode(jobs))
        worker.stdin.flush()
        await asyncio.sleep(1.0)  # the daemon reads nothing: the pipe fills
        worker.stdin.write(
            encode([(99, "127.0.0.1", port, False, False, request("/late"), 10, 5.0, True)])
        )
        worker.stdin.flush()
        await asyncio.wait_for(late_seen.wait(), 10)  # probed while its answers wait
        answers = await in_thread(lambda: read_answers(worker, 51))
    finally:
        worker.kill()
        worker.wait()
        await server.close()
    assert sorted(a[0] for a in answers) == [*range(50), 99]
    assert {(a[4], len(a[5]), a[7]) for a in answers if a[0] != 99} == {(200, 200_000, None)}
    assert [(a[4], a[5]) for a in answers if a[0] == 99] == [(200, b"late")]


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def test_finished_probes_leave_no_socket_and_no_memory_behind() -> None:
    """20,000 tcp probes with an hour's timeout, each done at once: the worker closes
    every socket, and what it kept of each finished probe until its deadline is swept
    (kept, they were ~0.5 KB each: 10 MB here, gigabytes a day)."""
    listener = closing_listener(read_hello=False)
    port = listener.getsockname()[1]
    worker = start_worker()
    try:
        assert worker.stdin is not None
        warm = [(n, "127.0.0.1", port, False, False, None, 0, 3600.0, True) for n in range(100)]
        worker.stdin.write(encode(list(warm)))
        worker.stdin.flush()
        read_answers(worker, 100)
        descriptors, before = open_descriptors(worker.pid), rss_kib(worker.pid)
        for batch in range(20):
            jobs: list[tuple[object, ...]] = [
                (1000 * (batch + 1) + n, "127.0.0.1", port, False, False, None, 0, 3600.0, True)
                for n in range(1000)
            ]
            worker.stdin.write(encode(jobs))
            worker.stdin.flush()
            answers = read_answers(worker, 1000)
            assert all(a[3] for a in answers), [a[7] for a in answers if not a[3]][:3]
        assert open_descriptors(worker.pid) == descriptors
        assert rss_kib(worker.pid) - before < 4096
    finally:
        worker.kill()
        worker.wait()
        listener.close()


async def test_a_worker_ends_when_the_daemon_closes_its_pipe() -> None:
    worker = start_worker()
    try:
        assert worker.stdin is not None
        worker.stdin.close()
        code = await in_thread(lambda: worker.wait(10))
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == 0


def test_a_worker_loads_tls_only_for_a_tls_probe() -> None:
    """The worker's RSS: ssl (and its libraries) only once a TLS job comes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        worker = start_worker()
        try:
            assert worker.stdin is not None
            plain = (1, "127.0.0.1", port, False, False, None, 0, 5.0, True)
            worker.stdin.write(encode([plain]))
            worker.stdin.flush()
            assert read_answers(worker, 1)[0][3] is True  # connected
            maps = Path(f"/proc/{worker.pid}/maps").read_text()
            assert "_ssl" not in maps and "libssl" not in maps
            tls = (2, "127.0.0.1", port, True, False, None, 0, 0.5, True)
            worker.stdin.write(encode([tls]))  # accepted, never handshaken: a timeout
            worker.stdin.flush()
            answer = read_answers(worker, 1)[0]
            assert answer[7] == "timeout after 0.5s"
            assert "_ssl" in Path(f"/proc/{worker.pid}/maps").read_text()
        finally:
            worker.kill()
            worker.wait()


# A worker whose resolver answers from this table (the test's names, 127.0.0.1 only):
# "two.test" has an address that refuses before one that listens, "slow.test" takes 3 s.
FAKE_RESOLVER = """
import socket, sys, time
real = socket.getaddrinfo
closed, open_ = int(sys.argv[1]), int(sys.argv[2])
def fake(host, port, *args, **kwargs):
    def at(p):
        return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", p))
    if host == "two.test":
        return [at(closed), at(open_)]
    if host == "none.test":
        return [at(closed), at(closed)]
    if host == "slow.test":
        time.sleep(3)
        return [at(open_)]
    return real(host, port, *args, **kwargs)
socket.getaddrinfo = fake
from monitor.probing.worker import main
main()
"""


def test_a_name_is_tried_at_each_address_and_a_slow_one_holds_no_other_up() -> None:
    """Each of a host's addresses in turn, as asyncio does; names whose probes timed
    out while waiting for a resolver thread are not looked up (they held up the rest)."""
    with socket.socket() as listener, socket.socket() as unused:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        ports = [str(unused.getsockname()[1]), str(listener.getsockname()[1])]
        worker = start_worker([*_worker_argv()[:3], "-c", FAKE_RESOLVER, *ports])
        try:
            assert worker.stdin is not None

            def tcp(n: int, host: str, timeout: float) -> tuple[object, ...]:
                return (n, host, 1, False, False, None, 0, timeout, True)

            jobs = [tcp(1, "two.test", 5.0), tcp(2, "none.test", 5.0)]
            jobs += [tcp(10 + n, "slow.test", 0.5) for n in range(12)]  # 3 rounds of 4 threads
            jobs.append(tcp(3, "two.test", 5.0))  # behind them in the resolvers' queue
            worker.stdin.write(encode(jobs))
            worker.stdin.flush()
            answers = {a[0]: a for a in read_answers(worker, len(jobs))}
        finally:
            worker.kill()
            worker.wait()
    assert answers[1][3] is True and answers[1][7] is None  # the second address connected
    assert answers[2][7] == "connect: Connection refused"
    assert {answers[10 + n][7] for n in range(12)} == {"timeout after 0.5s"}
    assert answers[3][3] is True, answers[3][7]
