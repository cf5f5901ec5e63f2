"""A 2xx from the registry is durable: SIGKILL right after loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

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
