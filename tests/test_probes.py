"""Probes against real servers on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from monitor.probing import Probe, Prober, resolve_probe
from registry import ProbeSpec

from .conftest import require_tool
from .processes import free_port
from .targets import self_signed, start_target


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    running = Prober(concurrency=50)
    await running.start()
    yield running
    await running.close()


def http(path: str, **settings: object) -> Probe:
    return resolve_probe([ProbeSpec.model_validate({"path": path, **settings})])


def passed(probe: Probe, result: object) -> bool:
    return all(condition.check(result)[0] for condition in probe.conditions)  # type: ignore[arg-type]


async def test_http_probe_of_a_healthy_target(prober: Prober, target: TestServer) -> None:
    probe = http("/ok", conditions=["[STATUS] == 200", "[BODY].status == UP"])
    result = await prober.run(str(target.make_url("/")), probe)
    assert result.status == 200 and result.connected and result.error is None
    assert passed(probe, result)


async def test_http_probe_of_a_failing_target(prober: Prober, target: TestServer) -> None:
    probe = http("/fail")
    result = await prober.run(str(target.make_url("/")), probe)
    assert result.status == 503
    assert not passed(probe, result)  # default condition: [STATUS] < 400


async def test_a_hung_target_costs_only_its_timeout(prober: Prober, target: TestServer) -> None:
    probe = http("/hang", timeout="200ms")
    started = time.perf_counter()
    result = await prober.run(str(target.make_url("/")), probe)
    assert time.perf_counter() - started < 2
    assert result.error == "timeout after 0.2s"
    assert not result.connected


async def test_bad_json_fails_body_conditions(prober: Prober, target: TestServer) -> None:
    probe = http("/bad-json", conditions=["[STATUS] == 200", "[BODY].status == UP"])
    result = await prober.run(str(target.make_url("/")), probe)
    assert result.status == 200
    assert [c.check(result)[0] for c in probe.conditions] == [True, False]


async def test_a_closed_connection_is_an_error(prober: Prober, target: TestServer) -> None:
    result = await prober.run(str(target.make_url("/")), http("/hang-up"))
    assert result.error is not None
    assert not result.connected


async def test_nothing_listening_is_a_connect_error(prober: Prober) -> None:
    result = await prober.run(f"http://127.0.0.1:{free_port()}/", http("/"))
    assert result.error is not None and result.error.startswith("connect")


async def test_redirects_are_not_followed_by_default(prober: Prober, target: TestServer) -> None:
    url = str(target.make_url("/"))
    assert (await prober.run(url, http("/redirect"))).status == 302
    assert (await prober.run(url, http("/redirect", follow_redirects=True))).status == 200


async def test_body_is_capped(prober: Prober, target: TestServer) -> None:
    result = await prober.run(str(target.make_url("/")), http("/big", max_body_bytes=1000))
    assert len(result.body) == 1000


async def test_tcp_probe(prober: Prober, target: TestServer) -> None:
    probe = resolve_probe([ProbeSpec(type="tcp")])
    up = await prober.run(str(target.make_url("/")), probe)
    down = await prober.run(f"http://127.0.0.1:{free_port()}", probe)
    assert up.connected and passed(probe, up)
    assert not down.connected and not passed(probe, down)


@pytest.fixture
async def tls_target(tmp_path: Path) -> AsyncIterator[tuple[TestServer, Path]]:
    require_tool("openssl")
    certificate = self_signed(tmp_path, days=2)
    server = await start_target(certificate)
    yield server, certificate.cert
    await server.close()


async def test_tls_is_verified_by_default(tls_target: tuple[TestServer, Path]) -> None:
    server, _ = tls_target
    prober = Prober()
    await prober.start()
    try:
        result = await prober.run(str(server.make_url("/")), http("/ok"))
        unverified = await prober.run(str(server.make_url("/")), http("/ok", tls_verify=False))
    finally:
        await prober.close()
    assert result.error is not None and "certificate" in result.error
    assert unverified.status == 200


async def test_certificate_expiry_is_measured(
    tls_target: tuple[TestServer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca = tls_target
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # how operators trust a private CA too
    prober = Prober()
    await prober.start()
    try:
        https = await prober.run(str(server.make_url("/")), http("/ok"))
        tls_probe = resolve_probe(
            [ProbeSpec(type="tls", conditions=("[CERTIFICATE_EXPIRATION] > 72h",))]
        )
        tls = await prober.run(str(server.make_url("/")), tls_probe)
    finally:
        await prober.close()
    assert https.status == 200
    assert https.certificate_expires_in is not None
    assert 86400 < https.certificate_expires_in <= 2 * 86400
    assert tls.connected
    assert tls_probe.conditions[0].check(tls) == (False, "48.0h")


async def test_a_fresh_connection_per_probe_unless_keepalive(
    prober: Prober, target: TestServer
) -> None:
    url = str(target.make_url("/"))
    for _ in range(3):
        fresh = await prober.run(url, http("/peer"))
    assert fresh.body_json() == {"connections": 3}
    for _ in range(3):
        pooled = await prober.run(url, http("/peer", keepalive=True))
    assert pooled.body_json() == {"connections": 4}  # one more, reused three times


async def test_chunked_and_close_delimited_bodies_are_read(prober: Prober) -> None:
    from aiohttp import web

    from .targets import chunked

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        probe = http("/chunked", conditions=["[BODY].status == UP", "[BODY].n == 42"])
        result = await prober.run(str(server.make_url("/")), probe)
    finally:
        await server.close()
    assert result.body_json() == {"status": "UP", "n": 42}
    assert passed(probe, result)


async def test_query_strings_and_headers_reach_the_target(prober: Prober) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"q": request.query.get("q"), "h": request.headers.get("X-Probe")})

    app = web.Application()
    app.router.add_get("/echo", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        probe = http("/echo?q=1", headers={"X-Probe": "yes"})
        result = await prober.run(str(server.make_url("/")), probe)
    finally:
        await server.close()
    assert result.body_json() == {"q": "1", "h": "yes"}


def test_probes_run_on_uvloop_the_loop_serve_uses() -> None:
    import asyncio

    import uvloop

    async def probe_twice() -> list[int | None]:
        server = await start_target()
        prober = Prober()
        await prober.start()
        try:
            url = str(server.make_url("/"))
            results = [await prober.run(url, http("/ok")), await prober.run(url, http("/fail"))]
        finally:
            await prober.close()
            await server.close()
        assert all(r.error is None for r in results), results
        return [r.status for r in results]

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(asyncio.wait_for(probe_twice(), 10)) == [200, 503]
    finally:
        loop.close()
