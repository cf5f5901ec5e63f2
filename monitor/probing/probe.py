"""What a probe is: its settings with every default filled in, and its result.

Below the prober and the probe kinds, which both speak these types.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from registry import ProbeSpec, ProbeType
from registry.conditions import MISSING, Condition, parse_conditions

DEFAULT_MAX_BODY = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class Probe:
    """Probe settings with every default filled in, conditions parsed."""

    type: ProbeType = ProbeType.HTTP
    method: str = "GET"
    path: str | None = None  # None: the instance URL's own path
    headers: tuple[tuple[str, str], ...] = ()
    conditions: tuple[Condition, ...] = ()
    interval: float = 10.0
    timeout: float = 2.0
    down_interval: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 2
    warning_latency: float | None = None
    warning_certificate: float | None = None
    keepalive: bool = False
    tls_verify: bool = True
    follow_redirects: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY

    @functools.cached_property
    def reads_body(self) -> bool:
        """Whether a condition looks at the body: a probe worker sends it back only then."""
        return any(condition.left.placeholder == "BODY" for condition in self.conditions)


DEFAULT_CONDITIONS: dict[ProbeType, tuple[str, ...]] = {
    ProbeType.HTTP: ("[STATUS] < 400",),
    ProbeType.TCP: ("[CONNECTED] == true",),
    ProbeType.TLS: ("[CONNECTED] == true",),
    ProbeType.NONE: (),
}


def resolve_probe(layers: Sequence[ProbeSpec | None]) -> Probe:
    """Merge probe settings, later layers winning: defaults, service, instance.

    Raises ConditionError for a condition that does not parse.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:  # iterating a model gives raw values (timedelta, not "10s")
            merged.update((name, value) for name, value in layer if value is not None)
    kind = ProbeType(merged.get("type", ProbeType.HTTP))
    texts = merged.pop("conditions", None) or DEFAULT_CONDITIONS[kind]
    if kind == ProbeType.NONE:
        texts = ()
    for name in ("interval", "timeout", "down_interval", "warning_latency", "warning_certificate"):
        if isinstance(merged.get(name), timedelta):
            merged[name] = merged[name].total_seconds()
    if "headers" in merged:
        merged["headers"] = tuple(merged["headers"].items())
    return Probe(conditions=parse_conditions(texts), **merged)


@dataclass(slots=True, kw_only=True)
class ProbeResult:
    at: float  # wall clock at the start
    response_time: float  # seconds
    connected: bool
    status: int | None = None
    body: bytes = b""
    certificate_expires_at: float | None = None  # wall clock
    error: str | None = None
    _json: Any = field(default=MISSING, repr=False)

    @property
    def certificate_expires_in(self) -> float | None:
        if self.certificate_expires_at is None:
            return None
        return self.certificate_expires_at - self.at

    @property
    def body_text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def body_json(self) -> Any:
        if self._json is MISSING:
            try:
                self._json = json.loads(self.body) if self.body else None
            except ValueError:
                self._json = None
        return self._json


class ProbeRequestError(ValueError):
    """The probe's request cannot be built from its settings (a path or header that
    would not be one request): the probe fails with this reason, nothing is sent."""
