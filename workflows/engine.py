"""The workflow engine: durable processes that call services step by step.

Each unfinished process is one asyncio task that loops: do the next unit of
work (a delay, an attempt, a wait, a compensation), checkpoint its outcome,
go on. Everything a restart needs is in the process row (workflows/records.py);
on start every unfinished process resumes from its last checkpoint, and its
timers (delay, retry backoff, wait timeout, deadline) are re-armed from the
stored due times, firing at once when they passed during downtime. A step
runs a second time only when the daemon died between the call and its
checkpoint, and then with the same `Idempotency-Key`.

Failure: a step that fails for good (non-retryable, or out of attempts)
starts compensation: the `compensate` calls of the done steps, in reverse
order, each retried. The process ends `compensated`, or `failed` when a
compensation fails for good or there was nothing to compensate. Cancel does
the same and ends `cancelled`. A passed deadline marks the process, publishes
`workflow.deadline_missed` and counts against the workflow's SLO; the process
keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from registry import StoreUnavailable
from scheduler import EventBus

from . import templates
from .abc import WorkflowStore
from .caller import CallResult, ServiceCaller
from .definition import Call, Definition, Publish, Step, WaitFor
from .describe import describe_process, template_context
from .errors import ProcessFinished, UnknownProcess, UnknownWorkflow
from .metrics import WorkflowMetrics
from .records import Attempt, NewEvent, Process, StoredEvent
from .states import AttemptKind, AttemptOutcome, ProcessStatus, StepKind

log = logging.getLogger(__name__)

MIN_COMPENSATION_ATTEMPTS = 3
STORAGE_RETRY_MIN, STORAGE_RETRY_MAX = 0.1, 5.0
# A step's attempts are recorded under its kind; compensations under their own.
_ATTEMPT_KIND = {
    StepKind.CALL: AttemptKind.CALL,
    StepKind.PUBLISH: AttemptKind.PUBLISH,
    StepKind.WAIT_FOR: AttemptKind.WAIT_FOR,
}
# Called with (workflow, when, good) once per process: at its missed deadline, else at its end.
Outcome = Callable[[str, float, bool], None]


class Engine:
    def __init__(
        self,
        definitions: Iterable[Definition],
        *,
        store: WorkflowStore,
        caller: ServiceCaller,
        bus: EventBus,
        metrics: WorkflowMetrics,
        clock: Callable[[], float] = time.time,
        outcome: Outcome | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.store, self.caller, self._bus, self._metrics = store, caller, bus, metrics
        self._clock, self._outcome, self._jitter = clock, outcome, jitter
        self.configure(definitions)
        self.live: dict[str, Process] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, dict[str, dict[str, Any]]] = {}  # topic -> id -> match
        self._arrived: dict[str, StoredEvent] = {}
        self._stored: dict[int, StoredEvent] = {}  # stored, not yet delivered (see _deliver)
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._marking: set[asyncio.Task[None]] = set()  # deadline marks being written
        self.counts: Counter[tuple[str, str]] = Counter()  # (workflow, status)
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Create tables, load counts and resume every unfinished process."""
        await self.store.create_tables()
        self._bus.start_after(await self.store.last_event_seq())
        self.counts.update(await self.store.counts())
        for process in await self.store.unfinished():
            self._spawn(process)

    async def close(self) -> None:
        """Stop every task; their state is what the last checkpoint says."""
        self._stopping = True
        for handle in self._deadlines.values():
            handle.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def prune(self, retention: float, event_retention: float | None = None) -> None:
        """Forget processes that finished more than `retention` seconds ago and events
        published more than `event_retention` ago (default: the same); a scheduler job."""
        now = self._clock()
        events = retention if event_retention is None else event_retention
        self.counts.subtract(await self.store.prune(now - retention, now - events))

    # -- starting ----------------------------------------------------------------

    async def start(
        self, name: str, input_: Mapping[str, Any], idempotency_key: str | None = None
    ) -> tuple[Process, bool]:
        """Start a process (durable when this returns); the same key gives the same one."""
        definition = self.definitions.get(name)
        if definition is None:
            raise UnknownWorkflow(f"no workflow named {name!r}")
        [(process, new)], _ = await self.store.create(
            [self._new(definition, input_, idempotency_key)], None
        )
        if new:
            self._started(process)
        return self.live.get(process.id, process), new

    async def publish(
        self, topic: str, data: Mapping[str, Any], key: str | None = None
    ) -> int | None:
        """Store an event and the processes it triggers in one transaction, then deliver it.

        Returns the event's sequence number (None when `key` was published before).
        """
        key = key or secrets.token_hex(12)
        now = self._clock()
        # One encoding: the stored row, and (decoded again) the event every subscriber and
        # waiting process gets, a snapshot nobody shares with whoever published it.
        encoded = orjson.dumps(data)
        snapshot: dict[str, Any] = orjson.loads(encoded)
        triggered = self._triggers.get(topic, ())
        processes = [self._new(d, snapshot, f"event:{key}") for d in triggered]
        reserved = self._bus.reserve()
        event = NewEvent(seq=reserved, topic=topic, data=encoded, key=key, published_at=now)
        seq = None
        try:
            created, seq = await self.store.create(processes, event)
        finally:
            if seq is None:  # a duplicate key, or the write failed
                self._bus.release(reserved)
                self._deliver()  # the release may let later events through
        for process, new in created:
            if new:
                self._started(process)
        if seq is not None:
            self._bus.publish(topic, snapshot, reserved=seq)
            self._deliver(StoredEvent(seq=seq, topic=topic, data=snapshot, published_at=now))
        return seq

    def _new(self, definition: Definition, input_: Mapping[str, Any], key: str | None) -> Process:
        now = self._clock()
        deadline = now + definition.deadline if definition.deadline is not None else None
        process_id = f"{int(now * 1000):012x}{secrets.token_hex(6)}"  # sorts by start time
        return Process(
            id=process_id,
            workflow=definition.name,
            status=ProcessStatus.STARTED,
            input=dict(input_),
            outputs={},
            idempotency_key=key,
            created_at=now,
            updated_at=now,
            deadline_at=deadline,
        )

    def _started(self, process: Process) -> None:
        self.counts[(process.workflow, process.status)] += 1
        self._metrics.started(process.workflow)
        self._emit("workflow.started", process)
        self._spawn(process)

    def _spawn(self, process: Process) -> None:
        self.live[process.id] = process
        self._wakeups[process.id] = asyncio.Event()
        self._done.setdefault(process.id, asyncio.Event())
        self._arm_deadline(process)
        task = asyncio.create_task(self._run(process), name=f"process:{process.id}")
        self._tasks[process.id] = task

    # -- requests on running processes -------------------------------------------

    async def cancel(self, process_id: str) -> Process:
        process = self.live.get(process_id)
        if process is None:
            stored = await self.store.get(process_id)
            if stored is None:
                raise UnknownProcess(f"no process {process_id!r}")
            raise ProcessFinished(f"process {process_id} is {stored[0].status}")
        if not process.cancel_requested:
            process.cancel_requested = True
            process.updated_at = self._clock()
            try:
                await self.store.checkpoint(process)  # durable before the 202
            except StoreUnavailable:
                process.cancel_requested = False  # the 503 says "not made": make it so
                raise
            self._wake(process.id)
        return process

    async def wait(self, process_id: str, seconds: float) -> bool:
        """True when the process has finished within `seconds`."""
        done = self._done.get(process_id)
        if done is None:
            return True  # not live: finished already (or unknown)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await done.wait()
        return done.is_set()

    # -- the process loop --------------------------------------------------------

    async def _run(self, process: Process) -> None:
        definition = self.definitions.get(process.workflow)
        try:
            if definition is None:
                process.error = f"workflow {process.workflow!r} is no longer defined"
                await self._finish(process, ProcessStatus.FAILED)
                return
            pause = STORAGE_RETRY_MIN
            while not process.finished:
                try:
                    if process.compensating_from is None:
                        await self._forward(definition, process)
                    else:
                        await self._compensate(definition, process)
                    pause = STORAGE_RETRY_MIN
                except StoreUnavailable:  # e.g. a publish step: retried with its same key
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, STORAGE_RETRY_MAX)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave a process silently stuck
            log.exception("process %s failed inside the engine", process.id)
            process.error = f"internal error: {exc}"
            await self._finish(process, ProcessStatus.FAILED)
        finally:
            if process.finished or not self._stopping:
                self._forget(process)

    async def _forward(self, definition: Definition, process: Process) -> None:
        if process.cancel_requested:
            await self._begin_compensation(definition, process, cancelled=True)
            return
        if process.position >= len(definition.steps):
            await self._finish(process, ProcessStatus.COMPLETED)
            return
        step = definition.steps[process.position]
        if isinstance(step.action, WaitFor):
            await self._wait_for(definition, process, step, step.action)
            return
        if process.wake_at is None and process.attempt == 0 and step.delay:
            process.wake_at = self._clock() + step.delay
            await self._checkpoint(process, ProcessStatus.WAITING)
        if process.wake_at is not None:
            if not await self._sleep(process, process.wake_at):
                return  # cancelled meanwhile
            process.wake_at = None
        await self._attempt(definition, process, step)

    async def _attempt(self, definition: Definition, process: Process, step: Step) -> None:
        self._set_status(process, ProcessStatus.RUNNING)
        started = self._clock()
        attempt = process.attempt + 1
        result = await self._act(process, step)
        self._record(process, step.name, _ATTEMPT_KIND[step.kind], attempt, started, result)
        if result.ok:
            process.outputs[step.name] = result.output
            process.position += 1
            process.attempt = 0
            await self._checkpoint(process, ProcessStatus.RUNNING)
            self._emit("workflow.step_completed", process, step=step.name)
            return
        process.attempt = attempt
        if result.retryable and attempt < step.retry.max_attempts:
            process.wake_at = self._clock() + step.retry.delay(attempt, self._jitter())
            await self._checkpoint(process, ProcessStatus.WAITING)
            return
        process.error = f"step {step.name}: {result.error}"
        await self._begin_compensation(definition, process, cancelled=False)

    async def _act(self, process: Process, step: Step) -> CallResult:
        context = template_context(process)
        if isinstance(step.action, Call):
            return await self._call(process, step.name, step.action, step, context)
        assert isinstance(step.action, Publish)
        try:
            data = (
                templates.render(step.action.data, context)
                if step.action.data is not None
                else {"process": process.id, "workflow": process.workflow, **context}
            )
        except templates.TemplateError as exc:
            return CallResult(ok=False, error=str(exc), retryable=False)
        if not isinstance(data, dict):
            data = {"value": data}
        seq = await self.publish(step.action.topic, data, key=f"{process.id}/{step.name}")
        return CallResult(ok=True, output={"event": seq})

    async def _call(
        self, process: Process, name: str, call: Call, step: Step, context: dict[str, Any]
    ) -> CallResult:
        """A step's call or compensation; a template without a value fails it for good."""
        try:
            rendered = {
                str(k): str(v) for k, v in templates.render(dict(call.headers), context).items()
            }
            path = str(templates.render(call.path, context))
            body = templates.render(call.body, context) if call.body is not None else None
        except templates.TemplateError as exc:
            return CallResult(ok=False, error=str(exc), retryable=False)
        headers = {**rendered, "Idempotency-Key": f"{process.id}/{name}"}
        return await self.caller.call(
            call.service,
            call.method,
            path,
            body=body,
            headers=headers,
            timeout=step.timeout,
            retry_on=step.retry.retry_on,
        )

    async def _wait_for(
        self, definition: Definition, process: Process, step: Step, wait: WaitFor
    ) -> None:
        try:
            match = templates.render(dict(wait.match), template_context(process))
        except templates.TemplateError as exc:
            process.error = f"step {step.name}: {exc}"
            await self._begin_compensation(definition, process, cancelled=False)
            return
        started = self._clock()
        self._waiting.setdefault(wait.event, {})[process.id] = match
        try:
            if process.wait_seq is None:  # registered above first, so nothing slips between
                process.wait_seq = self._bus.position  # later events are delivered live
                if wait.timeout is not None:
                    process.wake_at = started + wait.timeout
                await self._checkpoint(process, ProcessStatus.WAITING)
            else:  # resumed: an event may have come while the daemon was down
                for stored in await self.store.events_since(wait.event, process.wait_seq):
                    if _matches(match, stored.data):
                        self._arrived.setdefault(process.id, stored)
                        break
            while process.id not in self._arrived and not process.cancel_requested:
                if await self._sleep(process, process.wake_at):
                    break  # timed out
        finally:
            self._waiting.get(wait.event, {}).pop(process.id, None)
        if process.cancel_requested:
            return
        event = self._arrived.pop(process.id, None)
        process.wake_at, process.wait_seq = None, None
        if event is None:
            result = CallResult(ok=False, error=f"no {wait.event} event within {wait.timeout:g}s")
            self._record(process, step.name, AttemptKind.WAIT_FOR, 1, started, result)
            process.error = f"step {step.name}: {result.error}"
            await self._begin_compensation(definition, process, cancelled=False)
            return
        self._record(
            process,
            step.name,
            AttemptKind.WAIT_FOR,
            1,
            started,
            CallResult(ok=True, output=event.data),
        )
        process.outputs[step.name] = event.data
        process.position += 1
        await self._checkpoint(process, ProcessStatus.RUNNING)
        self._emit("workflow.step_completed", process, step=step.name)

    # -- compensation --------------------------------------------------------------

    async def _begin_compensation(
        self, definition: Definition, process: Process, *, cancelled: bool
    ) -> None:
        done = definition.steps[: process.position]
        if not any(step.compensate is not None for step in done):
            await self._finish(
                process, ProcessStatus.CANCELLED if cancelled else ProcessStatus.FAILED
            )
            return
        process.compensating_from = process.position - 1
        process.attempt, process.wake_at = 0, None
        await self._checkpoint(process, ProcessStatus.COMPENSATING)

    async def _compensate(self, definition: Definition, process: Process) -> None:
        index = process.compensating_from
        assert index is not None
        while index >= 0 and definition.steps[index].compensate is None:
            index -= 1
        if index < 0:
            status = (
                ProcessStatus.CANCELLED if process.cancel_requested else ProcessStatus.COMPENSATED
            )
            await self._finish(process, status)
            return
        process.compensating_from = index
        step = definition.steps[index]
        assert step.compensate is not None
        if process.wake_at is not None:
            await self._sleep(process, process.wake_at, cancellable=False)
            process.wake_at = None
        started, attempt = self._clock(), process.attempt + 1
        result = await self._call(
            process, f"{step.name}.compensate", step.compensate, step, template_context(process)
        )
        self._record(process, step.name, AttemptKind.COMPENSATE, attempt, started, result)
        if result.ok:
            process.compensating_from, process.attempt = index - 1, 0
            await self._checkpoint(process, ProcessStatus.COMPENSATING)
            return
        process.attempt = attempt
        retry = step.retry
        attempts = max(retry.max_attempts, MIN_COMPENSATION_ATTEMPTS)
        if result.retryable and attempt < attempts:
            process.wake_at = self._clock() + retry.delay(attempt, self._jitter())
            await self._checkpoint(process, ProcessStatus.COMPENSATING)
            return
        process.error = f"{process.error}; compensation of {step.name} failed: {result.error}"
        await self._finish(process, ProcessStatus.FAILED)

    # -- endings, deadlines, events ----------------------------------------------

    async def _finish(self, process: Process, status: ProcessStatus) -> None:
        now = self._clock()
        process.finished_at, process.wake_at = now, None
        await self._checkpoint(process, status)
        self._metrics.finished(process.workflow, status, now - process.created_at)
        self._emit(f"workflow.{status}", process)
        handle = self._deadlines.pop(process.id, None)
        if handle is not None:
            handle.cancel()
        if self._outcome is not None and not process.deadline_missed:
            self._outcome(process.workflow, now, status == ProcessStatus.COMPLETED)

    def _arm_deadline(self, process: Process) -> None:
        if process.deadline_at is None or process.deadline_missed:
            return
        delay = max(0.0, process.deadline_at - self._clock())

        def passed() -> None:  # the loop keeps only weak references to tasks: hold it
            task = asyncio.create_task(self._deadline_passed(process))
            self._marking.add(task)
            task.add_done_callback(self._marking.discard)

        self._deadlines[process.id] = asyncio.get_running_loop().call_later(delay, passed)

    async def _deadline_passed(self, process: Process) -> None:
        self._deadlines.pop(process.id, None)
        if process.finished or process.deadline_missed:
            return
        process.deadline_missed = True
        await self._store_durably(process)
        self._metrics.deadline_missed(process.workflow)
        self._emit("workflow.deadline_missed", process)
        if self._outcome is not None:
            self._outcome(process.workflow, process.deadline_at or self._clock(), False)

    def _deliver(self, event: StoredEvent | None = None) -> None:
        """Hand stored events to waiting processes in id order, up to the bus's position,
        as the bus does: an event whose earlier reservation is still being written waits.
        So a process that starts waiting at `bus.position` gets live exactly the events
        after it, as `events_since(wait_seq)` finds them after a restart."""
        if event is not None:
            self._stored[event.seq] = event
        while self._stored and (first := min(self._stored)) <= self._bus.position:
            event = self._stored.pop(first)
            for process_id, match in list(self._waiting.get(event.topic, {}).items()):
                if _matches(match, event.data) and process_id not in self._arrived:
                    self._arrived[process_id] = event
                    self._wake(process_id)

    def _emit(self, topic: str, process: Process, **extra: Any) -> None:
        data = {
            "process": process.id,
            "workflow": process.workflow,
            "status": process.status,
            **extra,
        }
        if process.error and topic != "workflow.step_completed":
            data["error"] = process.error
        self._bus.publish(topic, data)

    # -- helpers -------------------------------------------------------------------

    def _record(
        self,
        process: Process,
        step: str,
        kind: AttemptKind,
        attempt: int,
        started: float,
        result: CallResult,
    ) -> None:
        ended = self._clock()
        outcome = (
            AttemptOutcome.OK
            if result.ok
            else (AttemptOutcome.TIMEOUT if result.timed_out else AttemptOutcome.ERROR)
        )
        process.pending.append(
            Attempt(
                step=step,
                kind=kind,
                attempt=attempt,
                started_at=started,
                ended_at=ended,
                outcome=outcome,
                error=result.error,
                instance=result.instance,
                http_status=result.status,
            )
        )
        self._metrics.attempt(process.workflow, step, outcome, ended - started)

    def configure(self, definitions: Iterable[Definition]) -> None:
        """Take new definitions (config reload). A running process keeps the definition it
        started with (its task holds it); new starts and triggers use the new ones."""
        self.definitions = {d.name: d for d in definitions}
        self._triggers: dict[str, list[Definition]] = {}
        for definition in self.definitions.values():
            self._metrics.declare(definition.name)
            if definition.trigger is not None:
                self._triggers.setdefault(definition.trigger, []).append(definition)

    async def describe(self, process_id: str) -> dict[str, Any] | None:
        """A process as the API and the status page show it: status, data, full history."""
        stored = await self.store.get(process_id)
        if stored is None:
            return None
        process, history = stored
        live = self.live.get(process_id)
        if live is not None:  # history not yet checkpointed is shown too
            process, history = live, history + list(live.pending)
        return describe_process(process, history, self.definitions.get(process.workflow))

    async def _checkpoint(self, process: Process, status: ProcessStatus) -> None:
        self._set_status(process, status)
        process.updated_at = self._clock()
        await self._store_durably(process)

    async def _store_durably(self, process: Process) -> None:
        """Checkpoint, waiting out a storage failure (disk full, read-only): the process
        holds where it is rather than fail or run ahead of what is on disk."""
        pause = STORAGE_RETRY_MIN
        while True:
            try:
                await self.store.checkpoint(process)
                return
            except StoreUnavailable:
                log.debug("process %s waits for storage (%.1fs)", process.id, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORAGE_RETRY_MAX)

    def _set_status(self, process: Process, status: ProcessStatus) -> None:
        if process.status != status:
            self.counts[(process.workflow, process.status)] -= 1
            self.counts[(process.workflow, status)] += 1
            process.status = status

    async def _sleep(
        self, process: Process, until: float | None, *, cancellable: bool = True
    ) -> bool:
        """Sleep until `until` (None: until woken). False when woken early (cancel, event)."""
        wakeup = self._wakeups[process.id]
        wakeup.clear()
        if cancellable and process.cancel_requested:
            return False
        timeout = None if until is None else max(0.0, until - self._clock())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await wakeup.wait()
                    wakeup.clear()
                    if cancellable:
                        return False
        except TimeoutError:
            return True

    def _wake(self, process_id: str) -> None:
        wakeup = self._wakeups.get(process_id)
        if wakeup is not None:
            wakeup.set()

    def _forget(self, process: Process) -> None:
        self.live.pop(process.id, None)
        self._tasks.pop(process.id, None)
        self._wakeups.pop(process.id, None)
        done = self._done.pop(process.id, None)
        if done is not None:
            done.set()


def _matches(match: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    return all(data.get(key) == value for key, value in match.items())
