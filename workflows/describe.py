"""A process as people read it: the API's and the status page's view of one process.

Pure functions of a process, its history and its definition, so the view can
be built from a stored row as well as from a live process.
"""

from __future__ import annotations

from typing import Any

from . import templates
from .definition import Definition, Task, WaitFor
from .records import Attempt, Process
from .states import AttemptKind, AttemptOutcome, ProcessStatus, StepState, WaitKind


def describe_process(
    process: Process, history: list[Attempt], definition: Definition | None
) -> dict[str, Any]:
    """Status, data and full history; `definition` None when it is no longer configured."""
    return {
        **process.summary(),
        "idempotency_key": process.idempotency_key,
        "current_step": current_step(process, definition),
        "waiting_for": waiting_for(process, definition),
        "steps": step_states(process, history, definition),
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


def waiting_for(process: Process, definition: Definition | None) -> dict[str, Any] | None:
    """What a waiting process waits for (DESIGN.md §3): kind, until (epoch seconds or
    None for no limit) and detail."""
    if process.status != ProcessStatus.WAITING or definition is None:
        return None
    if not 0 <= process.position < len(definition.steps):
        return None
    step = definition.steps[process.position]
    if isinstance(step.action, WaitFor) and step.action.signal is not None:
        detail = f"signal {step.action.signal}"
        return {"kind": WaitKind.SIGNAL, "until": process.wake_at, "detail": detail}
    if isinstance(step.action, WaitFor):
        try:  # the values the event must carry, as the runner matches them
            match = templates.render(dict(step.action.match), template_context(process))
        except templates.TemplateError:
            match = dict(step.action.match)
        wanted = ", ".join(f"{k}={v}" for k, v in match.items())
        detail = f"{step.action.event}" + (f" with {wanted}" if wanted else "")
        return {"kind": WaitKind.EVENT, "until": process.wake_at, "detail": detail}
    if isinstance(step.action, Task) and process.wake_at is None:  # Engine.describe: until
        detail = f"{step.action.name} on {definition.task_queue}"
        return {"kind": WaitKind.TASK, "until": None, "detail": detail}
    if process.attempt > 0:
        detail = f"attempt {process.attempt + 1} of {step.retry.max_attempts} of {step.name}"
        return {"kind": WaitKind.RETRY, "until": process.wake_at, "detail": detail}
    return {"kind": WaitKind.DELAY, "until": process.wake_at, "detail": f"{step.name} starts"}


def step_states(
    process: Process, history: list[Attempt], definition: Definition | None
) -> list[dict[str, str]]:
    """Every step of the definition with its state, those not yet run included."""
    if definition is None:
        return []
    compensated = {
        a.step
        for a in history
        if a.kind == AttemptKind.COMPENSATE and a.outcome == AttemptOutcome.OK
    }
    skipped = {a.step: a.error for a in history if a.outcome == AttemptOutcome.SKIPPED}
    states: list[dict[str, str]] = []
    for index, step in enumerate(definition.steps):
        if step.name in skipped and index < process.position:
            reason = skipped[step.name] or ""
            states.append({"name": step.name, "state": StepState.SKIPPED, "reason": reason})
            continue
        states.append(
            {"name": step.name, "state": _step_state(process, index, step.name in compensated)}
        )
    return states


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
