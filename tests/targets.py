"""Real probe targets on 127.0.0.1: they answer, fail, hang, lie, hang up, and speak TLS."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

HEALTHY = {"status": "UP", "items": [1, 2, 3], "name": "hms-payments", "checks": {"db": "ok"}}


async def chunked(request: web.Request) -> web.StreamResponse:
    """`{"status": "UP", "n": 42}` in three chunks."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b'{"status": ', b'"UP", "n": ', b"42}"):
        await response.write(part)
    await response.write_eof()
    return response


def target_app() -> web.Application:
    state = {"status": 200}

    peers: set[object] = set()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response(HEALTHY)

    async def peer(request: web.Request) -> web.Response:
        """Counts the client connections it has seen (their source ports)."""
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.json_response({"connections": len(peers)})

    async def switchable(request: web.Request) -> web.Response:
        return web.json_response(HEALTHY, status=state["status"])

    async def set_status(request: web.Request) -> web.Response:
        state["status"] = int(request.match_info["status"])
        return web.Response()

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"status": "DOWN"}, status=503)

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    async def bad_json(request: web.Request) -> web.Response:
        return web.Response(text='{"status": "UP"', content_type="application/json")

    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1_000_000)

    app = web.Application()
    app.add_routes(
        [
            web.get("/ok", ok),
            web.get("/peer", peer),
            web.get("/switchable", switchable),
            web.post("/status/{status}", set_status),
            web.get("/fail", fail),
            web.get("/hang", hang),
            web.get("/bad-json", bad_json),
            web.get("/hang-up", hang_up),
            web.get("/redirect", redirect),
            web.get("/big", big),
        ]
    )
    return app


@dataclass
class Certificate:
    cert: Path
    key: Path


def self_signed(directory: Path, days: int = 2) -> Certificate:
    """A short-lived certificate for 127.0.0.1 and localhost (openssl CLI)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-days", str(days), "-nodes", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Certificate(cert, key)


async def start_target(tls: Certificate | None = None) -> TestServer:
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
    server = TestServer(target_app(), host="127.0.0.1", scheme="https" if tls else "http")
    await server.start_server(ssl=context)
    return server
