"""Hostile clients against a real daemon process: slow headers and bodies (slowloris),
oversized and deeply nested bodies, invalid UTF-8. Each gets a 4xx or a closed
connection; the daemon keeps answering everyone else and logs no crash."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import aiohttp
import pytest

from .processes import DaemonProcess, running_daemon

READ_TIMEOUT = 1.0
SECRET = b"s3cret-token-"
WORKFLOW = {"name": "Echo", "route": "/api/echo", "steps": [{"name": "p", "publish": "echoed"}]}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("hostile")
    server = {"read_timeout": f"{READ_TIMEOUT:g}s"}
    with running_daemon(directory, server=server, workflows=[WORKFLOW]) as process:
        yield process


async def healthz_ms(url: str) -> float:
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200
        return (time.perf_counter() - started) * 1000


async def closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the server ends the connection, and what it said before. A reset
    ends it too: the server closes with unread bytes of ours (the trickle) pending."""
    started = time.monotonic()
    try:
        said = await asyncio.wait_for(reader.read(), timeout=limit)
    except ConnectionResetError:
        said = b""
    return time.monotonic() - started, said


async def test_slow_headers_are_cut_off_while_others_are_served(daemon: DaemonProcess) -> None:
    connections = [await asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(200)]
    try:
        for _, writer in connections:
            writer.write(b"GET /v1/services HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        dribble = connections[0][1]

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for n in range(50):  # a header byte now and then keeps nothing alive
                    dribble.write(b"X-%d: y\r\n" % n)
                    await asyncio.sleep(0.1)

        trickling = asyncio.create_task(trickle())
        assert await healthz_ms(daemon.url) < 1000  # served while 200 sockets hang
        seconds, said = await closed_after(connections[0][0], limit=READ_TIMEOUT + 5)
        assert said == b"" and seconds < READ_TIMEOUT + 3
        for reader, _ in connections[1:]:
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        trickling.cancel()
    finally:
        for _, writer in connections:
            writer.close()


async def test_a_slow_body_gets_408(daemon: DaemonProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(
            b"PUT /v1/services/s/instances/i HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"url":'
        )
        seconds, said = await closed_after(reader, limit=READ_TIMEOUT + 5)
    finally:
        writer.close()
    assert said.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in said
    assert seconds < READ_TIMEOUT + 3
    async with aiohttp.ClientSession(daemon.url) as http, http.get("/v1/services/s") as resp:
        assert (await resp.json())["instances"] == []


BODIES = {
    "deep array": b"[" * 200_000 + b"]" * 200_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "invalid utf-8": b'{"url": "http://127.0.0.1:1", "meta": {"k": "\xff\xfe"}}',
    "lone surrogate": b'{"url": "http://127.0.0.1:1", "meta": {"k": "\\ud800"}}',
    "nul bytes": b'{"url": "http://127.0.0.1:1\x00"}',
    "not json": b"\x00\x01\x02 definitely not json",
}
TARGETS = [
    ("PUT", "/v1/services/s/instances/i"),
    ("POST", "/v1/events/t.x"),
    ("POST", "/v1/workflows/Echo"),
    ("POST", "/api/echo"),
]


@pytest.mark.parametrize("kind", sorted(BODIES))
async def test_malformed_bodies_are_4xx_on_every_write_route(
    daemon: DaemonProcess, kind: str
) -> None:
    async with aiohttp.ClientSession(daemon.url) as http:
        for method, path in TARGETS:
            headers = {"Content-Type": "application/json"}
            async with http.request(method, path, data=BODIES[kind], headers=headers) as resp:
                assert 400 <= resp.status < 500, (kind, path, resp.status)
                if resp.status != 413:
                    assert (await resp.json())["error"]["code"], (kind, path)
        async with http.get("/v1/services/s") as resp:
            assert (await resp.json())["instances"] == []
    assert await healthz_ms(daemon.url) < 1000


async def test_oversized_bodies_are_413_with_or_without_a_length(daemon: DaemonProcess) -> None:
    big = b'{"url": "' + b"a" * (2 * 1024 * 1024) + b'"}'

    async def chunks() -> object:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    async with aiohttp.ClientSession(daemon.url) as http:
        for data in (big, chunks()):
            try:
                async with http.put("/v1/services/s/instances/i", data=data) as resp:
                    assert resp.status == 413
            except aiohttp.ClientOSError:
                pass  # the server may close while the client still sends: also refused
    assert await healthz_ms(daemon.url) < 1000


async def test_hostile_paths_and_headers_are_4xx(daemon: DaemonProcess) -> None:
    requests = [
        b"GET /v1/services/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/services/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/services/a%00b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /v1/services/s/instances/" + b"i" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 100_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nAuthorization: Bearer " + SECRET * 2000 + b"\r\n\r\n",
        b"GET /v1/services HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/events/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello to a plain port\r\n\r\n",
    ]
    for raw in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        try:
            writer.write(raw)
            said = await asyncio.wait_for(reader.read(4096), timeout=5)
        finally:
            writer.close()
        status = int(said.split(b" ", 2)[1]) if said.startswith(b"HTTP/1.1 ") else None
        assert status is None or 400 <= status < 500, (raw[:60], said[:200])
    assert await healthz_ms(daemon.url) < 1000


async def test_after_all_of_it_the_daemon_logged_no_crash(daemon: DaemonProcess) -> None:
    """Runs last in this module: each refusal above is one INFO line, never a traceback."""
    assert await healthz_ms(daemon.url) < 1000
    log = daemon.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    assert "malformed request from 127.0.0.1 refused" in log
    assert SECRET.decode() not in log  # the overlong Authorization header was not quoted
