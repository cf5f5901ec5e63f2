"""What the workflow engine refuses: plain exceptions, mapped to HTTP at the edge."""

from __future__ import annotations


class WorkflowError(Exception):
    """A request the engine refuses."""


class UnknownWorkflow(WorkflowError, LookupError):
    """No workflow of that name is defined."""


class UnknownProcess(WorkflowError, LookupError):
    """No process with that id."""


class ProcessFinished(WorkflowError):
    """The process has ended already (a cancel came too late)."""
