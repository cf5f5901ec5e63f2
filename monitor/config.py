"""config.yaml: the schema of DESIGN.md §2, parsed once into frozen models.

Loading reports every problem at once, each as `file:line: key.path: message`,
so an operator fixes a config in one pass rather than one error per restart.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from registry import Duration, HttpUrl, Name, ProbeSpec, Tags
from registry.conditions import ConditionError, parse_condition, parse_context_condition
from registry.model import DurationOrZero, Headers, Meta, RequestPath
from registry.targets import TargetPolicy, parse_target
from scheduler import Cron
from workflows import templates
from workflows.errors import InvalidDefinition

DEFAULT_LISTEN = "127.0.0.1:9797"
SCOPE_VERBS = (
    "register",
    "publish",
    "subscribe",
    "start",
    "cancel",
    "signal",
    "define",
    "work",
    "audit",
)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
HTTP_METHODS = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


# `json_schema_extra` of a field bound at start (a socket, middleware, the database): a reload
# that changes it is refused whole (monitor/reload.py), and the reference says so.
RESTART: dict[str, Any] = {"restart": True}


def needs_restart(info: FieldInfo) -> bool:
    return isinstance(info.json_schema_extra, dict) and bool(info.json_schema_extra.get("restart"))


class ConfigError(Exception):
    """The config cannot be used; `errors` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9797")
    if not host.strip("[]"):
        raise ValueError("host is missing (use 0.0.0.0 to listen on every address)")
    return value


def _check_scope(value: str) -> str:
    if value == "*":
        return value
    verb, sep, pattern = value.partition(":")
    if not sep or verb not in SCOPE_VERBS or not pattern:
        raise ValueError(f"scope must be '*' or <verb>:<glob> with verb one of {SCOPE_VERBS}")
    return value


def _check_token(value: SecretStr) -> SecretStr:
    if len(value.get_secret_value()) < 8:
        raise ValueError("token must be at least 8 characters")
    return value


class Token(_Model):
    name: Name = Field(
        description="Who holds the token: the actor of its changes in the audit trail, the logs "
        "and process histories (the token itself never appears there). Unique."
    )
    token: Annotated[SecretStr, AfterValidator(_check_token)] = Field(
        description="The bearer token, 8 characters or more; usually `${VAR}` from the "
        "environment. Compared in constant time, never logged."
    )
    scopes: tuple[Annotated[str, AfterValidator(_check_scope)], ...] = Field(
        min_length=1,
        description=f"`*`, or `<verb>:<glob>` with verb {', '.join(SCOPE_VERBS)} "
        "(e.g. `register:payments*`).",
    )


class Auth(_Model):
    tokens: tuple[Token, ...] = Field(
        min_length=1, description="Who may write: each token with its scopes."
    )
    protect_reads: bool = Field(
        default=False,
        description="true: every GET, `/metrics` and the status page need a token too "
        "(people sign in at `/login`).",
    )


def _check_target(value: str) -> str:
    parse_target(value)
    return value


class ProbeBudget(_Model):
    """A global cap on probing, so that a mass outage cannot starve the API (ARCHITECTURE.md)."""

    per_second: int = Field(
        default=250,
        ge=1,
        description="Probes started per second beyond each instance's own `interval`, all "
        "instances together: what `down_interval` may add. Down instances share it, backing off.",
    )
    in_flight: int = Field(default=1000, ge=1, description="Probes running at once.")
    workers: int = Field(
        json_schema_extra=RESTART,
        default=1,
        ge=0,
        le=64,
        description="Processes doing the network part of probes (connect, send, read) beside "
        "the API's event loop; conditions, health and SLOs stay in the daemon. 0: every probe "
        "runs in the event loop. Probes with `keepalive` or `follow_redirects` always do.",
    )


class Server(_Model):
    listen: Annotated[str, AfterValidator(_check_listen)] = Field(
        json_schema_extra=RESTART,
        default=DEFAULT_LISTEN,
        description="host:port the API and the status page listen on (0.0.0.0: every address).",
    )
    auth: Auth | None = Field(
        default=None,
        description="Absent: no auth (the log warns when `listen` is not loopback). Tokens, "
        "scopes and `protect_reads` change on reload; turning auth on or off refuses a reload: "
        "restart to apply it.",
    )
    read_timeout: Duration = Field(
        json_schema_extra=RESTART,
        default=timedelta(seconds=15),
        description="A request's headers, then its body, must each arrive within this "
        "(else 408 or the connection closes).",
    )
    overload_lag: DurationOrZero = Field(
        default=timedelta(milliseconds=25),
        description="Event-loop lag beyond which requests are shed with 503 and "
        "`Retry-After`; `0s`: never shed. Turning shedding on or off refuses a reload.",
    )
    allowed_targets: tuple[Annotated[str, AfterValidator(_check_target)], ...] | None = Field(
        default=None,
        description="Networks (`10.0.0.0/8`) and host names (`*.svc.cluster.local`) instances "
        "and workflow calls may point at; absent: any host.",
    )
    sse_buffer: ByteSize = Field(
        default=ByteSize(8 * 1024 * 1024),
        ge=64 * 1024,
        description="An SSE subscriber this far behind (`8MiB`, `512KiB` or bytes) is cut off; "
        "it reconnects with `Last-Event-ID`.",
    )
    probe_budget: ProbeBudget = Field(
        json_schema_extra=RESTART,
        default=ProbeBudget(),
        description="A global cap on probing, so a mass outage cannot starve the API.",
    )

    @property
    def targets(self) -> TargetPolicy:
        return TargetPolicy.from_entries(self.allowed_targets)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Storage(_Model):
    path: Path = Field(
        default=Path("var/hms-mgmt.db"),
        description="The SQLite file; a relative path is relative to the config file.",
    )
    url: str | None = Field(
        default=None,
        description="A PostgreSQL database (`postgresql://user@host:5432/db`) instead of "
        "`path`: several replicas share it (§8 of DESIGN, `cluster`).",
    )
    retention: Duration = Field(
        default=timedelta(days=400),
        description="How long per-minute probe aggregates are kept (raw results: 2 days).",
    )
    process_retention: Duration = Field(
        default=timedelta(days=30), description="How long finished workflow processes are kept."
    )
    event_retention: Duration = Field(
        default=timedelta(days=7),
        description="How long published events are stored and replayed after `Last-Event-ID`.",
    )
    audit_retention: Duration = Field(
        default=timedelta(days=400),
        description="How long the audit trail keeps its records (pruned by age only).",
    )

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must be a postgresql:// URL (SQLite takes `path`)")
        return value

    @field_validator("path")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return value if value.is_absolute() or base is None else Path(base) / value


class Cluster(_Model):
    replica_id: str = Field(
        default="",
        max_length=128,
        description="This replica's name among the members; empty: host name and pid.",
    )
    lease: Duration = Field(
        default=timedelta(seconds=10),
        description="A replica that has not renewed its membership for this long is dead: "
        "its probes, processes and leadership pass to the others.",
    )

    @field_validator("lease")
    @classmethod
    def _lease_floor(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("lease must be at least 1s")
        return value


class Lease(_Model):
    ttl: Duration = Field(
        default=timedelta(seconds=30),
        description='The lease a registration gets with `"ttl": "default"`.',
    )
    deregister_after: Duration = Field(
        default=timedelta(minutes=10),
        description="How long an instance whose lease lapsed stays (critical) before removal.",
    )


def _check_buckets(value: tuple[float, ...]) -> tuple[float, ...]:
    if any(boundary <= 0 for boundary in value):
        raise ValueError("bucket boundaries are seconds greater than zero")
    return tuple(sorted(set(value)))


class Defaults(_Model):
    probe: ProbeSpec = Field(
        default=ProbeSpec(),
        description="Probe settings for every instance; a service's `probe`, then an "
        "instance's own, override them key by key.",
    )
    lease: Lease = Field(
        default=Lease(), json_schema_extra=RESTART, description="Leases of registered instances."
    )
    latency_buckets: Annotated[tuple[float, ...], AfterValidator(_check_buckets)] = Field(
        default=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        description="Seconds: the boundaries of `hms_probe_duration_seconds`; every SLO's "
        "`latency_threshold` is added to them. A new boundary refuses a reload: restart to apply "
        "it.",
    )


class RawSli(_Model):
    """An SLI Prometheus already has; `{{window}}` is replaced by each rule window."""

    error_query: str = Field(min_length=1, description="PromQL counting bad events.")
    total_query: str = Field(min_length=1, description="PromQL counting all events.")


class Slo(_Model):
    name: Name = Field(description="Unique within the service.")
    objective: float = Field(gt=0, lt=100, description="Percent of good events, e.g. 99.9.")
    period: Duration = Field(
        default=timedelta(days=30),
        description="The rolling window of the error budget; burn-rate alerts scale to it.",
    )
    latency_threshold: Duration | None = Field(
        default=None,
        description="Set: good means successful and faster than this. "
        "Absent: good means a successful probe.",
    )
    sli: RawSli | None = Field(
        default=None,
        description="Measure with these Prometheus queries instead of the daemon's probes.",
    )
    source: Literal["probes", "calls"] = Field(
        default="probes",
        description="`probes`: the daemon's probes of the service. `calls`: the workflow calls "
        "made to it (`hms_service_calls_total`): good is a call it served (no 5xx, no "
        "`retry_on` status, no timeout or failed connection), and under `latency_threshold` "
        "when set. Minutes without calls are no data.",
    )
    description: str = Field(default="", description="Free text shown with the SLO.")

    @model_validator(mode="after")
    def _one_kind(self) -> Slo:
        if self.latency_threshold is not None and self.sli is not None:
            raise ValueError("set latency_threshold or sli, not both")
        if self.sli is not None and self.source != "probes":
            raise ValueError("sli measures with Prometheus queries: it takes no source")
        return self


class StaticInstance(_Model):
    id: Name = Field(description="Unique within the service.")
    url: HttpUrl = Field(description="Where the instance answers; probed as registered ones are.")
    meta: Meta = Field(default_factory=dict, description="Free key/value labels.")


class Service(_Model):
    name: Name = Field(description="Unique; registered instances of this name join it.")
    instances: tuple[StaticInstance, ...] = Field(
        default=(), description="Instances that need no registration (the API cannot change them)."
    )
    tags: Tags = Field(default=(), description="The first tag groups the service on the page.")
    meta: Meta = Field(default_factory=dict, description="Free key/value labels of the service.")
    probe: ProbeSpec | None = Field(
        default=None, description="Overrides `defaults.probe` for this service's instances."
    )
    depends_on: tuple[Name, ...] = Field(
        default=(),
        description="Services this one needs: while one is down (all its instances critical), "
        "this service's instances are suppressed and raise no alerts.",
    )
    slos: tuple[Slo, ...] = Field(
        default=(), description="Objectives on this service's probes, or on the calls made to it."
    )


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {value!r}") from exc
    return value


class Maintenance(_Model):
    services: tuple[Name, ...] = Field(min_length=1, description="The services it covers.")
    start: time | None = Field(
        default=None, description="A recurring window's start, local time of day, `HH:MM`."
    )
    duration: Duration = Field(description="How long each window lasts.")
    timezone: Annotated[str, AfterValidator(_check_timezone)] = Field(
        default="UTC", description="IANA name (`Europe/Paris`) for `start`."
    )
    every: tuple[Literal[WEEKDAYS], ...] | None = Field(  # type: ignore[valid-type]
        default=None, description="Weekdays of a recurring window; absent: every day."
    )
    at: datetime | None = Field(
        default=None, description="A one-off window's start, ISO 8601 (instead of `start`)."
    )

    @model_validator(mode="after")
    def _start_or_at(self) -> Maintenance:
        if (self.start is None) == (self.at is None):
            raise ValueError("set either start (recurring) or at (one-off)")
        if self.at is not None and self.every is not None:
            raise ValueError("every applies to recurring windows (start), not to at")
        return self


class Call(_Model):
    service: Name = Field(description="A passing instance of it is called (round-robin).")
    method: HTTP_METHODS = Field(default="POST", description="The HTTP method.")
    path: RequestPath = Field(
        description="Appended to the instance URL; may hold `{input.x}` templates."
    )
    body: Any = Field(
        default=None,
        description="JSON body; `{input.x}` and `{steps.<step>.x}` templates are filled in.",
    )
    headers: Headers = Field(default_factory=dict, description="Extra request headers.")


class Retry(_Model):
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts in all, the first included."
    )
    backoff: Duration = Field(
        default=timedelta(seconds=1), description="The wait before the second attempt."
    )
    factor: float = Field(
        default=2.0, ge=1.0, le=10.0, description="Each wait is the previous one times this."
    )
    max_backoff: Duration = Field(
        default=timedelta(minutes=1), description="No wait is longer (before jitter)."
    )
    retry_on: tuple[Annotated[int, Field(ge=100, le=599)], ...] | None = Field(
        default=None,
        description="HTTP statuses worth another attempt; absent: 429 and 5xx. Connection "
        "errors and timeouts are always retried.",
    )


NOTIFY_RETRY = Retry(
    max_attempts=8, backoff=timedelta(seconds=5), max_backoff=timedelta(minutes=10)
)


class Notification(_Model):
    name: Name = Field(description="Unique; the `name` label of `hms_notifications_total`.")
    url: HttpUrl = Field(description="The webhook that receives a POST per event.")
    events: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        min_length=1, description="Topics to send, globs allowed (`workflow.*`)."
    )
    format: Literal["json", "slack"] = Field(
        default="json", description='`json`, or `slack`: `{"text": "..."}`.'
    )
    secret: SecretStr | None = Field(
        default=None,
        description="Signs each body: `X-Hms-Signature: sha256=<hex HMAC-SHA256>`.",
    )
    timeout: Duration = Field(default=timedelta(seconds=5), description="Per delivery attempt.")
    retry: Retry = Field(
        default=NOTIFY_RETRY,
        description="Failed deliveries are retried from a durable outbox with this backoff.",
    )
    min_interval: Duration = Field(
        default=timedelta(minutes=5),
        description="The same state of one subject is sent at most once in this interval.",
    )


# Labels the generated alerts set themselves; a copied meta key may not take their place.
ALERT_LABELS = ("alertname", "service", "instance", "slo", "severity", "state", "workflow")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _check_alert_label(value: str) -> str:
    if not _LABEL_NAME.fullmatch(value) or value.startswith("__"):
        raise ValueError(f"{value!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
    if value in ALERT_LABELS or value.startswith("sloth_"):
        raise ValueError(f"{value!r} is a label the alerts set themselves")
    return value


def _check_runbook_base(value: str) -> str:
    if not value or "#" in value or any(c.isspace() for c in value):
        raise ValueError("expected a URL or path without '#' or spaces (#<alert> is appended)")
    return value


class Alerting(_Model):
    """What `hms-mgmt rules` puts into alerts besides their expressions."""

    labels: tuple[Annotated[str, AfterValidator(_check_alert_label)], ...] = Field(
        default=(),
        description="Service `meta` keys copied into alert labels, so Alertmanager can route "
        "on them (e.g. `[team]`).",
    )
    runbook_base: Annotated[str, AfterValidator(_check_runbook_base)] = Field(
        default="docs/runbooks.md",
        description="Each alert's `runbook_url` is `<runbook_base>#<alert name, lower case>`; "
        "the default is the runbook page shipped in the repository, relative to its root.",
    )


class WaitFor(_Model):
    event: str | None = Field(
        default=None, min_length=1, description="The topic to wait for (or `signal`)."
    )
    signal: Name | None = Field(
        default=None,
        description="A signal sent to the process (`POST /v1/processes/<id>/signals/<name>`); "
        "one that came before the step is kept for it. Its JSON is the step's output.",
    )
    match: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys the event's data must have, with these values (templates allowed).",
    )
    timeout: Duration | None = Field(
        default=None, description="The step fails when no event came in time; absent: no limit."
    )

    @model_validator(mode="after")
    def _event_or_signal(self) -> WaitFor:
        if (self.event is None) == (self.signal is None):
            raise ValueError("wait_for needs exactly one of event, signal")
        if self.signal is not None and self.match:
            raise ValueError("match applies to events; a signal is sent to one process")
        return self


class Resource(_Model):
    name: Name = Field(description="Unique; a step's `acquire.resource` names it.")
    capacity: int = Field(
        ge=1,
        description="Units held at once across all processes; per key value when a step's "
        "`acquire` gives a key. A reload's new capacity applies to grants from then on.",
    )


class Acquire(_Model):
    resource: Name = Field(
        description="A resource of the top-level `resources`, acquired at one step (or "
        "branch) of the workflow only: acquire it once, with all the units."
    )
    units: int = Field(default=1, ge=1, description="Units reserved; at most its capacity.")
    key: str | None = Field(
        default=None,
        min_length=1,
        description="A template (`{input.parent_id}`): the capacity then applies per value "
        "(one payment at a time per parent); absent: across all processes.",
    )


class TaskCompensation(_Model):
    task: Name = Field(description="Run by a worker of the workflow's queue to undo the step.")


class Step(_Model):
    name: Name = Field(description="Unique in the workflow; `{steps.<name>.x}` reads its output.")
    call: Call | None = Field(
        default=None, description="Call a service (one of call, publish, wait_for, task)."
    )
    publish: str | None = Field(
        default=None, min_length=1, description="Publish this topic on the event bus."
    )
    data: Any = Field(
        default=None,
        description="A publish step's event data (templates allowed, `{process.id}` too); "
        "absent: the process id, the workflow, its input and step outputs.",
    )
    wait_for: WaitFor | None = Field(default=None, description="Wait for an event.")
    task: Name | None = Field(
        default=None,
        description="Run by a worker polling the workflow's `queue` (`POST /v1/tasks/poll`); "
        "`timeout` is its lease, renewed by heartbeats.",
    )
    delay: Duration | None = Field(
        default=None, description="Wait this long before the step runs (durable)."
    )
    timeout: Duration | None = Field(
        default=None, description="Per attempt of a call or a task (a task's lease)."
    )
    retry: Retry | None = Field(
        default=None, description="Retries of a call or task; absent: it is tried once."
    )
    compensate: Call | TaskCompensation | None = Field(
        default=None,
        description="Undoes the step when a later one fails for good or the process is "
        "cancelled (retried too): a call, or `{task: name}` run by a worker.",
    )
    acquire: Acquire | None = Field(
        default=None,
        description="Reserve units of a resource before the step runs (before its delay), "
        "held until the process ends; while they are taken the process waits, in FIFO order.",
    )
    expect: tuple[str, ...] = Field(
        default=(),
        description="A call step's checks of its 2xx answer, in the probe condition language "
        "(`[STATUS] == 200`, `[BODY].passed == true`, `[RESPONSE_TIME] < 2s`): one that fails "
        "fails the step without retry, the condition and what was seen in its error. A 5xx "
        "or `retry_on` status is still retried, any other non-2xx still fails the step.",
    )
    parallel: tuple[Step, ...] | None = Field(
        default=None,
        description="Steps run together (branches, each with its own delay, retry, timeout, "
        "when and compensate; not itself parallel); the step ends when all have, and fails "
        "when one fails for good (the others are stopped and the finished ones compensated). "
        "A branch's output is `steps.<branch>`; branch names are unique in the workflow.",
    )
    when: str | list[str] | None = Field(
        default=None,
        description="Run the step only when this workflow condition holds (a list: every one "
        "does), checked before its delay, e.g. `[steps.validate.priority] == urgent`; "
        "else it is skipped (no output, not compensated) and the process goes on.",
    )

    @field_validator("compensate", mode="before")
    @classmethod
    def _call_or_task(cls, value: Any) -> Any:
        """A call or a task, never both; validated as the one it names, so an error speaks
        of that one's fields only (not of both models of the union)."""
        if not isinstance(value, dict):
            return value
        if "task" in value and value.keys() - {"task"}:
            raise ValueError("a compensation is a call or {task: name}, not both")
        if "task" not in value and "service" not in value:
            raise ValueError("a compensation needs a call (service, path) or a task")
        return TaskCompensation(**value) if "task" in value else Call(**value)

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [self.call, self.publish, self.wait_for, self.task, self.parallel]
        if sum(action is not None for action in actions) != 1:
            raise ValueError("a step needs exactly one of call, publish, wait_for, task, parallel")
        if self.parallel is not None:
            if self.compensate is not None or self.retry is not None or self.timeout:
                raise ValueError("a parallel step's branches take compensate, retry, timeout")
            if any(branch.parallel is not None for branch in self.parallel):
                raise ValueError("a parallel branch is not itself parallel (not supported)")
            if not self.parallel:
                raise ValueError("parallel needs at least one branch")
        if self.data is not None and self.publish is None:
            raise ValueError("data is the event of a publish step")
        return self


def _check_cron(value: str) -> str:
    try:
        Cron(value)
    except ValueError as exc:
        raise ValueError(f"not a crontab expression ({exc})") from None
    return value


class Trigger(_Model):
    event: str | None = Field(
        default=None,
        min_length=1,
        description="Each event of this topic starts a process (or `schedule`).",
    )
    schedule: Annotated[str, AfterValidator(_check_cron)] | None = Field(
        default=None,
        description="A crontab expression (minute hour day month weekday; weekdays 0-7, "
        "0 and 7 Sunday): a process starts at each tick, with input `{scheduled_at: "
        "<ISO 8601 tick time>}`. A tick missed while the daemon was down runs once at start.",
    )
    timezone: Annotated[str, AfterValidator(_check_timezone)] | None = Field(
        default=None,
        description="IANA name (`Europe/Paris`) the `schedule` is read in; absent: UTC.",
    )

    @model_validator(mode="after")
    def _event_or_schedule(self) -> Trigger:
        if (self.event is None) == (self.schedule is None):
            raise ValueError("a trigger needs exactly one of event, schedule")
        if self.timezone is not None and self.schedule is None:
            raise ValueError("timezone applies to a schedule")
        return self


class Workflow(_Model):
    name: Name = Field(description="Unique; `POST /v1/workflows/<name>` starts a process.")
    route: str | None = Field(
        default=None,
        description="A path outside `/v1` where a POST starts a process with the body as input.",
    )
    trigger: Trigger | None = Field(
        default=None, description="Start a process on an event, or on a schedule."
    )
    queue: Name | None = Field(
        default=None,
        description="The task queue workers poll for this workflow's `task` steps; absent: "
        "the workflow's name.",
    )
    deadline: Duration | None = Field(
        default=None,
        description="Each process should finish within this; a miss publishes "
        "`workflow.deadline_missed` and counts against `objective`.",
    )
    objective: float = Field(
        default=99.0,
        gt=0,
        lt=100,
        description="Percent of processes completed within `deadline` "
        "(`GET /v1/workflows/<name>/slo`).",
    )
    output: Any = Field(
        default=None,
        description="The process's result (templates over `input`, `steps`, `process.id`); "
        "absent: every step's output.",
    )
    respond_after: Name | None = Field(
        default=None,
        description="A synchronous start (`?wait=`) answers once this step is done, with the "
        "output so far, while the process goes on.",
    )
    steps: tuple[Step, ...] = Field(min_length=1, description="Run in order, each checkpointed.")

    @field_validator("route")
    @classmethod
    def _route_shape(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or value.startswith("/v1/") or value == "/v1":
            raise ValueError("route must start with / and not be under /v1")
        if value in ("/metrics", "/healthz", "/readyz", "/openapi.json", "/"):
            raise ValueError(f"route {value} is taken by the daemon")
        return value


class Config(_Model):
    server: Server = Field(default=Server(), description="Where and how the daemon listens.")
    storage: Storage = Field(
        default=Storage(),
        json_schema_extra=RESTART,
        description="The SQLite file or the PostgreSQL database, and retention.",
    )
    cluster: Cluster = Field(
        default=Cluster(),
        json_schema_extra=RESTART,
        description="Replicas sharing one PostgreSQL (`storage.url`); unused on SQLite.",
    )
    defaults: Defaults = Field(default=Defaults(), description="Defaults for every service.")
    services: tuple[Service, ...] = Field(
        default=(), description="Static services, beside the ones that register themselves."
    )
    maintenance: tuple[Maintenance, ...] = Field(
        default=(), description="Windows in which services raise no alerts or notifications."
    )
    notifications: tuple[Notification, ...] = Field(
        default=(), description="Webhooks (JSON or Slack) that receive bus events."
    )
    alerting: Alerting = Field(
        default=Alerting(), description="Labels and runbook links of the generated alert rules."
    )
    workflows: tuple[Workflow, ...] = Field(
        default=(), description="Durable multi-step processes across services."
    )
    resources: tuple[Resource, ...] = Field(
        default=(),
        description="Named capacities that workflow steps reserve with `acquire` (funds, "
        "quotas, inspectors).",
    )

    # What `${VAR}` hid (parse_config fills them): each workflows entry as written, and
    # each variable's (value, "${VAR}"), so a stored definition keeps `${VAR}` and never
    # its value (monitor/convert.py), and a rotated secret is no new version.
    _written_workflows: tuple[Any, ...] = PrivateAttr(default=())
    _variables: tuple[tuple[str, str], ...] = PrivateAttr(default=())

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def workflow_as_written(self, index: int) -> Any:
        """workflows[index] as config.yaml wrote it, `${VAR}` unexpanded (None: unknown)."""
        written = self._written_workflows
        return written[index] if index < len(written) else None

    @property
    def variables(self) -> tuple[tuple[str, str], ...]:
        """(value, "${VAR}") of each variable that changed a string."""
        return self._variables


def expand_variables(data: Any, env: Mapping[str, str] | None = None) -> Any:
    """A workflow entry stored as config.yaml wrote it, its `${VAR}`s expanded again from
    the environment; InvalidDefinition names each one that is not set."""
    unset: list[tuple[Path_, str]] = []
    expanded = _expand(data, (), os.environ if env is None else env, unset, [])
    if unset:
        raise InvalidDefinition(
            [(_json_path(p), f"environment variable {name} is not set") for p, name in unset]
        )
    return expanded


# -- loading -----------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Path_ = tuple[str | int, ...]


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    return parse_config(text, source=str(path), env=env, base_dir=path.parent)


def parse_config(
    text: str,
    *,
    source: str = "config.yaml",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    try:
        return _parse(text, source, os.environ if env is None else env, base_dir)
    except RecursionError:  # YAML composes deep nesting iteratively; the checks recurse
        raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None


def _parse(text: str, source: str, env: Mapping[str, str], base_dir: Path | None) -> Config:
    node, data = _parse_yaml(text, source)
    lines = dict(_lines(node, ()))
    problems: list[tuple[Path_, str]] = list(_duplicate_keys(node, ()))
    unset: list[tuple[Path_, str]] = []
    expanded: list[Expansion] = []
    written = data
    data = _expand(data, (), env, unset, expanded)
    problems += [(p, f"environment variable {name} is not set") for p, name in unset]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the top level must be a mapping of sections"])
    problems += _cross_check(data)
    problems += _check_conditions(data)
    config: Config | None = None
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        for error in _root_causes(exc, unset):
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append((tuple(error["loc"]), message))
    if problems or config is None:
        located = [
            (_line_of(lines, _known_prefix(data, p)), _dotted(p), _as_written(m, p, expanded))
            for p, m in problems
        ]
        located.sort(key=lambda item: item[0])  # stable: same-line errors keep their order
        # dict.fromkeys: two errors whose reasons were dropped read the same, once is enough
        raise ConfigError(
            list(dict.fromkeys(f"{source}:{line}: {path}: {msg}" for line, path, msg in located))
        )
    if isinstance(written, dict) and isinstance(written.get("workflows"), list):
        config._written_workflows = tuple(written["workflows"])
    config._variables = tuple(pair for e in expanded for pair in e.variables)
    return config


def config_warnings(config: Config) -> list[str]:
    """Things that are allowed (the service may register later) but look like mistakes."""
    known = {s.name for s in config.services}
    warnings = [
        f"services[{i}].depends_on: {dep!r} is not a configured service (it may register later)"
        for i, s in enumerate(config.services)
        for dep in s.depends_on
        if dep not in known
    ]
    warnings += [
        f"maintenance[{i}].services: {name!r} is not a configured service"
        for i, m in enumerate(config.maintenance)
        for name in m.services
        if name not in known
    ]
    for w, workflow in enumerate(config.workflows):
        for s, step in enumerate(workflow.steps):
            branches = [c for b in step.parallel or () for c in (b.call, b.compensate)]
            for call in (step.call, step.compensate, *branches):
                if isinstance(call, Call) and call.service not in known:
                    warnings.append(
                        f"workflows[{w}].steps[{s}]: service {call.service!r} is not configured "
                        "(it must self-register before the step runs)"
                    )
    return warnings


def _parse_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    try:
        loader = yaml.SafeLoader(text)  # checks every character up front
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError([f"{source}:{line}: invalid YAML: {exc.reason}"]) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{source}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return node, data


def _lines(node: yaml.Node | None, path: Path_) -> Iterator[tuple[Path_, int]]:
    if node is None:
        return
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            yield child, key.start_mark.line + 1
            for sub_path, line in _lines(value, child):
                if sub_path != child:
                    yield sub_path, line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _lines(item, (*path, i))


def _duplicate_keys(node: yaml.Node | None, path: Path_) -> Iterator[tuple[Path_, str]]:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                yield (*path, name), "duplicate key"
            seen.add(name)
            yield from _duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path, i))


@dataclass(frozen=True)
class Expansion:
    """A string that `${VAR}` changed: where, as written, and what each variable gave."""

    path: Path_
    written: str
    value: str
    variables: tuple[tuple[str, str], ...]  # (value from the environment, "${VAR}")


def _expand(
    value: Any, path: Path_, env: Mapping[str, str], unset: list[Any], expanded: list[Expansion]
) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _expand(v, (*path, str(k)), env, unset, expanded) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, unset, expanded) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value
    variables: list[tuple[str, str]] = []

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            variables.append((env[name], match.group(0)))
            return env[name]
        if default is not None:
            return default
        unset.append((path, name))
        return ""

    result = _VAR.sub(substitute, value)
    if variables:
        expanded.append(Expansion(path, value, result, tuple(variables)))
    return result


# Shorter values are hidden only where quoted in errors about their own key: "1" or "s"
# from the environment would otherwise be cut out of every message.
MIN_HIDDEN_ELSEWHERE = 4


def _as_written(message: str, path: Path_, expanded: list[Expansion]) -> str:
    """`message` with what came from the environment shown as written (`${VAR}`): a
    variable may hold a secret, and an error about it must not print it."""
    for expansion in expanded:
        related = _under(path, expansion.path) or _under(expansion.path, path)
        related = related or path == expansion.path
        pairs = [(expansion.value, expansion.written), *expansion.variables]
        for value, written in pairs:
            if len(value) >= MIN_HIDDEN_ELSEWHERE:
                for form in dict.fromkeys((repr(value)[1:-1], value)):  # as repr'd, and raw
                    message = message.replace(form, written)
            elif value and related:  # quoted only: "5" must not change "500ms" in the text
                message = message.replace(repr(value), repr(written))
        if related and _quotes_part_of(message, expansion):
            # A check quoted a piece of the value (a url's port text, a template field
            # split at "{"): the reason is dropped, the key and the value as written stay.
            names = ", ".join(dict.fromkeys(written for _, written in expansion.variables))
            return f"invalid value {expansion.written!r} (the reason would show part of {names})"
    return message


def _quotes_part_of(message: str, expansion: Expansion) -> bool:
    """Whether `message` holds MIN_HIDDEN_ELSEWHERE or more characters of a variable's value
    in a row, outside the `${VAR}` forms already written in it."""
    text = _VAR.sub("", message)
    size = MIN_HIDDEN_ELSEWHERE
    forms = {form for value, _ in expansion.variables for form in (value, repr(value)[1:-1])}
    return any(form[i : i + size] in text for form in forms for i in range(len(form) - size + 1))


def _root_causes(exc: ValidationError, unset: list[tuple[Path_, str]]) -> Iterator[Any]:
    """Errors worth showing: not those caused by an unset variable (already reported),
    nor pydantic's "too short" on a list whose items failed on their own."""
    errors = exc.errors()
    unset_paths = {path for path, _ in unset}
    for error in errors:
        loc = tuple(error["loc"])
        if any(loc[: len(p)] == p for p in unset_paths):
            continue
        if error["type"] == "too_short" and any(_under(o["loc"], loc) for o in errors):
            continue
        yield error


def _under(loc: tuple[int | str, ...], parent: tuple[int | str, ...]) -> bool:
    return len(loc) > len(parent) and tuple(loc[: len(parent)]) == parent


def _known_prefix(data: Any, loc: tuple[int | str, ...]) -> Path_:
    """The longest part of a pydantic error location that exists in the YAML."""
    prefix: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and str(part) in current:
            current = current[str(part)]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[part]
        else:
            break
        prefix.append(part if isinstance(part, int) else str(part))
    return tuple(prefix)


def _line_of(lines: Mapping[Path_, int], path: Path_) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or ("-" in part and "function" in part):
            continue  # pydantic's union/validator markers, not keys
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _cross_check(data: dict[str, Any]) -> Iterator[tuple[Path_, str]]:
    """Checks across entries, on the raw data so they run even when fields are invalid."""
    services = _items(data, "services")
    workflows = _items(data, "workflows")
    yield from _unique((("services", i), s.get("name")) for i, s in services)
    yield from _unique((("workflows", i), w.get("name")) for i, w in workflows)
    yield from _unique(
        (("notifications", i), n.get("name")) for i, n in _items(data, "notifications")
    )
    yield from _unique((("workflows", i, "route"), w.get("route")) for i, w in workflows)
    server = data.get("server") if isinstance(data, dict) else None
    auth = server.get("auth") if isinstance(server, dict) else None
    tokens = _items(auth, "tokens")
    yield from _unique((("server", "auth", "tokens", i), t.get("name")) for i, t in tokens)
    for i, service in services:
        if service.get("name") in (service.get("depends_on") or ()):
            yield ("services", i, "depends_on"), "a service cannot depend on itself"
        prefix: Path_ = ("services", i)
        yield from _unique(
            ((*prefix, "instances", j), x.get("id")) for j, x in _items(service, "instances")
        )
        yield from _unique(
            ((*prefix, "slos", j), x.get("name")) for j, x in _items(service, "slos")
        )
    yield from _check_targets(data, services)
    resources = _items(data, "resources")
    yield from _unique((("resources", i), r.get("name")) for i, r in resources)
    capacities: dict[Any, Any] = {}
    for _, resource in resources:  # a duplicate is reported above; the first one counts
        capacities.setdefault(resource.get("name"), resource.get("capacity"))
    for i, workflow in workflows:
        yield from workflow_problems(workflow, ("workflows", i))
        yield from _check_acquires(workflow, ("workflows", i), capacities)


def _check_acquires(
    workflow: dict[str, Any], at: Path_, capacities: Mapping[Any, Any]
) -> Iterator[tuple[Path_, str]]:
    """Each step's `acquire` names a resource of the top level, for at most its capacity,
    and no other step (or branch) acquires it: its process would wait for units it holds
    itself, or hold some while waiting for more, and two such processes for each other
    (`PUT /v1/workflows/{name}` checks against the running config's: `parse_workflow`)."""
    every: list[tuple[Path_, dict[str, Any]]] = []
    for j, step in _items(workflow, "steps"):
        every.append(((*at, "steps", j), step))
        every += [((*at, "steps", j, "parallel", k), b) for k, b in _items(step, "parallel")]
    first: dict[str, Any] = {}  # resource -> the step that acquires it first
    for where, step in every:
        acquire = step.get("acquire")
        if not isinstance(acquire, dict) or not isinstance(acquire.get("resource"), str):
            continue
        path: Path_ = (*where, "acquire")
        name = acquire["resource"]
        if name in first:
            again = f"{name!r} is acquired at step {first[name]!r} already"
            advice = "acquire it once, at the first step that needs it, with all the units"
            yield (*path, "resource"), f"{again}: {advice}"
        first.setdefault(name, step.get("name"))
        if name not in capacities:
            known = ", ".join(sorted(str(n) for n in capacities)) or "none"
            yield (*path, "resource"), f"no resource named {name!r} (resources: {known})"
            continue
        units, capacity = acquire.get("units", 1), capacities[name]
        if isinstance(units, int) and isinstance(capacity, int) and units > capacity:
            yield (*path, "units"), f"{units} units exceed the capacity of {name!r} ({capacity})"


def _check_targets(
    data: dict[str, Any], services: list[tuple[int, dict[str, Any]]]
) -> Iterator[tuple[Path_, str]]:
    """Static instances obey server.allowed_targets like registered ones."""
    server = data.get("server")
    entries = server.get("allowed_targets") if isinstance(server, dict) else None
    if not isinstance(entries, list):
        return
    try:
        policy = TargetPolicy.from_entries(str(entry) for entry in entries)
    except ValueError:
        return  # reported on the entry itself
    for i, service in services:
        for j, instance in _items(service, "instances"):
            url = instance.get("url")
            refusal = policy.refusal(url) if isinstance(url, str) else None
            if refusal is not None:
                yield ("services", i, "instances", j, "url"), refusal


def parse_workflow(data: Any, capacities: Mapping[str, int] | None = None) -> Workflow:
    """One workflow entry from JSON (`PUT /v1/workflows/{name}`, or a stored version), with
    every check a config.yaml entry gets; `InvalidDefinition` names each bad field.
    `capacities`: the running config's resources, which a new definition's `acquire`s
    are checked against (it has no top level of its own); None for a stored version."""
    problems: list[tuple[Path_, str]] = []
    if isinstance(data, dict):
        problems += workflow_problems(data)
        if capacities is not None:
            problems += _check_acquires(data, (), capacities)
    workflow = None
    try:
        workflow = Workflow.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append((tuple(error["loc"]), message))
    if problems or workflow is None:
        raise InvalidDefinition([(_json_path(loc), message) for loc, message in problems])
    return workflow


def _json_path(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if isinstance(p, int) or not ("[" in p or "function" in p)]
    return ".".join(parts) or "(top level)"


def workflow_problems(workflow: dict[str, Any], at: Path_ = ()) -> Iterator[tuple[Path_, str]]:
    """Checks across one workflow's steps, beside its model's (a config entry, or a body of
    `PUT /v1/workflows/{name}`): unique step names, templates, `respond_after`."""
    steps = _items(workflow, "steps")
    every = [((*at, "steps", j), x) for j, x in steps]  # each step, then its branches
    for j, x in steps:
        every += [((*at, "steps", j, "parallel", k), b) for k, b in _items(x, "parallel")]
    yield from _unique((path, x.get("name")) for path, x in every)
    yield from _check_templates(at, steps)
    yield from _check_when(at, steps)
    for path, x in every:
        yield from step_expect_problems(x, path)
    names = {x.get("name") for _, x in every}
    if "output" in workflow:
        known = {n for n in names if isinstance(n, str)}
        for problem in templates.check(workflow["output"], known):
            yield (*at, "output"), problem
    after = workflow.get("respond_after")
    if isinstance(after, str) and after not in names:
        yield (*at, "respond_after"), f"no step named {after!r} in this workflow"


def step_expect_problems(step: dict[str, Any], at: Path_) -> Iterator[tuple[Path_, str]]:
    """A step's `expect:`: on a call step only, each condition parsed (a parallel step's
    branches are steps too: call this for each)."""
    conditions = step.get("expect")
    if conditions is None:
        return
    if "call" not in step:
        yield (*at, "expect"), "expect checks a call's answer: only a call step may have it"
        return
    yield from _condition_problems(conditions, (*at, "expect"))


def _check_templates(
    at: Path_, steps: list[tuple[int, dict[str, Any]]]
) -> Iterator[tuple[Path_, str]]:
    """References in paths and bodies: `input.*`, `process.id` or an earlier step's output."""
    earlier: set[str] = set()
    for j, outer in steps:
        branches = _items(outer, "parallel")
        for k, step in [(None, outer)] + [(k, b) for k, b in branches]:
            path: Path_ = (*at, "steps", j) if k is None else (*at, "steps", j, "parallel", k)
            yield from _step_templates(path, step, earlier)
        for name in [outer.get("name")] + [b.get("name") for _, b in branches]:
            if isinstance(name, str):
                earlier.add(name)


def _step_templates(
    path: Path_, step: dict[str, Any], earlier: set[str]
) -> Iterator[tuple[Path_, str]]:
    """One step's (or branch's) references, given the steps that ran before it."""
    name = step.get("name")
    if "data" in step:
        for problem in templates.check(step["data"], earlier):
            yield (*path, "data"), problem
    for key in ("call", "wait_for", "compensate", "acquire"):
        value = step.get(key)
        if not isinstance(value, dict):
            continue
        known = earlier | {name} if key == "compensate" and isinstance(name, str) else earlier
        for field_name in ("path", "body", "headers", "match", "key"):
            if field_name in value:
                for problem in templates.check(value[field_name], known):
                    yield (*path, key, field_name), problem


def _check_when(at: Path_, steps: list[tuple[int, dict[str, Any]]]) -> Iterator[tuple[Path_, str]]:
    """Each `when` parses and reads only `steps.<x>` of steps that ran before it."""
    earlier: set[str] = set()
    for j, step in steps:
        yield from _when_problems((*at, "steps", j), step.get("when"), earlier)
        branches = _items(step, "parallel")
        for k, branch in branches:  # a branch reads steps before the parallel step only
            yield from _when_problems((*at, "steps", j, "parallel", k), branch.get("when"), earlier)
        for x in [step] + [b for _, b in branches]:
            if isinstance(x.get("name"), str):
                earlier.add(x["name"])


def _when_problems(path: Path_, when: Any, earlier: set[str]) -> Iterator[tuple[Path_, str]]:
    texts = list(enumerate(when)) if isinstance(when, list) else [(None, when)]
    for k, text in texts:
        if not isinstance(text, str):
            continue  # the model says what is wrong with its type
        at: Path_ = (*path, "when") if k is None else (*path, "when", k)
        try:
            condition = parse_context_condition(text)
        except ConditionError as exc:
            yield at, str(exc)
            continue
        left = condition.left
        if left.placeholder == "steps" and left.path and left.path[0] not in earlier:
            yield at, f"{text!r} reads step {left.path[0]!r}, which does not run before"


def _check_conditions(data: dict[str, Any]) -> Iterator[tuple[Path_, str]]:
    """Probe conditions are parsed here, so a bad one is a config error, not a probe crash."""
    probes: list[tuple[Path_, Any]] = []
    defaults = data.get("defaults")
    if isinstance(defaults, dict):
        probes.append((("defaults", "probe"), defaults.get("probe")))
    probes += [(("services", i, "probe"), s.get("probe")) for i, s in _items(data, "services")]
    for path, probe in probes:
        conditions = probe.get("conditions") if isinstance(probe, dict) else None
        yield from _condition_problems(conditions, (*path, "conditions"))


def _condition_problems(conditions: Any, at: Path_) -> Iterator[tuple[Path_, str]]:
    """Each condition of a list parsed; one that does not is reported at its index (what
    is not a list of strings, the model reports)."""
    if not isinstance(conditions, list):
        return
    for j, text in enumerate(conditions):
        if isinstance(text, str):
            try:
                parse_condition(text)
            except ConditionError as exc:
                yield (*at, j), str(exc)


def _items(parent: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    """The mappings in parent[key], with their positions; anything malformed is skipped."""
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, dict)]


def _unique(items: Iterable[tuple[Path_, object]]) -> Iterator[tuple[Path_, str]]:
    seen: set[str] = set()
    for path, name in items:
        if not isinstance(name, str):
            continue
        if name in seen:
            yield path, f"duplicate name {name!r}"
        seen.add(name)
