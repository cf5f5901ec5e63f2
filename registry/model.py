"""What the registry holds: instances, their health states and the registration body."""

from __future__ import annotations

import enum
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from .durations import format_duration, parse_duration

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
META_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_META_PAIRS = 64
MAX_TAGS = 64
MAX_URL_LENGTH = 2048


class HealthState(enum.StrEnum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    MAINTENANCE = "maintenance"
    UNKNOWN = "unknown"


class ProbeType(enum.StrEnum):
    """How an instance is probed; `none`: its health comes from the lease alone."""

    HTTP = "http"
    TCP = "tcp"
    TLS = "tls"
    NONE = "none"


# The schema a Literal of the same values had: the OpenAPI document stays as it was.
ProbeTypeField = Annotated[
    ProbeType, WithJsonSchema({"enum": [kind.value for kind in ProbeType], "type": "string"})
]


def is_valid_name(name: str) -> bool:
    """Service names and instance ids: `[A-Za-z0-9._-]`, 1 to 128 characters."""
    return NAME_PATTERN.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not is_valid_name(name):
        raise ValueError("must be 1 to 128 characters of A-Z a-z 0-9 . _ -")
    return name


def check_http_url(url: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"url longer than {MAX_URL_LENGTH} characters")
    if _CONTROL.search(url):  # urlsplit drops CR/LF/TAB silently; a caller may not
        raise ValueError("url must not contain control characters (CR, LF, NUL, ...)")
    # urlsplit's messages quote part of the url (which may hold a ${VAR} secret): not shown.
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("malformed url host (IPv6 brackets or characters)") from None
    try:
        port = parts.port
    except ValueError:
        raise ValueError("url port must be a number from 1 to 65535") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("url must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("url has no host")
    if port == 0:
        raise ValueError("url port must be 1-65535")
    return url


def check_meta(meta: dict[str, str]) -> dict[str, str]:
    if len(meta) > MAX_META_PAIRS:
        raise ValueError(f"at most {MAX_META_PAIRS} meta pairs")
    for key in meta:
        if not META_KEY_PATTERN.fullmatch(key):
            # Keys become Prometheus labels (__meta_hms_meta_<key>) in http_sd.
            raise ValueError(f"meta key {key!r} must match [A-Za-z_][A-Za-z0-9_]* (max 128)")
    return meta


def check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not tag or len(tag) > 128 or "," in tag:
            raise ValueError(f"tag {tag!r} must be 1 to 128 characters without commas")
    return tags


def _to_timedelta(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration string such as '10s'")


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("duration must be greater than zero")
    return value


DURATION_JSON_SCHEMA = {
    "type": "string",
    "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d|w))+$",
    "examples": ["500ms", "10s", "1h30m"],
}

# A duration string at the edge, a timedelta inside, the same string when written back.
Duration = Annotated[
    timedelta,
    BeforeValidator(_to_timedelta),
    AfterValidator(_positive),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(DURATION_JSON_SCHEMA),
]
# The same, where zero means "off" (server.overload_lag).
DurationOrZero = Annotated[
    timedelta,
    BeforeValidator(_to_timedelta),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(DURATION_JSON_SCHEMA),
]

# RFC 9110 token characters: what a header name may be made of.
HEADER_NAME_PATTERN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing is the daemon's: a Content-Length or Transfer-Encoding from input would let it
# desynchronise the connection (request smuggling).
RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# What a request target keeps as it is (RFC 3986 pchar, "/" and "?", and valid %XX).
_NOT_IN_TARGET = re.compile(r"%(?![0-9A-Fa-f]{2})|[^A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")


def request_path_problem(path: str) -> str | None:
    """Why `path` cannot go into a request line (CR/LF would start another request)."""
    if _CONTROL.search(path):
        return "path must not contain control characters (CR, LF, NUL, ...)"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid Unicode (a lone surrogate)"
    return None


def header_problem(name: str, value: str) -> str | None:
    """Why `name: value` cannot be sent as a header line, or None."""
    if not HEADER_NAME_PATTERN.fullmatch(name):
        return f"header name {name!r} is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"
    if name.lower() in RESERVED_HEADERS:
        return f"header {name!r} is set by the daemon"
    if _CONTROL_BUT_TAB.search(value):
        return f"header {name!r}: value must not contain control characters (CR, LF, NUL, ...)"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return f"header {name!r}: value must be Latin-1 (HTTP header bytes); percent-encode it"
    return None


def headers_problem(headers: Iterable[tuple[str, str]]) -> str | None:
    """Why one of `headers` cannot be sent as a header line, or None."""
    return next(filter(None, (header_problem(name, value) for name, value in headers)), None)


def request_problem(path: str, headers: Iterable[tuple[str, str]]) -> str | None:
    """Why `path` and `headers` cannot be sent as one request, or None: the check every
    sender (probes, workflow calls) makes before a byte leaves."""
    if not path.startswith("/"):
        return f"path must start with /, got {path[:80]!r}"
    return request_path_problem(path) or headers_problem(headers)


# Validation context of rows read back from the store: a registration an older version
# accepted still loads, and its probe fails with the reason instead
# (monitor.probing.kinds.http.build_target).
STORED = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("stored"))


def check_request_path(path: str, info: ValidationInfo) -> str:
    problem = None if _stored(info) else request_path_problem(path)
    if problem is not None:
        raise ValueError(problem)
    return path


def check_headers(headers: dict[str, str], info: ValidationInfo) -> dict[str, str]:
    problem = None if _stored(info) else headers_problem(headers.items())
    if problem is not None:
        raise ValueError(problem)
    return headers


def encode_request_target(path: str) -> str:
    """`path` as a request target: characters a target cannot hold are percent-encoded
    (UTF-8), a valid `%XX` is kept as it is. `/😀` -> `/%F0%9F%98%80`."""
    return _NOT_IN_TARGET.sub(
        lambda match: "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8")), path
    )


Name = Annotated[str, AfterValidator(check_name)]
HttpUrl = Annotated[str, AfterValidator(check_http_url)]
Tags = Annotated[tuple[Annotated[str, Field(max_length=128)], ...], AfterValidator(check_tags)]
Meta = Annotated[dict[str, Annotated[str, Field(max_length=4096)]], AfterValidator(check_meta)]
# Paths and headers that become request bytes: a probe's, a workflow call's.
RequestPath = Annotated[
    str, Field(pattern=r"^/", max_length=2048), AfterValidator(check_request_path)
]
Headers = Annotated[
    dict[str, Annotated[str, Field(max_length=4096)]],
    Field(max_length=64),
    AfterValidator(check_headers),
]


class ProbeSpec(BaseModel):
    """How an instance is probed. Every field is optional: unset ones fall back
    to the service's probe in config, then to `defaults.probe`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ProbeTypeField | None = Field(
        default=None,
        title="Type",
        description="`none`: not probed; health comes from the lease alone "
        "(critical once it lapses).",
    )
    method: Literal["GET", "HEAD", "POST", "PUT", "OPTIONS"] | None = Field(
        default=None, description="The HTTP method of an http probe."
    )
    path: RequestPath | None = Field(
        default=None,
        description="Requested instead of the instance URL's own path (which is the default).",
    )
    headers: Headers | None = Field(
        default=None, description="Extra request headers of an http probe."
    )
    conditions: tuple[Annotated[str, Field(min_length=1, max_length=1024)], ...] | None = Field(
        default=None,
        max_length=64,
        description="All must hold for a success (`[STATUS] == 200`, `[BODY].status == UP`); "
        "absent: `[STATUS] < 400` for http, a connection for tcp and tls.",
    )
    interval: Duration | None = Field(default=None, description="Between probes while passing.")
    timeout: Duration | None = Field(default=None, description="Per probe.")
    down_interval: Duration | None = Field(
        default=None, description="Between probes while not passing."
    )
    failure_threshold: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="Consecutive failures to go critical."
    )
    success_threshold: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="Consecutive successes to come back to passing."
    )
    warning_latency: Duration | None = Field(
        default=None, description="Passing but slower than this: warning. Absent: never."
    )
    warning_certificate: Duration | None = Field(
        default=None, description="A certificate expiring within this: warning. Absent: never."
    )
    keepalive: bool | None = Field(
        default=None,
        description="false: a fresh connection per probe, so DNS, connect and TLS are exercised.",
    )
    tls_verify: bool | None = Field(default=None, description="Verify certificates (https, tls).")
    follow_redirects: bool | None = Field(default=None, description="Follow 3xx answers.")
    max_body_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] | None = Field(
        default=None, description="The most of a body read for `[BODY]` conditions."
    )


def _check_ttl(value: str | None) -> str | None:
    if value is not None and value != "default":
        _positive(parse_duration(value))
    return value


class RegistrationBody(BaseModel):
    """The body of `PUT /v1/services/{service}/instances/{id}`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: HttpUrl | None = Field(
        default=None, description="Required unless `probe.type` is `none` (a worker, a job)."
    )
    tags: Tags = ()
    meta: Meta = Field(default_factory=dict)
    probe: ProbeSpec | None = None
    ttl: Annotated[str | None, AfterValidator(_check_ttl)] = Field(
        default=None,
        description="Lease length, e.g. '30s', or 'default' for defaults.lease.ttl. "
        "Absent: no lease, the instance stays until deleted.",
        examples=["30s", "default"],
    )
    deregister_after: Duration | None = Field(
        default=None,
        description="How long a lapsed instance stays (critical) before removal; "
        "absent: defaults.lease.deregister_after.",
    )

    @model_validator(mode="after")
    def _url_unless_unprobed(self) -> RegistrationBody:
        if self.url is None and (self.probe is None or self.probe.type != ProbeType.NONE):
            raise ValueError("url is required unless probe.type is none")
        return self

    def lease_seconds(self, default_ttl: timedelta) -> float | None:
        if self.ttl is None:
            return None
        ttl = default_ttl if self.ttl == "default" else parse_duration(self.ttl)
        return ttl.total_seconds()


# Instance.document's derived parts: see Instance._derived.
_Derived = str | tuple[str | None, str | None, dict[str, Any] | None] | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Instance:
    """One registered (or configured) instance of a service.

    Slotted, its strings shared and of its JSON form only the times kept: a fleet holds
    10,000 of these, and a dict per instance (and per cached document) is most of their
    size."""

    service: str
    id: str
    url: str
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    probe: ProbeSpec | None = None
    ttl: float | None = None  # seconds; None: no lease
    deregister_after: float = 600.0
    static: bool = False
    registered_at: float = 0.0  # wall clock
    updated_at: float = 0.0
    # What `document` derives, made on its first read (listings reuse it): the time as
    # one string while registered_at == updated_at and the probe's JSON is the fleet's
    # shared one (nearly always); else (registered_at, updated_at, the probe's own JSON).
    _derived: _Derived = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A fleet repeats a few service names, tags and meta pairs: keep one copy of each.
        object.__setattr__(self, "service", sys.intern(self.service))
        if self.ttl is not None:
            object.__setattr__(self, "ttl", _shared_seconds(self.ttl))
        object.__setattr__(self, "deregister_after", _shared_seconds(self.deregister_after))
        if self.probe is not None:
            object.__setattr__(self, "probe", _shared_probe(self.probe))
        if self.tags:
            object.__setattr__(self, "tags", _shared_tags(self.tags))
        if self.meta:
            pairs = tuple(
                (sys.intern(key), _short_intern(value)) for key, value in self.meta.items()
            )
            short = all(len(value) <= SHORT for _, value in pairs)
            object.__setattr__(self, "meta", _shared_meta(pairs) if short else dict(pairs))

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.id)

    def same_registration(self, other: Instance) -> bool:
        """True when a re-registration changes nothing a reader can see."""
        return (
            self.url == other.url
            and self.tags == other.tags
            and dict(self.meta) == dict(other.meta)
            and self.probe == other.probe
            and self.ttl == other.ttl
            and self.deregister_after == other.deregister_after
        )

    @property
    def document(self) -> dict[str, Any]:
        """The JSON form; its costly parts are built once per registration (the times)
        or shared by the fleet (the probe's, the durations)."""
        derived, probe = self._derived, self.probe
        if derived is None or (
            # Kept while the probe's JSON was the fleet's shared one, which has gone since
            # (over MAX_SHARED_PROBES settings): the instance keeps its own from now on.
            not isinstance(derived, tuple) and probe is not None and not _is_shared(probe)
        ):
            derived = self._derive()
        if isinstance(derived, tuple):
            registered_at, updated_at, probe_json = derived
        else:
            registered_at = updated_at = derived
            probe_json = None
        if probe_json is None and probe is not None:
            probe_json = _probe_document(probe)
        return {
            "service": self.service,
            "id": self.id,
            "url": self.url,
            "tags": self.tags,
            "meta": self.meta,
            "probe": probe_json,
            "ttl": _duration_text(self.ttl) if self.ttl is not None else None,
            "deregister_after": _duration_text(self.deregister_after),
            "static": self.static,
            "registered_at": registered_at,
            "updated_at": updated_at,
        }

    def _derive(self) -> _Derived:
        registered_at = _iso(self.registered_at)
        same = self.updated_at == self.registered_at  # a new registration: one string
        updated_at = registered_at if same else _iso(self.updated_at)
        probe = self.probe
        own = None if probe is None or _is_shared(probe) else _probe_document(probe)
        derived: _Derived = (
            registered_at if same and own is None else (registered_at, updated_at, own)
        )
        object.__setattr__(self, "_derived", derived)
        return derived


SHORT = 64  # meta values up to this long are shared (zones, versions); longer ones are kept
MAX_SHARED_PROBES = 1024
# A fleet registers a handful of probe settings: one ProbeSpec (~800 bytes) and one JSON form
# of each, keyed by its JSON (as the checker keys resolved probes), not one per instance.
_probes: dict[str, ProbeSpec] = {}
_probe_documents: dict[int, tuple[ProbeSpec, dict[str, Any]]] = {}  # by id of a shared one


def _shared_probe(probe: ProbeSpec) -> ProbeSpec:
    key = probe.model_dump_json(exclude_none=True)
    shared = _probes.get(key)
    if shared is None:
        if len(_probes) >= MAX_SHARED_PROBES:  # settings per instance: nothing to share
            _probes.clear()
            _probe_documents.clear()
        shared = _probes[key] = probe
        document = probe.model_dump(mode="json", exclude_none=True)
        _probe_documents[id(probe)] = (probe, document)
    return shared


def _shared_document(probe: ProbeSpec) -> dict[str, Any] | None:
    """The fleet's shared JSON of `probe`, built once (read-only: listings share it);
    None when it is not at hand (its entry was cleared since)."""
    kept = _probe_documents.get(id(probe))
    return kept[1] if kept is not None and kept[0] is probe else None


def _is_shared(probe: ProbeSpec) -> bool:
    return _shared_document(probe) is not None


def _probe_document(probe: ProbeSpec) -> dict[str, Any]:
    """The JSON form of a ProbeSpec: the shared one, or built now."""
    shared = _shared_document(probe)
    return shared if shared is not None else probe.model_dump(mode="json", exclude_none=True)


def _short_intern(value: str) -> str:
    return sys.intern(value) if len(value) <= SHORT else value


@lru_cache(maxsize=1024)  # a fleet uses a handful of meta sets (zone, version, team)
def _shared_meta(pairs: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    """One dict for every instance with these pairs (in this order: JSON keeps it); ~200
    bytes an instance. Never written to: `Instance` is frozen and its meta a Mapping."""
    return dict(pairs)


@lru_cache(maxsize=1024)  # a fleet uses a handful of tag sets
def _shared_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sys.intern(tag) for tag in tags)


@lru_cache(maxsize=256, typed=True)  # a fleet uses a handful of ttls: one float each
def _shared_seconds(seconds: float) -> float:
    return seconds


@lru_cache(maxsize=256)  # a fleet uses a handful of ttls
def _duration_text(seconds: float) -> str:
    return format_duration(seconds)


def _iso(timestamp: float) -> str | None:
    """RFC 3339 in UTC with milliseconds, e.g. 2026-11-22T18:21:01.772Z."""
    if not timestamp:
        return None
    seconds, millis = divmod(round(timestamp * 1000), 1000)
    return f"{_iso_seconds(seconds)}.{millis:03d}Z"


@lru_cache(maxsize=64)  # registrations arrive in bursts within the same second
def _iso_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
