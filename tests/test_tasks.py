"""Task steps and the task queues (DESIGN.md §3 Task queues): a real daemon, workers as
real processes where a worker's death or a daemon's matters (tests/task_worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from monitor.config import Config, ConfigError, parse_config
from monitor.keys import PARTS

from .conftest import BOTH_STORES, AppClient, metric_families, until
from .processes import ROOT, running_daemon

STORES = BOTH_STORES  # each test on SQLite and on PostgreSQL

Start = Callable[..., Awaitable[AppClient]]


def task_workflow(**extra: Any) -> dict[str, Any]:
    """Reserve (a task, undone by a task), then charge (a task)."""
    workflow: dict[str, Any] = {
        "name": "Payment",
        "queue": "payments",
        "steps": [
            {"name": "reserve", "task": "reserveFunds", "compensate": {"task": "releaseFunds"}},
            {"name": "charge", "task": "chargeCard", "timeout": "1s"},
        ],
    }
    workflow.update(extra)
    return workflow


@pytest.fixture
async def payments(make_config: Callable[..., Config], start_daemon: Start) -> AppClient:
    return await start_daemon(make_config(workflows=[task_workflow()]))


async def start(client: AppClient, workflow: str = "Payment", **input_: Any) -> str:
    resp = await client.post(f"/v1/workflows/{workflow}", json={"input": input_})
    assert resp.status == 202, await resp.text()
    process_id: str = (await resp.json())["id"]
    return process_id


async def poll(
    client: AppClient, queue: str = "payments", wait: str = "5s", **extra: Any
) -> list[dict[str, Any]]:
    resp = await client.post("/v1/tasks/poll", json={"queue": queue, "wait": wait, **extra})
    assert resp.status == 200, await resp.text()
    tasks: list[dict[str, Any]] = (await resp.json())["tasks"]
    return tasks


async def take(client: AppClient, task: str, queue: str = "payments") -> dict[str, Any]:
    """The next task of `queue`, which must be `task`."""
    [got] = await poll(client, queue, worker="w-test", max=1)
    assert got["task"] == task, got
    return got


async def process(client: AppClient, process_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/processes/{process_id}")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def finished(client: AppClient, process_id: str, status: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def ended() -> bool:
        seen.update(await process(client, process_id))
        return seen["status"] == status

    await until(ended)
    return seen


@contextlib.contextmanager
def worker(
    url: str, worker_id: str, mode: str, log: Path, queue: str = "payments"
) -> Iterator[subprocess.Popen[bytes]]:
    """tests/task_worker.py as a real process; its stdout (a line per task taken) in `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.task_worker", url, queue, worker_id, mode],
            cwd=ROOT,
            stdout=out,
        )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def taken(log: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines()]


# -- config ----------------------------------------------------------------------------


def test_a_compensation_is_a_call_or_a_task_never_both_nor_neither() -> None:
    def errors(compensate: str) -> list[str]:
        step = f"{{name: a, task: t, compensate: {compensate}}}"
        text = f"workflows:\n  - name: W\n    steps:\n      - {step}\n"
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        return caught.value.errors

    assert errors("{task: undo, service: s, path: /x}") == [
        "config.yaml:4: workflows[0].steps[0].compensate: a compensation is a call or "
        "{task: name}, not both"
    ]
    assert errors("{}") == [
        "config.yaml:4: workflows[0].steps[0].compensate: a compensation needs a call "
        "(service, path) or a task"
    ]
    assert errors("{service: s}") == [
        "config.yaml:4: workflows[0].steps[0].compensate.path: Field required"
    ]


# -- the whole way, with real worker processes ------------------------------------------


async def test_a_yaml_task_step_is_served_by_a_worker_process(
    payments: AppClient, tmp_path: Path
) -> None:
    url = str(payments.make_url("")).rstrip("/")
    with worker(url, "w1", "complete", tmp_path / "w1.log"):
        process_id = await start(payments, amount=12)
        done = await finished(payments, process_id, "completed")
    assert done["outputs"] == {
        "reserve": {"by": "w1", "task": "reserveFunds", "key": f"{process_id}/reserve"},
        "charge": {"by": "w1", "task": "chargeCard", "key": f"{process_id}/charge"},
    }
    assert [(a["step"], a["kind"], a["outcome"], a["instance"]) for a in done["history"]] == [
        ("reserve", "task", "ok", "w1"),
        ("charge", "task", "ok", "w1"),
    ]
    first = taken(tmp_path / "w1.log")[0]
    assert first["input"] == {"amount": 12} and first["steps"] == {}
    assert (first["process"], first["workflow"], first["step"], first["attempt"]) == (
        process_id,
        "Payment",
        "reserve",
        1,
    )


async def test_a_killed_worker_s_task_goes_to_another_worker_once(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    steps = [
        {
            "name": "charge",
            "task": "chargeCard",
            "timeout": "1s",
            "retry": {"max_attempts": 3, "backoff": "100ms"},
        }
    ]
    client = await start_daemon(
        make_config(workflows=[{"name": "Payment", "queue": "payments", "steps": steps}])
    )
    url = str(client.make_url("")).rstrip("/")
    process_id = await start(client)
    with worker(url, "w-hang", "hang", tmp_path / "hang.log") as hanging:

        async def took() -> bool:
            return bool(taken(tmp_path / "hang.log"))

        await until(took)
        hanging.kill()  # SIGKILL mid-task: the lease is all that is left of it
    [lost] = taken(tmp_path / "hang.log")
    with worker(url, "w-ok", "complete", tmp_path / "ok.log"):
        done = await finished(client, process_id, "completed")
    [second] = taken(tmp_path / "ok.log")
    assert second["idempotency_key"] == lost["idempotency_key"] == f"{process_id}/charge"
    assert second["id"] != lost["id"]
    assert (lost["attempt"], second["attempt"]) == (1, 2)
    assert [(a["attempt"], a["outcome"], a["instance"]) for a in done["history"]] == [
        (1, "timeout", "w-hang"),
        (2, "ok", "w-ok"),
    ]
    assert done["outputs"]["charge"]["by"] == "w-ok"
    # The reassigned delivery answers late: refused, nothing changes.
    late = await client.post(f"/v1/tasks/{lost['id']}/complete", json={"output": {"by": "late"}})
    assert late.status == 409
    assert (await late.json())["error"]["code"] == "conflict"
    again = await process(client, process_id)
    assert again["outputs"] == done["outputs"] and len(again["history"]) == 2


async def test_the_daemon_killed_mid_task_takes_the_workers_answer_after_restart(
    tmp_path: Path,
) -> None:
    with running_daemon(tmp_path, workflows=[task_workflow()]) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:
            async with http.post("/v1/workflows/Payment", json={"input": {"n": 1}}) as resp:
                process_id = (await resp.json())["id"]
            body = {"queue": "payments", "worker": "w1", "wait": "10s"}
            async with http.post("/v1/tasks/poll", json=body) as resp:
                [task] = (await resp.json())["tasks"]
        daemon.kill()  # the task is claimed; the daemon dies with no shutdown code
        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            answer = {"output": {"reservation": "r-1"}}
            async with http.post(f"/v1/tasks/{task['id']}/complete", json=answer) as resp:
                assert resp.status == 200, await resp.text()
            async with http.post("/v1/tasks/poll", json=body) as resp:
                [charge] = (await resp.json())["tasks"]
            assert charge["steps"] == {"reserve": {"reservation": "r-1"}}
            async with http.post(f"/v1/tasks/{charge['id']}/complete", json={}) as resp:
                assert resp.status == 200

            async def completed() -> bool:
                async with http.get(f"/v1/processes/{process_id}") as resp:
                    return (await resp.json())["status"] == "completed"

            await until(completed)
            async with http.get(f"/v1/processes/{process_id}") as resp:
                history = (await resp.json())["history"]
            assert [(a["step"], a["outcome"]) for a in history] == [
                ("reserve", "ok"),
                ("charge", "ok"),
            ]
            async with http.post("/v1/tasks/poll", json={**body, "wait": "0s"}) as resp:
                assert (await resp.json())["tasks"] == []  # nothing handed out twice


async def test_the_daemon_killed_right_after_a_complete_s_200_has_the_step_done(
    tmp_path: Path,
) -> None:
    """A 200 to a complete means the step's checkpoint (written with the task's end) is on
    disk: after a SIGKILL the processes go on from the next step, and nothing is redone."""
    with running_daemon(tmp_path, workflows=[task_workflow()]) as daemon:
        body = {"queue": "payments", "worker": "w1", "wait": "10s", "max": 5}
        async with aiohttp.ClientSession(daemon.url) as http:
            for n in range(5):
                async with http.post("/v1/workflows/Payment", json={"input": {"n": n}}) as resp:
                    assert resp.status == 202
            reserves: list[dict[str, Any]] = []
            while len(reserves) < 5:
                async with http.post("/v1/tasks/poll", json=body) as resp:
                    reserves += (await resp.json())["tasks"]

            async def complete(task: dict[str, Any]) -> int:
                answer = {"output": {"reservation": task["process"]}}
                async with http.post(f"/v1/tasks/{task['id']}/complete", json=answer) as resp:
                    return resp.status

            assert await asyncio.gather(*map(complete, reserves)) == [200] * 5
            daemon.kill()  # at once: no shutdown code, nothing left to flush
        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            charges: list[dict[str, Any]] = []
            while len(charges) < 5:
                async with http.post("/v1/tasks/poll", json=body) as resp:
                    charges += (await resp.json())["tasks"]
            assert {c["task"] for c in charges} == {"chargeCard"}
            assert {c["process"]: c["steps"] for c in charges} == {
                r["process"]: {"reserve": {"reservation": r["process"]}} for r in reserves
            }
            for task in reserves:
                async with http.get(f"/v1/processes/{task['process']}") as resp:
                    history = (await resp.json())["history"]
                assert [(a["step"], a["outcome"]) for a in history] == [("reserve", "ok")]
                async with http.post(f"/v1/tasks/{task['id']}/complete", json={}) as resp:
                    assert resp.status == 409  # answered before the kill: not again


async def test_a_complete_s_200_comes_with_the_step_s_checkpoint(payments: AppClient) -> None:
    """The task's end is written with the process's checkpoint: once the worker has its
    200 the process shows the step done; a second answer racing the first gets 409."""
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    path = f"/v1/tasks/{reserve['id']}/complete"
    first, second = await asyncio.gather(
        payments.post(path, json={"output": {"reservation": "r-1"}}),
        payments.post(path, json={"output": {"reservation": "r-2"}}),
    )
    assert (first.status, second.status) == (200, 409)
    seen = await process(payments, process_id)  # no wait: the 200 came after the commit
    assert seen["outputs"] == {"reserve": {"reservation": "r-1"}}
    assert [(a["step"], a["outcome"]) for a in seen["history"]] == [("reserve", "ok")]
    resp = await payments.post(f"/v1/tasks/{reserve['id']}/heartbeat")
    assert resp.status == 409
    charge = await take(payments, "chargeCard")
    resp = await payments.post(f"/v1/tasks/{charge['id']}/fail", json={"error": "no"})
    assert resp.status == 200
    failed = await process(payments, process_id)  # the failure is in the history already
    assert [(a["step"], a["outcome"]) for a in failed["history"]][:2] == [
        ("reserve", "ok"),
        ("charge", "error"),
    ]


@pytest.mark.sqlite_only  # reads the SQLite file itself
async def test_a_cancel_racing_a_complete_leaves_no_task_open(
    payments: AppClient, tmp_path: Path
) -> None:
    """The checkpoint that ends a step opens the next step's task; a cancel landing just
    then cancels that task too: no worker gets it, and no task row stays open."""
    ids = [await start(payments, n=n) for n in range(8)]
    reserves = {t["process"]: t for t in await poll(payments, worker="w-test", max=8)}
    assert sorted(reserves) == sorted(ids)

    async def complete_and_cancel(process_id: str) -> None:
        delivery = reserves[process_id]["id"]
        answer = payments.post(f"/v1/tasks/{delivery}/complete", json={"output": {}})
        cancel = payments.post(f"/v1/processes/{process_id}/cancel")
        for resp in await asyncio.gather(answer, cancel):
            assert resp.status in (200, 202, 409), await resp.text()

    await asyncio.gather(*map(complete_and_cancel, ids))
    ended: dict[str, str] = {}

    async def all_ended() -> bool:  # compensations done as workers would do them
        for task in await poll(payments, wait="0s", max=10):
            assert task["task"] == "releaseFunds", task  # never the charge after the cancel
            resp = await payments.post(f"/v1/tasks/{task['id']}/complete", json={})
            assert resp.status == 200
        for process_id in ids:
            ended[process_id] = (await process(payments, process_id))["status"]
        return set(ended.values()) <= {"cancelled", "compensated"}

    await until(all_ended)
    with sqlite3.connect(tmp_path / "hms.db") as db:
        left = db.execute("SELECT key, state FROM tasks WHERE state IN ('due', 'claimed')")
        assert left.fetchall() == []


# -- answers, leases, failures ---------------------------------------------------------


async def test_heartbeats_keep_a_task_past_its_timeout(payments: AppClient, tmp_path: Path) -> None:
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    charge = await take(payments, "chargeCard")  # timeout 1s
    assert charge["lease"] == 1  # its length: a worker whose clock is off paces by it
    for _ in range(8):  # 2s in all, twice the timeout
        await asyncio.sleep(0.25)
        resp = await payments.post(f"/v1/tasks/{charge['id']}/heartbeat")
        assert resp.status == 200
        renewed = await resp.json()
        assert renewed["deadline"] >= charge["deadline"] and renewed["lease"] == 1
    resp = await payments.post(f"/v1/tasks/{charge['id']}/complete", json={"output": {"ok": 1}})
    assert resp.status == 200
    done = await finished(payments, process_id, "completed")
    assert [a["outcome"] for a in done["history"]] == ["ok", "ok"]


async def test_a_failure_not_to_retry_compensates_with_a_task(payments: AppClient) -> None:
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {"hold": "h1"}})
    charge = await take(payments, "chargeCard")
    resp = await payments.post(
        f"/v1/tasks/{charge['id']}/fail", json={"error": "card declined", "retryable": False}
    )
    assert resp.status == 200
    release = await take(payments, "releaseFunds")
    assert release["idempotency_key"] == f"{process_id}/reserve.compensate"
    assert release["steps"]["reserve"] == {"hold": "h1"}
    await payments.post(f"/v1/tasks/{release['id']}/complete", json={"output": None})
    done = await finished(payments, process_id, "compensated")
    assert [(a["step"], a["kind"], a["outcome"]) for a in done["history"]] == [
        ("reserve", "task", "ok"),
        ("charge", "task", "error"),
        ("reserve", "compensate", "ok"),
    ]
    assert "card declined" in str(done["error"])


async def test_a_retryable_failure_is_tried_again_under_the_step_s_retry(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    steps = [{"name": "s", "task": "t", "retry": {"max_attempts": 2, "backoff": "50ms"}}]
    client = await start_daemon(make_config(workflows=[{"name": "W", "steps": steps}]))
    process_id = await start(client, "W")
    first = await take(client, "t", queue="W")  # the queue defaults to the workflow's name
    await client.post(f"/v1/tasks/{first['id']}/fail", json={"error": "busy"})
    second = await take(client, "t", queue="W")
    assert (second["attempt"], second["idempotency_key"]) == (2, first["idempotency_key"])
    await client.post(f"/v1/tasks/{second['id']}/fail", json={"error": "still busy"})
    done = await finished(client, process_id, "failed")
    assert [a["outcome"] for a in done["history"]] == ["error", "error"]


async def test_a_cancelled_process_s_open_task_answers_409(payments: AppClient) -> None:
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    assert (await payments.post(f"/v1/processes/{process_id}/cancel")).status == 202
    done = await finished(payments, process_id, "cancelled")
    # The attempt the cancel cut short is in the history, as every attempt is: a read while
    # the final checkpoint is being written shows its rows with its status.
    assert [(a["step"], a["kind"], a["outcome"], a["error"]) for a in done["history"]] == [
        ("reserve", "task", "error", "cancelled while its task was open")
    ]
    resp = await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    assert resp.status == 409
    assert (await poll(payments, wait="0s")) == []  # the step was not done: nothing to undo


async def test_an_answer_that_comes_while_the_cancel_is_written_gets_409_not_a_hang(
    payments: AppClient,
) -> None:
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    tasks = payments.app[PARTS].engine.tasks
    assert tasks is not None
    written, go = asyncio.Event(), asyncio.Event()
    cancel = tasks.store.cancel

    async def slow_cancel(key: str, attempt: int, now: float) -> Any:
        ended = await cancel(key, attempt, now)  # committed; the runner hears it later
        written.set()
        await go.wait()
        return ended

    tasks.store.cancel = slow_cancel  # type: ignore[method-assign]
    assert (await payments.post(f"/v1/processes/{process_id}/cancel")).status == 202
    await written.wait()
    answer = asyncio.create_task(
        payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    )
    await asyncio.sleep(0.2)  # the answer reaches the queues while the runner waits
    go.set()
    resp = await asyncio.wait_for(answer, 5)
    assert resp.status == 409  # the task was cancelled first: the answer was not taken
    done = await finished(payments, process_id, "cancelled")
    assert [(a["step"], a["outcome"]) for a in done["history"]] == [("reserve", "error")]


async def test_while_a_task_is_open_the_process_waits_for_it(payments: AppClient) -> None:
    process_id = await start(payments)

    async def waiting() -> bool:
        return (await process(payments, process_id))["waiting_for"] is not None

    await until(waiting)
    due = (await process(payments, process_id))["waiting_for"]
    assert due == {"kind": "task", "until": None, "detail": "reserveFunds on payments"}
    reserve = await take(payments, "reserveFunds")
    claimed = await process(payments, process_id)
    assert claimed["status"] == "waiting"
    assert claimed["waiting_for"]["until"] == reserve["deadline"]


# -- the poll ----------------------------------------------------------------------------


async def test_a_long_poll_is_answered_as_soon_as_a_task_is_due(payments: AppClient) -> None:
    polling = asyncio.create_task(poll(payments, wait="60s"))
    await asyncio.sleep(0.2)
    assert not polling.done()
    process_id = await start(payments)
    async with asyncio.timeout(10):  # far below the 60s wait: the creation woke it
        [task] = await polling
    assert task["process"] == process_id


async def test_a_poll_whose_worker_went_away_takes_no_task(tmp_path: Path) -> None:
    """The daemon's server does not end a handler whose client left: the poll stays
    waiting, and must not take the next task for nobody (it would come back only after its
    lease, as a timed-out attempt). A real process: the test server does cancel handlers."""
    with running_daemon(tmp_path, workflows=[task_workflow()]) as daemon:
        async with aiohttp.ClientSession(daemon.url) as http:

            async def poll_as(worker: str, wait: str) -> list[dict[str, Any]]:
                body = {"queue": "payments", "worker": worker, "wait": wait}
                async with http.post("/v1/tasks/poll", json=body) as resp:
                    tasks: list[dict[str, Any]] = (await resp.json())["tasks"]
                    return tasks

            async def gone_away(worker: str) -> None:  # a long poll, then stop() or a crash
                async with aiohttp.ClientSession(daemon.url) as own:
                    polling = asyncio.create_task(
                        own.post(
                            "/v1/tasks/poll",
                            json={"queue": "payments", "worker": worker, "wait": "60s"},
                        )
                    )
                    await asyncio.sleep(0.3)  # it waits in the daemon
                    polling.cancel()  # its connection closes
                    with contextlib.suppress(asyncio.CancelledError):
                        await polling
                await asyncio.sleep(0.2)

            async def started() -> str:
                async with http.post("/v1/workflows/Payment", json={"input": {}}) as resp:
                    process_id: str = (await resp.json())["id"]
                    return process_id

            await gone_away("gone-1")
            first = await started()  # the only poll waiting is gone: the task stays due
            [task] = await poll_as("w-test", "5s")
            assert (task["process"], task["attempt"]) == (first, 1)
            await gone_away("gone-2")
            live = asyncio.create_task(poll_as("alive", "10s"))
            await asyncio.sleep(0.3)
            second = await started()  # handed to the live poll behind the dead one, at once
            async with asyncio.timeout(5):
                [handed] = await live
            assert (handed["process"], handed["attempt"]) == (second, 1)
            for answered in (task, handed):
                async with http.post(f"/v1/tasks/{answered['id']}/complete", json={}) as resp:
                    assert resp.status == 200


async def test_a_claim_whose_answer_went_nowhere_is_released_not_timed_out(
    payments: AppClient,
) -> None:
    """The poll route releases what it claimed when its worker is gone by the time it
    answers: the task is due again at once, the same attempt (no timed-out one)."""
    queues = payments.app[PARTS].engine.tasks
    assert queues is not None
    process_id = await start(payments)
    lost = await queues.poll("payments", "gone", 5.0, 1)
    assert [r.process for r in lost] == [process_id]
    await queues.release(lost)
    again = await take(payments, "reserveFunds")
    assert again["attempt"] == 1 and again["id"] != lost[0].delivery
    resp = await payments.post(f"/v1/tasks/{lost[0].delivery}/complete", json={"output": {}})
    assert resp.status == 404  # the released delivery is no more
    resp = await payments.post(f"/v1/tasks/{again['id']}/complete", json={"output": {}})
    assert resp.status == 200
    charge = await take(payments, "chargeCard")
    await payments.post(f"/v1/tasks/{charge['id']}/complete", json={"output": {}})
    done = await finished(payments, process_id, "completed")
    assert [(a["step"], a["attempt"], a["outcome"]) for a in done["history"]] == [
        ("reserve", 1, "ok"),
        ("charge", 1, "ok"),
    ]


async def test_a_poll_carries_completions_committed_before_it_answers(
    payments: AppClient,
) -> None:
    """A worker may answer its deliveries in its next poll (`complete`): each is answered
    as its own POST would be, and the poll brings the task that completion made due."""
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    assert reserve["due_at"] <= reserve["deadline"]  # when it became due: before its claim
    resp = await payments.post(
        "/v1/tasks/poll",
        json={
            "queue": "payments",
            "wait": "5s",
            "complete": [
                {"id": reserve["id"], "output": {"reservation": "r-1"}},
                {"id": "never-handed-out", "output": {}},
            ],
        },
    )
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    [charge] = answer["tasks"]
    assert charge["task"] == "chargeCard" and charge["steps"] == {"reserve": {"reservation": "r-1"}}
    assert answer["completed"][0] == {"id": reserve["id"], "state": "done"}
    assert answer["completed"][1]["error"]["code"] == "not_found"
    again = await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    assert again.status == 409  # answered already, by the poll
    resp = await payments.post(
        "/v1/tasks/poll",
        json={"queue": "payments", "wait": "0s", "complete": [{"id": charge["id"]}]},
    )
    assert (await resp.json())["completed"] == [{"id": charge["id"], "state": "done"}]
    done = await finished(payments, process_id, "completed")
    assert done["outputs"]["reserve"] == {"reservation": "r-1"}


async def test_an_unknown_queue_answers_no_tasks_after_the_wait(payments: AppClient) -> None:
    assert await poll(payments, queue="nobody-serves-this", wait="100ms") == []


async def test_bad_polls_and_answers_are_refused(payments: AppClient) -> None:
    for body, status in (
        ({"queue": "payments", "max": 0}, 422),
        ({"queue": "payments", "max": 101}, 422),
        ({"queue": "payments", "wait": "soon"}, 422),
        ({"queue": "bad queue"}, 422),
        ({"wait": "1s"}, 422),
    ):
        resp = await payments.post("/v1/tasks/poll", json=body)
        assert resp.status == status, body
        assert set((await resp.json())["error"]) == {"code", "message", "details"}
    resp = await payments.post("/v1/tasks/nope/complete", json={"output": 1})
    assert resp.status == 404
    await start(payments)
    reserve = await take(payments, "reserveFunds")
    resp = await payments.post(f"/v1/tasks/{reserve['id']}/fail", json={"retryable": False})
    assert resp.status == 422
    resp = await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"result": 1})
    assert resp.status == 422


async def test_a_worker_s_poll_renews_its_registration(payments: AppClient) -> None:
    put = await payments.put(
        "/v1/services/payments/instances/w9", json={"url": "http://127.0.0.1:9", "ttl": "30s"}
    )
    assert put.status == 201, await put.text()
    catalog = payments.app[PARTS].catalog
    before = catalog.heartbeats_total
    assert await poll(payments, wait="0s", worker="w9") == []
    assert catalog.heartbeats_total == before + 1
    families = await metric_families(payments)
    workers = {s.labels["queue"]: s.value for s in families["hms_task_workers"].samples}
    assert workers == {"payments": 1}
    assert await poll(payments, wait="0s", worker="unregistered") == []  # fine too


async def test_depth_counts_due_tasks(payments: AppClient) -> None:
    for _ in range(3):
        await start(payments)

    async def three_due() -> bool:
        families = await metric_families(payments)
        return [s.value for s in families["hms_task_queue_depth"].samples] == [3]

    await until(three_due)
    await poll(payments, max=2)
    families = await metric_families(payments)
    assert [s.value for s in families["hms_task_queue_depth"].samples] == [1]


async def test_work_scope_is_required(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    tokens = [
        {"name": "admin-token-0001", "token": "admin-token-0001", "scopes": ["*"]},
        {"name": "worker-token-001", "token": "worker-token-001", "scopes": ["work:payments"]},
        {"name": "starter-token-01", "token": "starter-token-01", "scopes": ["start:*"]},
    ]
    client = await start_daemon(
        make_config(server={"auth": {"tokens": tokens}}, workflows=[task_workflow()])
    )

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    body = {"queue": "payments", "wait": "0s"}
    resp = await client.post("/v1/tasks/poll", json=body, headers=bearer("starter-token-01"))
    assert resp.status == 403
    resp = await client.post(
        "/v1/tasks/poll", json={**body, "queue": "other"}, headers=bearer("worker-token-001")
    )
    assert resp.status == 403
    assert (await client.post("/v1/tasks/poll", json=body)).status == 401
    start_resp = await client.post(
        "/v1/workflows/Payment", json={}, headers=bearer("starter-token-01")
    )
    assert start_resp.status == 202
    resp = await client.post(
        "/v1/tasks/poll", json={**body, "wait": "5s"}, headers=bearer("worker-token-001")
    )
    [task] = (await resp.json())["tasks"]
    answer = f"/v1/tasks/{task['id']}/complete"
    resp = await client.post(answer, json={"output": 1}, headers=bearer("starter-token-01"))
    assert resp.status == 403
    resp = await client.post(answer, json={"output": 1}, headers=bearer("worker-token-001"))
    assert resp.status == 200


async def test_a_glob_work_scope_serves_the_queues_it_matches(
    make_config: Callable[..., Config], start_daemon: Start
) -> None:
    tokens = [
        {"name": "admin-token-0001", "token": "admin-token-0001", "scopes": ["*"]},
        {"name": "glob-worker-0001", "token": "glob-worker-0001", "scopes": ["work:pay*"]},
    ]
    client = await start_daemon(
        make_config(server={"auth": {"tokens": tokens}}, workflows=[task_workflow()])
    )
    worker = {"Authorization": "Bearer glob-worker-0001"}
    admin = {"Authorization": "Bearer admin-token-0001"}
    assert (await client.post("/v1/workflows/Payment", json={}, headers=admin)).status == 202
    body = {"queue": "other", "wait": "0s"}
    assert (await client.post("/v1/tasks/poll", json=body, headers=worker)).status == 403
    body = {"queue": "payments", "wait": "5s"}
    resp = await client.post("/v1/tasks/poll", json=body, headers=worker)
    assert resp.status == 200
    [task] = (await resp.json())["tasks"]
    for verb, answer in (("heartbeat", {}), ("complete", {"output": 1})):
        resp = await client.post(f"/v1/tasks/{task['id']}/{verb}", json=answer, headers=worker)
        assert resp.status == 200, verb


async def test_a_lease_that_passed_while_the_daemon_was_down_ends_on_restart(
    tmp_path: Path,
) -> None:
    steps = [{"name": "s", "task": "t", "timeout": "1s", "retry": {"max_attempts": 2}}]
    with running_daemon(tmp_path, workflows=[{"name": "W", "steps": steps}]) as daemon:
        body = {"queue": "W", "worker": "w1", "wait": "10s"}
        async with aiohttp.ClientSession(daemon.url) as http:
            async with http.post("/v1/workflows/W", json={}) as resp:
                process_id = (await resp.json())["id"]
            async with http.post("/v1/tasks/poll", json=body) as resp:
                [first] = (await resp.json())["tasks"]
        daemon.kill()
        await asyncio.sleep(1.2)  # the lease passes while nobody runs
        await asyncio.to_thread(daemon.start)
        async with aiohttp.ClientSession(daemon.url) as http:
            async with http.post("/v1/tasks/poll", json=body) as resp:
                [second] = (await resp.json())["tasks"]
            assert (second["attempt"], second["idempotency_key"]) == (2, first["idempotency_key"])
            async with http.post(f"/v1/tasks/{first['id']}/complete", json={}) as resp:
                assert resp.status == 409
            async with http.post(f"/v1/tasks/{second['id']}/complete", json={}) as resp:
                assert resp.status == 200
            history: list[dict[str, Any]] = []

            async def completed() -> bool:
                async with http.get(f"/v1/processes/{process_id}") as resp:
                    described = await resp.json()
                history[:] = described["history"]
                return described["status"] == "completed"

            await until(completed)
    assert [(a["attempt"], a["outcome"]) for a in history] == [(1, "timeout"), (2, "ok")]
