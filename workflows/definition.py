"""Workflow definitions: frozen values built from a config.yaml entry, or from the same
entry as JSON (`PUT /v1/workflows/{name}`, which is how the SDK's builder deploys code
definitions; the builder lives in the SDK only, DESIGN.md §1). monitor/convert.py builds
them; config.yaml's schema and its checks are monitor/config.py's.

Step kinds: `call` (HTTP to a registered service), `publish` (an event),
`wait_for` (pause until a matching event, or a signal sent to the process,
arrives); any step may `delay` first (a durable timer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from registry.conditions import Condition
from scheduler.retry import DEFAULT_RETRY, Retry

from .states import StepKind

DEFAULT_TIMEOUT = 10.0
DEFAULT_OBJECTIVE = 99.0


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """Code a worker runs: the step's task goes on the workflow's queue (DESIGN.md §3)."""

    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallel:
    """Steps run together (its branches); the step ends when all have, and fails when one
    fails for good. A branch's output is `steps.<branch>`: branch names are unique across
    the workflow. A branch is not itself parallel."""

    branches: tuple[Step, ...]


Action = Call | Publish | WaitFor | Task | Parallel


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """A named capacity that steps reserve (funds, message quotas, inspectors): `capacity`
    units held at once, per key value when a step's `acquire` gives a key."""

    name: str
    capacity: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquire:
    """Reserve `units` of `resource` before the step runs (before its delay), held until
    the process ends; `key` (a template) makes the capacity apply per rendered value."""

    resource: str
    units: int = 1
    key: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """Start a process at each tick of a crontab expression, read in `timezone` (an IANA
    name): `0 2 * * *` in Europe/Paris is 01:00 UTC in winter, 00:00 in summer."""

    cron: str
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    name: str
    action: Action
    delay: float | None = None
    timeout: float = DEFAULT_TIMEOUT
    retry: Retry = DEFAULT_RETRY
    compensate: Call | Task | None = None
    acquire: Acquire | None = None
    # A call step's `expect:` (the probe language over its answer): a 2xx that fails one
    # fails the step without retry (workflows/expect.py).
    expect: tuple[Condition, ...] = ()
    # Run only when every one holds (`when:`, a string or a list); else the step is skipped.
    when: tuple[Condition, ...] = ()

    @property
    def kind(self) -> StepKind:
        if isinstance(self.action, Call):
            return StepKind.CALL
        if isinstance(self.action, Task):
            return StepKind.TASK
        if isinstance(self.action, Parallel):
            return StepKind.PARALLEL
        return StepKind.PUBLISH if isinstance(self.action, Publish) else StepKind.WAIT_FOR


@dataclass(frozen=True, slots=True, kw_only=True)
class Definition:
    name: str
    steps: tuple[Step, ...]
    route: str | None = None
    trigger: str | None = None  # event topic that starts a process
    schedule: Schedule | None = None  # or: a process at each tick (workflows/schedules.py)
    deadline: float | None = None  # seconds from start
    objective: float = DEFAULT_OBJECTIVE  # percent of processes completed within deadline
    queue: str | None = None  # where its task steps go; None: the workflow's name
    output: Any = None  # the process's result, a template; None: every step's output
    respond_after: str | None = None  # a synchronous start answers once this step is done
    version: int = 1  # a new one each time the definition changes (API or config)
    source: str = "config"  # "config" (config.yaml) or "api" (PUT /v1/workflows/{name})
    # The JSON entry it was built from (a config.yaml entry's schema): stored per version,
    # parsed again at start, shown by GET /v1/workflows/{name}. Not part of equality: two
    # spellings of one definition ("60s", "1m") are the same version.
    spec: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def task_queue(self) -> str:
        return self.queue or self.name

    def same_as(self, other: Definition) -> bool:
        """The same steps and settings, whatever the version and source."""
        return replace(self, version=other.version, source=other.source) == other

    def step(self, name: str) -> Step:
        """A step or a branch of a parallel step, by name."""
        return next(s for s in self.all_steps() if s.name == name)

    def all_steps(self) -> list[Step]:
        """Every step, each parallel step followed by its branches."""
        steps = []
        for step in self.steps:
            steps.append(step)
            if isinstance(step.action, Parallel):
                steps.extend(step.action.branches)
        return steps

    @property
    def has_tasks(self) -> bool:
        """A step, branch or compensation runs in a worker."""
        return any(
            isinstance(s.action, Task) or isinstance(s.compensate, Task) for s in self.all_steps()
        )

    def services(self) -> set[str]:
        steps = self.all_steps()
        calls = [s.action for s in steps] + [s.compensate for s in steps]
        return {c.service for c in calls if isinstance(c, Call)}
