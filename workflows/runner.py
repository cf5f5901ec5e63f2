"""The process loop: each live process is one task running `ProcessRunner.run`.

It does the next unit of work (a delay, an attempt, a wait, a compensation),
checkpoints its outcome and goes on, until the process finishes. One runner
serves every process of an engine; what it shares with the engine (the
counts, the wakeups, the event waits) is handed in, never reached for.
Over 15 methods because they are one state machine's transitions: forward,
attempt, wait, compensate, finish, each with its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson

from registry import StoreUnavailable
from scheduler import EventBus

from . import expect, templates
from .abc import NewTask, TaskRecord, WorkflowStore
from .caller import CallResult, ServiceCaller
from .definition import Call, Definition, Parallel, Publish, Step, Task, WaitFor
from .describe import template_context
from .errors import Fenced
from .metrics import WorkflowMetrics
from .records import Attempt, Branch, Process, Strand, failure, match_key
from .resources import ResourcePool
from .states import AttemptKind, AttemptOutcome, BranchState, ProcessStatus, StepKind
from .tasks import Opened, StaleDelivery, TaskQueues, outcome
from .waits import Deadlines, EventWaits, SignalWaits, Wakeups, matches

log = logging.getLogger("workflows.engine")  # the name operators know these lines by

MIN_COMPENSATION_ATTEMPTS = 3
STORAGE_RETRY_MIN, STORAGE_RETRY_MAX = 0.1, 5.0
# A step's attempts are recorded under its kind; compensations under their own.
_ATTEMPT_KIND = {
    StepKind.CALL: AttemptKind.CALL,
    StepKind.PUBLISH: AttemptKind.PUBLISH,
    StepKind.WAIT_FOR: AttemptKind.WAIT_FOR,
    StepKind.TASK: AttemptKind.TASK,
    StepKind.PARALLEL: AttemptKind.PARALLEL,  # only a skipped one has a line of its own
}
# Called with (workflow, when, good) once per process: at its missed deadline, else at its end.
Outcome = Callable[[str, float, bool], None]


class Publisher(Protocol):
    """Engine.publish: a publish step stores its event as any publisher does, `by` its
    process (`process:<id>`)."""

    def __call__(
        self, topic: str, data: Mapping[str, Any], key: str | None = None, *, by: str
    ) -> Awaitable[int | None]: ...


class Parked(Exception):
    """Raised at a wait that lasts beyond the horizon: the process leaves memory, its row
    (written before the wait) brings it back when due (residency.py)."""


class ProcessRunner:
    def __init__(
        self,
        *,
        definition: Callable[[Process], Definition | None],
        store: WorkflowStore,
        caller: ServiceCaller,
        bus: EventBus,
        metrics: WorkflowMetrics,
        publish: Publisher,
        counts: Counter[tuple[str, str]],
        wakeups: Wakeups,
        waits: EventWaits,
        clock: Callable[[], float],
        outcome: Outcome | None,
        jitter: Callable[[], float],
        signals: SignalWaits,
        respond: Callable[[str], None] = lambda process_id: None,
        tasks: TaskQueues | None = None,
        resources: ResourcePool | None = None,
        acting: Callable[[], bool] = lambda: True,
        horizon: float | None = None,
        waiting_on: Callable[[str, str], None] = lambda topic, keys: None,
    ) -> None:
        self._definition, self._store, self._caller = definition, store, caller
        self._horizon = horizon  # None: every process stays in memory
        self._waiting_on = waiting_on  # a main line waits for (topic, keys): engine.publish
        # Replicas: whether this replica still leads, asked right before anything leaves it
        # (a call, a publish, a task), not only at the checkpoint after: a leader paused
        # past its lease wakes with its timers overdue and must not act on them.
        self._acting = acting
        self._tasks = tasks
        self._resources = resources  # None: no step acquires (`_hold` refuses one that does)
        self._bus, self._metrics, self._publish = bus, metrics, publish
        self._counts, self._wakeups, self._waits = counts, wakeups, waits
        self._clock, self._outcome, self._jitter = clock, outcome, jitter
        self._respond = respond  # a synchronous start may answer now (respond_after)
        self._signals = signals
        self.deadlines = Deadlines(clock, self._deadline_passed)

    async def run(self, process: Process) -> None:
        """Run the process until it finishes (or the task is cancelled: then the last
        checkpoint is where it resumes)."""
        definition = self._definition(process)  # the version it started with
        process.has_tasks = definition is None or definition.has_tasks  # None: unknown
        try:
            if definition is None:
                process.error = failure(
                    None,
                    f"workflow {process.workflow!r} v{process.workflow_version} "
                    "is no longer defined or no longer loads",
                )
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
            self._end_lost(process, StoreUnavailable("the daemon stops: answer not recorded"))
            raise
        except Parked:  # nothing in flight (see _park): its row says everything
            raise
        except Fenced:  # another replica runs it now: nothing of it is ours to write or free
            self._end_lost(process, StoreUnavailable("taken over by another replica"))
            raise
        except Exception as exc:  # a bug must not leave a process silently stuck
            log.exception("process %s failed inside the engine", process.id)
            lost, process.task_ends = process.task_ends, ()  # answered once the end is written
            self._end_lost(process, exc)
            process.error = failure(None, f"internal error: {exc}")
            try:  # its last checkpoint cancels its open tasks: the answers come too late
                await self._finish(process, ProcessStatus.FAILED)
            finally:
                stale = StaleDelivery(f"its process failed: {exc}")
                if self._tasks is not None:
                    for end in lost:
                        self._tasks.ended(end.delivery, stale)

    async def _forward(self, definition: Definition, process: Process) -> None:
        if process.cancel_requested:
            if self._tasks is not None:  # its step's task is not run (done: compensated)
                await self._cancel_stored_task(definition, process)
            await self._begin_compensation(definition, process, cancelled=True)
            return
        if process.position >= len(definition.steps):
            if definition.output is not None:  # else the output is every step's (describe)
                context = template_context(process)
                process.output = templates.render(definition.output, context, strict=False)
            await self._finish(process, ProcessStatus.COMPLETED)
            return
        step = definition.steps[process.position]
        line = Strand(process, process)
        if step.when and _fresh(line):
            unmet = self._unmet(step, process)
            if unmet is not None:  # checked before its delay, once: a resumed delay keeps it
                self._skipped(process, step, unmet)
                await self._advance(definition, process, step)
                return
        if isinstance(step.action, Parallel):
            refused = await self._hold(line, step) if step.acquire is not None else None
            if refused is None:
                if not process.cancel_requested:  # else the next turn compensates
                    await self._parallel(definition, process, step, step.action)
                return
            result: CallResult | None = refused
        else:
            result = await self._run_step(definition, line, step)
        if result is None:  # not over: a retry's backoff, a cancel, a storage failure
            return
        if not result.ok:
            process.error = failure(step.name, str(result.error), result.status, result.body)
            await self._begin_compensation(definition, process, cancelled=False)
            return
        process.outputs[step.name] = result.output
        await self._advance(definition, process, step, done=True)

    async def _advance(
        self, definition: Definition, process: Process, step: Step, *, done: bool = False
    ) -> None:
        """The main line goes past the step: `done` (its output kept), or skipped."""
        process.position += 1
        process.attempt = 0
        self._open_next(definition, process)
        await self._checkpoint(process, ProcessStatus.RUNNING)
        self._step_done(definition, process, step.name, done=done)

    async def _run_step(
        self, definition: Definition, strand: Strand, step: Step
    ) -> CallResult | None:
        """One turn of a step on a strand: its delay, then an attempt or its wait. The
        step's end (ok, or failed for good), or None when it is not over (a retry is
        due later, the strand was stopped): the caller's next turn goes on from there."""
        if step.acquire is not None:  # held before its delay, until the process ends
            refused = await self._hold(strand, step)
            if refused is not None or strand.stopped():
                return refused
        if isinstance(step.action, WaitFor):
            if step.action.signal is not None:
                return await self._wait_signal(strand, step, step.action)
            return await self._wait_for(strand, step, step.action)
        state = strand.state
        timed = state.wake_at is not None or (step.delay and state.attempt == 0)
        if timed and not await self._delay(strand, step):  # no coroutine for a plain step
            return None  # woken early: a cancel, or a wake for another strand
        return await self._attempt(definition, strand, step)

    async def _delay(self, strand: Strand, step: Step) -> bool:
        """The step's delay before its first attempt, or a retry's backoff (a durable
        timer: `wake_at`). False when woken before it passed."""
        state = strand.state
        if state.wake_at is None and state.attempt == 0 and step.delay:
            state.wake_at = self._clock() + step.delay
            await self._checkpoint(strand.process, ProcessStatus.WAITING, strand)
        if state.wake_at is not None:
            while await self._park(strand):  # its row was written: look again
                pass
            if not await self._wakeups.sleep(strand, state.wake_at):
                return False
            state.wake_at = None
        return True

    # -- parallel steps ------------------------------------------------------------

    async def _parallel(
        self, definition: Definition, process: Process, step: Step, parallel: Parallel
    ) -> None:
        """Run the branches together until all have ended. One failing for good stops the
        others (an open task cancelled, a wait ended, a call in flight finishes its
        attempt); then the process compensates, finished branches first. A restart comes
        back here: branches that ended are not run again, the others resume where their
        records (in the process row) say."""
        begun = any(branch.name in process.branches for branch in parallel.branches)
        if not begun and not await self._delay(Strand(process, process), step):
            return  # woken early: the next turn looks again (a cancel compensates)
        strands = [
            Strand(process, process.branches.setdefault(branch.name, Branch()), branch.name)
            for branch in parallel.branches
        ]
        failed = any(_branch(s).state == BranchState.FAILED for s in strands)  # before a restart
        if failed and self._tasks is not None:  # a task answered meanwhile is undone too
            await self._cancel_branch_tasks(definition, process, parallel)
        for strand in strands:
            strand.halted = failed
        async with asyncio.TaskGroup() as group:
            for branch, strand in zip(parallel.branches, strands, strict=True):
                if _branch(strand).state == BranchState.RUNNING:
                    group.create_task(self._branch(definition, branch, strand, strands))
        if process.cancel_requested:
            return  # the next turn compensates, as for any cancel
        if any(_branch(s).state == BranchState.FAILED for s in strands):
            await self._begin_compensation(definition, process, cancelled=False)
            return
        outputs = process.outputs
        outputs[step.name] = {
            b.name: outputs[b.name] for b in parallel.branches if b.name in outputs
        }
        await self._advance(definition, process, step, done=True)

    async def _branch(
        self, definition: Definition, step: Step, strand: Strand, strands: list[Strand]
    ) -> None:
        """One branch, turn by turn, until it ends (its record says how)."""
        process, branch = strand.process, _branch(strand)
        pause = STORAGE_RETRY_MIN
        while branch.state == BranchState.RUNNING:
            if strand.stopped():
                self._branch_ended(process, branch, BranchState.CANCELLED)
                return  # written by the checkpoint that begins compensation
            if step.when and _fresh(strand):
                unmet = self._unmet(step, process)
                if unmet is not None:
                    self._skipped(process, step, unmet)
                    self._branch_ended(process, branch, BranchState.SKIPPED)
                    await self._checkpoint(process, ProcessStatus.RUNNING, strand)
                    self._step_done(definition, process, step.name, done=False)
                    return
            try:
                result = await self._run_step(definition, strand, step)
            except StoreUnavailable:  # a publish: tried again with its same key
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORAGE_RETRY_MAX)
                continue
            if result is None:
                continue
            if result.ok:
                process.outputs[step.name] = result.output
                self._branch_ended(process, branch, BranchState.DONE)
                await self._checkpoint(process, ProcessStatus.RUNNING, strand)
                self._step_done(definition, process, step.name)
                return
            if process.error is None:  # the first failure is the process's
                process.error = failure(step.name, str(result.error), result.status, result.body)
            self._branch_ended(process, branch, BranchState.FAILED)
            for sibling in strands:
                sibling.halted = True
            self._wakeups.wake(process.id)
            await self._checkpoint(process, ProcessStatus.RUNNING, strand)
            return

    def _branch_ended(self, process: Process, branch: Branch, state: BranchState) -> None:
        branch.state, branch.waiting = state, False
        branch.finished = 1 + max((b.finished or 0 for b in process.branches.values()), default=0)

    def _unmet(self, step: Step, process: Process) -> str | None:
        """The first of the step's `when` conditions that does not hold, with what was
        seen (`[steps.validate.priority] == urgent (got low)`); None: the step runs."""
        context = template_context(process)
        for condition in step.when:
            holds, seen = condition.check_context(context)
            if not holds:
                return f"{condition.text} (got {seen})"
        return None

    def _skipped(self, process: Process, step: Step, why: str) -> None:
        """A step whose `when` does not hold: one history line, no output (so it is not
        compensated, and a template reading it fails as for any missing value)."""
        now = self._clock()
        skipped = Attempt(
            step=step.name,
            kind=_ATTEMPT_KIND[step.kind],
            attempt=1,
            started_at=now,
            ended_at=now,
            outcome=AttemptOutcome.SKIPPED,
            error=why,
        )
        process.pending.append(skipped)
        self._metrics.attempt(process.workflow, step.name, AttemptOutcome.SKIPPED, 0.0)

    async def _attempt(
        self, definition: Definition, strand: Strand, step: Step
    ) -> CallResult | None:
        process, state = strand.process, strand.state
        self._set_status(process, ProcessStatus.RUNNING, strand)
        started = self._clock()
        attempt = state.attempt + 1
        if isinstance(step.action, Task):
            task = await self._task(definition, strand, step, step.action, attempt, forward=True)
            if task is None:  # cancelled while open: the next turn compensates
                cancelled = CallResult(
                    ok=False, error="cancelled while its task was open", retryable=False
                )
                self._record(
                    process, step.name, AttemptKind.TASK, attempt, started, cancelled, count=False
                )  # in the history; not a step error in the metrics: an operator's cancel
                return None
            result = task
        else:
            result = self._expected(step, await self._act(process, step))
        self._record(process, step.name, _ATTEMPT_KIND[step.kind], attempt, started, result)
        if result.ok:
            state.attempt = 0
            return result
        state.attempt = attempt
        if result.retryable and attempt < step.retry.max_attempts:
            state.wake_at = self._clock() + step.retry.delay(attempt, self._jitter())
            await self._checkpoint(process, ProcessStatus.WAITING, strand)
            return None
        return result

    def _expected(self, step: Step, result: CallResult) -> CallResult:
        """A call step's `expect:` over its 2xx answer: a failing condition fails the
        attempt for good (the service answered; asking again gets the same answer)."""
        return expect.judge(step.expect, result) if step.expect else result

    def _may_act(self, process: Process) -> None:
        if not self._acting():
            raise Fenced(f"process {process.id}: this replica no longer leads")

    async def _act(self, process: Process, step: Step) -> CallResult:
        self._may_act(process)
        context = template_context(process)
        if isinstance(step.action, Call):
            return await self._call(process, step.name, step.action, step, context)
        assert isinstance(step.action, Publish)
        try:
            data = (
                templates.render(step.action.data, context)
                if step.action.data is not None
                else {
                    "process": process.id,
                    "workflow": process.workflow,
                    "input": process.input,
                    "steps": process.outputs,
                }
            )
        except templates.TemplateError as exc:
            return CallResult(ok=False, error=str(exc), retryable=False)
        if not isinstance(data, dict):
            data = {"value": data}
        key, by = f"{process.id}/{step.name}", f"process:{process.id}"
        seq = await self._publish(step.action.topic, data, key, by=by)
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
        self._may_act(process)
        headers = {**rendered, "Idempotency-Key": f"{process.id}/{name}"}
        return await self._caller.call(
            call.service,
            call.method,
            path,
            body=body,
            headers=headers,
            timeout=step.timeout,
            retry_on=step.retry.retry_on,
        )

    async def _task(
        self,
        definition: Definition,
        strand: Strand,
        step: Step,
        task: Task,
        attempt: int,
        *,
        forward: bool,
    ) -> CallResult | None:
        """A task step's attempt (`forward`) or a task compensation: open its task (found
        again after a restart) and wait for its end. None: the strand was stopped (the
        process cancelled, a sibling branch failed) while the task was open; the task is
        cancelled too, its delivery answers 409."""
        if self._tasks is None:
            return CallResult(ok=False, error="task queues are not served", retryable=False)
        process = strand.process
        self._may_act(process)
        opened = await self._tasks.open(
            self._new_task(definition, process, step, task, attempt, forward=forward)
        )
        kept = None
        try:
            if not forward:  # a compensation runs to its end, cancel or not
                ended = await opened.outcome
            else:
                self._set_status(process, ProcessStatus.WAITING, strand)
                while not opened.outcome.done():
                    await self._wakeups.sleep(strand, None)  # woken by the outcome or a cancel
                    if strand.stopped() and not opened.outcome.done():
                        cancelled = await self._cancel_task(opened)
                        return outcome(cancelled) if cancelled is not None else None
                ended = opened.outcome.result()
            # A worker's answer handed over (not yet written): the next checkpoint writes it.
            kept = opened.end
            if kept is not None:
                process.task_ends += (kept,)
            return outcome(ended)
        finally:
            self._tasks.close_task(opened, kept=kept)

    def _open_next(self, definition: Definition, process: Process) -> None:
        """When the next step is a task step with no delay, the checkpoint ending this one
        opens its task too: one commit where there were two."""
        if (
            self._tasks is None
            or process.cancel_requested
            or process.position >= len(definition.steps)
        ):
            return
        step = definition.steps[process.position]
        if not isinstance(step.action, Task) or step.delay or step.when or step.acquire:
            return  # a step that acquires opens its task only once it holds the units
        new = self._new_task(definition, process, step, step.action, 1, forward=True)
        process.task_open = self._tasks.prepare(new)

    def _new_task(
        self,
        definition: Definition,
        process: Process,
        step: Step,
        task: Task,
        attempt: int,
        *,
        forward: bool,
    ) -> NewTask:
        key = f"{process.id}/{step.name}" + ("" if forward else ".compensate")
        payload = {
            "process": process.id,
            "workflow": process.workflow,
            "step": step.name,
            "task": task.name,
            "input": process.input,
            "steps": process.outputs,
            "attempt": attempt,
            "idempotency_key": key,
        }
        return NewTask(
            process=process.id,
            key=key,
            attempt=attempt,
            queue=definition.task_queue,
            lease=step.timeout,
            payload=orjson.dumps(payload),
            created_at=self._clock(),
        )

    async def _cancel_task(self, opened: Opened) -> TaskRecord | None:
        """Cancel the open task, waiting out a storage failure: a cancelled process's
        task must not be answered afterwards."""
        assert self._tasks is not None
        pause = STORAGE_RETRY_MIN
        while True:
            try:
                return await self._tasks.cancel(opened, self._clock())
            except StoreUnavailable:
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORAGE_RETRY_MAX)

    async def _cancel_stored_task(self, definition: Definition, process: Process) -> None:
        """Cancel the step's task as stored (each running task branch's, at a parallel
        step): opened by the last checkpoint, or open when the daemon stopped before the
        cancel reached it. One a worker answered first is the step's outcome: a done step
        is compensated with the others."""
        if process.position >= len(definition.steps):
            return
        step = definition.steps[process.position]
        if isinstance(step.action, Parallel):
            await self._cancel_branch_tasks(definition, process, step.action)
            return
        if not isinstance(step.action, Task):
            return
        result = await self._cancel_strand_task(definition, Strand(process, process), step)
        if result is not None and result.ok:
            process.outputs[step.name] = result.output
            process.position, process.attempt = process.position + 1, 0

    async def _cancel_branch_tasks(
        self, definition: Definition, process: Process, parallel: Parallel
    ) -> None:
        """Cancel the stored task of every task branch still running (`<id>/<branch>`),
        when they will not run on (a cancel, a sibling failed before a restart). A branch
        whose worker's answer reached the table first is done: its output is kept and
        compensation undoes it. Its record may not be stored yet (its task opened before
        any checkpoint of the step): then the task is its first attempt."""
        for step in parallel.branches:
            branch = process.branches.get(step.name)
            running = branch is None or branch.state == BranchState.RUNNING
            if not running or not isinstance(step.action, Task):
                continue
            strand = Strand(process, branch or Branch(), step.name)
            result = await self._cancel_strand_task(definition, strand, step)
            if result is not None and result.ok:
                process.outputs[step.name] = result.output
                done = process.branches.setdefault(step.name, _branch(strand))
                self._branch_ended(process, done, BranchState.DONE)

    async def _cancel_strand_task(
        self, definition: Definition, strand: Strand, step: Step
    ) -> CallResult | None:
        """Cancel the task of the step's attempt under way on the strand, as stored. Its
        outcome (in the history) when a worker's answer reached the table first."""
        assert self._tasks is not None and isinstance(step.action, Task)
        process = strand.process
        attempt = strand.state.attempt + 1
        new = self._new_task(definition, process, step, step.action, attempt, forward=True)
        started = self._clock()
        ended = await self._tasks.cancel_stored(process.id, new.key, new.attempt)
        if ended is None:
            return None
        result = outcome(ended)
        self._record(process, step.name, AttemptKind.TASK, new.attempt, started, result)
        return result

    async def _wait_for(self, strand: Strand, step: Step, wait: WaitFor) -> CallResult | None:
        assert wait.event is not None
        process, state, key = strand.process, strand.state, strand.key
        try:
            match = templates.render(dict(wait.match), template_context(process))
        except templates.TemplateError as exc:
            return CallResult(ok=False, error=str(exc), retryable=False)
        started = self._clock()
        fresh, since = state.wait_seq is None, state.wait_seq
        if since is None:  # its events are those published after this (one begun before: not)
            since = state.wait_seq = self._bus.reserved_through
        if not strand.name:  # the main line's wait is in its row: a publish finds it there
            process.wait_topic = wait.event
            process.wait_keys, process.wait_match = match_key(match)
            # From now each publish on the topic makes such rows due in its own write (no
            # await since wait_seq was read: a publish reserved later sees these keys).
            self._waiting_on(wait.event, process.wait_keys)
        self._waits.waiting.setdefault(wait.event, {})[key] = (match, since)
        try:
            if fresh:  # registered above first, so nothing slips between
                if wait.timeout is not None:
                    state.wake_at = started + wait.timeout
                await self._checkpoint(process, ProcessStatus.WAITING, strand)
            else:  # resumed: an event may have come while the daemon was down
                for stored in await self._store.events_since(wait.event, since):
                    if matches(match, stored.data):
                        self._waits.arrived.setdefault(key, stored)
                        break
            while key not in self._waits.arrived and not strand.stopped():
                if await self._park(strand):  # its row was written: look again
                    continue
                if await self._wakeups.sleep(strand, state.wake_at):
                    break  # timed out
        finally:
            self._waits.waiting.get(wait.event, {}).pop(key, None)
        event = self._waits.arrived.pop(key, None)
        if strand.stopped():
            return None
        state.wake_at, state.wait_seq = None, None
        if event is None:
            result = CallResult(ok=False, error=f"no {wait.event} event within {wait.timeout:g}s")
            self._record(process, step.name, AttemptKind.WAIT_FOR, 1, started, result)
            return result
        result = CallResult(ok=True, output=event.data)
        self._record(process, step.name, AttemptKind.WAIT_FOR, 1, started, result)
        return result

    async def _wait_signal(self, strand: Strand, step: Step, wait: WaitFor) -> CallResult | None:
        """Take the step's signal: one kept from before, or the next to come. `wait_seq`
        0 marks the wait begun, so a restart keeps its timeout instead of starting anew.
        The caller's checkpoint (with no await before it) deletes the taken signal."""
        assert wait.signal is not None
        process, state = strand.process, strand.state
        started, name, timeout = self._clock(), wait.signal, wait.timeout
        if state.wait_seq is None:
            state.wait_seq = 0
            state.wake_at = started + timeout if timeout is not None else None
            await self._checkpoint(process, ProcessStatus.WAITING, strand)
        waiting = self._signals.waiting.setdefault(process.id, {})
        waiting[strand.name] = name
        try:
            signal = self._signals.take(process.id, name)
            while signal is None and not strand.stopped():
                if await self._park(strand):  # its row was written: look again
                    signal = self._signals.take(process.id, name)
                    continue
                if await self._wakeups.sleep(strand, state.wake_at):
                    break  # timed out
                signal = self._signals.take(process.id, name)
        finally:
            waiting.pop(strand.name, None)
        if strand.stopped() and signal is None:
            return None
        state.wake_at, state.wait_seq = None, None
        if signal is None:
            result = CallResult(ok=False, error=f"no {name} signal within {timeout:g}s")
            self._record(process, step.name, AttemptKind.WAIT_FOR, 1, started, result)
            return result
        result = CallResult(ok=True, output=signal.data)
        self._record(
            process, step.name, AttemptKind.WAIT_FOR, 1, started, result, signalled_by=signal.by
        )
        process.taken_signals += (signal.seq,)  # deleted by the next checkpoint: taken once
        return result

    async def _hold(self, strand: Strand, step: Step) -> CallResult | None:
        """Reserve the step's `acquire` before it runs (and before its delay): at once when
        the units are free and nobody waits before it, else `waiting` in its queue until
        granted. A step run again (a retry, a resume) finds its hold. None: held, or the
        strand stopped while waiting (it left the queue; the caller sees `stopped()`). A
        failed result, in the history, when the request cannot be met (an unknown resource,
        too many units, a key without a value): the step fails for good."""
        acquire, process = step.acquire, strand.process
        assert acquire is not None
        started = self._clock()
        if self._resources is None:
            error = f"resource {acquire.resource!r} is not defined"
        else:
            try:
                context = template_context(process)
                key = None if acquire.key is None else str(templates.render(acquire.key, context))
            except templates.TemplateError as exc:
                error = f"acquire key: {exc}"
            else:
                request = await self._resources.request(
                    process.id, step.name, acquire.resource, key, acquire.units
                )
                while not request.granted and request.refused is None:
                    if strand.stopped():
                        await self._resources.leave(request)
                        return None
                    self._set_status(process, ProcessStatus.WAITING, strand)
                    await self._wakeups.sleep(strand, None)  # woken by its grant or a cancel
                if request.granted:  # held until the process ends, cancelled or not
                    if request.freed_at is not None:  # it waited: its handover's latency
                        self._metrics.granted(acquire.resource, self._clock() - request.freed_at)
                        request.freed_at = None
                    return None
                error = str(request.refused)
        refused = CallResult(ok=False, error=error, retryable=False)
        attempt = strand.state.attempt + 1
        self._record(process, step.name, _ATTEMPT_KIND[step.kind], attempt, started, refused)
        return refused

    def _step_done(
        self, definition: Definition, process: Process, step: str, *, done: bool = True
    ) -> None:
        """After the checkpoint of a step (or branch) that ended, `done` or skipped: tell
        listeners of a done one, and answer a synchronous start waiting for this step
        (`respond_after`) either way."""
        if done:
            self.emit("workflow.step_completed", process, step=step)
        if definition.respond_after == step:
            self._respond(process.id)

    # -- compensation --------------------------------------------------------------

    async def _begin_compensation(
        self, definition: Definition, process: Process, *, cancelled: bool
    ) -> None:
        start = process.position - 1
        steps = definition.steps
        if start + 1 < len(steps) and isinstance(steps[start + 1].action, Parallel):
            start += 1  # a parallel step ended part way: its finished branches are undone
        done = definition.steps[: start + 1]
        if not any(_compensable(process, step) for step in done):
            await self._finish(
                process, ProcessStatus.CANCELLED if cancelled else ProcessStatus.FAILED
            )
            return
        process.compensating_from = start
        process.attempt, process.wake_at = 0, None
        await self._checkpoint(process, ProcessStatus.COMPENSATING)

    async def _compensate(self, definition: Definition, process: Process) -> None:
        index = process.compensating_from
        assert index is not None
        while index >= 0 and not _compensable(process, definition.steps[index]):
            index -= 1
        if index < 0:
            status = (
                ProcessStatus.CANCELLED if process.cancel_requested else ProcessStatus.COMPENSATED
            )
            await self._finish(process, status)
            return
        process.compensating_from = index
        step = definition.steps[index]
        if isinstance(step.action, Parallel):  # its branches, the last to finish first
            step = max(
                (b for b in step.action.branches if _branch_compensable(process, b)),
                key=lambda b: process.branches[b.name].finished or 0,
            )
        assert step.compensate is not None
        line = Strand(process, process)
        if process.wake_at is not None:
            await self._wakeups.sleep(line, process.wake_at, cancellable=False)
            process.wake_at = None
        started, attempt = self._clock(), process.attempt + 1
        if isinstance(step.compensate, Task):
            task = await self._task(definition, line, step, step.compensate, attempt, forward=False)
            assert task is not None  # a compensation is not cancelled
            result = task
        else:
            result = await self._call(
                process, f"{step.name}.compensate", step.compensate, step, template_context(process)
            )
        self._record(process, step.name, AttemptKind.COMPENSATE, attempt, started, result)
        if result.ok:
            process.attempt = 0
            if step.name in process.branches:  # the parallel step's other branches next
                process.branches[step.name].compensated = True
            else:
                process.compensating_from = index - 1
            await self._checkpoint(process, ProcessStatus.COMPENSATING)
            return
        process.attempt = attempt
        retry = step.retry
        attempts = max(retry.max_attempts, MIN_COMPENSATION_ATTEMPTS)
        if result.retryable and attempt < attempts:
            process.wake_at = self._clock() + retry.delay(attempt, self._jitter())
            await self._checkpoint(process, ProcessStatus.COMPENSATING)
            return
        reason = f"compensation of {step.name} failed: {result.error}"
        if process.error is None:  # a cancel: nothing failed before the compensation
            process.error = failure(step.name, reason, result.status, result.body)
        else:  # the step's failure stays the error; the message says what followed
            process.error = {**process.error, "message": f"{process.error['message']}; {reason}"}
        await self._finish(process, ProcessStatus.FAILED)

    async def _finish(self, process: Process, status: ProcessStatus) -> None:
        now = self._clock()
        process.finished_at, process.wake_at = now, None
        try:
            await self._checkpoint(process, status)
        except Fenced:  # another replica's now: its holds are the new owner's
            raise
        except Exception:  # a bug: this daemon runs it no more, its units must not stay held
            await self._release(process)  # (a restart resumes its unfinished row, unheld)
            raise
        await self._release(process)  # after the final checkpoint
        self._metrics.finished(process.workflow, status, now - process.created_at)
        self.emit(f"workflow.{status}", process)
        self.deadlines.cancel(process.id)
        if self._outcome is not None and not process.deadline_missed:
            self._outcome(process.workflow, now, status == ProcessStatus.COMPLETED)

    async def _release(self, process: Process) -> None:
        if self._resources is not None and self._resources.asked(process.id):
            await self._resources.release(process.id)

    async def _deadline_passed(self, process: Process) -> None:
        if process.finished or process.deadline_missed:
            return
        process.deadline_missed = True
        await self._store_durably(process)
        self._wakeups.wake(process.id)  # due by its timer alone now: it may park
        self._metrics.deadline_missed(process.workflow)
        self.emit("workflow.deadline_missed", process)
        if self._outcome is not None:
            self._outcome(process.workflow, process.deadline_at or self._clock(), False)

    def emit(self, topic: str, process: Process, **extra: Any) -> None:
        data = {
            "process": process.id,
            "workflow": process.workflow,
            "status": process.status,
            **extra,
        }
        if process.error and topic != "workflow.step_completed":
            data["error"] = process.error_text  # the line notifications show
            data["failure"] = process.error
        self._bus.publish(topic, data)

    def _record(
        self,
        process: Process,
        step: str,
        kind: AttemptKind,
        attempt: int,
        started: float,
        result: CallResult,
        *,
        count: bool = True,
        signalled_by: str | None = None,
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
                signalled_by=signalled_by,
            )
        )
        if count:
            self._metrics.attempt(process.workflow, step, outcome, ended - started)

    async def _checkpoint(
        self, process: Process, status: ProcessStatus, strand: Strand | None = None
    ) -> None:
        self._set_status(process, status, strand)
        process.updated_at = self._clock()
        await self._store_durably(process)

    async def _store_durably(self, process: Process) -> None:
        """Checkpoint, waiting out a storage failure (disk full, read-only): the process
        holds where it is rather than fail or run ahead of what is on disk."""
        self._set_due(process)
        pause = STORAGE_RETRY_MIN
        while True:
            try:
                await self._store.checkpoint(process)
                return
            except StoreUnavailable:
                log.debug("process %s waits for storage (%.1fs)", process.id, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORAGE_RETRY_MAX)

    def _set_due(self, process: Process) -> None:
        """Before a checkpoint: its due time, and the event it waits for only while it
        waits for one (`_due`)."""
        process.due_at, event = self._due(process)
        if event is None:
            process.wait_topic = process.wait_keys = process.wait_match = None

    def _due(self, process: Process) -> tuple[float | None, str | None]:
        """When the process must be in memory again: its timer at a delay, a backoff or a
        wait (None: a wait only an event or a signal ends), its deadline if sooner; past
        (its start) while it runs or waits on anything else (a task, a resource, a
        compensation, a branch, a cancel): those stay in memory, and a restart reads them
        first. And the topic its wait is for, if any."""
        definition = self._definition(process)
        # In memory: due since it began, a time that stays put (not the checkpoint's), so the
        # loop reading rows due passes it once instead of reading each of its checkpoints.
        due: float | None = process.created_at
        event = None
        if (
            process.status == ProcessStatus.WAITING
            and not process.cancel_requested
            and process.compensating_from is None
            and definition is not None
            and process.position < len(definition.steps)
            and not any(b.state == BranchState.RUNNING for b in process.branches.values())
        ):
            action = definition.steps[process.position].action
            if isinstance(action, WaitFor) and process.wait_seq is not None:
                due, event = process.wake_at, action.event
            elif process.wake_at is not None:
                due = process.wake_at
        if process.deadline_at is not None and not process.deadline_missed:
            due = process.deadline_at if due is None else min(due, process.deadline_at)
        return (None if process.finished else due), event

    async def _park(self, strand: Strand) -> bool:
        """Leave memory (raise Parked) when the main line is about to wait beyond the
        horizon with nothing in flight: no history, signal or task answer unwritten, no
        task being opened, no branch running. Its row must say when it is due, so the
        loop reading rows brings it back in time: when the row says sooner (a signal or
        an event that did not end this wait made it due now, or it was written before
        due times existed), the row is written first and True comes back: the caller
        looks again at what it waits for (something may have come meanwhile), then
        calls again. False: it stays in memory for this wait."""
        process = strand.process
        if self._horizon is None or strand.name or strand.stopped():
            return False
        if process.pending or process.writing or process.task_ends or process.taken_signals:
            return False
        if process.task_open is not None or process.finished:
            return False
        if any(b.state == BranchState.RUNNING for b in process.branches.values()):
            return False
        due, _ = self._due(process)
        if due is None:  # only an event or a signal ends the wait: is that what it waits for?
            if process.wait_seq is None:
                return False
        elif due <= self._clock() + self._horizon:
            return False
        if process.due_at != due:
            await self._store_durably(process)
            return True
        raise Parked(process.id)

    def _end_lost(self, process: Process, error: BaseException) -> None:
        """A handed-over answer that no checkpoint will write: its worker hears so (and
        sends it again; the claim is still open in the table). Nor is the next task the
        checkpoint would open: a poll held for it waits on."""
        ends, process.task_ends = process.task_ends, ()
        process.task_open = None
        if self._tasks is not None:
            for end in ends:
                self._tasks.ended(end.delivery, error)
            self._tasks.drop(process.id)

    def _set_status(
        self, process: Process, status: ProcessStatus, strand: Strand | None = None
    ) -> None:
        """A branch's running or waiting is its own: the process waits only when every
        branch still running waits (`waiting_for` shows the first)."""
        if strand is not None and strand.name:
            branch = strand.state
            assert isinstance(branch, Branch)
            branch.waiting = status == ProcessStatus.WAITING
            status = _parallel_status(process)
        if process.status != status:
            self._counts[(process.workflow, process.status)] -= 1
            self._counts[(process.workflow, status)] += 1
            process.status = status


def _compensable(process: Process, step: Step) -> bool:
    """A step done (a skipped one has no output) that has a compensation; a parallel step
    while one of its finished branches has one not yet run."""
    if isinstance(step.action, Parallel):
        return any(_branch_compensable(process, b) for b in step.action.branches)
    return step.compensate is not None and step.name in process.outputs


def _branch_compensable(process: Process, branch: Step) -> bool:
    record = process.branches.get(branch.name)
    return (
        branch.compensate is not None
        and record is not None
        and record.state == BranchState.DONE
        and not record.compensated
    )


def _branch(strand: Strand) -> Branch:
    branch = strand.state
    assert isinstance(branch, Branch)
    return branch


def _fresh(strand: Strand) -> bool:
    """The step has not begun on this strand (no attempt, timer or wait yet)."""
    state = strand.state
    return state.attempt == 0 and state.wake_at is None and state.wait_seq is None


def _parallel_status(process: Process) -> ProcessStatus:
    running = [b for b in process.branches.values() if b.state == BranchState.RUNNING]
    waiting = bool(running) and all(b.waiting for b in running)
    return ProcessStatus.WAITING if waiting else ProcessStatus.RUNNING
