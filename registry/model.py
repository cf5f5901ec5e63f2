"""What the registry holds: instances, their health states and the registration body."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"malformed url: {exc}") from exc
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


Name = Annotated[str, AfterValidator(check_name)]
HttpUrl = Annotated[str, AfterValidator(check_http_url)]
Tags = Annotated[tuple[Annotated[str, Field(max_length=128)], ...], AfterValidator(check_tags)]
Meta = Annotated[dict[str, Annotated[str, Field(max_length=4096)]], AfterValidator(check_meta)]


class RegistrationBody(BaseModel):
    """The body of `PUT /v1/services/{service}/instances/{id}`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: HttpUrl
    tags: Tags = ()
    meta: Meta = Field(default_factory=dict)
    probe: dict[str, Any] | None = None
    ttl: str | None = Field(
        default=None,
        description="Lease length, e.g. '30s', or 'default' for defaults.lease.ttl. "
        "Absent: no lease, the instance stays until deleted.",
    )
    deregister_after: str | None = Field(
        default=None,
        description="How long a lapsed instance stays (critical) before removal; "
        "default defaults.lease.deregister_after.",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Instance:
    """One registered (or configured) instance of a service."""

    service: str
    id: str
    url: str
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    probe: Mapping[str, Any] | None = None
    ttl: float | None = None  # seconds; None: no lease
    deregister_after: float = 600.0
    static: bool = False
    registered_at: float = 0.0  # wall clock
    updated_at: float = 0.0

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
