"""The workflow builder: a workflow in Python, as the JSON of a config.yaml workflow entry.

    payment = (
        Workflow("ChildSupportPayment", deadline="2d")
        .step("validate", validate)                       # a function: a task step
        .step("reserve", reserve_funds, compensate=release_funds)
        .step("pay", call("payments", "POST", "/pay", body={"amount": "{input.amount}"}))
        .step("notify", publish("payment.done"))
    )
    payment.definition()   # {"name": ..., "steps": [...]}: the body of PUT /v1/workflows/{name}

A function step becomes `{"name": s, "task": s}` run by a Worker serving the
workflow's queue; its `compensate=` function becomes the task `<s>.compensate`.
Mistakes Python can see (a duplicate step, a compensation on a wait, a bad
duration, `respond_after` naming no step) raise DefinitionError here, at build
time; the daemon validates the rest when the Worker deploys it (422 naming the field).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .durations import Duration, duration_text

NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
COMPENSATION = ".compensate"

StepFunction = Callable[..., Any]  # one StepContext in; JSON (or an awaitable of it) out


class DefinitionError(ValueError):
    """The workflow cannot be right, whatever the daemon says: raised while building it."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Attempts of a step in all, and the waits between them (the daemon adds jitter)."""

    max_attempts: int = 3
    backoff: Duration = "1s"
    factor: float = 2.0
    max_backoff: Duration = "1m"

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 100:
            raise DefinitionError(f"max_attempts must be 1-100, got {self.max_attempts}")
        if not 1.0 <= self.factor <= 10.0:
            raise DefinitionError(f"factor must be 1-10, got {self.factor}")
        _duration("backoff", self.backoff)
        _duration("max_backoff", self.max_backoff)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "backoff": duration_text(self.backoff),
            "factor": self.factor,
            "max_backoff": duration_text(self.max_backoff),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """A step that calls a passing instance of `service` (round-robin)."""

    service: str
    method: str = "POST"
    path: str = "/"
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": self.service, "method": self.method, "path": self.path}
        if self.body is not None:
            out["body"] = self.body
        if self.headers:
            out["headers"] = dict(self.headers)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """A step that publishes `topic` on the daemon's bus, `data` its (templated) body."""

    topic: str
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitFor:
    """A step that waits for an event of a topic, or for a signal sent to the process."""

    event: str | None = None
    signal: str | None = None
    match: Mapping[str, Any] = field(default_factory=dict)
    timeout: Duration | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event} if self.event else {"signal": self.signal}
        if self.match:
            out["match"] = dict(self.match)
        if self.timeout is not None:
            out["timeout"] = duration_text(self.timeout)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """A step run by whichever worker serves the workflow's queue with a task of this name."""

    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Branch:
    """A step of a parallel step, as `step(name, action, ...)` makes it."""

    name: str
    action: Call | Publish | WaitFor | Task | StepFunction
    options: Mapping[str, Any] = field(default_factory=dict)  # the keywords of .step


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallel:
    """A step whose branches run together: `parallel(step("fire", call(...)), step(...))`."""

    branches: tuple[Branch, ...]


Action = Call | Publish | WaitFor | Task | Parallel


def step(
    name: str, action: Call | Publish | WaitFor | Task | StepFunction, **options: Any
) -> Branch:
    """A branch of `parallel(...)`: the same arguments as `Workflow.step` (a function
    becomes a task named after the branch, its compensation `<branch>.compensate`)."""
    return Branch(name=name, action=action, options=options)


def parallel(*branches: Branch) -> Parallel:
    """Branches run together; the step ends when all have (DESIGN.md §2 `parallel`)."""
    if not branches or not all(isinstance(b, Branch) for b in branches):
        raise DefinitionError("parallel takes one or more step(name, action, ...)")
    return Parallel(branches=branches)


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquire:
    """Units of a resource (config.yaml's top-level `resources`) the step reserves before it
    runs, held until the process ends; `key` (a template) makes the capacity per value."""

    resource: str
    units: int = 1
    key: str | None = None

    def __post_init__(self) -> None:
        _name("resource", self.resource)
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise DefinitionError(f"acquire units must be a whole number >= 1, got {self.units!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"resource": self.resource, "units": self.units}
        if self.key is not None:
            out["key"] = self.key
        return out


def acquire(resource: str, units: int = 1, key: str | None = None) -> Acquire:
    """`acquire("funds", key="{input.parent_id}")`: one payment at a time per parent."""
    return Acquire(resource=resource, units=units, key=key)


def call(
    service: str,
    method: str = "POST",
    path: str = "/",
    *,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Call:
    return Call(service=service, method=method.upper(), path=path, body=body, headers=headers or {})


def publish(topic: str, data: Any = None) -> Publish:
    return Publish(topic=topic, data=data)


def wait_for(
    event: str | None = None,
    *,
    signal: str | None = None,
    match: Mapping[str, Any] | None = None,
    timeout: Duration | None = None,
) -> WaitFor:
    """Wait for a bus event (`event=`, with `match`) or a signal (`signal=`): exactly one."""
    if (event is None) == (signal is None):
        raise DefinitionError("wait_for takes exactly one of event or signal")
    if timeout is not None:
        _duration("timeout", timeout)
    return WaitFor(event=event, signal=signal, match=match or {}, timeout=timeout)


def task(name: str) -> Task:
    """A task step served by name (a Worker's `tasks={name: fn}`), not by a function here."""
    return Task(name=name)


class Workflow:
    """The builder: `Workflow(name, ...).step(...).step(...)`; `.definition()` is its JSON."""

    def __init__(
        self,
        name: str,
        *,
        deadline: Duration | None = None,
        queue: str | None = None,
        route: str | None = None,
        trigger: str | Mapping[str, Any] | None = None,
        output: Any = None,
        respond_after: str | None = None,
    ) -> None:
        _name("workflow", name)
        if queue is not None:
            _name("queue", queue)
        if deadline is not None:
            _duration("deadline", deadline)
        self.name = name
        self.deadline = deadline
        self.queue = queue or name  # as the daemon: a task step's queue is the workflow's name
        self._queue_given = queue is not None
        self.route = route
        self.trigger = {"event": trigger} if isinstance(trigger, str) else trigger
        self.output = output
        self.respond_after = respond_after
        self._steps: list[dict[str, Any]] = []
        self._functions: dict[str, StepFunction] = {}
        self._names: set[str] = set()  # steps and branches: unique across the workflow

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, steps={[s['name'] for s in self._steps]})"

    def step(
        self,
        name: str,
        action: Action | StepFunction,
        *,
        compensate: Call | Task | StepFunction | None = None,
        delay: Duration | None = None,
        timeout: Duration | None = None,
        retry: Retry | None = None,
        when: str | list[str] | None = None,
        acquire: Acquire | Mapping[str, Any] | None = None,
        expect: Sequence[str] | None = None,
    ) -> Workflow:
        """Add a step; `action` is a function (sync or async, one StepContext in) or one of
        `call(...)`, `publish(...)`, `wait_for(...)`, `task(...)`, `parallel(...)`. `when`:
        a condition (`"[steps.validate.priority] == urgent"`, or a list that must all
        hold); the step is skipped unless it holds. `acquire` reserves units of a resource
        first: `acquire(...)` or its dict (`{"resource": "funds"}`). `expect`: a call step's
        conditions over its answer (`"[BODY].passed == true"`); the daemon parses them."""
        names, functions = set(self._names), dict(self._functions)
        try:
            entry = self._entry(
                name,
                action,
                compensate,
                delay,
                timeout,
                retry,
                when,
                acquire=acquire,
                expect=expect,
            )
        except DefinitionError:  # a refused step leaves no name or function behind
            self._names, self._functions = names, functions
            raise
        self._steps.append(entry)
        return self

    def _entry(
        self,
        name: str,
        action: Action | StepFunction,
        compensate: Call | Task | StepFunction | None = None,
        delay: Duration | None = None,
        timeout: Duration | None = None,
        retry: Retry | None = None,
        when: str | list[str] | None = None,
        *,
        acquire: Acquire | Mapping[str, Any] | None = None,
        expect: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        where = f"{self.name}.{name}"
        _name("step", name)
        if name in self._names:
            raise DefinitionError(f"{where}: duplicate step name")
        self._names.add(name)
        entry: dict[str, Any] = {"name": name, **self._action(where, name, action)}
        if when is not None:
            entry["when"] = when if isinstance(when, str) else list(when)
        if compensate is not None:
            if isinstance(action, Parallel):
                raise DefinitionError(f"{where}: compensate each branch, not the parallel step")
            if isinstance(action, WaitFor | Publish):
                kind = "wait" if isinstance(action, WaitFor) else "publish"
                raise DefinitionError(f"{where}: a {kind} step has nothing to compensate")
            entry["compensate"] = self._compensation(where, name, compensate)
        if delay is not None:
            entry["delay"] = _duration(f"{where}.delay", delay)
        if timeout is not None:
            entry["timeout"] = _duration(f"{where}.timeout", timeout)
        if retry is not None:
            entry["retry"] = retry.to_json()
        if acquire is not None:
            entry["acquire"] = _acquire(where, acquire)
        if expect is not None:
            if not isinstance(action, Call):
                raise DefinitionError(f"{where}: expect checks a call's answer")
            if isinstance(expect, str):  # a string is a Sequence[str] of its characters
                raise DefinitionError(f"{where}: expect is a list of conditions")
            entry["expect"] = [str(condition) for condition in expect]
        return entry

    def definition(self) -> dict[str, Any]:
        """The JSON of a config.yaml workflow entry: the body of `PUT /v1/workflows/{name}`."""
        if not self._steps:
            raise DefinitionError(f"{self.name}: a workflow needs steps")
        if self.respond_after is not None and self.respond_after not in self._names:
            raise DefinitionError(f"{self.name}: respond_after names no step")
        out: dict[str, Any] = {"name": self.name}
        if self._queue_given:
            out["queue"] = self.queue
        if self.route is not None:
            out["route"] = self.route
        if self.trigger is not None:
            out["trigger"] = dict(self.trigger)
        if self.deadline is not None:
            out["deadline"] = duration_text(self.deadline)
        if self.output is not None:
            out["output"] = self.output
        if self.respond_after is not None:
            out["respond_after"] = self.respond_after
        out["steps"] = [dict(s) for s in self._steps]
        return out

    def tasks(self) -> dict[str, StepFunction]:
        """Task name -> function for every function step and compensation (what a Worker runs)."""
        return dict(self._functions)

    def _action(self, where: str, name: str, action: Action | StepFunction) -> dict[str, Any]:
        if isinstance(action, Call):
            return {"call": action.to_json()}
        if isinstance(action, Publish):
            return {
                "publish": action.topic,
                **({} if action.data is None else {"data": action.data}),
            }
        if isinstance(action, WaitFor):
            return {"wait_for": action.to_json()}
        if isinstance(action, Task):
            return {"task": action.name}
        if isinstance(action, Parallel):
            branches = []
            for branch in action.branches:
                if isinstance(branch.action, Parallel):
                    raise DefinitionError(f"{where}.{branch.name}: a branch is not parallel")
                try:
                    branches.append(self._entry(branch.name, branch.action, **branch.options))
                except TypeError as exc:  # a keyword .step does not take
                    raise DefinitionError(f"{where}.{branch.name}: {exc}") from None
            return {"parallel": branches}
        if callable(action):
            self._functions[name] = action
            return {"task": name}
        raise DefinitionError(
            f"{where}: a step is a function, call(), publish(), wait_for() or task(), "
            f"not {type(action).__name__}"
        )

    def _compensation(
        self, where: str, name: str, compensate: Call | Task | StepFunction
    ) -> dict[str, Any]:
        if isinstance(compensate, Call):
            return compensate.to_json()
        if isinstance(compensate, Task):
            return {"task": compensate.name}
        if callable(compensate) and not isinstance(compensate, Publish | WaitFor):
            task_name = name + COMPENSATION
            self._functions[task_name] = compensate
            return {"task": task_name}
        raise DefinitionError(f"{where}: compensate is a function, call() or task()")


def _acquire(where: str, value: Acquire | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, Acquire):
        return value.to_json()
    if isinstance(value, Mapping):
        try:
            return Acquire(**value).to_json()
        except TypeError as exc:  # a key Acquire does not take
            raise DefinitionError(f"{where}.acquire: {exc}") from None
    raise DefinitionError(f"{where}: acquire is acquire(...) or a dict, not {value!r}")


def _name(what: str, value: str) -> None:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise DefinitionError(f"{what} name {value!r}: 1-128 of A-Z a-z 0-9 . _ -")


def _duration(where: str, value: Duration) -> str:
    try:
        return duration_text(value)
    except ValueError as exc:
        raise DefinitionError(f"{where}: {exc}") from None
