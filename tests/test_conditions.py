"""The condition language: every operator and function, and bad conditions refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from monitor.probing import ProbeResult
from registry.conditions import (
    ConditionError,
    parse_condition,
    parse_conditions,
    parse_context_condition,
)


def result(
    *, status: int | None = 200, body: Any = None, rt: float = 0.1, cert_days: float | None = None
) -> ProbeResult:
    raw = (
        body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    )
    expires = 1000.0 + cert_days * 86400 if cert_days is not None else None
    return ProbeResult(
        at=1000.0,
        response_time=rt,
        connected=status is not None,
        status=status,
        body=raw,
        certificate_expires_at=expires,
    )


BODY = {
    "status": "UP",
    "items": [{"id": 7}, {"id": 8}],
    "count": "12",
    "name": "hms-pay",
    "ok": True,
}


@pytest.mark.parametrize(
    ("condition", "observation", "holds"),
    [
        ("[STATUS] == 200", result(), True),
        ("[STATUS] != 200", result(), False),
        ("[STATUS] < 300", result(status=503), False),
        ("[STATUS] <= 503", result(status=503), True),
        ("[STATUS] > 499", result(status=503), True),
        ("[STATUS] >= 504", result(status=503), False),
        ("[RESPONSE_TIME] < 300ms", result(rt=0.25), True),
        ("[RESPONSE_TIME] < 300ms", result(rt=0.35), False),
        ("[RESPONSE_TIME] <= 300", result(rt=0.3), True),  # a bare number is milliseconds
        ("[BODY].status == UP", result(body=BODY), True),
        ("[BODY].status == DOWN", result(body=BODY), False),
        ("[BODY].items[1].id == 8", result(body=BODY), True),
        ("[BODY].count > 10", result(body=BODY), True),  # "12" compared as a number
        ("[BODY].ok == true", result(body=BODY), True),
        ("[BODY] == pong", result(body=b"pong"), True),
        ("len([BODY].items) == 2", result(body=BODY), True),
        ("len([BODY]) > 3", result(body=b"pong"), True),
        ("has([BODY].status) == true", result(body=BODY), True),
        ("has([BODY].errors) == false", result(body=BODY), True),
        ("[BODY].name == pat(hms-*)", result(body=BODY), True),
        ("[BODY].name != pat(hms-*)", result(body=BODY), False),
        ("[BODY].status == 'UP'", result(body=BODY), True),
        ("[CONNECTED] == true", result(), True),
        ("[CONNECTED] == true", result(status=None), False),
        ("[CERTIFICATE_EXPIRATION] > 48h", result(cert_days=30), True),
        ("[CERTIFICATE_EXPIRATION] > 48h", result(cert_days=1), False),
        ("[BODY].missing == x", result(body=BODY), False),
        ("[BODY].status == UP", result(body=b"not json{"), False),
    ],
)
def test_condition_evaluates(condition: str, observation: ProbeResult, holds: bool) -> None:
    assert parse_condition(condition).check(observation)[0] is holds


def test_a_failing_condition_reports_what_it_saw() -> None:
    assert parse_condition("[STATUS] == 200").check(result(status=503)) == (False, "503")
    assert parse_condition("[RESPONSE_TIME] < 300ms").check(result(rt=0.5)) == (False, "500ms")
    assert parse_condition("[BODY].status == UP").check(result(body={"status": "DOWN"})) == (
        False,
        "DOWN",
    )
    assert parse_condition("[BODY].gone == 1").check(result(body={})) == (False, "missing")


@pytest.mark.parametrize(
    "condition",
    [
        "[STATUS]",
        "[STATUS] = 200",
        "[STATUS] == ",
        "[STATES] == 200",
        "[STATUS].code == 200",
        "[STATUS] == two hundred",
        "[RESPONSE_TIME] < soon",
        "[CONNECTED] == yes",
        "[BODY].name < pat(a*)",
        "[BODY].name > UP",
        "has([STATUS]) == true",
        "size([BODY]) > 1",
    ],
)
def test_bad_conditions_are_refused(condition: str) -> None:
    with pytest.raises(ConditionError):
        parse_condition(condition)


def test_every_bad_condition_is_named() -> None:
    with pytest.raises(ConditionError) as caught:
        parse_conditions(["[STATUS] == 200", "[NOPE] == 1", "[STATUS] ~ 2"])
    assert "conditions[1]" in str(caught.value)
    assert "conditions[2]" in str(caught.value)


CONTEXT = {
    "input": {"amount": 1200, "parent_id": "P-7", "tags": ["a", "b"]},
    "steps": {"validate": {"priority": "urgent", "passed": True}},
    "process": {"id": "p-1"},
}


@pytest.mark.parametrize(
    ("condition", "holds"),
    [
        ("[steps.validate.priority] == urgent", True),
        ("[steps.validate.priority] != urgent", False),
        ("[steps.validate.passed] == true", True),
        ("[input.amount] > 1000", True),
        ("[input.amount] <= 1000", False),
        ("[input.tags[1]] == b", True),
        ("len([input.tags]) == 2", True),
        ("has([input.parent_id]) == true", True),
        ("has([steps.escalate.sent]) == true", False),
        ("[input.parent_id] == pat(P-*)", True),
        ("[process.id] == p-1", True),
        ("[steps.skipped.x] == 1", False),
    ],
)
def test_workflow_conditions_read_input_steps_and_process(condition: str, holds: bool) -> None:
    assert parse_context_condition(condition).check_context(CONTEXT)[0] is holds


def test_a_workflow_condition_says_what_it_saw() -> None:
    condition = parse_context_condition("[steps.validate.priority] == low")
    assert condition.check_context(CONTEXT) == (False, "urgent")
    assert parse_context_condition("[input.nope] == 1").check_context(CONTEXT) == (
        False,
        "missing",
    )


@pytest.mark.parametrize(
    "condition",
    [
        "[STATUS] == 200",  # an answer's placeholder: no answer in a process
        "[steps] == 1",  # which step?
        "[process.name] == x",
        "[input.amount] ~ 3",
        "[input.amount] < high",
        "[inputs.amount] == 1",
    ],
)
def test_bad_workflow_conditions_are_refused(condition: str) -> None:
    with pytest.raises(ConditionError):
        parse_context_condition(condition)
