"""Task answers racing a cancel, a heartbeat, a storage outage, an engine error and a
daemon's death (DESIGN.md §3 Task queues): every answer is answered, a cancelled or
failed process's task is never handed out nor accepted, and a lease starts when its
claim is written."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import workflows.stores.sqlite as sqlite_store
from monitor.config import Config
from monitor.keys import DATABASE, PARTS
from registry import StoreUnavailable
from workflows.records import Process, TaskEnd
from workflows.runner import ProcessRunner
from workflows.stores.sqlite_tasks import ClaimLost

from .conftest import AppClient, FakeClock, metric_families, until
from .test_tasks import finished, payments, poll, process, start, take, task_workflow

__all__ = ["payments"]  # the fixture, used by name

Start = Callable[..., Awaitable[AppClient]]


def rows(tmp_path: Path, process_id: str) -> list[tuple[str, int, str]]:
    """(step key after the process id, attempt, state) of the process's tasks."""
    with sqlite3.connect(tmp_path / "hms.db") as db:
        found = db.execute(
            "SELECT key, attempt, state FROM tasks WHERE process = ? ORDER BY seq", [process_id]
        ).fetchall()
    return [(key.split("/", 1)[1], attempt, state) for key, attempt, state in found]


async def history(client: AppClient, process_id: str) -> list[tuple[str, str, str]]:
    return [
        (a["step"], a["kind"], a["outcome"]) for a in (await process(client, process_id))["history"]
    ]


def slow_cancel(client: AppClient, *, before: asyncio.Event, after: asyncio.Event) -> None:
    """The runner's cancel of a task waits for `before` to write, for `after` to return."""
    store = client.app[PARTS].engine.tasks.store
    real = store.cancel

    async def cancel(key: str, attempt: int, now: float) -> Any:
        await before.wait()
        ended = await real(key, attempt, now)
        await after.wait()
        return ended

    store.cancel = cancel  # type: ignore[method-assign]


async def answered(call: Awaitable[Any]) -> Any:
    """An answer that must come, and soon: a hang fails the test, it does not stall it."""
    return await asyncio.wait_for(call, 5)


# -- a complete while the cancel of its task is being written -------------------------


async def test_a_complete_that_reaches_the_table_before_the_cancel_is_done_and_undone(
    payments: AppClient,
) -> None:
    go, back = asyncio.Event(), asyncio.Event()
    slow_cancel(payments, before=go, after=back)
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    assert (await payments.post(f"/v1/processes/{process_id}/cancel")).status == 202
    await asyncio.sleep(0.1)  # the runner is in the cancel's write
    complete = f"/v1/tasks/{reserve['id']}/complete"
    resp = await answered(payments.post(complete, json={"output": {"reservation": "r-1"}}))
    assert resp.status == 200
    go.set()
    back.set()
    assert (await answered(payments.post(complete, json={"output": {}}))).status == 409
    release = await take(payments, "releaseFunds")  # the step was done: it is undone
    assert release["steps"] == {"reserve": {"reservation": "r-1"}}
    await payments.post(f"/v1/tasks/{release['id']}/complete", json={"output": {}})
    await finished(payments, process_id, "cancelled")
    assert await history(payments, process_id) == [
        ("reserve", "task", "ok"),
        ("reserve", "compensate", "ok"),
    ]


async def test_a_complete_that_reaches_the_table_after_the_cancel_answers_409(
    payments: AppClient,
) -> None:
    go, back = asyncio.Event(), asyncio.Event()
    go.set()  # the cancel is written; its answer has not reached the runner
    slow_cancel(payments, before=go, after=back)
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    assert (await payments.post(f"/v1/processes/{process_id}/cancel")).status == 202
    await asyncio.sleep(0.1)
    complete = f"/v1/tasks/{reserve['id']}/complete"
    assert (await answered(payments.post(complete, json={"output": {}}))).status == 409
    assert (await answered(payments.post(complete, json={"output": {}}))).status == 409
    carried = await answered(
        payments.post(
            "/v1/tasks/poll",
            json={"queue": "payments", "wait": "0s", "complete": [{"id": reserve["id"]}]},
        )
    )
    assert [c["error"]["code"] for c in (await carried.json())["completed"]] == ["conflict"]
    back.set()
    await finished(payments, process_id, "cancelled")


async def test_an_attempt_cut_short_by_a_cancel_is_no_step_error_in_the_metrics(
    payments: AppClient,
) -> None:
    process_id = await start(payments)
    await take(payments, "reserveFunds")
    assert (await payments.post(f"/v1/processes/{process_id}/cancel")).status == 202
    await finished(payments, process_id, "cancelled")
    await until(lambda: _has_history(payments, process_id))
    families = await metric_families(payments)
    results = {
        s.labels["result"]: s.value
        for s in families["hms_workflow_step_attempts"].samples
        if s.name == "hms_workflow_step_attempts_total"
    }
    assert results.get("error", 0) == 0


async def _has_history(client: AppClient, process_id: str) -> bool:
    return bool(await history(client, process_id))


# -- a lease starts when its claim is written --------------------------------------------


async def writes_refused(client: AppClient, refused: bool) -> None:
    """A storage outage, as a read-only disk gives one: every write fails."""

    def pragma(d: Any) -> None:
        d.execute(f"PRAGMA query_only = {int(refused)}")

    await client.app[DATABASE].read(pragma)


async def test_a_task_claimed_by_a_checkpoint_after_an_outage_leases_from_its_commit(
    payments: AppClient, clock: FakeClock
) -> None:
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    waiting = asyncio.ensure_future(
        payments.post(
            "/v1/tasks/poll", json={"queue": "payments", "worker": "w2", "wait": "20s", "max": 1}
        )
    )
    await asyncio.sleep(0.1)  # charge is claimed for this poll by the step's checkpoint
    await writes_refused(payments, True)
    complete = asyncio.ensure_future(
        payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    )
    await asyncio.sleep(0.5)  # the step's checkpoint (which claims charge) fails, is retried
    clock.advance(5)  # longer than charge's 1s lease
    await writes_refused(payments, False)
    assert (await answered(complete)).status == 200
    [charge] = (await (await answered(waiting)).json())["tasks"]
    assert charge["task"] == "chargeCard"
    assert charge["deadline"] > clock.wall
    resp = await payments.post(f"/v1/tasks/{charge['id']}/complete", json={"output": {}})
    assert resp.status == 200
    await finished(payments, process_id, "completed")
    assert [o for _, _, o in await history(payments, process_id)] == ["ok", "ok"]


# -- a heartbeat racing a complete -------------------------------------------------------


async def test_a_heartbeat_answered_after_a_complete_leaves_no_lease_to_end_it(
    payments: AppClient, tmp_path: Path
) -> None:
    engine = payments.app[PARTS].engine
    assert engine.tasks is not None
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    charge = await take(payments, "chargeCard")  # a 1s lease

    real_heartbeat = engine.tasks.store.heartbeat

    async def heartbeat(delivery: str, now: float) -> Any:
        renewed = await real_heartbeat(delivery, now)  # committed: the lease renewed
        await asyncio.sleep(0.3)  # its answer comes back after the complete's
        return renewed

    engine.tasks.store.heartbeat = heartbeat  # type: ignore[method-assign]
    held, real_checkpoint = asyncio.Event(), engine.store.checkpoint

    async def checkpoint(p: Process) -> None:
        if p.task_ends:  # the step's checkpoint waits past the lease
            await held.wait()
        await real_checkpoint(p)

    engine.store.checkpoint = checkpoint  # type: ignore[method-assign]
    beat = asyncio.ensure_future(payments.post(f"/v1/tasks/{charge['id']}/heartbeat"))
    await asyncio.sleep(0.1)
    complete = asyncio.ensure_future(
        payments.post(f"/v1/tasks/{charge['id']}/complete", json={"output": {}})
    )
    await answered(beat)
    await asyncio.sleep(1.5)  # a lease armed again by the heartbeat would have ended
    held.set()
    assert (await answered(complete)).status == 200
    await finished(payments, process_id, "completed")
    assert rows(tmp_path, process_id) == [("reserve", 1, "done"), ("charge", 1, "done")]


# -- an engine error after the checkpoint that opened the next task -----------------------


async def test_a_process_failing_in_the_engine_after_opening_its_next_task_leaves_none(
    payments: AppClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = []

    def step_done(self: ProcessRunner, *args: Any) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("simulated bug after the step's checkpoint")

    monkeypatch.setattr(ProcessRunner, "_step_done", step_done)
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    waiting = asyncio.ensure_future(poll(payments, wait="5s", worker="w2", max=5))
    await asyncio.sleep(0.1)  # charge is claimed for this poll as the checkpoint opens it
    resp = await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    assert resp.status == 200  # written with the step, before the error
    done = await finished(payments, process_id, "failed")
    assert done["error"]["message"].startswith("internal error")
    assert rows(tmp_path, process_id) == [("reserve", 1, "done"), ("charge", 1, "cancelled")]
    other = await start(payments)  # the poll waits on, and gets the next task due
    [got] = await answered(waiting)
    assert (got["process"], got["task"]) == (other, "reserveFunds")


async def test_an_answer_whose_checkpoint_fails_in_the_engine_opens_no_next_task(
    payments: AppClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, lost = sqlite_store.write_end, set()

    def write_end(d: Any, end: TaskEnd) -> None:
        if end.delivery in lost:
            raise ClaimLost("simulated: memory and the table disagree")
        real(d, end)

    monkeypatch.setattr(sqlite_store, "write_end", write_end)
    process_id = await start(payments)
    reserve = await take(payments, "reserveFunds")
    lost.add(reserve["id"])
    waiting = asyncio.ensure_future(poll(payments, wait="5s", worker="w2", max=5))
    await asyncio.sleep(0.1)
    resp = await payments.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    assert resp.status == 409  # not recorded, and its process failed: too late to send again
    await finished(payments, process_id, "failed")
    assert rows(tmp_path, process_id) == [("reserve", 1, "cancelled")]
    other = await start(payments)
    [got] = await answered(waiting)
    assert (got["process"], got["task"]) == (other, "reserveFunds")


# -- a daemon killed between a cancel's 202 and the cancel of its task ---------------------


async def killed_while_cancelling(client: AppClient, process_id: str) -> None:
    """The cancel's 202, then the daemon dies before its runner's cancel of the task."""
    never = asyncio.Event()
    slow_cancel(client, before=never, after=never)
    assert (await client.post(f"/v1/processes/{process_id}/cancel")).status == 202
    await asyncio.sleep(0.2)
    await client.close()


async def undone(client: AppClient, process_id: str) -> dict[str, Any]:
    """The only task handed out is the compensation; done, the process ends cancelled."""
    [release] = await poll(client, wait="2s", worker="w2", max=10)
    assert release["task"] == "releaseFunds"
    await client.post(f"/v1/tasks/{release['id']}/complete", json={"output": {}})
    await finished(client, process_id, "cancelled")
    return release


async def test_after_a_restart_a_cancelled_process_s_task_is_cancelled_not_handed_out(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    config = make_config(workflows=[task_workflow()])
    first = await start_daemon(config)
    process_id = await start(first)
    reserve = await take(first, "reserveFunds")
    resp = await first.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    assert resp.status == 200  # charge is due
    await killed_while_cancelling(first, process_id)
    await undone(await start_daemon(config), process_id)
    assert rows(tmp_path, process_id) == [
        ("reserve", 1, "done"),
        ("charge", 1, "cancelled"),
        ("reserve.compensate", 1, "done"),
    ]


async def test_after_a_restart_a_task_done_before_the_cancel_reached_it_is_undone(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    config = make_config(workflows=[task_workflow()])
    first = await start_daemon(config)
    process_id = await start(first)
    reserve = await take(first, "reserveFunds")
    await killed_while_cancelling(first, process_id)
    with sqlite3.connect(tmp_path / "hms.db") as db:  # the worker's answer reached the table
        db.execute(
            "UPDATE tasks SET state = 'done', output = '{\"reservation\": \"r-1\"}' "
            "WHERE delivery = ?",
            [reserve["id"]],
        )
    second = await start_daemon(config)
    release = await undone(second, process_id)
    assert release["steps"] == {"reserve": {"reservation": "r-1"}}
    assert await history(second, process_id) == [
        ("reserve", "task", "ok"),
        ("reserve", "compensate", "ok"),
    ]


# -- two branches' answers during a storage outage ------------------------------------------


def two_branches(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A parallel step of two branches, a and b, then a publish."""
    return {
        "name": "Payment",
        "queue": "payments",
        "steps": [
            {"name": "both", "parallel": [{"name": "a", **a}, {"name": "b", **b}]},
            {"name": "after", "publish": "payment.done"},
        ],
    }


class CheckpointsRefused:
    """The store's database refusing checkpoints while `refused` (other writes, such as a
    signal's, go through): the outage a step's checkpoint meets."""

    def __init__(self, client: AppClient) -> None:
        self.store = client.app[PARTS].engine.store
        self._db, self.refused = self.store._db, True
        self.store._db = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def write(self, fn: Callable[[Any], Any]) -> Any:
        if self.refused and "checkpoint" in fn.__qualname__:
            raise StoreUnavailable("disk full (test)")
        return await self._db.write(fn)


async def test_two_branches_answered_during_an_outage_both_get_their_answer_written(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    client = await start_daemon(
        make_config(workflows=[two_branches({"task": "aTask"}, {"task": "bTask"})])
    )
    process_id = await start(client)
    got: list[dict[str, Any]] = []
    while len(got) < 2:
        got += await poll(client, wait="2s", worker="w1", max=2)
    by = {t["task"]: t["id"] for t in got}
    await writes_refused(client, True)
    complete_a = asyncio.ensure_future(
        client.post(f"/v1/tasks/{by['aTask']}/complete", json={"output": {"a": 1}})
    )
    await asyncio.sleep(0.35)  # a's checkpoint failed: it waits to try again, a's answer kept
    complete_b = asyncio.ensure_future(
        client.post(f"/v1/tasks/{by['bTask']}/complete", json={"output": {"b": 1}})
    )
    await asyncio.sleep(0.3)
    await writes_refused(client, False)
    assert (await answered(complete_a)).status == 200
    assert (await answered(complete_b)).status == 200
    done = await finished(client, process_id, "completed")
    assert done["outputs"]["both"] == {"a": {"a": 1}, "b": {"b": 1}}
    assert rows(tmp_path, process_id) == [("a", 1, "done"), ("b", 1, "done")]


async def test_two_branches_taking_signals_during_an_outage_take_each_once(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    client = await start_daemon(
        make_config(
            workflows=[two_branches({"wait_for": {"signal": "a"}}, {"wait_for": {"signal": "b"}})]
        )
    )
    process_id = await start(client)
    await until(lambda: _waits(client, process_id))
    refused = CheckpointsRefused(client)
    for name in ("a", "b"):  # each taken as it comes; its branch's checkpoint is refused
        resp = await client.post(f"/v1/processes/{process_id}/signals/{name}", json={})
        assert resp.status == 202
        await asyncio.sleep(0.15)
    refused.refused = False
    await finished(client, process_id, "completed")
    with sqlite3.connect(tmp_path / "hms.db") as db:
        kept = db.execute("SELECT name FROM process_signals WHERE process = ?", [process_id])
        assert kept.fetchall() == []  # both taken, both gone: none to take again on a restart


async def _waits(client: AppClient, process_id: str) -> bool:
    return (await process(client, process_id))["status"] == "waiting"


# -- a daemon killed mid parallel step whose branches are tasks ------------------------------

RESERVE_THEN_BOTH = {
    "name": "Payment",
    "queue": "payments",
    "steps": [
        {"name": "reserve", "task": "reserveFunds", "compensate": {"task": "releaseFunds"}},
        {
            "name": "both",
            "parallel": [
                {"name": "a", "task": "aTask", "compensate": {"task": "aUndo"}},
                {"name": "b", "task": "bTask", "compensate": {"task": "bUndo"}},
            ],
        },
    ],
}


async def branch_tasks(client: AppClient, count: int = 2) -> dict[str, str]:
    """The branches' tasks as handed out: task name -> delivery id."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        got += await poll(client, wait="2s", worker="w1", max=count)
    return {t["task"]: t["id"] for t in got}


async def run_handed(client: AppClient, process_id: str, status: str) -> list[str]:
    """Complete every task handed out until the process ends `status`: their names."""
    handed: list[str] = []

    async def ended() -> bool:
        for task in await poll(client, wait="0.2s", worker="w2", max=10):
            handed.append(task["task"])
            await client.post(f"/v1/tasks/{task['id']}/complete", json={"output": {}})
        return bool((await process(client, process_id))["status"] == status)

    await until(ended)
    return handed


def answered_in_the_table(tmp_path: Path, delivery: str) -> None:
    """A worker's complete that reached the table while the daemon was going down."""
    with sqlite3.connect(tmp_path / "hms.db") as db:
        db.execute("UPDATE tasks SET state = 'done', output = '{}' WHERE delivery = ?", [delivery])


async def cancelled_then_killed_mid_branches(
    start_daemon: Start, config: Config
) -> tuple[str, dict[str, str]]:
    """Reserve done, both task branches open, a cancel accepted, then the daemon killed
    before the runner cancelled the branches' tasks: (process id, task name -> delivery)."""
    first = await start_daemon(config)
    process_id = await start(first)
    reserve = await take(first, "reserveFunds")
    await first.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    tasks = await branch_tasks(first)
    await killed_while_cancelling(first, process_id)
    return process_id, tasks


async def test_after_a_restart_a_cancelled_branch_s_task_done_before_is_undone(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    config = make_config(workflows=[RESERVE_THEN_BOTH])
    process_id, tasks = await cancelled_then_killed_mid_branches(start_daemon, config)
    answered_in_the_table(tmp_path, tasks["aTask"])
    second = await start_daemon(config)
    assert await run_handed(second, process_id, "cancelled") == ["aUndo", "releaseFunds"]
    assert ("a", "compensate", "ok") in await history(second, process_id)
    assert rows(tmp_path, process_id)[:3] == [
        ("reserve", 1, "done"),
        ("a", 1, "done"),
        ("b", 1, "cancelled"),
    ]


async def test_after_a_restart_a_cancelled_branch_s_task_answers_409(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    config = make_config(workflows=[RESERVE_THEN_BOTH])
    process_id, tasks = await cancelled_then_killed_mid_branches(start_daemon, config)
    second = await start_daemon(config)
    await until(lambda: _compensating(second, process_id))
    resp = await second.post(f"/v1/tasks/{tasks['bTask']}/complete", json={"output": {}})
    assert resp.status == 409  # its process was cancelled: the work is not taken as done
    assert await run_handed(second, process_id, "cancelled") == ["releaseFunds"]


async def _compensating(client: AppClient, process_id: str) -> bool:
    return (await process(client, process_id))["status"] == "compensating"


async def test_after_a_restart_a_branch_task_done_beside_a_failed_one_is_undone(
    make_config: Callable[..., Config], start_daemon: Start, tmp_path: Path
) -> None:
    config = make_config(workflows=[RESERVE_THEN_BOTH])
    first = await start_daemon(config)
    process_id = await start(first)
    reserve = await take(first, "reserveFunds")
    await first.post(f"/v1/tasks/{reserve['id']}/complete", json={"output": {}})
    tasks = await branch_tasks(first)
    never = asyncio.Event()
    slow_cancel(first, before=never, after=never)  # b's cancel never reaches the table
    failed = {"error": "no funds", "retryable": False}
    assert (await first.post(f"/v1/tasks/{tasks['aTask']}/fail", json=failed)).status == 200
    await asyncio.sleep(0.2)
    await first.close()
    answered_in_the_table(tmp_path, tasks["bTask"])
    second = await start_daemon(config)
    assert await run_handed(second, process_id, "compensated") == ["bUndo", "releaseFunds"]
    view = await process(second, process_id)
    both = next(s for s in view["steps"] if s["name"] == "both")
    assert [(b["name"], b["state"]) for b in both["branches"]] == [
        ("a", "failed"),
        ("b", "compensated"),
    ]
