"""A task worker as a real process, for tests/test_tasks.py: plain aiohttp, no SDK.

    python -m tests.task_worker URL QUEUE WORKER MODE [TOKEN]

It polls QUEUE and writes one JSON line per task it takes to stdout, then acts by MODE:
`complete` (output {"by", "task", "key"}) or `hang` (never answers: the test kills it).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import orjson


async def work(url: str, queue: str, worker: str, mode: str, token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(url, headers=headers) as session:
        while True:
            body = {"queue": queue, "worker": worker, "wait": "5s", "max": 1}
            async with session.post("/v1/tasks/poll", json=body) as resp:
                tasks = (await resp.json())["tasks"]
            for task in tasks:
                sys.stdout.write(orjson.dumps(task).decode() + "\n")
                sys.stdout.flush()
                await answer(session, task, worker, mode)


async def answer(
    session: aiohttp.ClientSession, task: dict[str, Any], worker: str, mode: str
) -> None:
    if mode == "hang":
        await asyncio.sleep(3600)
    output = {"by": worker, "task": task["task"], "key": task["idempotency_key"]}
    async with session.post(f"/v1/tasks/{task['id']}/complete", json={"output": output}) as resp:
        assert resp.status == 200, await resp.text()


if __name__ == "__main__":
    url, queue, worker, mode = sys.argv[1:5]
    asyncio.run(work(url, queue, worker, mode, sys.argv[5] if len(sys.argv) > 5 else None))
