"""The Python SDK (client/, import name hms_mgmt) against a real daemon process."""

from __future__ import annotations

import ast
import asyncio
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from hms_mgmt import (
    BadRequest,
    Client,
    NotFound,
    SyncClient,
    Unauthorized,
    Unreachable,
)

from .conftest import until
from .processes import ROOT, DaemonProcess, free_port, running_daemon, write_config
from .services import Calls, service_app
from .test_auth import ADMIN

DAEMON_PACKAGES = {"registry", "scheduler", "monitor", "workflows"}


def imported_roots(package: Path) -> set[str]:
    """The top-level names every module under `package` imports (relative imports aside)."""
    roots: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_the_sdk_and_the_daemon_never_import_each_other() -> None:
    assert imported_roots(ROOT / "client" / "hms_mgmt").isdisjoint(DAEMON_PACKAGES)
    for package in DAEMON_PACKAGES:
        assert "hms_mgmt" not in imported_roots(ROOT / package), package


def test_the_sdk_is_versioned_with_the_daemon() -> None:
    import hms_mgmt

    daemon = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sdk = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text(encoding="utf-8"))
    assert sdk["project"]["version"] == daemon["project"]["version"] == hms_mgmt.__version__
    assert sdk["project"]["dependencies"] == ["aiohttp>=3.11,<4"]


# Against a real daemon process and a real step service (tests/services.py).

GRANT = {
    "name": "Grant",
    "steps": [
        {"name": "validate", "call": {"service": "ach", "path": "/validate"}},
        {
            "name": "pay",
            "call": {"service": "ach", "path": "/transfers", "body": {"amount": "{input.amount}"}},
        },
    ],
}
PARKED = {  # waits an hour: never ends within a test
    "name": "Parked",
    "steps": [{"name": "later", "delay": "1h", "publish": "grant.later"}],
}
ANNOUNCE = {"name": "Announce", "steps": [{"name": "announce", "publish": "grant.announced"}]}


@pytest.fixture
async def ach() -> AsyncIterator[tuple[str, Calls]]:
    """The step service the workflows call, on 127.0.0.1."""
    calls = Calls()
    server = TestServer(service_app(calls), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/")).rstrip("/"), calls
    await server.close()


@pytest.fixture
def daemon(tmp_path: Path, ach: tuple[str, Calls]) -> Iterator[DaemonProcess]:
    sections: dict[str, Any] = {
        "services": [{"name": "ach", "instances": [{"id": "ach-1", "url": ach[0]}]}],
        "workflows": [GRANT, PARKED, ANNOUNCE],
    }
    with running_daemon(tmp_path, **sections) as process:
        yield process


async def test_start_then_status_then_result(daemon: DaemonProcess) -> None:
    async with Client(daemon.url) as hms:
        handle = await hms.start("Grant", {"amount": 120})
        process = await handle.status()
        assert process["id"] == handle.id and process["input"] == {"amount": 120}
        report = await handle.result(timeout=10)
    assert report.success and report.status == "completed"
    assert report.process_id == handle.id and report.error is None
    assert report.output["pay"]["amount"] == 120
    assert report.output["pay"]["payment_id"].startswith("pay-")


async def test_run_reports_a_failed_process_with_its_error(
    daemon: DaemonProcess, ach: tuple[str, Calls]
) -> None:
    ach[1].fail["/transfers"] = [422]  # a 4xx is not retried: the step fails for good
    async with Client(daemon.url) as hms:
        report = await hms.run("Grant", {"amount": 5}, timeout=10)
    assert not report.success and report.status == "failed"
    assert report.error is not None and "422" in report.error["message"]


async def test_the_same_idempotency_key_gives_the_same_process(daemon: DaemonProcess) -> None:
    async with Client(daemon.url) as hms:
        first = await hms.start("Grant", {"amount": 1}, idempotency_key="grant-1")
        again = await hms.start("Grant", {"amount": 1}, idempotency_key="grant-1")
    assert first.id == again.id


async def test_result_and_run_raise_timeout_error_when_the_process_goes_on(
    daemon: DaemonProcess,
) -> None:
    async with Client(daemon.url) as hms:
        handle = await hms.start("Parked")
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.3)
        with pytest.raises(TimeoutError):
            await hms.run("Parked", timeout="1s")
        assert (await handle.status())["status"] == "waiting"


async def test_process_workflow_answers_status_and_output(daemon: DaemonProcess) -> None:
    async with Client(daemon.url) as hms:
        answer = await hms.process_workflow("Grant", {"amount": 7})
    assert answer["status"] == "completed"
    assert answer["pay"]["payment_id"].startswith("pay-")


async def test_refusals_raise_with_the_daemons_code_message_and_status(
    daemon: DaemonProcess,
) -> None:
    async with Client(daemon.url) as hms:
        with pytest.raises(NotFound) as unknown:
            await hms.start("NoSuchWorkflow")
        with pytest.raises(NotFound):
            await hms.handle("no-such-process").status()
        with pytest.raises(BadRequest) as bad:
            await hms.publish("bad topic!")
    assert unknown.value.status == 404 and unknown.value.code == "not_found"
    assert "NoSuchWorkflow" in unknown.value.message
    assert bad.value.status == 400


async def test_a_daemon_that_is_not_there_is_unreachable() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}") as hms:
        with pytest.raises(Unreachable):
            await hms.start("Grant")


async def test_the_token_is_sent_and_a_missing_one_is_unauthorized(tmp_path: Path) -> None:
    tokens = [{"token": ADMIN, "scopes": ["*"]}]
    server = {"auth": {"tokens": tokens}}
    with running_daemon(tmp_path, server=server, workflows=[ANNOUNCE]) as daemon:
        async with Client(daemon.url) as anonymous:
            with pytest.raises(Unauthorized) as refused:
                await anonymous.start("Announce")
        async with Client(daemon.url, token=ADMIN) as admin:
            report = await admin.run("Announce")
    assert refused.value.status == 401
    assert report.success


async def test_lookup_lists_passing_instances_and_round_robin_takes_turns(
    tmp_path: Path, ach: tuple[str, Calls]
) -> None:
    other = TestServer(service_app(Calls()), host="127.0.0.1")
    await other.start_server()
    up = [ach[0], str(other.make_url("/")).rstrip("/")]
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: never passing
    probe = {"type": "http", "path": "/transfers/1", "interval": "200ms", "success_threshold": 1}
    try:
        with running_daemon(tmp_path) as daemon:
            async with aiohttp.ClientSession(daemon.url) as http:
                for n, url in enumerate([*up, down]):
                    body = {"url": url, "probe": probe}
                    async with http.put(f"/v1/services/payments/instances/p{n}", json=body) as r:
                        assert r.status == 201
            async with Client(daemon.url) as hms:

                async def both_passing() -> bool:
                    return len(await hms.lookup("payments")) == 2

                await until(both_passing)
                urls = await hms.lookup("payments")
                assert await hms.lookup("nobody") == []
                balancer = hms.round_robin("payments")
                turns = [await balancer.next() for _ in range(4)]
                with pytest.raises(LookupError):
                    await hms.round_robin("nobody").next()
    finally:
        await other.close()
    assert sorted(urls) == sorted(up)
    assert turns[:2] == turns[2:] and sorted(turns[:2]) == sorted(up)


async def test_subscribe_yields_published_events_in_order(daemon: DaemonProcess) -> None:
    async with Client(daemon.url) as hms:
        events = hms.subscribe("grant.*")
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)  # subscribed before publishing
        ids = [await hms.publish("grant.submitted", {"n": n}) for n in range(3)]
        await hms.publish("other.topic", {"n": 99})
        got = [await first] + [await anext(events) for _ in range(2)]
        await events.aclose()
    assert [e.id for e in got] == ids
    assert [(e.topic, e.data) for e in got] == [("grant.submitted", {"n": n}) for n in range(3)]


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon process the test may kill and start again."""
    port = free_port()
    process = DaemonProcess(write_config(tmp_path, port), port, tmp_path / "daemon.log")
    process.start()
    yield process
    process.stop()


async def test_subscribe_resumes_after_the_daemon_restarts_without_loss_or_repeat(
    restartable: DaemonProcess,
) -> None:
    async with Client(restartable.url) as hms:
        events = hms.subscribe("grant.*")
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)
        await hms.publish("grant.submitted", {"n": 0})
        assert (await asyncio.wait_for(first, 10)).data == {"n": 0}
        restartable.kill()
        await asyncio.to_thread(restartable.start)
        # Published before the client has reconnected: it gets them from the store.
        for n in (1, 2):
            await hms.publish("grant.submitted", {"n": n})
        resumed = [await asyncio.wait_for(anext(events), 15) for _ in range(2)]
        await hms.publish("grant.submitted", {"n": 3})
        resumed.append(await asyncio.wait_for(anext(events), 10))
        await events.aclose()
    assert [e.data for e in resumed] == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_sync_client_runs_publishes_looks_up_and_subscribes(tmp_path: Path) -> None:
    with running_daemon(tmp_path, workflows=[ANNOUNCE, PARKED]) as daemon:
        with SyncClient(daemon.url) as hms:
            report = hms.run("Announce", {"a": 1}, timeout=10)
            assert report.success and report.status == "completed"
            assert hms.process_workflow("Announce")["status"] == "completed"
            handle = hms.start("Parked")
            assert handle.status()["status"] in ("started", "running", "waiting")
            with pytest.raises(TimeoutError):
                handle.result(timeout=0.2)
            assert hms.lookup("payments") == []
            event_id = hms.publish("grant.submitted", {"n": 1})
            events = hms.subscribe("grant.submitted", last_event_id=(event_id or 1) - 1)
            event = next(events)
            events.close()
        assert (event.id, event.data) == (event_id, {"n": 1})
        with pytest.raises(RuntimeError):
            hms.lookup("payments")  # closed
