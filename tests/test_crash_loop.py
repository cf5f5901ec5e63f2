"""A crash loop: one database, a daemon SIGKILLed at a random moment under mixed load, 20
times with different seeds (HMS_CRASH_SEEDS=N for more). After every kill: nothing that
got a 2xx is missing, nothing deleted with a 2xx is back, the file passes
`PRAGMA integrity_check`, a start sent again with its key after a kill is the same process.
At the end every process has finished, each timer fired (its
event stored once, never before its due time) and each call carried one idempotency key."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from .conftest import until
from .processes import DaemonProcess, free_port, write_config
from .services import Calls, service_app

SEEDS = int(os.environ.get("HMS_CRASH_SEEDS", "20"))
DELAY = 0.4
TIMED = {
    "name": "Timed",
    "steps": [
        {"name": "wait", "delay": f"{int(DELAY * 1000)}ms", "publish": "timer.fired"},
        {"name": "done", "call": {"service": "rec", "path": "/done"}},
    ],
}


@dataclass
class Acked:
    """What the daemon acknowledged with a 2xx, and what is in doubt (no answer came)."""

    present: set[tuple[str, str]] = field(default_factory=set)
    deleted: set[tuple[str, str]] = field(default_factory=set)
    doubtful: set[tuple[str, str]] = field(default_factory=set)
    events: set[str] = field(default_factory=set)
    processes: set[str] = field(default_factory=set)
    unanswered_starts: set[str] = field(default_factory=set)  # idempotency keys to send again


async def load(url: str, rng: random.Random, acked: Acked, seed: int) -> None:
    """Four kinds of writes until cancelled by the kill; each remembered only once acked."""
    counter = itertools.count()
    timeout = aiohttp.ClientTimeout(total=5)

    async def registrations(http: aiohttp.ClientSession) -> None:
        while True:
            key = (f"svc{rng.randrange(5)}", f"s{seed}-{next(counter)}")
            acked.doubtful.add(key)
            path = f"/v1/services/{key[0]}/instances/{key[1]}"
            async with http.put(path, json={"url": "http://127.0.0.1:9"}) as r:
                if r.status in (200, 201):
                    acked.present.add(key)
                    acked.doubtful.discard(key)

    async def deletions(http: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(0.01)
            if not acked.present:
                continue
            key = rng.choice(sorted(acked.present))
            acked.present.discard(key)
            acked.doubtful.add(key)
            async with http.delete(f"/v1/services/{key[0]}/instances/{key[1]}") as r:
                if r.status == 204:
                    acked.deleted.add(key)
                    acked.doubtful.discard(key)

    async def publishes(http: aiohttp.ClientSession) -> None:
        while True:
            key = f"e{seed}-{next(counter)}"
            headers = {"Idempotency-Key": key}
            async with http.post("/v1/events/load.tick", json={"k": key}, headers=headers) as r:
                if r.status == 202:
                    acked.events.add(key)

    async def starts(http: aiohttp.ClientSession) -> None:
        while True:
            key = f"p{seed}-{next(counter)}"
            acked.unanswered_starts.add(key)
            async with http.post("/v1/workflows/Timed", json={"idempotency_key": key}) as r:
                if r.status == 202:
                    acked.processes.add((await r.json())["id"])
                    acked.unanswered_starts.discard(key)

    async with aiohttp.ClientSession(url, timeout=timeout) as http:
        workers = [registrations, registrations, deletions, publishes, starts, starts]
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            await asyncio.gather(*(work(http) for work in workers))


def check_file(path: Path, acked: Acked) -> None:
    """With the daemon dead: the file is sound and holds every acknowledged event."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        keys = {row[0] for row in db.execute("SELECT key FROM events WHERE key IS NOT NULL")}
        twice = db.execute(
            "SELECT idempotency_key FROM processes WHERE idempotency_key IS NOT NULL "
            "GROUP BY workflow, idempotency_key HAVING count(*) > 1"
        ).fetchall()
    assert not twice, f"a second process for one idempotency key: {twice[:3]}"
    missing = acked.events - keys
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}"


async def check_registry(url: str, acked: Acked) -> None:
    async with aiohttp.ClientSession(url) as http, http.get("/v1/sd") as resp:
        groups = await resp.json()
    found = {
        (g["labels"]["__meta_hms_service"], g["labels"]["__meta_hms_instance"]) for g in groups
    }
    found.discard(("rec", "r1"))  # the static one
    assert acked.present <= found, f"lost registrations: {sorted(acked.present - found)[:3]}"
    assert not acked.deleted & found, f"deletions undone: {sorted(acked.deleted & found)[:3]}"
    assert found <= acked.present | acked.doubtful, "instances nobody registered"
    # What is in doubt has now been decided by the restart; it is acknowledged from here on.
    acked.present, acked.doubtful = found, set()
    acked.deleted -= found


async def start_again(url: str, acked: Acked) -> None:
    """A client whose start got no answer sends it again with the same key, as it should: the
    one process (made before the kill, or now), never a second."""
    async with aiohttp.ClientSession(url) as http:
        for key in sorted(acked.unanswered_starts):
            async with http.post("/v1/workflows/Timed", json={"idempotency_key": key}) as r:
                assert r.status == 202, await r.text()
                acked.processes.add((await r.json())["id"])
    acked.unanswered_starts.clear()


async def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    calls = Calls()
    recorder = TestServer(service_app(calls), host="127.0.0.1")
    await recorder.start_server()
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        services=[{"name": "rec", "instances": [{"id": "r1", "url": str(recorder.make_url("/"))}]}],
        workflows=[TIMED],
    )
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    acked = Acked()
    try:
        for seed in range(SEEDS):
            rng = random.Random(seed)
            await asyncio.to_thread(daemon.start)
            await check_registry(daemon.url, acked)
            await start_again(daemon.url, acked)
            worker = asyncio.create_task(load(daemon.url, rng, acked, seed))
            await asyncio.sleep(rng.uniform(0.05, 1.0))
            daemon.kill()  # SIGKILL while requests are in flight
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            check_file(tmp_path / "hms.db", acked)

        await asyncio.to_thread(daemon.start)
        await check_registry(daemon.url, acked)
        await start_again(daemon.url, acked)
        await every_process_finished(daemon.url, acked)
    finally:
        daemon.stop()
        await recorder.close()
    check_file(tmp_path / "hms.db", acked)
    check_timers(tmp_path / "hms.db", acked, calls)
    print(
        f"\n{SEEDS} kills: {len(acked.present)} instances, {len(acked.deleted)} deletions, "
        f"{len(acked.events)} events, {len(acked.processes)} processes acknowledged, none lost"
    )


async def every_process_finished(url: str, acked: Acked) -> None:
    async with aiohttp.ClientSession(url) as http:
        statuses: dict[str, str] = {}

        async def done() -> bool:
            cursor: Any = None
            statuses.clear()
            while True:
                params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
                async with http.get("/v1/processes", params=params) as r:
                    page = await r.json()
                statuses.update({p["id"]: p["status"] for p in page["processes"]})
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            return all(statuses.get(pid) == "completed" for pid in acked.processes)

        await until(done, timeout=60)
    assert acked.processes <= set(statuses)


def check_timers(path: Path, acked: Acked, calls: Calls) -> None:
    """Each process: its timer event stored once, not before the due time; its call made
    with one idempotency key (a repeat after a kill carries the same one)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT p.id, p.created_at, e.published_at FROM processes p "
            "JOIN events e ON e.key = p.id || '/wait'"
        ).fetchall()
    fired = {pid: (created, at) for pid, created, at in rows}
    lost = acked.processes - set(fired)
    assert not lost, f"{len(lost)} timers never fired"
    early = [pid for pid, (created, at) in fired.items() if at < created + DELAY - 0.01]
    assert not early, f"timers fired before their due time: {early[:3]}"
    keys: dict[str, set[str | None]] = {}
    for _, path_, _, key in calls.seen:
        if path_ == "/done" and key:
            keys.setdefault(key.split("/")[0], set()).add(key)
    assert acked.processes <= set(keys)
    assert all(len(k) == 1 for k in keys.values())
