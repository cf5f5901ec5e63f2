"""`Worker`: runs the task steps of workflows, long-polling the daemon's task queues (§3).

    async with Worker("http://127.0.0.1:9797", workflows=[payment], concurrency=10):
        ...                      # deployed, registered and serving until the block ends

    await Worker(url, tasks={"reserveFunds": reserve}, queue="child-support").run()  # forever

On start it deploys its workflows (`PUT /v1/workflows/{name}`: the same definition
again changes nothing) and registers itself as instance `<worker id>` of service
`<queue>` (`probe: {type: none}`, a TTL lease), for every queue it serves. Each queue
is long-polled by up to three polls (others wait while one's answer is on its way),
each asking for as many tasks as it holds free slots of `concurrency` (with fewer slots
than queues, the polls wait a second at most: the queues take turns). Async functions
run on the loop, sync ones in the worker's own threads; a function that outlasts a third
of its lease heartbeats it. A return completes the task, an exception fails it
(`NonRetryable`: for good; any other: retryable, with its message); the slot is free
again as the function ends, while its answer is still being reported.

When the daemon goes away (a restart, a crash) the worker keeps trying with a growing
pause, deploys again when it is back (Registration re-registers by itself), and keeps
reporting results it could not deliver until the daemon answers (a delivery that was
meanwhile given to another worker answers 409: the result is dropped, never doubled).
`stop()` (or leaving the `async with`, or SIGTERM/SIGINT under `run()`) stops polling,
lets the tasks in flight finish and report, then deregisters.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from .client import Client
from .context import NonRetryable, StepContext
from .durations import Duration, duration_text, seconds
from .errors import BadRequest, Conflict, HmsError, NotFound, Unavailable
from .registration import Registration
from .workflow import StepFunction, Workflow

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 0.1, 5.0
REPORT_FOR = 300.0  # seconds a result is retried while the daemon is unreachable
MIN_HEARTBEAT = 0.05
MAX_POLL = 100  # the daemon hands out at most this many tasks per poll
POLLERS_PER_QUEUE = 3
DEFAULT_LEASE = 30.0  # seconds, for a delivery that names no deadline
SCARCE_POLL = 1.0  # seconds a poll waits at most while there are fewer slots than queues


@dataclass(slots=True, eq=False)
class _Carried:
    """A completion waiting for a poll to carry it."""

    delivery: str
    output: Any
    done: asyncio.Future[bool]


class Worker:
    """Serves the function steps of `workflows`, and `tasks` on `queue`."""

    def __init__(
        self,
        url: str,
        *,
        workflows: Iterable[Workflow] = (),
        tasks: Mapping[str, StepFunction] | None = None,
        queue: str | None = None,
        concurrency: int = 10,
        token: str | None = None,
        worker_id: str | None = None,
        poll_wait: Duration = "30s",
        ttl: Duration = "30s",
        stop_timeout: Duration = "30s",
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = url.rstrip("/")
        self.token = token
        self.workflows = tuple(workflows)
        self.concurrency = concurrency
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.poll_wait = duration_text(poll_wait)
        self.ttl = duration_text(ttl)
        self.stop_timeout = seconds(stop_timeout)
        self.functions = _functions(self.workflows, tasks, queue)
        self._session: aiohttp.ClientSession | None = None
        self._client: Client | None = None
        self._registrations: list[Registration] = []
        self._executor: ThreadPoolExecutor | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._pollers: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        # Completions waiting for the next poll of their queue to carry them (`complete` in
        # its body); each future: True once a poll's answer covered it, False: report it.
        self._outbox: dict[str, list[_Carried]] = {}
        self._carry = True  # False once a daemon refused `complete` in a poll (an older one)
        self._deployed = False
        self._deploy_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None

    @property
    def queues(self) -> list[str]:
        return list(self.functions)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Deploy (waiting for the daemon while it is unreachable), register, start polling.

        A definition the daemon refuses raises its HmsError (422 names the bad field)."""
        self._session = session = aiohttp.ClientSession()
        self._client = Client(self.url, self.token, session=session)
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hms-task")
        try:
            await self._deploy_until_done()
        except BaseException:
            await self._close()
            raise
        if self._stopping.is_set():  # stopped (stop(), SIGTERM) while the daemon was away
            return
        for queue in self.functions:
            registration = Registration(
                self.url,
                queue,
                self.id,
                url=None,
                ttl=self.ttl,
                probe={"type": "none"},
                meta={"kind": "worker"},
                token=self.token,
                session=session,
                max_backoff=RETRY_MAX,
            )
            await registration.__aenter__()
            self._registrations.append(registration)
            for n in range(self._pollers_per_queue()):
                poller = asyncio.create_task(self._serve(queue), name=f"poll-{queue}-{n}")
                self._pollers.append(poller)

    async def run(self) -> None:
        """Serve until stop(), SIGTERM or SIGINT; raise what ended it otherwise (a 403)."""
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self._stopping.set)
                handled.append(signum)
        try:
            async with self:
                await self._stopping.wait()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)

    async def stop(self) -> None:
        """Stop polling, let tasks in flight finish and report (`stop_timeout`), deregister.

        A sync function still running after `stop_timeout` goes on in its thread (Python
        cannot stop a thread): its result is dropped, and once its lease lapses the
        daemon hands the task to another worker."""
        self._stopping.set()
        for poller in self._pollers:
            poller.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=self.stop_timeout)
            for task in late:  # their leases lapse and the daemon hands them to another worker
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for registration in self._registrations:
            await registration.__aexit__(None, None, None)
        self._registrations.clear()
        await self._close()
        if self._failure is not None:
            raise self._failure

    async def _close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._session is not None:
            await self._session.close()

    # Deploying

    async def _deploy_until_done(self) -> None:
        """Deploy, retrying while the daemon is away; a stop ends the wait (a request
        after it would open a session that nothing closes)."""
        pause = RETRY_FIRST
        while not self._stopping.is_set():
            try:
                await self._deploy()
                return
            except Unavailable as exc:
                log.warning("worker %s: deploying: %s; retrying in %.1fs", self.id, exc, pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, RETRY_MAX)

    async def _deploy(self) -> None:
        async with self._deploy_lock:
            if self._deployed:
                return
            for workflow in self.workflows:
                if self._stopping.is_set():
                    return
                answer = await self._http().deploy(workflow.definition())
                log.info("deployed %s version %s", workflow.name, answer.get("version"))
            self._deployed = True

    # Polling

    async def _serve(self, queue: str) -> None:
        pause = RETRY_FIRST
        while not self._stopping.is_set():
            taken = await self._take_slots()
            try:
                await self._deploy()
                tasks = await self._poll(queue, taken)
                pause = RETRY_FIRST
            except Unavailable as exc:  # the daemon is down or restarting: deploy again after
                self._release(taken)
                self._deployed = False
                log.warning("worker %s: %s; polling again in %.1fs", self.id, exc, pause)
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, RETRY_MAX)
                continue
            except BadRequest as exc:
                self._release(taken)
                if not self._carry:
                    self._fail(queue, exc)
                    return
                self._carry = False  # a daemon that predates `complete` in polls: report apart
                log.info("worker %s: the daemon does not take completions in polls", self.id)
                continue
            except HmsError as exc:  # 401/403 (no `work:` scope): no use polling again
                self._release(taken)
                self._fail(queue, exc)
                return
            except Exception as exc:  # any other answer or fault: the poller must not die
                self._release(taken)
                log.exception(
                    "worker %s: polling %s: %s; again in %.1fs", self.id, queue, exc, pause
                )
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, RETRY_MAX)
                continue
            except BaseException:
                self._release(taken)
                raise
            self._release(taken - len(tasks))
            for delivery in tasks:
                task = asyncio.create_task(self._execute(queue, delivery))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            if tasks:  # a quick function ends in this turn: the next poll carries its answer
                await asyncio.sleep(0)

    async def _take_slots(self) -> int:
        """At least one free slot (waiting for one), and more while free, up to this queue's
        share: a long poll holding every slot would starve the worker's other queues."""
        share = max(1, self.concurrency // len(self.functions))
        await self._slots.acquire()
        taken = 1
        while taken < share and not self._slots.locked():
            await self._slots.acquire()
            taken += 1
        return taken

    def _fail(self, queue: str, exc: HmsError) -> None:
        log.error("worker %s: polling %s refused: %s", self.id, queue, exc)
        self._failure = exc
        self._stopping.set()

    def _pollers_per_queue(self) -> int:
        """Up to three long polls per queue, as its share of slots allows: while one or two
        polls' answers travel and are dispatched, another is waiting, so a task that becomes
        due then is handed over as it is committed, not claimed by the next poll (a second
        commit). With two, a fifth of the tasks of the bench's calm run missed a waiting
        poll; with three, none in 600."""
        return min(POLLERS_PER_QUEUE, max(1, self.concurrency // len(self.functions)))

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    async def _poll(self, queue: str, limit: int) -> list[dict[str, Any]]:
        """One long poll, carrying the completions waiting for it: the daemon commits them
        (with its claim) before it answers, and the answer says how each went."""
        carried = self._outbox.pop(queue, []) if self._carry else []
        body: dict[str, Any] = {
            "queue": queue,
            "worker": self.id,
            "wait": self._poll_wait(),
            "max": min(limit, MAX_POLL),
        }
        if carried:
            body["complete"] = [{"id": c.delivery, "output": c.output} for c in carried]
        answer: dict[str, Any] = {}
        try:
            answer = await self._http()._call(
                "POST", "/v1/tasks/poll", json=body, timeout=seconds(self.poll_wait) + 30
            )
        finally:  # not answered (the daemon away, a refusal, stop()): each reports apart
            outcomes = {str(o.get("id")): o for o in answer.get("completed") or ()}
            for completion in carried:
                outcome = outcomes.get(completion.delivery)
                error = outcome.get("error") if outcome is not None else None
                unmade = outcome is None or (error is not None and error["code"] == "unavailable")
                if error is not None and not unmade:
                    log.warning("completing %s: %s", completion.delivery, error)
                if not completion.done.done():  # False: not made (or not known): sent again
                    completion.done.set_result(not unmade)
        return list(answer.get("tasks", ()))

    def _poll_wait(self) -> str:
        """The long poll's wait. With fewer slots than queues, a poll holding a slot keeps
        the other queues from polling all that time: they take turns every second instead."""
        if self.concurrency >= len(self.functions):
            return self.poll_wait
        return duration_text(min(seconds(self.poll_wait), SCARCE_POLL))

    # Running one task

    async def _execute(self, queue: str, delivery: Mapping[str, Any]) -> None:
        """Run the function, free its slot, then report: the next poll (and the function it
        brings) need not wait for the daemon's commit of this answer."""
        released = False
        try:
            loop = asyncio.get_running_loop()
            heartbeats: list[asyncio.Task[None]] = []
            lease = _lease(delivery, DEFAULT_LEASE)  # its length: this clock need not agree
            # Most functions end well within a third of their lease: no heartbeat task then.
            timer = loop.call_later(
                max(lease / 3, MIN_HEARTBEAT),
                lambda: heartbeats.append(asyncio.create_task(self._heartbeat(delivery))),
            )
            try:
                outcome = await self._outcome(queue, delivery)
            finally:
                timer.cancel()
                for heartbeat in heartbeats:
                    heartbeat.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):  # report anyway
                        await heartbeat
            self._slots.release()
            released = True
            carried = await self._carried(queue, delivery, outcome)
            if carried is not True:
                await self._report(delivery, outcome, resent=carried is False)
        finally:
            if not released:
                self._slots.release()

    async def _carried(
        self, queue: str, delivery: Mapping[str, Any], outcome: tuple[str, Any]
    ) -> bool | None:
        """Hand a completion to the poll that starts next (it runs before this task
        resumes); True once that poll's answer covered it, False when that poll got no
        answer (it may have been committed all the same). None when no poll takes it at
        once (every poll is already waiting): it is reported apart, without delay."""
        verb, body = outcome
        if verb != "complete" or not self._carry:
            return None
        completion = _Carried(
            str(delivery["id"]), body["output"], asyncio.get_running_loop().create_future()
        )
        outbox = self._outbox.setdefault(queue, [])
        outbox.append(completion)
        await asyncio.sleep(0)  # the poller woken by the released slot takes the outbox now
        if completion in self._outbox.get(queue, ()):
            outbox.remove(completion)
            return None
        return await completion.done

    async def _outcome(self, queue: str, delivery: Mapping[str, Any]) -> tuple[str, Any]:
        """("complete", {"output"}) or ("fail", {"error", "retryable"})."""
        function = self.functions[queue].get(str(delivery["task"]))
        if function is None:  # another worker on this queue may know it (a rolling deploy)
            message = f"worker {self.id} has no task {delivery['task']!r} on queue {queue!r}"
            return "fail", {"error": message, "retryable": True}
        context = StepContext(
            input=delivery.get("input") or {},
            steps=delivery.get("steps") or {},
            process_id=str(delivery["process"]),
            step=str(delivery["step"]),
            attempt=int(delivery.get("attempt", 1)),
            idempotency_key=str(delivery["idempotency_key"]),
            task=str(delivery["task"]),
            workflow=str(delivery.get("workflow", "")),
        )
        try:
            output = await self._call(function, context)
            json.dumps(output)
        except NonRetryable as exc:
            return "fail", {"error": _message(exc), "retryable": False}
        except Exception as exc:  # the output not being JSON included
            log.warning("task %s of %s failed: %s", delivery["task"], context.process_id, exc)
            return "fail", {"error": _message(exc), "retryable": True}
        return "complete", {"output": output}

    async def _call(self, function: StepFunction, context: StepContext) -> Any:
        if inspect.iscoroutinefunction(function):
            return await function(context)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, function, context)
        if inspect.isawaitable(result):
            return await result
        return result

    async def _heartbeat(self, delivery: Mapping[str, Any]) -> None:
        """Renew the lease every third of its length while the function runs (started once
        a third of the first lease has passed, so the first renewal goes at once).

        Paced by the lease's length on this worker's monotonic clock, not by the daemon's
        deadline: the two clocks need not agree. A heartbeat that fails (any error: it
        must not cost the task its report) is tried again at the same pace."""
        url = f"/v1/tasks/{delivery['id']}/heartbeat"
        lease = _lease(delivery, DEFAULT_LEASE)
        while True:
            sent = time.monotonic()
            try:
                answer = await self._http()._call("POST", url, json={}, timeout=max(lease / 3, 1.0))
                lease = _lease(answer, lease)
            except (NotFound, Conflict):
                log.warning("task %s is no longer this worker's; its result goes nowhere", url)
                return
            except Exception as exc:
                log.warning("heartbeat of %s: %s", url, exc)
            await asyncio.sleep(max(sent + lease / 3 - time.monotonic(), MIN_HEARTBEAT))

    async def _report(
        self, delivery: Mapping[str, Any], outcome: tuple[str, Any], *, resent: bool = False
    ) -> None:
        """Send the result until the daemon answers; 404/409 mean another has the task (or,
        `resent` after a poll that carried it got no answer, that the poll's commit took)."""
        verb, body = outcome
        url = f"/v1/tasks/{delivery['id']}/{verb}"
        give_up = time.monotonic() + REPORT_FOR
        pause = RETRY_FIRST
        while True:
            try:
                await self._http()._call("POST", url, json=body)
                return
            except (NotFound, Conflict) as exc:
                if resent:
                    log.info("%s: %s (answered by a poll cut short)", url, exc.message)
                else:
                    log.warning("%s: %s (the task was given to another worker)", url, exc.message)
                return
            except Unavailable as exc:
                if time.monotonic() > give_up:
                    log.error("%s: gave up after %.0fs: %s", url, REPORT_FOR, exc)
                    return
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, RETRY_MAX)
            except HmsError as exc:
                log.error("%s refused: %s", url, exc)
                return

    def _http(self) -> Client:
        if self._client is None:
            raise RuntimeError("start the Worker first (async with, or run())")
        return self._client


def _functions(
    workflows: tuple[Workflow, ...],
    tasks: Mapping[str, StepFunction] | None,
    queue: str | None,
) -> dict[str, dict[str, StepFunction]]:
    """Queue -> task name -> function, refusing two functions for one task of a queue."""
    served: dict[str, dict[str, StepFunction]] = {}

    def add(on: str, name: str, function: StepFunction) -> None:
        known = served.setdefault(on, {})
        if known.get(name, function) is not function:
            raise ValueError(f"two functions for task {name!r} on queue {on!r}")
        known[name] = function

    for workflow in workflows:  # a workflow without function steps is only deployed
        for name, function in workflow.tasks().items():
            add(workflow.queue, name, function)
    if tasks:
        if queue is None:
            queues = {w.queue for w in workflows}
            if len(queues) != 1:
                raise ValueError("tasks= needs queue= (the queue their workflows name)")
            queue = queues.pop()
        for name, function in tasks.items():
            add(queue, name, function)
    elif queue is not None:
        served.setdefault(queue, {})
    if not served and not workflows:
        raise ValueError("a Worker needs workflows= or tasks= to serve")
    return served


def _lease(answer: Mapping[str, Any], otherwise: float) -> float:
    """The lease's length in seconds, from a delivery or a heartbeat's answer. A daemon
    before `lease` gave the deadline only: its distance on this clock, as a last resort."""
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
        if answer.get("lease") is not None:
            return max(float(answer["lease"]), MIN_HEARTBEAT)
        left = float(answer["deadline"]) - time.time()
        if left > 0:
            return left
    return otherwise


def _message(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    """`python -m hms_mgmt.worker module:attr [--url URL]`: attr is a Worker, a Workflow,
    or a list of Workflows (served with the defaults); runs until SIGTERM or SIGINT."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="python -m hms_mgmt.worker", description=main.__doc__)
    parser.add_argument("target", help="module:attr")
    parser.add_argument("--url", default=os.environ.get("HMS_URL", "http://127.0.0.1:9797"))
    parser.add_argument("--token", default=os.environ.get("HMS_TOKEN"))
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args(argv)
    module_name, _, attr = args.target.partition(":")
    target = getattr(importlib.import_module(module_name), attr or "worker")
    if isinstance(target, Worker):
        worker = target
    else:
        workflows = [target] if isinstance(target, Workflow) else list(target)
        worker = Worker(
            args.url, workflows=workflows, concurrency=args.concurrency, token=args.token
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(worker.run())


if __name__ == "__main__":
    main()
