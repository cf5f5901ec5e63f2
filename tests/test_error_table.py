"""Core errors are plain exceptions; the one table at the HTTP edge gives each its answer."""

from __future__ import annotations

import pytest

from monitor.http.errors import STATUS, status_of
from registry.errors import Conflict, Overloaded, RegistryError, StoreUnavailable, UnknownInstance
from registry.storable import MalformedJson, UnstorableJson
from workflows.errors import (
    DefinitionConflict,
    InvalidDefinition,
    ProcessFinished,
    UnknownProcess,
    UnknownWorkflow,
    WorkflowError,
)

ANSWERS = [
    (UnknownInstance, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (StoreUnavailable, 503, "storage_unavailable"),
    (Overloaded, 503, "overloaded"),
    (UnknownWorkflow, 404, "not_found"),
    (UnknownProcess, 404, "not_found"),
    (ProcessFinished, 409, "conflict"),
    (DefinitionConflict, 409, "conflict"),
    (InvalidDefinition, 422, "invalid"),
    (MalformedJson, 400, "malformed_json"),
    (UnstorableJson, 422, "invalid"),
    # A refusal added later without a row of its own answers as its base, never a 500.
    (RegistryError, 400, "bad_request"),
    (WorkflowError, 400, "bad_request"),
]


@pytest.mark.parametrize(("error", "status", "code"), ANSWERS)
def test_each_core_error_has_its_status_and_code(
    error: type[Exception], status: int, code: str
) -> None:
    assert status_of(error("why")) == (status, code)


def test_every_core_error_class_is_answered() -> None:
    def subclasses(cls: type[Exception]) -> list[type[Exception]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    every = [
        c for base in (RegistryError, WorkflowError, StoreUnavailable) for c in subclasses(base)
    ]
    assert {c for c in every if status_of(c("why")) is None} == set()
    assert set(STATUS) <= {error for error, _, _ in ANSWERS}
