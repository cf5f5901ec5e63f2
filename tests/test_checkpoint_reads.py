"""Reading a process while its checkpoint is being written: what `GET /v1/processes/{id}`
shows is one state of the process, its status and outputs with the history rows that
brought them, never the new state without its newest rows."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from monitor.config import Config
from monitor.keys import DATABASE, ENGINE

from .conftest import AppClient, until

PAY = {
    "name": "Pay",
    "steps": [
        {"name": "pay", "call": {"service": "ach", "path": "/pay"}},
        {"name": "notify", "publish": "pay.done"},
    ],
}


class HeldService:
    """A real HTTP service whose answer waits until the test lets it go."""

    def __init__(self) -> None:
        self.called = asyncio.Event()
        self.answer = asyncio.Event()

    async def pay(self, request: web.Request) -> web.Response:
        self.called.set()
        await self.answer.wait()
        return web.json_response({"payment_id": "p-1"})


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldService, TestServer]]:
    service = HeldService()
    app = web.Application()
    app.router.add_post("/pay", service.pay)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield service, server
    service.answer.set()
    await server.close()


class HeldWriter:
    """Holds the database's writer (a write that waits on the writer thread), as a slow
    fsync does: writes queue behind it, reads queued meanwhile run before them."""

    def __init__(self, client: AppClient) -> None:
        self._database = client.app[DATABASE]
        self._entered, self._release = threading.Event(), threading.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HeldWriter:
        def block(_: Any) -> None:
            self._entered.set()
            self._release.wait(10)

        self._task = asyncio.create_task(self._database.write(block))

        async def entered() -> bool:
            return self._entered.is_set()

        await until(entered)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        if self._task is not None:
            await self._task


async def test_a_read_during_a_checkpoint_shows_the_rows_it_writes(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    held: tuple[HeldService, TestServer],
) -> None:
    service, server = held
    client = await start_daemon(make_config(workflows=[PAY]))
    url = str(server.make_url("/"))
    resp = await client.put("/v1/services/ach/instances/a1", json={"url": url})
    assert resp.status == 201
    started = await (await client.post("/v1/workflows/Pay", json={"input": {}})).json()
    await service.called.wait()

    live = client.app[ENGINE].live[started["id"]]
    async with HeldWriter(client):
        service.answer.set()

        async def checkpointing() -> bool:  # the step's checkpoint is queued behind the hold
            return "pay" in live.outputs

        await until(checkpointing)
        read = asyncio.create_task(client.get(f"/v1/processes/{started['id']}"))
        await asyncio.sleep(0.2)  # its read queued on the database thread, before the write
    seen = await (await read).json()

    done = [a["step"] for a in seen["history"] if a["outcome"] == "ok"]
    assert "pay" in seen["outputs"]
    assert done[: len(seen["outputs"])] == list(seen["outputs"])  # every output has its row
