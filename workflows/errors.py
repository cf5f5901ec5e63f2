"""What the workflow engine refuses: plain exceptions, mapped to HTTP at the edge."""

from __future__ import annotations


class WorkflowError(Exception):
    """A request the engine refuses."""


class UnknownWorkflow(WorkflowError, LookupError):
    """No workflow of that name is defined."""


class UnknownProcess(WorkflowError, LookupError):
    """No process with that id."""


class InvalidDefinition(WorkflowError, ValueError):
    """A definition sent as JSON does not validate: (JSON path, message) pairs, the path
    as pydantic's `loc` joined with dots (`steps.1.call.service`)."""

    def __init__(self, problems: list[tuple[str, str]] | str) -> None:
        if isinstance(problems, str):
            problems = [("(top level)", problems)]
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems


class DefinitionConflict(WorkflowError):
    """config.yaml defines that workflow: the API may not replace it."""


class ProcessFinished(WorkflowError):
    """The process has ended already (a cancel came too late)."""


class Fenced(WorkflowError):
    """A checkpoint of a process this replica no longer owns: another replica claimed it
    (`ProcessStore.claim_orphans`) after taking this one for dead. Nothing was written; the
    replica drops the process and leaves it to its owner."""
