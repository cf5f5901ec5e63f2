"""Storage faults: a full disk and a read-only database refuse writes with 503 and one clear
log line, keep reads working, and recover by themselves; a corrupt or foreign file at start
is a clear error and is left as it was."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from monitor.config import Config
from monitor.keys import DATABASE
from registry import StoreUnavailable

from .conftest import AppClient, metric_families, until
from .processes import ROOT, free_port, write_config

WORKFLOW = {"name": "Pay", "steps": [{"name": "later", "delay": "1h", "publish": "paid"}]}
QUICK = {"name": "Quick", "steps": [{"name": "soon", "delay": "300ms", "publish": "done"}]}
BIG_META = {f"k{i}": "x" * 200 for i in range(60)}  # ~12 KiB a row: a few pages each


async def pragma(client: AppClient, sql: str) -> int:
    def run(db: object) -> int:
        row = db.execute(sql).fetchone()  # type: ignore[attr-defined]
        return int(row[0]) if row else 0

    return await client.app[DATABASE].read(run)


async def register(client: AppClient, name: str) -> int:
    body = {"url": "http://127.0.0.1:9", "meta": BIG_META}
    resp = await client.put(f"/v1/services/fill/instances/{name}", json=body)
    if resp.status >= 300:
        error = (await resp.json())["error"]
        assert (resp.status, error["code"]) == (503, "storage_unavailable"), error
        assert "storage unavailable" in error["message"]
    return resp.status


async def until_refused(send: Callable[[int], Awaitable[aiohttp.ClientResponse]]) -> int:
    """Send changes until one is refused; every answer is a 2xx or a 503 in the error shape.
    (A full database still takes what fits in the free space of its pages.)"""
    for n in range(2000):
        resp = await send(n)
        if resp.status == 503:
            assert (await resp.json())["error"]["code"] == "storage_unavailable"
            return n
        assert resp.status < 300, await resp.text()
    raise AssertionError("never refused")


async def writes_refused(client: AppClient, *, deletes: bool) -> None:
    """Every kind of change is refused with 503; reads answer as before."""
    assert await register(client, "refused") == 503
    published = await until_refused(lambda n: client.post(f"/v1/events/t.{n}", json={"n": n}))
    started = await until_refused(lambda n: client.post("/v1/workflows/Pay", json={"input": {}}))
    if deletes:  # deleting needs no new page: on a full disk SQLite still allows it
        assert await until_refused(lambda n: client.delete("/v1/services/fill/instances/kept")) == 0
    for path in ("/v1/services/fill", "/v1/processes", "/", "/metrics", "/v1/health"):
        assert (await client.get(path)).status == 200, path
    listed = await (await client.get("/v1/services/fill")).json()
    assert {i["id"] for i in listed["instances"]} == {"kept"}
    processes = await (await client.get("/v1/processes?workflow=Pay")).json()
    assert len(processes["processes"]) == started  # the accepted ones, and only those
    families = await metric_families(client)
    assert families["hms_storage_writable"].samples[0].value == 0
    ready = await (await client.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["writable"] is False
    assert published >= 0


async def recovers(client: AppClient) -> None:
    assert await register(client, "after") == 201
    assert (await client.post("/v1/workflows/Pay", json={"input": {}})).status == 202
    families = await metric_families(client)
    assert families["hms_storage_writable"].samples[0].value == 1


@pytest.fixture
async def daemon_with_data(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    client = await start_daemon(make_config(workflows=[WORKFLOW, QUICK]))
    assert await register(client, "kept") == 201
    return client


async def test_a_full_disk_refuses_writes_with_503_and_recovers(
    daemon_with_data: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = daemon_with_data
    size = await pragma(client, "PRAGMA page_count")
    # SQLite's own size limit: past it every write fails as on a full disk (SQLITE_FULL).
    assert await pragma(client, f"PRAGMA max_page_count = {size}") == size
    await writes_refused(client, deletes=False)
    failures = [r for r in caplog.records if "storage: writes to" in r.getMessage()]
    assert len(failures) == 1  # one line for the outage, not one per refused request
    assert failures[0].levelno == logging.ERROR
    assert "database or disk is full" in failures[0].getMessage()

    await pragma(client, "PRAGMA max_page_count = 1073741823")  # space is back
    await recovers(client)
    assert "accepts writes again" in caplog.text


async def test_a_read_only_database_refuses_writes_with_503_and_recovers(
    daemon_with_data: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = daemon_with_data
    quick = await (await client.post("/v1/workflows/Quick", json={"input": {}})).json()
    await pragma(client, "PRAGMA query_only = 1")  # as after a read-only remount
    await writes_refused(client, deletes=True)
    assert "readonly database" in caplog.text
    await asyncio.sleep(0.5)  # Quick's delay is over: its next checkpoint cannot be stored
    held = await (await client.get(f"/v1/processes/{quick['id']}")).json()
    assert held["status"] in ("waiting", "running")  # held, not failed
    await pragma(client, "PRAGMA query_only = 0")
    await recovers(client)

    async def completed() -> bool:
        process = await (await client.get(f"/v1/processes/{quick['id']}")).json()
        return bool(process["status"] == "completed")

    await until(completed)


async def test_probe_results_and_slo_minutes_wait_out_a_full_disk(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    from monitor.keys import RESULTS
    from monitor.probing import ProbeResult

    client = await start_daemon(make_config())
    results = client.app[RESULTS]
    size = await pragma(client, "PRAGMA page_count")
    await pragma(client, f"PRAGMA max_page_count = {size}")
    for minute in range(3):
        for i in range(200):
            at = 1_800_000_000.0 + minute * 60
            result = ProbeResult(at=at, response_time=0.01, connected=True, status=200)
            results.add("svc", f"i{i}", result, ok=True)
    with pytest.raises(StoreUnavailable, match="storage unavailable"):
        await results.flush(1_800_000_000.0 + 300)
    await pragma(client, "PRAGMA max_page_count = 1073741823")
    assert await results.flush(1_800_000_000.0 + 300) == 600  # nothing was lost meanwhile
    stored = await pragma(client, "SELECT sum(count) FROM probe_minutes")
    assert stored == 600


async def test_a_minute_a_failed_flush_kept_adds_the_results_that_came_meanwhile(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    from monitor.keys import RESULTS
    from monitor.probing import ProbeResult

    client = await start_daemon(make_config())
    results = client.app[RESULTS]
    at = 1_800_000_000.0
    result = ProbeResult(at=at, response_time=0.01, connected=True, status=200)
    for i in range(600):  # enough rows that the full file refuses them
        results.add("svc", f"i{i}", result, ok=True)
    results.add("svc", "i1", result, ok=False)
    size = await pragma(client, "PRAGMA page_count")
    await pragma(client, f"PRAGMA max_page_count = {size}")
    flush = asyncio.create_task(results.flush(at + 120))
    await asyncio.sleep(0)  # the flush has taken the minute and waits for the store
    results.add("svc", "i1", result, ok=True)  # a late result of that minute, meanwhile
    with pytest.raises(StoreUnavailable):
        await flush
    await pragma(client, "PRAGMA max_page_count = 1073741823")
    await results.flush(at + 120)
    stored = await pragma(client, "SELECT count FROM probe_minutes WHERE instance = 'i1'")
    assert stored == 3
    successes = await pragma(client, "SELECT successes FROM probe_minutes WHERE instance = 'i1'")
    assert successes == 2


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path, free_port())
    return subprocess.run(
        [sys.executable, "-m", "monitor", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
        db.execute("INSERT INTO invoices (amount) VALUES (12.5)")


def corrupt(path: Path) -> None:
    foreign(path)
    data = bytearray(path.read_bytes())
    data[100:600] = b"\xff" * 500  # the schema page's header and cell pointers
    path.write_bytes(bytes(data))


def not_sqlite(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 this is a zip file, or anything else\n" * 100)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (foreign, "a SQLite database of another application"),
        (corrupt, "not a usable SQLite database"),
        (not_sqlite, "not a usable SQLite database"),
    ],
)
def test_a_foreign_or_corrupt_database_stops_the_start_and_is_not_touched(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "hms.db"
    make(path)
    before = digest(path)
    done = serve(tmp_path)
    assert done.returncode != 0
    assert message in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr
    assert digest(path) == before
    assert not (tmp_path / "hms.db-wal").exists() or (tmp_path / "hms.db-wal").stat().st_size == 0
