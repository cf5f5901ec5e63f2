"""Property-based fuzzing (hypothesis): the config loader and the condition language answer
any input with a clean error naming the problem, never an exception from inside."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.config import Config, ConfigError, parse_config
from monitor.probing import ProbeResult
from registry.conditions import ConditionError, parse_condition

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The vocabulary of the config, so generated documents get deep enough to reach validators.
KEYS = [
    "server", "listen", "auth", "tokens", "token", "scopes", "protect_reads", "read_timeout",
    "allowed_targets", "storage", "path", "retention", "process_retention", "defaults",
    "probe", "interval", "timeout", "failure_threshold", "success_threshold", "lease", "ttl",
    "services", "name", "instances", "id", "url", "tags", "type", "conditions", "depends_on",
    "slos", "objective", "period", "latency_threshold", "maintenance", "start", "duration",
    "timezone", "every", "at", "notifications", "events", "format", "secret", "workflows",
    "route", "trigger", "event", "deadline", "steps", "call", "service", "method", "body",
    "retry", "max_attempts", "backoff", "delay", "compensate", "publish", "wait_for", "match",
]  # fmt: skip
ODD_STRINGS = [
    "10s", "-1s", "1e400", "99.9", "0", "", "*", "http://127.0.0.1:1", "${NOPE}", "${X:-1s}",
    "[STATUS] == 200", "127.0.0.1:9797", "10.0.0.0/8", "23:00", "sunday", "2026-12-01T22:00Z",
    "Europe/Paris", "{input.x}", "/api/x", "register:*",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=20),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=40,
)


def loads_cleanly(text: str) -> None:
    try:
        config = parse_config(text, env={"X": "5s"})
    except ConfigError as exc:
        assert exc.errors, "a ConfigError lists at least one problem"
        for line in exc.errors:
            assert line.startswith("config.yaml:"), line  # each names where
    else:
        assert isinstance(config, Config)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), DOCUMENTS, max_size=6))
def test_any_config_document_loads_or_fails_with_located_errors(data: dict[str, Any]) -> None:
    loads_cleanly(yaml.safe_dump(data))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_loads_or_fails_with_located_errors(text: str) -> None:
    loads_cleanly(text)


@FUZZ
@given(st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_odd_bytes_anywhere_fail_cleanly(noise: str) -> None:
    loads_cleanly(noise)
    loads_cleanly(f"services:\n  - name: a\n    instances: [{noise}]\n")


@pytest.mark.parametrize(
    "text",
    [
        "a: &x [*x]\n",  # a recursive alias
        "a: &a [1]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n",  # alias fan-out
        "!!python/object/apply:os.system [echo owned]\n",
        "x: " + "[" * 5000,
        "x: " + "[" * 5000 + "]" * 5000,
        "services:" + "\n  - {name: a}" * 20_000,
        "\ufeffserver: {listen: 127.0.0.1:1}\n",
        "server:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n",
    ],
    ids=lambda text: repr(text[:24]),
)
def test_hostile_yaml_fails_cleanly(text: str) -> None:
    loads_cleanly(text)


PARTS = st.sampled_from(
    ["[STATUS]", "[RESPONSE_TIME]", "[BODY]", "[BODY].a.b[0].c", "[CONNECTED]",
     "[CERTIFICATE_EXPIRATION]", "len([BODY].items)", "has([BODY].x)", "pat(*UP*)",
     "==", "!=", "<", "<=", ">", ">=", "200", "300ms", "1h", "UP", "true", "-1", "[0]",
     "[", "]", "(", ")", ".", "'", '"', " ", "\\", "\x00", "1e999", "nan"]
)  # fmt: skip
CONDITIONS = st.one_of(st.lists(PARTS, max_size=8).map(" ".join), st.text(max_size=60))
BODIES = st.one_of(
    st.binary(max_size=50),
    st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=10,
    ).map(lambda value: json.dumps(value).encode()),
)


@FUZZ
@given(
    CONDITIONS,
    BODIES,
    st.one_of(st.none(), st.integers(-1, 999)),
    st.floats(0, 100),
    st.booleans(),
)
def test_any_condition_parses_or_fails_cleanly_and_checks_any_result(
    text: str, body: bytes, status: int | None, seconds: float, connected: bool
) -> None:
    try:
        condition = parse_condition(text)
    except ConditionError as exc:
        assert str(exc)
        return
    result = ProbeResult(
        at=0.0, response_time=seconds, connected=connected, status=status, body=body
    )
    held, observed = condition.check(result)
    assert isinstance(held, bool) and isinstance(observed, str)
