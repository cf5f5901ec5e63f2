"""A process as people read it: the API's and the status page's view of one process.

Pure functions of a process, its history and its definition, so the view can
be built from a stored row as well as from a live process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import templates
from .definition import Definition, Parallel, Step, Task, WaitFor
from .records import Attempt, Branch, Process
from .states import (
    AttemptKind,
    AttemptOutcome,
    BranchState,
    ProcessStatus,
    StepState,
    WaitKind,
)


def describe_process(
    process: Process,
    history: list[Attempt],
    definition: Definition | None,
    queued: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Status, data and full history; `definition` None when it is no longer configured.
    `queued`: the steps and branches waiting in a resource's queue, by name, with their
    `waiting_for` (the resource pool knows it, the process row does not)."""
    queued = queued or {}
    return {
        **process.summary(),
        "idempotency_key": process.idempotency_key,
        "current_step": current_step(process, definition),
        "waiting_for": waiting_for(process, definition, queued),
        "steps": step_states(process, history, definition, queued),
        "input": process.input,
        "outputs": process.outputs,
        "output": output(process, definition),
        "history": [attempt.to_json() for attempt in history],
    }


def template_context(process: Process) -> dict[str, Any]:
    """What templates see: `{input.x}`, `{steps.name.field}` and `{process.id}`."""
    return {"input": process.input, "steps": process.outputs, "process": {"id": process.id}}


def output(process: Process, definition: Definition | None) -> Any:
    """The process's result: its `output:` template as rendered at completion (before
    then, rendered from the steps done so far), else every step's output. None when the
    process failed or was undone."""
    if process.output is not None:
        return process.output
    if process.finished and process.status != ProcessStatus.COMPLETED:
        return None
    if definition is not None and definition.output is not None and not process.finished:
        return templates.render(definition.output, template_context(process), strict=False)
    return process.outputs


def waiting_for(
    process: Process,
    definition: Definition | None,
    queued: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """What a waiting process waits for (DESIGN.md §3): kind, until (epoch seconds or
    None for no limit) and detail. In a parallel step: the first branch that waits (each
    waiting branch has its own in `steps`). `queued` as for `describe_process`."""
    queued = queued or {}
    if process.status != ProcessStatus.WAITING or definition is None:
        return None
    if not 0 <= process.position < len(definition.steps):
        return None
    step = definition.steps[process.position]
    if isinstance(step.action, Parallel):
        for branch in step.action.branches:
            record = process.branches.get(branch.name)
            if record is not None and record.state == BranchState.RUNNING and record.waiting:
                return queued.get(branch.name) or _waiting(process, definition, branch, record)
    if step.name in queued:
        return queued[step.name]
    return _waiting(process, definition, step, process)  # a parallel step's own delay too


def _waiting(
    process: Process, definition: Definition, step: Step, state: Process | Branch
) -> dict[str, Any]:
    """What a step waits for on its strand (the main line, or a branch's record)."""
    if isinstance(step.action, WaitFor) and step.action.signal is not None:
        detail = f"signal {step.action.signal}"
        return {"kind": WaitKind.SIGNAL, "until": state.wake_at, "detail": detail}
    if isinstance(step.action, WaitFor):
        try:  # the values the event must carry, as the runner matches them
            match = templates.render(dict(step.action.match), template_context(process))
        except templates.TemplateError:
            match = dict(step.action.match)
        wanted = ", ".join(f"{k}={v}" for k, v in match.items())
        detail = f"{step.action.event}" + (f" with {wanted}" if wanted else "")
        return {"kind": WaitKind.EVENT, "until": state.wake_at, "detail": detail}
    if isinstance(step.action, Task) and state.wake_at is None:  # Engine.describe: until
        detail = f"{step.action.name} on {definition.task_queue}"
        return {"kind": WaitKind.TASK, "until": None, "detail": detail}
    if state.attempt > 0:
        detail = f"attempt {state.attempt + 1} of {step.retry.max_attempts} of {step.name}"
        return {"kind": WaitKind.RETRY, "until": state.wake_at, "detail": detail}
    return {"kind": WaitKind.DELAY, "until": state.wake_at, "detail": f"{step.name} starts"}


def step_states(
    process: Process,
    history: list[Attempt],
    definition: Definition | None,
    queued: Mapping[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every step of the definition with its state, those not yet run included; a skipped
    or waiting one with its `reason`, a parallel one with its `branches` (each the same).
    `queued` as for `describe_process`."""
    if definition is None:
        return []
    queued = queued or {}
    compensated = {
        a.step
        for a in history
        if a.kind == AttemptKind.COMPENSATE and a.outcome == AttemptOutcome.OK
    }
    skipped = {a.step: a.error for a in history if a.outcome == AttemptOutcome.SKIPPED}
    waiting = waiting_for(process, definition, queued)
    states: list[dict[str, Any]] = []
    for index, step in enumerate(definition.steps):
        entry: dict[str, Any]
        if step.name in skipped and index < process.position:
            entry = {"name": step.name, "state": StepState.SKIPPED, "reason": skipped[step.name]}
        else:
            state = _step_state(process, index, step.name in compensated)
            entry = {"name": step.name, "state": state}
        if isinstance(step.action, Parallel):
            entry["branches"] = [
                _branch_state(process, definition, branch, skipped, compensated, queued)
                for branch in step.action.branches
            ]
            if any(b["state"] == StepState.COMPENSATED for b in entry["branches"]):
                entry["state"] = StepState.COMPENSATED
        if entry["state"] == StepState.WAITING and waiting is not None:
            entry["reason"] = waiting["detail"]
        states.append(entry)
    return states


def _branch_state(
    process: Process,
    definition: Definition,
    branch: Step,
    skipped: dict[str, str | None],
    compensated: set[str],
    queued: Mapping[str, dict[str, Any]],
) -> dict[str, Any]:
    record = process.branches.get(branch.name)
    name = branch.name
    if record is None:
        return {"name": name, "state": StepState.PENDING}
    if record.state == BranchState.SKIPPED:
        return {"name": name, "state": StepState.SKIPPED, "reason": skipped.get(name)}
    if record.state == BranchState.DONE:
        state = StepState.COMPENSATED if name in compensated else StepState.COMPLETED
        return {"name": name, "state": state}
    if record.state == BranchState.FAILED:
        return {"name": name, "state": StepState.FAILED}
    if record.state == BranchState.CANCELLED or process.finished:
        reason = "stopped: another branch failed, or the process was cancelled"
        return {"name": name, "state": StepState.FAILED, "reason": reason}
    if record.waiting:
        waiting = queued.get(name) or _waiting(process, definition, branch, record)
        return {"name": name, "state": StepState.WAITING, "reason": waiting["detail"]}
    return {"name": name, "state": StepState.RUNNING}


def _step_state(process: Process, index: int, compensated: bool) -> StepState:
    if compensated:
        return StepState.COMPENSATED
    if index < process.position:
        return StepState.COMPLETED
    if index > process.position or process.cancel_requested:
        return StepState.PENDING
    if process.status == ProcessStatus.COMPLETED:
        return StepState.COMPLETED
    if process.finished or process.status == ProcessStatus.COMPENSATING:
        return StepState.FAILED
    return StepState.WAITING if process.status == ProcessStatus.WAITING else StepState.RUNNING


def current_step(process: Process, definition: Definition | None) -> str | None:
    """The step being run or compensated; None once the process has finished."""
    if definition is None or process.finished:
        return None
    index = process.compensating_from if process.compensating_from is not None else process.position
    return definition.steps[index].name if 0 <= index < len(definition.steps) else None
