"""The workflow states are the strings the daemon has always written: on disk, on the
wire, in metric labels."""

from __future__ import annotations

import orjson

from workflows import (
    ACTIVE,
    FINAL,
    STATUSES,
    AttemptKind,
    AttemptOutcome,
    ProcessStatus,
    StepKind,
    StepState,
    WaitKind,
)


def test_the_values_are_the_stored_strings() -> None:
    assert STATUSES == (
        "started",
        "running",
        "waiting",
        "completed",
        "failed",
        "compensating",
        "compensated",
        "cancelled",
    )
    assert [s.value for s in ProcessStatus] == list(STATUSES)
    assert list(StepKind) == ["call", "publish", "wait_for", "task", "parallel"]
    assert list(AttemptKind) == ["call", "publish", "wait_for", "task", "parallel", "compensate"]
    assert list(AttemptOutcome) == ["ok", "error", "timeout", "skipped"]
    assert set(StepState) == {
        "pending",
        "running",
        "waiting",
        "completed",
        "failed",
        "skipped",
        "compensated",
    }
    assert list(WaitKind) == ["delay", "retry", "event", "task", "signal", "resource"]


def test_final_and_active_split_the_statuses() -> None:
    assert {"completed", "failed", "compensated", "cancelled"} == FINAL
    assert set(ProcessStatus) == ACTIVE | FINAL
    assert not ACTIVE & FINAL
    assert [s for s in ProcessStatus if s in ACTIVE] == [
        "started",
        "running",
        "waiting",
        "compensating",
    ]


def test_a_status_is_written_as_its_string() -> None:
    status = ProcessStatus.COMPENSATED
    assert orjson.dumps({"status": status}) == b'{"status":"compensated"}'
    assert (f"workflow.{status}", str(status)) == ("workflow.compensated", "compensated")
    assert ProcessStatus("waiting") is ProcessStatus.WAITING


def test_statuses_are_plain_strings_safe_as_json_keys() -> None:
    assert all(type(s) is str for s in STATUSES)
    assert orjson.dumps({s: 0 for s in STATUSES[:1]}) == b'{"started":0}'
