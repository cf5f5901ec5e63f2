"""Workflow definitions: from config.yaml or from Python, the same frozen value.

    payment = (
        Workflow("ChildSupportPayment", deadline="2d")
        .step("validate", call("applications", "POST", "/validate"), retry=Retry(max_attempts=5))
        .step("pay", call("ach", "POST", "/transfers", body={"amount": "{input.amount}"}),
              compensate=call("ach", "POST", "/transfers/{steps.pay.payment_id}/cancel"))
        .step("notify", publish("payment.done"))
        .build()
    )

Step kinds: `call` (HTTP to a registered service), `publish` (an event),
`wait_for` (pause until a matching event arrives); any step may `delay`
first (a durable timer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from registry import parse_duration
from scheduler.retry import DEFAULT_RETRY, Retry

from . import templates
from .states import StepKind

DEFAULT_TIMEOUT = 10.0
DEFAULT_OBJECTIVE = 99.0


class DefinitionError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    service: str
    method: str = "POST"
    path: str = "/"
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitFor:
    """Wait for an `event` on the bus (matching `match`) or for a `signal` sent to this
    process (POST /v1/processes/{id}/signals/{name}); exactly one of the two."""

    event: str | None = None
    match: Mapping[str, Any] = field(default_factory=dict)  # data field -> template
    timeout: float | None = None
    signal: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    topic: str
    data: Any = None  # template; default: the process's input and step outputs


Action = Call | Publish | WaitFor


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    name: str
    action: Action
    delay: float | None = None
    timeout: float = DEFAULT_TIMEOUT
    retry: Retry = DEFAULT_RETRY
    compensate: Call | None = None

    @property
    def kind(self) -> StepKind:
        if isinstance(self.action, Call):
            return StepKind.CALL
        return StepKind.PUBLISH if isinstance(self.action, Publish) else StepKind.WAIT_FOR


@dataclass(frozen=True, slots=True, kw_only=True)
class Definition:
    name: str
    steps: tuple[Step, ...]
    route: str | None = None
    trigger: str | None = None  # event topic that starts a process
    deadline: float | None = None  # seconds from start
    objective: float = DEFAULT_OBJECTIVE  # percent of processes completed within deadline
    output: Any = None  # the process's result, a template; None: every step's output
    respond_after: str | None = None  # a synchronous start answers once this step is done
    version: int = 1  # a new one each time the definition changes (API or config)
    source: str = "config"  # "config" (config.yaml) or "api" (PUT /v1/workflows/{name})
    # The JSON entry it was built from (a config.yaml entry's schema): stored per version,
    # parsed again at start, shown by GET /v1/workflows/{name}. Not part of equality: two
    # spellings of one definition ("60s", "1m") are the same version.
    spec: Mapping[str, Any] | None = field(default=None, compare=False)

    def same_as(self, other: Definition) -> bool:
        """The same steps and settings, whatever the version and source."""
        return replace(self, version=other.version, source=other.source) == other

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def services(self) -> set[str]:
        calls = [s.action for s in self.steps] + [s.compensate for s in self.steps]
        return {c.service for c in calls if isinstance(c, Call)}


def call(
    service: str,
    method: str = "POST",
    path: str = "/",
    *,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Call:
    return Call(
        service=service, method=method.upper(), path=path, body=body, headers=dict(headers or {})
    )


def publish(topic: str, data: Any = None) -> Publish:
    return Publish(topic=topic, data=data)


def wait_for(
    event: str, *, match: Mapping[str, Any] | None = None, timeout: str | float | None = None
) -> WaitFor:
    return WaitFor(event=event, match=dict(match or {}), timeout=_seconds(timeout))


class Workflow:
    """The builder: `Workflow(name).step(...).step(...).build()`."""

    def __init__(
        self,
        name: str,
        *,
        deadline: str | float | None = None,
        route: str | None = None,
        trigger: str | None = None,
        objective: float = DEFAULT_OBJECTIVE,
    ) -> None:
        self._name, self._route, self._trigger = name, route, trigger
        self._deadline, self._objective = _seconds(deadline), objective
        self._steps: list[Step] = []

    def step(
        self,
        name: str,
        action: Action,
        *,
        delay: str | float | None = None,
        timeout: str | float | None = None,
        retry: Retry | None = None,
        compensate: Call | None = None,
    ) -> Workflow:
        self._steps.append(
            Step(
                name=name,
                action=action,
                delay=_seconds(delay),
                timeout=_seconds(timeout) or DEFAULT_TIMEOUT,
                retry=retry or DEFAULT_RETRY,
                compensate=compensate,
            )
        )
        return self

    def build(self) -> Definition:
        definition = Definition(
            name=self._name,
            steps=tuple(self._steps),
            route=self._route,
            trigger=self._trigger,
            deadline=self._deadline,
            objective=self._objective,
        )
        problems = validate(definition)
        if problems:
            raise DefinitionError(problems)
        return definition


def validate(definition: Definition) -> list[str]:
    """Errors: no steps, duplicate step names, references to unknown or later steps."""
    problems = [] if definition.steps else [f"{definition.name}: a workflow needs steps"]
    earlier: set[str] = set()
    for step in definition.steps:
        where = f"{definition.name}.{step.name}"
        if step.name in earlier:
            problems.append(f"{where}: duplicate step name")
        fields: list[Any] = []
        if isinstance(step.action, Call):
            fields += [step.action.path, step.action.body, dict(step.action.headers)]
        elif isinstance(step.action, Publish):
            fields.append(step.action.data)
        else:
            fields.append(dict(step.action.match))
        problems += [f"{where}: {p}" for f in fields for p in templates.check(f, earlier)]
        if step.compensate is not None:  # runs after the step: may use its own output
            compensate = step.compensate
            problems += [
                f"{where}.compensate: {p}"
                for f in (compensate.path, compensate.body, dict(compensate.headers))
                for p in templates.check(f, earlier | {step.name})
            ]
        earlier.add(step.name)
    return problems


def unknown_services(definition: Definition, known: set[str]) -> list[str]:
    """Warnings: services neither configured nor registered yet (they may register later)."""
    return sorted(definition.services() - known)


def _seconds(value: str | float | timedelta | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    return float(value)
