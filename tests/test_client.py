"""hms_mgmt.Registration against a real daemon process, which goes down and comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from hms_mgmt import Registration, registration_ctx

from .processes import DaemonProcess, free_port, running_daemon, write_config


async def instances(daemon_url: str, service: str = "payments") -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{daemon_url}/v1/services/{service}") as r,
    ):
        body = await r.json()
    return list(body["instances"])


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def registration(daemon_url: str, **kwargs: Any) -> Registration:
    kwargs.setdefault("url", "http://127.0.0.1:8001")
    kwargs.setdefault("ttl", "1s")
    return Registration(daemon_url, "payments", "payments-1", max_backoff=0.5, **kwargs)


async def test_registers_heartbeats_and_deregisters(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        async with registration(daemon.url, tags=["tier1"]) as reg:
            await asyncio.wait_for(reg.registered.wait(), 10)
            await asyncio.sleep(2.5)  # well past the 1s ttl: only heartbeats keep it alive
            [listed] = await instances(daemon.url)
            assert listed["health"] == "unknown"  # not lapsed
            assert listed["tags"] == ["tier1"]
        assert await instances(daemon.url) == []


async def test_waits_for_a_daemon_that_is_not_up_yet(tmp_path: Path) -> None:
    port = free_port()
    daemon = DaemonProcess(write_config(tmp_path, port), port, tmp_path / "daemon.log")
    async with registration(daemon.url) as reg:
        await asyncio.sleep(1.0)
        assert not reg.registered.is_set()
        assert reg.last_error is not None
        daemon.start()
        try:
            await asyncio.wait_for(reg.registered.wait(), 10)
            assert [i["id"] for i in await instances(daemon.url)] == ["payments-1"]
        finally:
            daemon.stop()


async def test_survives_a_daemon_restart(restartable_daemon: DaemonProcess) -> None:
    daemon = restartable_daemon
    async with registration(daemon.url) as reg:
        await asyncio.wait_for(reg.registered.wait(), 10)
        daemon.kill()
        await asyncio.sleep(1.0)  # heartbeats fail meanwhile; the client keeps trying
        daemon.start()
        await asyncio.sleep(2.5)
        [listed] = await instances(daemon.url)
        assert listed["lease"]["lapsed"] is False


async def test_registers_again_when_the_daemon_lost_it(
    restartable_daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon = restartable_daemon
    async with registration(daemon.url) as reg:
        await asyncio.wait_for(reg.registered.wait(), 10)
        daemon.kill()
        for leftover in tmp_path.glob("hms.db*"):
            leftover.unlink()  # the daemon comes back with an empty registry
        daemon.start()
        assert await instances(daemon.url) == []

        async def registered_again() -> bool:
            return len(await instances(daemon.url)) == 1

        await wait_until(registered_again)


async def test_cleanup_ctx_helper_registers_an_aiohttp_app(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        app = web.Application()
        app.cleanup_ctx.append(
            registration_ctx(daemon.url, "payments", "payments-1", url="http://127.0.0.1:8001")
        )
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()

        async def registered() -> bool:
            return len(await instances(daemon.url)) == 1

        await wait_until(registered)
        await server.close()
        assert await instances(daemon.url) == []


async def test_a_rejected_registration_is_reported_and_retried(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        async with registration(daemon.url, url="ftp://nowhere") as reg:
            await asyncio.sleep(1.0)
            assert not reg.registered.is_set()
            assert reg.last_error is not None and "422" in reg.last_error
