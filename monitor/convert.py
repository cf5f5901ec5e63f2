"""Config entries turned into the domain's values: a workflow definition, a retry policy.

The packages below the daemon know nothing of config.yaml; the composition root
hands them values built here.
"""

from __future__ import annotations

from monitor import config as cfg
from scheduler.retry import DEFAULT_RETRY, RETRYABLE, Retry
from workflows.definition import (
    DEFAULT_TIMEOUT,
    Action,
    Call,
    Definition,
    Publish,
    Step,
    WaitFor,
)


def retry_from_config(retry: cfg.Retry, retry_on: frozenset[int] = RETRYABLE) -> Retry:
    """A config `retry:` block as a policy; `retry_on` when the block names no statuses."""
    return Retry(
        retry.max_attempts,
        retry.backoff.total_seconds(),
        retry.factor,
        retry.max_backoff.total_seconds(),
        frozenset(retry.retry_on) if retry.retry_on is not None else retry_on,
    )


def definition_from_config(workflow: cfg.Workflow) -> Definition:
    """The same frozen value as the builder's, from a validated config entry."""
    steps = []
    for step in workflow.steps:
        action: Action
        if step.call is not None:
            action = _call(step.call)
        elif step.publish is not None:
            action = Publish(step.publish)
        else:
            assert step.wait_for is not None  # the config allows exactly one action
            timeout = step.wait_for.timeout
            action = WaitFor(
                step.wait_for.event,
                dict(step.wait_for.match),
                timeout.total_seconds() if timeout else None,
            )
        retry = DEFAULT_RETRY if step.retry is None else retry_from_config(step.retry)
        steps.append(
            Step(
                step.name,
                action,
                step.delay.total_seconds() if step.delay else None,
                step.timeout.total_seconds() if step.timeout else DEFAULT_TIMEOUT,
                retry,
                _call(step.compensate) if step.compensate is not None else None,
            )
        )
    return Definition(
        workflow.name,
        tuple(steps),
        workflow.route,
        workflow.trigger.event if workflow.trigger else None,
        workflow.deadline.total_seconds() if workflow.deadline else None,
        workflow.objective,
    )


def _call(spec: cfg.Call) -> Call:
    return Call(spec.service, spec.method, spec.path, spec.body, dict(spec.headers))
