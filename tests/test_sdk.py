"""The Python SDK (client/, import name hms_mgmt) against a real daemon process."""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hms_mgmt import (
    BadRequest,
    Client,
    DefinitionError,
    NotFound,
    Registration,
    Retry,
    StepContext,
    SyncClient,
    Unauthorized,
    Unavailable,
    Unreachable,
    Workflow,
    call,
    parallel,
    publish,
    step,
    wait_for,
)
from hms_mgmt import client as client_module

from .conftest import until
from .processes import ROOT, DaemonProcess, free_port, running_daemon
from .services import Calls, service_app
from .test_auth import ADMIN
from .test_readme_tour import DAEMON, shipped_config
from .test_sdk_worker import cut

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


async def test_run_longer_than_one_daemon_wait_still_answers_at_respond_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run() longer than the daemon's longest `?wait=` (5 min; 0.5 s here) waits again
    with the same key: it answers at the `respond_after` step, not only at the end."""
    monkeypatch.setattr(client_module, "MAX_WAIT", 0.5)
    review = (
        Workflow("Slow", respond_after="first")
        .step("first", publish("slow.first"), delay="1500ms")
        .step("later", publish("slow.later"), delay="1h")
    )
    with running_daemon(tmp_path) as daemon:
        async with Client(daemon.url) as hms:
            await hms.deploy(review)
            report = await hms.run("Slow", timeout=10)
            processes = await hms._call("GET", "/v1/processes", params={"workflow": "Slow"})
    assert report.success and report.status not in ("completed", "failed")
    assert len(processes["processes"]) == 1  # waited again for the one process


async def test_process_workflow_s_status_is_the_process_s_own(tmp_path: Path) -> None:
    review = Workflow("Review", output={"status": "approved", "by": "{process.id}"}).step(
        "announce", publish("review.done")
    )
    with running_daemon(tmp_path) as daemon:
        async with Client(daemon.url) as hms:
            await hms.deploy(review)
            answer = await hms.process_workflow("Review")
    assert answer["status"] == "completed"  # not the output's "approved"
    assert answer["by"]


async def test_process_workflow_answers_a_failure_with_its_error(
    daemon: DaemonProcess, ach: tuple[str, Calls]
) -> None:
    ach[1].fail["/transfers"] = [422]
    async with Client(daemon.url) as hms:
        answer = await hms.process_workflow("Grant", {"amount": 7})
    assert answer["status"] == "failed"
    assert "422" in answer["error"]["message"]


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


async def test_a_cut_answer_or_a_request_timeout_is_unavailable() -> None:
    """Faults with no HTTP status are Unavailable too, the error callers retry on (the
    Worker's poller died of them): a real server, since the daemon cannot be made to."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/processes/cut", cut)
    app.router.add_get("/v1/processes/slow", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with Client(url, request_timeout=0.2) as hms:
            for process_id in ("cut", "slow"):
                with pytest.raises(Unavailable) as raised:
                    await hms.process(process_id)
                assert raised.value.status == 0
    finally:
        await server.close()


async def test_the_token_is_sent_and_a_missing_one_is_unauthorized(tmp_path: Path) -> None:
    tokens = [{"name": "admin", "token": ADMIN, "scopes": ["*"]}]
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


async def test_a_worker_registers_without_url_and_is_neither_scraped_nor_called(
    tmp_path: Path,
) -> None:
    """DESIGN §3: `url` is required unless `probe.type` is `none` (how a Worker registers)."""
    call_workers = {"service": "workers", "path": "/"}
    calling = {"name": "CallWorkers", "steps": [{"name": "c", "call": call_workers}]}
    with running_daemon(tmp_path, workflows=[calling]) as daemon:
        worker = Registration(
            daemon.url, "workers", "w-1", url=None, probe={"type": "none"}, ttl="30s"
        )
        unprobed_only = Registration(daemon.url, "workers", "w-2", url=None, max_backoff=0.5)
        async with worker, unprobed_only:
            await asyncio.wait_for(worker.registered.wait(), 10)
            await asyncio.sleep(0.5)
            async with aiohttp.ClientSession(daemon.url) as http:
                async with http.get("/v1/health") as r:
                    health = [(i["service"], i["instance"]) for i in (await r.json())["instances"]]
                async with http.get("/v1/sd") as r:
                    targets = await r.json()
            async with Client(daemon.url) as hms:
                report = await hms.run("CallWorkers", timeout=10)
    assert ("workers", "w-1") in health and ("workers", "w-2") not in health
    assert unprobed_only.last_error is not None and "422" in unprobed_only.last_error
    assert targets == []
    assert report.status == "failed" and report.error is not None
    assert "no passing instance" in report.error["message"]


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
    assert {e.actor for e in got} == {"anonymous"}  # who published it: no auth here


async def test_subscribe_passes_a_large_event_whole(daemon: DaemonProcess) -> None:
    blob = "x" * 300_000  # one `data:` line of 300 KB
    async with Client(daemon.url) as hms:
        event_id = await hms.publish("grant.large", {"blob": blob})
        assert event_id is not None
        events = hms.subscribe("grant.*", last_event_id=event_id - 1)
        event = await asyncio.wait_for(anext(events), 10)
        await events.aclose()
    assert event.data == {"blob": blob}


async def test_subscribe_resumes_after_the_daemon_restarts_without_loss_or_repeat(
    restartable_daemon: DaemonProcess,
) -> None:
    async with Client(restartable_daemon.url) as hms:
        events = hms.subscribe("grant.*")
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)
        await hms.publish("grant.submitted", {"n": 0})
        assert (await asyncio.wait_for(first, 10)).data == {"n": 0}
        restartable_daemon.kill()
        await asyncio.to_thread(restartable_daemon.start)
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


# The builder: a workflow in Python is the JSON of a config.yaml workflow entry.


def validate(ctx: StepContext) -> dict[str, Any]:
    return {"valid": True}


async def reserve(ctx: StepContext) -> dict[str, Any]:
    return {"reservation": "r-1"}


def release(ctx: StepContext) -> None:
    return None


def test_a_built_workflow_is_the_json_of_a_config_workflow_entry() -> None:
    payment = (
        Workflow("ChildSupportPayment", deadline="2d", queue="child-support", trigger="case.opened")
        .step("validate", validate, timeout=30, retry=Retry(5, "2s", 2.0, "1m"))
        .step("reserve", reserve, compensate=release)
        .step(
            "pay",
            call("payments", "post", "/pay", body={"amount": "{input.amount}"}),
            compensate=call("payments", "POST", "/pay/{steps.pay.id}/cancel"),
        )
        .step("docs", wait_for(signal="docsValidated", timeout="2d"))
        .step("notify", publish("payment.done", {"process": "{process.id}"}), delay=1.5)
    )
    assert payment.definition() == {
        "name": "ChildSupportPayment",
        "queue": "child-support",
        "trigger": {"event": "case.opened"},
        "deadline": "2d",
        "steps": [
            {
                "name": "validate",
                "task": "validate",
                "timeout": "30s",
                "retry": {"max_attempts": 5, "backoff": "2s", "factor": 2.0, "max_backoff": "1m"},
            },
            {"name": "reserve", "task": "reserve", "compensate": {"task": "reserve.compensate"}},
            {
                "name": "pay",
                "call": {
                    "service": "payments",
                    "method": "POST",
                    "path": "/pay",
                    "body": {"amount": "{input.amount}"},
                },
                "compensate": {
                    "service": "payments",
                    "method": "POST",
                    "path": "/pay/{steps.pay.id}/cancel",
                },
            },
            {"name": "docs", "wait_for": {"signal": "docsValidated", "timeout": "2d"}},
            {
                "name": "notify",
                "publish": "payment.done",
                "data": {"process": "{process.id}"},
                "delay": "1500ms",
            },
        ],
    }
    assert payment.tasks() == {
        "validate": validate,
        "reserve": reserve,
        "reserve.compensate": release,
    }
    assert payment.queue == "child-support"
    assert Workflow("Plain").queue == "Plain"  # the daemon's default queue: the workflow name


async def test_a_built_workflow_of_calls_runs_in_the_daemon_as_config(
    tmp_path: Path, ach: tuple[str, Calls]
) -> None:
    ach[1].fail["/notify"] = [422]  # fails for good: the payment is compensated
    grant = (
        Workflow("BuiltGrant", deadline=3600)
        .step("validate", call("ach", "POST", "/validate"), timeout=5)
        .step(
            "pay",
            call("ach", "POST", "/transfers", body={"amount": "{input.amount}"}),
            compensate=call("ach", "POST", "/transfers/{steps.pay.payment_id}/cancel"),
            retry=Retry(max_attempts=2, backoff=0.1),
        )
        .step("notify", call("ach", "POST", "/notify"))
    )
    services = [{"name": "ach", "instances": [{"id": "ach-1", "url": ach[0]}]}]
    definition = grant.definition()
    with running_daemon(tmp_path, services=services, workflows=[definition]) as daemon:
        async with Client(daemon.url) as hms:
            report = await hms.run("BuiltGrant", {"amount": 9}, timeout=15)
    assert report.status == "compensated" and not report.success
    payment = report.process["outputs"]["pay"]["payment_id"]
    assert f"/transfers/{payment}/cancel" in ach[1].paths()


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: Workflow("W").step("a", validate).step("a", validate), "duplicate step"),
        (lambda: Workflow("W").step("a", wait_for("e"), compensate=release), "nothing to"),
        (lambda: Workflow("W").step("a", publish("t"), compensate=release), "nothing to"),
        (lambda: wait_for("e", signal="s"), "exactly one"),
        (lambda: wait_for(), "exactly one"),
        (lambda: Workflow("W").step("a", validate, timeout="soon"), "W.a.timeout"),
        (lambda: Workflow("W", deadline=-1), "deadline"),
        (lambda: Workflow("W", respond_after="b").step("a", validate).definition(), "no step"),
        (lambda: Workflow("W").definition(), "needs steps"),
        (lambda: Workflow("W").step("a", "not a step"), "a step is a function"),  # type: ignore[arg-type]
        (lambda: Workflow("W").step("a b", validate), "step name"),
        (lambda: Retry(max_attempts=0), "max_attempts"),
        (lambda: Workflow("W").step("a", validate).step("p", parallel(step("a", validate))), "dup"),
        (
            lambda: Workflow("W").step("p", parallel(step("a", validate)), compensate=release),
            "each",
        ),
        (
            lambda: Workflow("W").step("p", parallel(step("a", parallel(step("b", validate))))),
            "not",
        ),
        (lambda: Workflow("W").step("p", parallel(step("a", validate, colour=1))), "keyword"),
        (lambda: parallel(), "one or more"),
    ],
)
def test_mistakes_python_can_see_raise_while_building(build: Any, problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        build()


def test_a_refused_step_leaves_its_names_free_for_the_corrected_one() -> None:
    workflow = Workflow("W")
    with pytest.raises(DefinitionError, match="expect"):
        workflow.step("p", parallel(step("a", validate), step("b", validate, expect=["x"])))
    workflow.step("p", parallel(step("a", validate), step("b", validate)))
    assert [s["name"] for s in workflow.definition()["steps"]] == ["p"]
    assert sorted(workflow.tasks()) == ["a", "b"]


def test_a_built_definition_passes_the_daemons_config_model(tmp_path: Path) -> None:
    """What the builder emits is what config.yaml accepts: task steps, data, signals, output."""
    from monitor.config import Workflow as ConfigWorkflow

    built = (
        Workflow(
            "Case",
            queue="cases",
            output={"r": "{steps.reserve.reservation}"},
            respond_after="reserve",
        )
        .step("reserve", reserve, compensate=release, timeout=10)
        .step("notify", publish("case.done", {"process": "{process.id}"}))
        .step("docs", wait_for(signal="docsValidated", timeout="1d"))
    )
    ConfigWorkflow.model_validate(built.definition())


async def test_deploy_then_signal_a_waiting_process(tmp_path: Path) -> None:
    permit = (
        Workflow("Permit", output={"docs": "{steps.docs.ok}", "process": "{process.id}"})
        .step("docs", wait_for(signal="docsValidated", timeout="1h"))
        .step("announce", publish("permit.granted", {"process": "{process.id}"}))
    )
    with running_daemon(tmp_path) as daemon:
        async with Client(daemon.url) as hms:
            deployed = await hms.deploy(permit)
            assert deployed["version"] == 1
            again = await hms.deploy(permit.definition())
            assert again["version"] == 1  # unchanged: no new version
            handle = await hms.start("Permit", {"applicant_id": "A-1"})
            await hms.signal(handle.id, "docsValidated", {"ok": True})
            report = await handle.result(timeout=10)
            stored = await hms.workflow("Permit")
    assert report.success and report.output == {"docs": True, "process": handle.id}
    assert stored["source"] == "api" and stored["definition"]["name"] == "Permit"


async def test_process_workflow_answers_at_respond_after_while_the_rest_goes_on(
    tmp_path: Path, ach: tuple[str, Calls]
) -> None:
    grant = (
        Workflow("Grant", output={"payment_id": "{steps.pay.payment_id}"}, respond_after="pay")
        .step("pay", call("ach", "POST", "/transfers", body={"amount": "{input.amount}"}))
        .step("follow_up", call("ach", "GET", "/transfers/{steps.pay.payment_id}"), delay="1h")
    )
    services = [{"name": "ach", "instances": [{"id": "ach-1", "url": ach[0]}]}]
    with running_daemon(tmp_path, services=services) as daemon:
        async with Client(daemon.url) as hms:
            await hms.deploy(grant.definition())
            answer = await hms.process_workflow("Grant", {"amount": 3}, timeout=10)
    assert answer["payment_id"].startswith("pay-")
    assert answer["status"] in ("running", "waiting")  # the 1 h follow-up goes on


async def test_a_failed_report_carries_the_step_status_and_body(
    tmp_path: Path, ach: tuple[str, Calls]
) -> None:
    ach[1].fail["/transfers"] = [422]
    grant = Workflow("Grant").step("pay", call("ach", "POST", "/transfers", body={"amount": 1}))
    services = [{"name": "ach", "instances": [{"id": "ach-1", "url": ach[0]}]}]
    with running_daemon(tmp_path, services=services) as daemon:
        async with Client(daemon.url) as hms:
            await hms.deploy(grant.definition())
            report = await hms.run("Grant", timeout=10)
    assert report.status == "failed" and report.error is not None
    assert report.error["step"] == "pay" and report.error["status"] == 422
    assert "planned failure" in report.error["body"]


async def test_a_definition_the_daemon_refuses_raises_bad_request(tmp_path: Path) -> None:
    broken = Workflow("Broken").step("pay", call("ach", "POST", "/x")).definition()
    broken["steps"][0]["call"]["method"] = "BREW"
    with running_daemon(tmp_path) as daemon:
        async with Client(daemon.url) as hms:
            with pytest.raises(BadRequest) as refused:
                await hms.deploy(broken)
    assert refused.value.status == 422 and "method" in str(refused.value.details)


# The README's "From Python" section works as written (its first block, the registration,
# is tests/test_readme_tour.py's).


def readme_python_blocks() -> list[str]:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### From Python", 1)[1]
    section = section.split("\n### ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def run_readme_block(block: str, tmp_path: Path) -> str:
    port = free_port()
    daemon = DaemonProcess(shipped_config(tmp_path, port), port, tmp_path / "daemon.log")
    daemon.start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", DAEMON.sub(f"127.0.0.1:{port}", block)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        daemon.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_readme_sync_client_block_works_as_written(tmp_path: Path) -> None:
    (block,) = [b for b in readme_python_blocks() if "SyncClient(" in b]
    out = run_readme_block(block, tmp_path)
    assert "grant.submitted {'application_id': 'GR-2023-55'}" in out


def test_the_readme_worker_block_works_as_written(tmp_path: Path) -> None:
    (block,) = [b for b in readme_python_blocks() if "Worker(" in b]
    out = run_readme_block(block, tmp_path)
    assert "completed {'greeting': 'hello Ada'}" in out


async def test_sync_client_works_inside_a_running_event_loop(daemon: DaemonProcess) -> None:
    """Where asyncio.run would refuse (a notebook, a framework's handler), it still works."""
    with SyncClient(daemon.url) as hms:
        report = hms.run("Announce", timeout=10)
    assert report.success


def test_the_readme_builder_blocks_run_as_written(tmp_path: Path) -> None:
    """The Python blocks of the workflow sections build their workflows (no daemon needed:
    building and `definition()` are local; a Worker connects only when started)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## Workflows and events", 1)[1]
    blocks = re.findall(r"^```python\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block + "\nprint('built')"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 0 and done.stdout.endswith("built\n"), block + done.stderr
