"""A 2xx from the registry is durable: SIGKILL right after loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import until
from .processes import running_daemon


async def test_kill_9_after_2xx_loses_no_registration_or_deletion(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:

            async def put(i: int) -> int:
                path = f"/v1/services/svc{i % 7}/instances/i{i}"
                async with http.put(path, json={"url": f"http://127.0.0.1:{1000 + i}"}) as r:
                    return r.status

            statuses = await asyncio.gather(*(put(i) for i in range(200)))
            assert set(statuses) == {201}
            deletes = [http.delete(f"/v1/services/svc{i % 7}/instances/i{i}") for i in range(50)]
            for resp in await asyncio.gather(*deletes):
                assert resp.status == 204
                resp.release()
            # The last acknowledged write, then the process dies without any shutdown code.
            async with http.put("/v1/services/last/instances/x", json={"url": "http://a:1"}) as r:
                assert r.status == 201
            daemon.kill()

        daemon.start()
        async with aiohttp.ClientSession(daemon.url) as http, http.get("/v1/sd") as resp:
            groups = await resp.json()
    found = {
        (g["labels"]["__meta_hms_service"], g["labels"]["__meta_hms_instance"]) for g in groups
    }
    expected = {(f"svc{i % 7}", f"i{i}") for i in range(50, 200)} | {("last", "x")}
    assert found == expected


async def test_kill_9_mid_run_resumes_every_process_and_fires_its_timers(tmp_path: Path) -> None:
    import sqlite3

    from aiohttp.test_utils import TestServer

    from .services import Calls, service_app

    calls = Calls()
    service = TestServer(service_app(calls), host="127.0.0.1")
    await service.start_server()
    url = str(service.make_url("/"))
    grant = {
        "name": "Grant",
        "steps": [
            {"name": "validate", "call": {"service": "ach", "path": "/validate"}},
            {
                "name": "pay",
                "call": {"service": "ach", "path": "/transfers", "body": {"amount": "{input.n}"}},
            },
            {
                "name": "follow_up",
                "delay": "1500ms",
                "call": {
                    "service": "ach",
                    "method": "GET",
                    "path": "/transfers/{steps.pay.payment_id}",
                },
            },
            {"name": "notify", "call": {"service": "ach", "path": "/notify"}},
        ],
    }
    sections = {
        "services": [{"name": "ach", "instances": [{"id": "i1", "url": url}]}],
        "workflows": [grant],
    }
    try:
        with running_daemon(tmp_path, **sections) as daemon:
            async with aiohttp.ClientSession(daemon.url) as http:
                ids = []
                for n in range(30):
                    async with http.post("/v1/workflows/Grant", json={"input": {"n": n}}) as r:
                        assert r.status == 202
                        ids.append((await r.json())["id"])
                await asyncio.sleep(0.3)  # most are in their delay, some still paying
            daemon.kill()
            killed_at = len(calls.seen)

            await asyncio.to_thread(daemon.start)
            listed: list[dict[str, Any]] = []
            async with aiohttp.ClientSession(daemon.url) as http:

                async def all_completed() -> bool:
                    async with http.get("/v1/processes", params={"limit": "100"}) as r:
                        listed[:] = (await r.json())["processes"]
                    return len(listed) == 30 and all(p["status"] == "completed" for p in listed)

                await until(all_completed, timeout=20)
            assert sorted(p["id"] for p in listed) == sorted(ids)
            assert {p["status"] for p in listed} == {"completed"}
    finally:
        await service.close()
    notified = calls.keys("/notify")
    assert sorted(notified) == sorted(f"{i}/notify" for i in ids)  # each process once
    follow_ups = [
        path for _, path, _, _ in calls.seen[killed_at:] if path.startswith("/transfers/")
    ]
    assert len(follow_ups) == 30  # every delay fired after the restart, once
    with sqlite3.connect(tmp_path / "hms.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
