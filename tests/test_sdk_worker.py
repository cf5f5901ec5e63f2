"""hms_mgmt.Worker against a real daemon process: deploys, registers, polls, runs, reports."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hms_mgmt import (
    Client,
    NonRetryable,
    Retry,
    StepContext,
    Unauthorized,
    Worker,
    Workflow,
    parallel,
    publish,
    step,
)

from .conftest import until
from .processes import DaemonProcess, free_port, running_daemon


def worker(url: str, *workflows: Workflow, **kwargs: Any) -> Worker:
    kwargs.setdefault("poll_wait", "1s")
    kwargs.setdefault("stop_timeout", "10s")
    return Worker(url, workflows=workflows, **kwargs)


async def test_a_worker_deploys_registers_and_runs_sync_and_async_functions(
    tmp_path: Path,
) -> None:
    seen: list[StepContext] = []

    def validate(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"valid": ctx.input["amount"] > 0}

    async def reserve(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"reservation": f"r-{ctx.steps['validate']['valid']}"}

    payment = (
        Workflow("ChildSupportPayment", queue="child-support")
        .step("validate", validate)
        .step("reserve", reserve)
        .step("notify", publish("payment.done", {"process": "{process.id}"}))
    )
    with running_daemon(tmp_path) as daemon:
        async with worker(daemon.url, payment) as w, Client(daemon.url) as hms:
            report = await hms.run("ChildSupportPayment", {"amount": 10}, timeout=15)
            instances: list[dict[str, Any]] = []

            async def registered() -> bool:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"{daemon.url}/v1/services/child-support") as r,
                ):
                    instances[:] = (await r.json())["instances"]
                return bool(instances)

            await until(registered)  # registration runs beside the polls, not before them
            deployed = await hms.workflow("ChildSupportPayment")
    assert report.success and report.status == "completed"
    assert report.output["reserve"] == {"reservation": "r-True"}
    assert [(c.step, c.attempt) for c in seen] == [("validate", 1), ("reserve", 1)]
    assert {c.process_id for c in seen} == {report.process_id}
    assert seen[1].idempotency_key == f"{report.process_id}/reserve"
    assert [i["id"] for i in instances] == [w.id]
    assert deployed["source"] == "api" and deployed["version"] == 1


async def test_non_retryable_fails_at_once_and_the_compensation_runs(tmp_path: Path) -> None:
    attempts: list[int] = []
    released: list[str] = []

    def reserve(ctx: StepContext) -> dict[str, Any]:
        return {"reservation": "r-1"}

    def release(ctx: StepContext) -> None:
        released.append(ctx.idempotency_key)

    def pay(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        raise NonRetryable("account closed")

    payment = (
        Workflow("Payment")
        .step("reserve", reserve, compensate=release)
        .step("pay", pay, retry=Retry(max_attempts=3, backoff=0.1))
    )
    with running_daemon(tmp_path) as daemon:
        async with worker(daemon.url, payment), Client(daemon.url) as hms:
            report = await hms.run("Payment", timeout=15)
    assert report.status == "compensated" and not report.success
    assert attempts == [1]
    assert released == [f"{report.process_id}/reserve.compensate"]
    failed = [h for h in report.process["history"] if h.get("step") == "pay"]
    assert "account closed" in str(failed)


async def test_an_exception_is_retried_and_its_message_kept(tmp_path: Path) -> None:
    def flaky(ctx: StepContext) -> dict[str, int]:
        if ctx.attempt < 3:
            raise ValueError(f"flaky {ctx.attempt}")
        return {"attempt": ctx.attempt}

    flow = Workflow("Flaky").step("try", flaky, retry=Retry(max_attempts=3, backoff=0.05))
    with running_daemon(tmp_path) as daemon:
        async with worker(daemon.url, flow), Client(daemon.url) as hms:
            report = await hms.run("Flaky", timeout=15)
    assert report.success and report.output == {"try": {"attempt": 3}}
    assert "ValueError: flaky 1" in str(report.process["history"])


async def test_tasks_serve_the_task_steps_of_a_yaml_workflow(tmp_path: Path) -> None:
    def reserve_funds(ctx: StepContext) -> dict[str, Any]:
        return {"reservation": f"funds-{ctx.input['parent_id']}"}

    case = {
        "name": "ChildSupportCase",
        "queue": "child-support",
        "steps": [{"name": "reserve", "task": "reserveFunds"}],
    }
    with running_daemon(tmp_path, workflows=[case]) as daemon:
        serving = Worker(
            daemon.url, tasks={"reserveFunds": reserve_funds}, queue="child-support", poll_wait=1
        )
        async with serving, Client(daemon.url) as hms:
            report = await hms.run("ChildSupportCase", {"parent_id": "P-1"}, timeout=15)
    assert report.output == {"reserve": {"reservation": "funds-P-1"}}


async def test_a_long_task_heartbeats_its_lease_and_runs_once(tmp_path: Path) -> None:
    runs: list[int] = []

    async def slow(ctx: StepContext) -> str:
        runs.append(ctx.attempt)
        await asyncio.sleep(3)  # three times the step's timeout: only heartbeats keep it
        return "done"

    flow = Workflow("Slow").step("slow", slow, timeout=1, retry=Retry(max_attempts=3))
    with running_daemon(tmp_path) as daemon:
        async with worker(daemon.url, flow), Client(daemon.url) as hms:
            report = await hms.run("Slow", timeout=20)
    assert report.success and report.output == {"slow": "done"}
    assert runs == [1]


async def test_concurrency_bounds_the_tasks_in_flight(tmp_path: Path) -> None:
    lock = threading.Lock()
    running, most = [0], [0]

    def busy(ctx: StepContext) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)  # a sync function: in the worker's threads, not on its loop
        with lock:
            running[0] -= 1

    flow = Workflow("Busy").step("busy", busy)
    with running_daemon(tmp_path) as daemon:
        async with worker(daemon.url, flow, concurrency=2), Client(daemon.url) as hms:
            handles = [await hms.start("Busy") for _ in range(6)]
            reports = [await h.result(timeout=20) for h in handles]
    assert all(r.success for r in reports)
    assert most[0] == 2


async def test_fewer_slots_than_queues_still_serve_every_queue_soon(tmp_path: Path) -> None:
    """concurrency 1 and two queues: the queue whose poll waits for the slot is not kept
    waiting a whole poll_wait (30 s) by the other's long poll."""

    def done(ctx: StepContext) -> str:
        return ctx.workflow

    flows = [Workflow(name).step("done", done) for name in ("QueueA", "QueueB")]
    with running_daemon(tmp_path) as daemon:
        serving = worker(daemon.url, *flows, concurrency=1, poll_wait="30s")
        async with serving, Client(daemon.url) as hms:
            await asyncio.sleep(0.5)  # one queue's poll holds the slot, the other waits
            # After a task the other queue's poll has the slot: one of the first two runs
            # waits for it, whichever queue had it at first.
            runs = ("QueueA", "QueueA", "QueueB")
            reports = [await hms.run(name, timeout=6) for name in runs]
    assert [r.output for r in reports] == [{"done": name} for name in runs]


async def test_stop_lets_the_tasks_in_flight_finish_and_report(tmp_path: Path) -> None:
    started = asyncio.Event()

    async def slow(ctx: StepContext) -> str:
        started.set()
        await asyncio.sleep(1)
        return "finished"

    flow = Workflow("Stopping").step("slow", slow)
    with running_daemon(tmp_path) as daemon:
        serving = worker(daemon.url, flow)
        async with Client(daemon.url) as hms:
            await serving.start()
            handle = await hms.start("Stopping")
            await asyncio.wait_for(started.wait(), 10)
            await serving.stop()
            report = await handle.result(timeout=5)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{daemon.url}/v1/services/Stopping") as r,
            ):
                instances = (await r.json())["instances"]
    assert report.success and report.output == {"slow": "finished"}
    assert instances == []  # deregistered


async def test_a_rolling_restart_hands_the_next_task_to_the_new_worker_at_once(
    tmp_path: Path,
) -> None:
    """The old worker's long poll, cancelled by stop(), must not take the next task for
    nobody: that task would come back only after its lease, as a failed attempt."""

    def charge(ctx: StepContext) -> dict[str, Any]:
        return {"charged": ctx.input["amount"]}

    flow = Workflow("Charge").step("charge", charge, timeout=20)
    with running_daemon(tmp_path) as daemon:
        old = worker(daemon.url, flow, worker_id="old", poll_wait="30s")
        await old.start()
        await asyncio.sleep(1)  # the old worker is long-polling
        await old.stop()
        async with worker(daemon.url, flow, worker_id="new"), Client(daemon.url) as hms:
            await asyncio.sleep(0.5)
            report = await hms.run("Charge", {"amount": 5}, timeout=10)
    assert report.success and report.output == {"charge": {"charged": 5}}
    history = [(a["attempt"], a["instance"], a["outcome"]) for a in report.process["history"]]
    assert history == [(1, "new", "ok")]


async def test_the_worker_carries_on_when_the_daemon_restarts_mid_task(
    restartable_daemon: DaemonProcess,
) -> None:
    release = asyncio.Event()
    runs: list[str] = []

    async def gated(ctx: StepContext) -> str:
        runs.append(ctx.idempotency_key)
        await release.wait()
        return "paid"

    def after(ctx: StepContext) -> str:
        return "noted"

    flow = Workflow("Restart").step("pay", gated, timeout=30).step("note", after)
    async with worker(restartable_daemon.url, flow), Client(restartable_daemon.url) as hms:
        handle = await hms.start("Restart")
        await until(lambda: _true(bool(runs)))
        restartable_daemon.kill()
        await asyncio.to_thread(restartable_daemon.start)
        release.set()  # the result goes out once the daemon answers again
        report = await handle.result(timeout=30)
        again = await hms.run("Restart", timeout=20)  # and the worker polls the new daemon
    assert report.success and report.output == {"pay": "paid", "note": "noted"}
    assert again.success
    assert runs.count(f"{handle.id}/pay") == 1


async def test_a_worker_waiting_for_its_daemon_stops_when_told() -> None:
    """stop() (SIGTERM under run()) while the daemon is away: start() used to retry its
    deploy for ever, a request after the stop opening a session nothing closed."""

    def noop(ctx: StepContext) -> None:
        return None

    serving = worker(f"http://127.0.0.1:{free_port()}", Workflow("Away").step("noop", noop))
    starting = asyncio.create_task(serving.start())
    await asyncio.sleep(1)  # deploying: unreachable, retrying
    await serving.stop()
    await asyncio.wait_for(starting, 3)
    running = asyncio.create_task(serving.run())  # stopped already: run() ends at once
    await asyncio.wait_for(running, 3)


async def test_a_worker_without_the_work_scope_is_refused(tmp_path: Path) -> None:
    tokens = [
        {
            "name": "worker-token-123",
            "token": "worker-token-123",
            "scopes": ["define:*", "register:*"],
        }
    ]

    def noop(ctx: StepContext) -> None:
        return None

    flow = Workflow("Scoped").step("noop", noop)
    with running_daemon(tmp_path, server={"auth": {"tokens": tokens}}) as daemon:
        serving = worker(daemon.url, flow, token="worker-token-123")
        with pytest.raises(Unauthorized) as refused:
            await asyncio.wait_for(serving.run(), 15)
    assert refused.value.status == 403


async def _true(value: bool) -> bool:
    return value


WORKER_MODULE = """
from hms_mgmt import StepContext, Workflow


def shout(ctx: StepContext) -> dict:
    return {"loud": ctx.input["word"].upper()}


flow = Workflow("Shout", queue="shouters").step("shout", shout)
"""


async def test_python_m_hms_mgmt_worker_serves_a_module_until_sigterm(tmp_path: Path) -> None:
    (tmp_path / "shouting.py").write_text(WORKER_MODULE, encoding="utf-8")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    with running_daemon(tmp_path) as daemon:

        async def registered() -> bool:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{daemon.url}/v1/services/shouters") as r,
            ):
                return len((await r.json())["instances"]) == 1

        with (tmp_path / "worker.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "hms_mgmt.worker", "shouting:flow", "--url", daemon.url],
                env={**os.environ, "PYTHONPATH": path},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            await until(registered)  # deployed first, then registered: Shout is defined now
            async with Client(daemon.url) as hms:
                report = await hms.run("Shout", {"word": "hello"}, timeout=20)
        finally:
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 15)
        assert not await registered()  # deregistered on the way out
    assert report.output == {"shout": {"loud": "HELLO"}}
    assert code == 0, (tmp_path / "worker.log").read_text()


# -- faults the real daemon cannot be made to show: a stand-in daemon, a real HTTP server ----

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def cut(request: web.Request) -> web.StreamResponse:
    """An answer cut mid-body: the daemon killed while writing, a proxy's reset."""
    resp = web.StreamResponse(headers={"Content-Length": "100", "Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"tasks": [')
    assert request.transport is not None
    request.transport.close()
    return resp


def delivery(deadline: float, **extra: Any) -> dict[str, Any]:
    """A task as the daemon's poll hands it out, for the step `a` of workflow `W`."""
    return {
        "id": "d1",
        "process": "p1",
        "workflow": "W",
        "step": "a",
        "task": "a",
        "input": {},
        "steps": {},
        "attempt": 1,
        "idempotency_key": "p1/a",
        "deadline": deadline,
        **extra,
    }


@contextlib.asynccontextmanager
async def stand_in(
    poll: Handler, answers: list[tuple[str, Any]], heartbeat: Handler | None = None
) -> AsyncIterator[str]:
    """A daemon that serves `poll` (and `heartbeat`), keeps the answers to tasks in
    `answers` as (verb, body), and says yes to everything else (deploy, registration)."""

    async def answer(request: web.Request) -> web.Response:
        answers.append((request.match_info["verb"], await request.json()))
        return web.json_response({"id": request.match_info["id"], "state": "done"})

    async def yes(request: web.Request) -> web.Response:
        return web.json_response({"version": 1})

    app = web.Application()
    app.router.add_post("/v1/tasks/poll", poll)
    if heartbeat is not None:
        app.router.add_post("/v1/tasks/{id}/heartbeat", heartbeat)
    app.router.add_post("/v1/tasks/{id}/{verb:complete|fail}", answer)
    app.router.add_route("*", "/{tail:.*}", yes)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def idle_after(*first: Handler) -> Handler:
    """A poll handler: `first` answer the first polls, then no tasks after a short wait."""
    polls = [0]

    async def poll(request: web.Request) -> web.StreamResponse:
        polls[0] += 1
        if polls[0] <= len(first):
            return await first[polls[0] - 1](request)
        await asyncio.sleep(0.2)
        return web.json_response({"tasks": []})

    return poll


def handing(*tasks: dict[str, Any]) -> Handler:
    async def hand(request: web.Request) -> web.Response:
        return web.json_response({"tasks": list(tasks)})

    return hand


async def test_a_cut_poll_answer_does_not_end_the_worker_s_polling() -> None:
    """A non-HTTP fault (a cut answer, a timeout) used to end the poller silently: the
    worker stayed registered and never polled again."""
    answers: list[tuple[str, Any]] = []
    poll = idle_after(cut, handing(delivery(time.time() + 30)))
    async with stand_in(poll, answers) as url, worker(url, Workflow("W").step("a", lambda c: 1)):
        await until(lambda: _true(bool(answers)))
    assert answers == [("complete", {"output": 1})]


async def test_a_failing_heartbeat_does_not_lose_the_task_s_result() -> None:
    """A heartbeat cut mid-answer, then one answered with a proxy's page: the function's
    result is still reported (a heartbeat's error used to escape and skip the report)."""
    answers: list[tuple[str, Any]] = []
    beats = [0]

    async def heartbeat(request: web.Request) -> web.StreamResponse:
        beats[0] += 1
        if beats[0] == 1:
            return await cut(request)
        return web.Response(text="<html>a proxy's page</html>")

    async def slow(ctx: StepContext) -> dict[str, bool]:
        await asyncio.sleep(1)  # several heartbeats at a third of the 0.3 s lease
        return {"ok": True}

    poll = idle_after(handing(delivery(time.time() + 0.3, lease=0.3)))
    flow = Workflow("W").step("a", slow)
    async with stand_in(poll, answers, heartbeat) as url, worker(url, flow):
        await until(lambda: _true(bool(answers)))
    assert beats[0] >= 2
    assert answers == [("complete", {"output": {"ok": True}})]


@pytest.mark.parametrize("skew", [-60.0, 60.0], ids=["worker-clock-ahead", "worker-clock-behind"])
async def test_heartbeats_keep_their_pace_whatever_the_daemon_s_clock(skew: float) -> None:
    """The daemon's deadlines are on its own clock, `skew` seconds off this one: the
    heartbeats go at a third of the lease all the same (ahead, they went every 50 ms;
    behind, far too late)."""
    answers: list[tuple[str, Any]] = []
    beats: list[float] = []

    async def heartbeat(request: web.Request) -> web.Response:
        beats.append(time.monotonic())
        return web.json_response({"deadline": time.time() + skew + 1.5, "lease": 1.5})

    async def slow(ctx: StepContext) -> str:
        await asyncio.sleep(2.2)
        return "done"

    poll = idle_after(handing(delivery(time.time() + skew + 1.5, lease=1.5)))
    flow = Workflow("W").step("a", slow)
    async with stand_in(poll, answers, heartbeat) as url, worker(url, flow):
        await until(lambda: _true(bool(answers)))
    assert answers == [("complete", {"output": "done"})]
    assert 3 <= len(beats) <= 5  # every 0.5 s over 2.2 s: 4, give or take a slow machine
    assert all(later - earlier > 0.3 for earlier, later in itertools.pairwise(beats))


async def test_a_daemon_that_refuses_completions_in_polls_gets_them_apart(
    aiohttp_server: Any,
) -> None:
    """A daemon from before polls carried `complete` answers such a poll 422 (its body is
    `extra: forbid`); the worker then reports each answer with its own POST and keeps
    serving. No daemon of that age runs here: a stand-in with its answers does."""
    completes: list[tuple[str, Any]] = []
    polls: list[dict[str, Any]] = []
    handed = False

    async def poll(request: web.Request) -> web.Response:
        nonlocal handed
        body = await request.json()
        polls.append(body)
        if "complete" in body:
            error = {"code": "invalid", "message": "invalid request body", "details": {}}
            return web.json_response({"error": error}, status=422)
        if not handed:
            handed = True
            task = {
                "id": "d1",
                "process": "p1",
                "workflow": "",
                "step": "s",
                "task": "double",
                "input": {"n": 21},
                "steps": {},
                "attempt": 1,
                "idempotency_key": "p1/s",
                "deadline": time.time() + 30,
            }
            return web.json_response({"tasks": [task]})
        await asyncio.sleep(0.2)
        return web.json_response({"tasks": []})

    async def complete(request: web.Request) -> web.Response:
        completes.append((request.match_info["id"], (await request.json())["output"]))
        return web.json_response({"id": request.match_info["id"], "state": "done"})

    async def anything(request: web.Request) -> web.Response:  # registration and its renewals
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/tasks/poll", poll)
    app.router.add_post("/v1/tasks/{id}/complete", complete)
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)

    async def double(ctx: StepContext) -> dict[str, Any]:
        return {"n": ctx.input["n"] * 2}

    url = str(server.make_url("")).rstrip("/")
    async with Worker(url, tasks={"double": double}, queue="q", poll_wait="1s", concurrency=1):

        async def reported() -> bool:
            return bool(completes)

        await until(reported)
        await asyncio.sleep(0.3)  # still polling, without `complete` now
    assert completes == [("d1", {"n": 42})]
    assert any("complete" in body for body in polls)  # tried once, refused
    assert "complete" not in polls[-1]


async def test_a_parallel_step_with_a_function_branch_runs_through_a_worker(
    tmp_path: Path,
) -> None:
    seen: list[StepContext] = []

    def ems(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"unit": "ems-1"}

    dispatch = (
        Workflow("Dispatch", queue="dispatch")
        .step("triage", publish("call.received"))
        .step(
            "dispatch",
            parallel(
                step("ems", ems, retry=Retry(max_attempts=2, backoff=0.05)),
                step("notice", publish("dispatch.sent")),
                step("escalate", publish("dispatch.escalated"), when="[input.urgent] == true"),
            ),
        )
    )
    definition = dispatch.definition()
    assert definition["steps"][1]["parallel"][2]["when"] == "[input.urgent] == true"
    with running_daemon(tmp_path) as daemon:
        async with worker(daemon.url, dispatch), Client(daemon.url) as hms:
            report = await hms.run("Dispatch", {"urgent": False}, timeout=15)
    assert report.success, report.process
    assert report.output["ems"] == {"unit": "ems-1"}
    assert [c.idempotency_key for c in seen] == [f"{report.process_id}/ems"]
    [both] = [s for s in report.process["steps"] if s["name"] == "dispatch"]
    assert [b["state"] for b in both["branches"]] == ["completed", "completed", "skipped"]
