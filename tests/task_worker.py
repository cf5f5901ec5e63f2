"""A task worker as a real process, for tests/test_tasks.py: plain aiohttp, no SDK.

    python -m tests.task_worker URL QUEUE WORKER MODE [TOKEN]

It polls QUEUE and writes one JSON line per task it takes to stdout, then acts by MODE:
`complete` (output {"by", "task", "key"}), `fail` (retryable false), `hang` (never
answers: the test kills it), `heartbeat:<seconds>` (heartbeats that long, then completes).
"""

from __future__ import annotations

import asyncio
import sys

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


async def answer(session: aiohttp.ClientSession, task: dict, worker: str, mode: str) -> None:  # type: ignore[type-arg]
    base = f"/v1/tasks/{task['id']}"
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode.startswith("heartbeat:"):
        end = asyncio.get_running_loop().time() + float(mode.partition(":")[2])
        while asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.2)
            async with session.post(base + "/heartbeat") as resp:
                assert resp.status == 200, await resp.text()
    if mode == "fail":
        body = {"error": f"{task['task']} refused by {worker}", "retryable": False}
        async with session.post(base + "/fail", json=body) as resp:
            assert resp.status == 200, await resp.text()
        return
    output = {"by": worker, "task": task["task"], "key": task["idempotency_key"]}
    async with session.post(base + "/complete", json={"output": output}) as resp:
        assert resp.status == 200, await resp.text()


if __name__ == "__main__":
    url, queue, worker, mode = sys.argv[1:5]
    asyncio.run(work(url, queue, worker, mode, sys.argv[5] if len(sys.argv) > 5 else None))
