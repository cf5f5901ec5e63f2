"""config.yaml: the schema of DESIGN.md §2, parsed once into frozen models.

Loading reports every problem at once, each as `file:line: key.path: message`,
so an operator fixes a config in one pass rather than one error per restart.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from registry import Duration, HttpUrl, Name, ProbeSpec, Tags
from registry.model import DurationOrZero, Meta
from registry.targets import TargetPolicy, parse_target
from workflows import templates

from .conditions import ConditionError, parse_condition

DEFAULT_LISTEN = "127.0.0.1:9797"
SCOPE_VERBS = ("register", "publish", "subscribe", "start", "cancel")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
HTTP_METHODS = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


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
    token: Annotated[SecretStr, AfterValidator(_check_token)]
    scopes: tuple[Annotated[str, AfterValidator(_check_scope)], ...] = Field(min_length=1)


class Auth(_Model):
    tokens: tuple[Token, ...] = Field(min_length=1)
    protect_reads: bool = False


def _check_target(value: str) -> str:
    parse_target(value)
    return value


class ProbeBudget(_Model):
    """A global cap on probing, so that a mass outage cannot starve the API (ARCHITECTURE.md)."""

    # Probes started per second beyond each instance's own `interval`, all instances
    # together: what `down_interval` may add. Down instances share it, backing off.
    per_second: int = Field(default=1000, ge=1)
    in_flight: int = Field(default=1000, ge=1)  # probes running at once


class Server(_Model):
    listen: Annotated[str, AfterValidator(_check_listen)] = DEFAULT_LISTEN
    auth: Auth | None = None
    # A request's headers, then its body, must each arrive within this; idle connections close.
    read_timeout: Duration = timedelta(seconds=15)
    # Event-loop lag beyond which requests get 503 + Retry-After (monitor/overload.py); 0s: never.
    overload_lag: DurationOrZero = timedelta(milliseconds=25)
    # Absent: any host. Present: instance URLs must be in these networks or match these names.
    allowed_targets: tuple[Annotated[str, AfterValidator(_check_target)], ...] | None = None
    probe_budget: ProbeBudget = ProbeBudget()

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
    path: Path = Path("var/hms-mgmt.db")
    retention: Duration = timedelta(days=400)
    process_retention: Duration = timedelta(days=30)

    @field_validator("path")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return value if value.is_absolute() or base is None else Path(base) / value


class Lease(_Model):
    ttl: Duration = timedelta(seconds=30)
    deregister_after: Duration = timedelta(minutes=10)


def _check_buckets(value: tuple[float, ...]) -> tuple[float, ...]:
    if any(boundary <= 0 for boundary in value):
        raise ValueError("bucket boundaries are seconds greater than zero")
    return tuple(sorted(set(value)))


class Defaults(_Model):
    probe: ProbeSpec = ProbeSpec()
    lease: Lease = Lease()
    # hms_probe_duration_seconds boundaries; SLO latency thresholds are added to them.
    latency_buckets: Annotated[tuple[float, ...], AfterValidator(_check_buckets)] = (
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    )  # fmt: skip


class RawSli(_Model):
    """An SLI Prometheus already has; `{{window}}` is replaced by each rule window."""

    error_query: str = Field(min_length=1)
    total_query: str = Field(min_length=1)


class Slo(_Model):
    name: Name
    objective: float = Field(gt=0, lt=100, description="percent, e.g. 99.9")
    period: Duration = timedelta(days=30)
    latency_threshold: Duration | None = None
    sli: RawSli | None = None
    description: str = ""

    @model_validator(mode="after")
    def _one_kind(self) -> Slo:
        if self.latency_threshold is not None and self.sli is not None:
            raise ValueError("set latency_threshold or sli, not both")
        return self


class StaticInstance(_Model):
    id: Name
    url: HttpUrl
    meta: Meta = Field(default_factory=dict)


class Service(_Model):
    name: Name
    instances: tuple[StaticInstance, ...] = ()
    tags: Tags = ()
    meta: Meta = Field(default_factory=dict)
    probe: ProbeSpec | None = None
    depends_on: tuple[Name, ...] = ()
    slos: tuple[Slo, ...] = ()


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {value!r}") from exc
    return value


class Maintenance(_Model):
    services: tuple[Name, ...] = Field(min_length=1)
    start: time | None = Field(default=None, description="local time of day, HH:MM")
    duration: Duration
    timezone: Annotated[str, AfterValidator(_check_timezone)] = "UTC"
    every: tuple[Literal[WEEKDAYS], ...] | None = None  # type: ignore[valid-type]
    at: datetime | None = Field(default=None, description="a one-off window, ISO 8601")

    @model_validator(mode="after")
    def _start_or_at(self) -> Maintenance:
        if (self.start is None) == (self.at is None):
            raise ValueError("set either start (recurring) or at (one-off)")
        if self.at is not None and self.every is not None:
            raise ValueError("every applies to recurring windows (start), not to at")
        return self


class Call(_Model):
    service: Name
    method: HTTP_METHODS = "POST"
    path: str = Field(pattern=r"^/")
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)


class Retry(_Model):
    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff: Duration = timedelta(seconds=1)
    factor: float = Field(default=2.0, ge=1.0, le=10.0)
    max_backoff: Duration = timedelta(minutes=1)
    # HTTP statuses worth another attempt; default 429 and 5xx. Connection errors and
    # timeouts are always retried.
    retry_on: tuple[Annotated[int, Field(ge=100, le=599)], ...] | None = None


NOTIFY_RETRY = Retry(
    max_attempts=8, backoff=timedelta(seconds=5), max_backoff=timedelta(minutes=10)
)


class Notification(_Model):
    name: Name
    url: HttpUrl
    events: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    format: Literal["json", "slack"] = "json"
    secret: SecretStr | None = None
    timeout: Duration = timedelta(seconds=5)
    # Deliveries that fail are retried with backoff from a durable outbox.
    retry: Retry = NOTIFY_RETRY
    # The same state of one (event, subject) is re-sent at most once in this interval.
    min_interval: Duration = timedelta(minutes=5)


class WaitFor(_Model):
    event: str = Field(min_length=1)
    match: dict[str, Any] = Field(default_factory=dict)
    timeout: Duration | None = None


class Step(_Model):
    name: Name
    call: Call | None = None
    publish: str | None = Field(default=None, min_length=1)
    wait_for: WaitFor | None = None
    delay: Duration | None = None
    timeout: Duration | None = None
    retry: Retry | None = None
    compensate: Call | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [self.call, self.publish, self.wait_for]
        if sum(action is not None for action in actions) != 1:
            raise ValueError("a step needs exactly one of call, publish, wait_for")
        return self


class Trigger(_Model):
    event: str = Field(min_length=1)


class Workflow(_Model):
    name: Name
    route: str | None = None
    trigger: Trigger | None = None
    deadline: Duration | None = None
    # The workflow SLO (GET /v1/workflows/{name}/slo): percent completed within deadline.
    objective: float = Field(default=99.0, gt=0, lt=100)
    steps: tuple[Step, ...] = Field(min_length=1)

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
    server: Server = Server()
    storage: Storage = Storage()
    defaults: Defaults = Defaults()
    services: tuple[Service, ...] = ()
    maintenance: tuple[Maintenance, ...] = ()
    notifications: tuple[Notification, ...] = ()
    workflows: tuple[Workflow, ...] = ()

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)


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
    data = _expand(data, (), env, unset)
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
        located = [(_line_of(lines, _known_prefix(data, p)), _dotted(p), m) for p, m in problems]
        located.sort(key=lambda item: item[0])  # stable: same-line errors keep their order
        raise ConfigError([f"{source}:{line}: {path}: {msg}" for line, path, msg in located])
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
            for call in (step.call, step.compensate):
                if call is not None and call.service not in known:
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


def _expand(value: Any, path: Path_, env: Mapping[str, str], unset: list[Any]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _expand(v, (*path, str(k)), env, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, unset) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        unset.append((path, name))
        return ""

    return _VAR.sub(substitute, value)


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
    for i, workflow in workflows:
        steps = _items(workflow, "steps")
        yield from _unique((("workflows", i, "steps", j), x.get("name")) for j, x in steps)
        yield from _check_templates(i, steps)


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


def _check_templates(
    workflow: int, steps: list[tuple[int, dict[str, Any]]]
) -> Iterator[tuple[Path_, str]]:
    """References in paths and bodies: `input.*` or an earlier step's output."""
    earlier: set[str] = set()
    for j, step in steps:
        path: Path_ = ("workflows", workflow, "steps", j)
        name = step.get("name")
        for key in ("call", "wait_for", "compensate"):
            value = step.get(key)
            if not isinstance(value, dict):
                continue
            known = earlier | {name} if key == "compensate" and isinstance(name, str) else earlier
            for field_name in ("path", "body", "headers", "match"):
                if field_name in value:
                    for problem in templates.check(value[field_name], known):
                        yield (*path, key, field_name), problem
        if isinstance(name, str):
            earlier.add(name)


def _check_conditions(data: dict[str, Any]) -> Iterator[tuple[Path_, str]]:
    """Probe conditions are parsed here, so a bad one is a config error, not a probe crash."""
    probes: list[tuple[Path_, Any]] = []
    defaults = data.get("defaults")
    if isinstance(defaults, dict):
        probes.append((("defaults", "probe"), defaults.get("probe")))
    probes += [(("services", i, "probe"), s.get("probe")) for i, s in _items(data, "services")]
    for path, probe in probes:
        conditions = probe.get("conditions") if isinstance(probe, dict) else None
        if not isinstance(conditions, list):
            continue
        for j, text in enumerate(conditions):
            if isinstance(text, str):
                try:
                    parse_condition(text)
                except ConditionError as exc:
                    yield (*path, "conditions", j), str(exc)


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
