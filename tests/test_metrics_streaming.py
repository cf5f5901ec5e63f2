"""/metrics at many instances: streamed a slice at a time, each family whole, and the
event loop serving others while the scrape counts, copies and renders."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.health.metrics import SLICE
from monitor.keys import PARTS
from monitor.slo.metrics import SloMetrics
from registry import HealthState

from .conftest import AppClient, FakeClock, require_tool

INSTANCES = 2 * SLICE + 100  # three slices: a whole one, another, and a part


async def register_fleet(client: AppClient, count: int = INSTANCES, service: str = "fleet") -> None:
    async def one(n: int) -> None:
        body = {"url": f"http://127.0.0.1:9/{n}"}
        resp = await client.put(f"/v1/services/{service}/instances/i{n:05d}", json=body)
        assert resp.status == 201, await resp.text()

    for start in range(0, count, 100):
        await asyncio.gather(*(one(n) for n in range(start, min(count, start + 100))))


def contiguous(text: str) -> bool:
    """Every family's samples in one run, right after its own TYPE line, which comes once."""
    seen: set[str] = set()
    current = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2].removesuffix("_total")
            if current in seen:
                return False
            seen.add(current)
        elif line and not line.startswith("#") and not line.startswith(current or "\0"):
            return False
    return True


async def test_a_scrape_of_many_instances_streams_every_family_whole(
    daemon: AppClient, tmp_path: Path
) -> None:
    await register_fleet(daemon)
    plain = await (await daemon.get("/metrics")).text()
    resp = await daemon.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert "Content-Length" not in resp.headers  # streamed as rendered
    unzipped = gzip.decompress(await resp.read()).decode()

    for text in (plain, unzipped):
        assert contiguous(text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        health = families["hms_instance_health"].samples
        assert len({s.labels["instance"] for s in health}) == INSTANCES
        assert len(health) == INSTANCES * len(HealthState)  # one series per state
        unknown = [s for s in health if s.labels["state"] == "unknown"]
        assert sum(s.value for s in unknown) == INSTANCES
        counts = {
            s.labels["health"]: s.value
            for s in families["hms_registry_instances"].samples
            if s.labels["service"] == "fleet"
        }
        assert counts["unknown"] == INSTANCES
    # The same series in both (values of the process' own families differ between scrapes).
    assert probe_lines(plain) == probe_lines(unzipped)

    exposition = tmp_path / "metrics.txt"
    exposition.write_text(plain)
    checked = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        stdin=exposition.open(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    # promtool prints lint advice (exit 3) for names it dislikes; errors exit 1.
    assert checked.returncode in (0, 3), checked.stderr + checked.stdout
    assert "error" not in checked.stderr.lower(), checked.stderr


def probe_lines(text: str) -> list[str]:
    prefixes = ("hms_probe_", "hms_instance_", "hms_registry_instances")
    return [line for line in text.splitlines() if line.startswith(prefixes)]


@pytest.fixture
def turns() -> Iterator[Callable[[], int]]:
    """The number of event-loop turns so far, counted by a task that yields each turn."""
    count = itertools.count()
    current = [0]

    async def tick() -> None:
        while True:
            current[0] = next(count)
            await asyncio.sleep(0)

    task = asyncio.get_event_loop().create_task(tick())
    yield lambda: current[0]
    task.cancel()


async def test_a_scrape_lets_the_loop_turn_while_it_copies_and_counts(
    daemon: AppClient, turns: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 10,000 instances a scrape counted every instance's health and copied every
    probe counter in one go each (60-70 ms with no request served); now a slice at a
    time, other work running between slices."""
    await register_fleet(daemon, 3 * SLICE)
    parts = daemon.app[PARTS]
    seen_copying: set[int] = set()
    seen_counting: set[int] = set()
    row, health_of = parts.checker.stats.row, parts.catalog.health.health_of

    def copying(slot: int) -> Any:
        seen_copying.add(turns())
        return row(slot)

    def counting(instance: Any) -> Any:
        seen_counting.add(turns())
        return health_of(instance)

    monkeypatch.setattr(parts.checker.stats, "row", copying)
    monkeypatch.setattr(parts.catalog.health, "health_of", counting)
    monkeypatch.setattr("registry.catalog.COUNTED_PER_TURN", SLICE)
    assert (await daemon.get("/metrics")).status == 200
    # Three slices each: other tasks ran between them (one go, before: a single turn each).
    assert len(seen_copying) >= 2
    assert len(seen_counting) >= 2


async def test_health_counts_survive_changes_between_slices(
    daemon: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register_fleet(daemon, 300, service="a")
    await register_fleet(daemon, 5, service="b")
    catalog = daemon.app[PARTS].catalog
    health_of = catalog.health.health_of

    def slowly(instance: Any) -> Any:
        time.sleep(0.001)  # a few hundred milliseconds in all: changes land in between
        return health_of(instance)

    monkeypatch.setattr(catalog.health, "health_of", slowly)
    counting = asyncio.ensure_future(catalog.health_counts(per_turn=1))
    await asyncio.sleep(0)
    # Meanwhile: one leaves the service being counted, another service comes.
    assert (await daemon.delete("/v1/services/a/instances/i00299")).status == 204
    await register_fleet(daemon, 1, service="c")
    assert not counting.done()
    counts = await counting
    # Each service as it stood when its turn came; services as they stood at the start.
    assert list(counts) == ["a", "b"]
    assert sum(counts["a"]) == 300 and sum(counts["b"]) == 5
    monkeypatch.undo()
    later = await catalog.health_counts()
    assert sum(later["a"]) == 299 and sum(later["c"]) == 1


async def test_head_of_metrics_is_the_headers_alone(daemon: AppClient) -> None:
    """aiohttp sends a streamed response's body even to a HEAD, with no framing: the next
    response on that connection would start with exposition text."""
    await register_fleet(daemon, 3)
    url = daemon.make_url("/metrics")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain" in head
    after = await reader.readuntil(b"\r\n\r\n")  # the very next bytes: the GET's answer
    assert after.startswith(b"HTTP/1.1 200") and b"application/json" in after
    writer.close()


def endless(piece: str = "hms_filler 1\n" * 8000, pieces: int = 400) -> Callable[..., Any]:
    """ProbeMetrics.texts standing in for a fleet of any size: `pieces` of ~100 KB each."""

    async def texts(*, maintenance: bool = True) -> Any:
        for _ in range(pieces):
            yield piece
            await asyncio.sleep(0)

    return texts


async def test_a_scraper_that_hangs_up_mid_scrape_is_no_error(
    daemon: AppClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Prometheus gives up at its scrape_timeout: the daemon stops sending, quietly."""
    monkeypatch.setattr(daemon.app[PARTS].probe_metrics, "texts", endless())
    url = daemon.make_url("/metrics")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.transport.abort()
    await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert (await daemon.get("/healthz")).status == 200


@pytest.mark.parametrize("reads", ["at once", "slowly"])
async def test_a_scraper_that_hangs_up_is_no_error_as_the_daemon_serves(
    daemon: AppClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reads: str,
) -> None:
    """As `hms-mgmt serve` runs it (aiohttp's run_app leaves a handler running when its
    client leaves; the test server cancels it): a scraper that read slowly has left the
    daemon waiting for its buffers to drain, where the hang-up arrives as another error."""
    daemon.server.runner.server.handler_cancellation = False  # type: ignore[union-attr]
    monkeypatch.setattr(daemon.app[PARTS].probe_metrics, "texts", endless())
    url = daemon.make_url("/metrics")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    if reads == "slowly":
        await until_draining(daemon)
    writer.transport.abort()
    await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert (await daemon.get("/healthz")).status == 200


async def until_draining(daemon: AppClient) -> None:
    """Until the daemon's side of some connection waits for its send buffer to drain."""
    for _ in range(200):
        protocols = daemon.server.runner.server.connections  # type: ignore[union-attr]
        if any(p.writing_paused for p in protocols):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the daemon never waited on a full send buffer")


async def test_a_scrape_that_fails_midway_is_cut_not_answered_twice(
    daemon: AppClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once bytes have gone, an error answer would land inside the body (a second status
    line in a 200): the scraper must see a broken response instead, and the log why."""
    texts = endless(pieces=5)

    async def failing(*, maintenance: bool = True) -> Any:
        async for text in texts():
            yield text
        raise KeyError("a probe row went missing")

    monkeypatch.setattr(daemon.app[PARTS].probe_metrics, "texts", failing)
    resp = await daemon.get("/metrics")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert any("failed while streaming" in r.getMessage() for r in caplog.records)
    assert (await daemon.get("/healthz")).status == 200


async def test_without_instances_every_family_is_declared(
    make_config: Callable[..., Any], start_daemon: Callable[..., Any]
) -> None:
    client = await start_daemon(make_config())
    text = await (await client.get("/metrics")).text()
    for family in ("hms_probe_total", "hms_probe_duration_seconds", "hms_instance_health"):
        assert f"# TYPE {family} " in text
    assert "# TYPE hms_registry_instances gauge" in text
    assert "# TYPE hms_maintenance gauge" in text
    assert contiguous(text)


async def test_the_slo_families_render_a_slice_per_turn_each_family_whole(
    make_config: Callable[..., Any],
    start_daemon: Callable[..., Any],
    clock: FakeClock,
    turns: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20,000 SLOs' once-a-minute render took ~1 s in a worker thread that held the GIL:
    the loop got it back every 5 ms at best. Now the loop formats PER_TURN SLOs a turn."""
    slos = [{"name": "availability", "objective": 99.9}, {"name": "fast", "objective": 99}]
    services = [{"name": f"s{n}", "slos": slos} for n in range(3)]
    client = await start_daemon(make_config(services=services))
    monkeypatch.setattr("monitor.slo.metrics.PER_TURN", 2)
    seen: list[int] = []
    rows = SloMetrics.rows

    def counted(self: SloMetrics, *args: Any) -> Any:
        seen.append(turns())
        return rows(self, *args)

    monkeypatch.setattr(SloMetrics, "rows", counted)
    clock.advance(60)  # a new minute: the next scrape renders
    text = await (await client.get("/metrics")).text()
    assert len(seen) == 3 and len(set(seen)) >= 2  # 6 SLOs, 2 a turn, others ran between
    assert contiguous(text)
    objectives = [line for line in text.splitlines() if line.startswith("hms_slo_objective")]
    assert len(objectives) == 6
