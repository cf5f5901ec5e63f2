"""Shared fixtures: a controllable clock, configs on a real SQLite file, real daemons."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from monitor import build_app, load_config, parse_config
from monitor.cli import raise_open_file_limit
from monitor.config import Config

from .pg import PostgresCluster, pg_bin
from .processes import DaemonProcess, free_port, write_config
from .services import Calls, Receiver, service_app, start_receiver

AppClient = TestClient  # type: ignore[type-arg]


raise_open_file_limit()  # the overload tests hold 1,000+ sockets in this process


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.wall = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The test run's own PostgreSQL (tests/pg.py), started by the first test that needs it."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        require_tool("initdb")  # fails under CI, skips elsewhere
        raise AssertionError("unreachable")
    cluster = PostgresCluster(initdb, pg_ctl)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The store a daemon test runs on: "sqlite" unless the module sets STORES (both stores
    for the API tests that must hold on each; pytest_generate_tests parametrizes)."""
    name: str = getattr(request, "param", "sqlite")
    return name


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module with STORES runs each daemon test on each store; a test marked
    `sqlite_only` (it reads the SQLite file itself) on SQLite alone, one marked
    `postgres_only` (replicas sharing the database) on PostgreSQL alone."""
    stores = getattr(metafunc.module, "STORES", None)
    if stores and "store" in metafunc.fixturenames:
        if metafunc.definition.get_closest_marker("sqlite_only"):
            stores = ("sqlite",)
        if metafunc.definition.get_closest_marker("postgres_only"):
            stores = ("postgres",)
        metafunc.parametrize("store", stores, indirect=True)


@pytest.fixture
def storage(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """The config's `storage` section for this test: a SQLite file in tmp_path, or a new
    database on the run's PostgreSQL."""
    if store == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        return {"url": cluster.database()}
    return {"path": str(tmp_path / "hms.db")}


@pytest.fixture
def make_config(tmp_path: Path, storage: dict[str, str]) -> Callable[..., Config]:
    """A Config whose database lives in this test's tmp_path (or its PostgreSQL database)."""

    def make(**sections: Any) -> Config:
        # Not probed unless a test asks: registry tests use made-up addresses, and no
        # test may send traffic beyond 127.0.0.1.
        data: dict[str, Any] = {
            "server": {"overload_lag": "0s"},  # see tests/processes.py write_config
            "storage": dict(storage),
            "defaults": {"probe": {"type": "none"}},
        }
        defaults = sections.pop("defaults", {})
        server = sections.pop("server", {})
        data.update(sections)
        data["defaults"] = {**data["defaults"], **defaults}
        data["server"] = {**data["server"], **server}
        return parse_config(yaml.safe_dump(data), base_dir=tmp_path)

    return make


@pytest.fixture
def start_daemon(
    aiohttp_client: Callable[..., Awaitable[AppClient]], clock: FakeClock
) -> Callable[..., Awaitable[AppClient]]:
    """Build an app from a Config and serve it on a free 127.0.0.1 port."""

    async def start(config: Config) -> AppClient:
        app = build_app(config, clock=clock, metrics=CollectorRegistry())
        return await aiohttp_client(app)

    return start


@pytest.fixture
def start_watched(
    aiohttp_client: Callable[..., Awaitable[AppClient]], clock: FakeClock
) -> Callable[[Path], Awaitable[AppClient]]:
    """Serve the config at a path, watched: rewriting the file reloads it (hot reload)."""

    async def start(path: Path) -> AppClient:
        app = build_app(
            load_config(path),
            clock=clock,
            metrics=CollectorRegistry(),
            config_path=path,
            watch_interval=0.05,
        )
        return await aiohttp_client(app)

    return start


@pytest.fixture
async def daemon(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    return await start_daemon(make_config())


@pytest.fixture
def calls() -> Calls:
    """What the step service (`service`) was asked, in order."""
    return Calls()


@pytest.fixture
async def service(calls: Calls) -> AsyncIterator[TestServer]:
    """The services workflow steps call (tests/services.py service_app), on 127.0.0.1."""
    server = TestServer(service_app(calls), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def target() -> AsyncIterator[TestServer]:
    """A real probe target on 127.0.0.1 (tests/targets.py)."""
    from .targets import start_target

    server = await start_target()
    yield server
    await server.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real webhook receiver (tests/services.py)."""
    async for state in start_receiver():
        yield state


async def metric_families(client: AppClient) -> dict[str, Metric]:
    """GET /metrics, parsed by prometheus_client's own parser, by family name."""
    text = await (await client.get("/metrics")).text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def missing(message: str) -> NoReturn:
    """Something a test needs is not here: in CI (CI=true, CI=1, ...) the test fails,
    elsewhere it is skipped."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external program; in CI its absence fails the test instead of skipping."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (make test installs it via .ci/tools)")
    return path


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `predicate` every 50 ms until it holds; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


BACKENDS = ("sqlite", "postgres")  # postgres: on the cluster the test run starts (tests/pg.py)
BOTH_STORES = BACKENDS  # a daemon test module's STORES = BOTH_STORES runs it on each


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store implementation a contract test runs against (tests/contracts.py)."""
    name: str = request.param
    if name == "postgres":
        from . import contracts

        contracts._POSTGRES["cluster"] = request.getfixturevalue("postgres")
    return name


# Processes the tests start (workers, examples, the README's Python) import the SDK from
# this checkout's client/, as pytest itself does (pyproject: pythonpath), installed or not.
_CLIENT = str(Path(__file__).resolve().parent.parent / "client")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_CLIENT, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
)


@pytest.fixture
def restartable_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon process (tests/processes.py) the test may kill and start again."""
    port = free_port()
    process = DaemonProcess(write_config(tmp_path, port), port, tmp_path / "daemon.log")
    process.start()
    yield process
    process.stop()
