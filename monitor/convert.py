"""Config entries turned into the domain's values: definitions, retry policies, instances.

The packages below the daemon know nothing of config.yaml; the composition root
hands them values built here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from monitor import config as cfg
from registry import Instance, ProbeSpec
from scheduler.retry import DEFAULT_RETRY, RETRYABLE, Retry
from workflows.definition import (
    DEFAULT_TIMEOUT,
    Action,
    Call,
    Definition,
    Publish,
    Step,
    Task,
    WaitFor,
)
from workflows.metrics import topic_label


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
            action = Publish(topic=step.publish, data=step.data)
        elif step.task is not None:
            action = Task(name=step.task)
        else:
            assert step.wait_for is not None  # the config allows exactly one action
            timeout = step.wait_for.timeout
            action = WaitFor(
                event=step.wait_for.event,
                signal=step.wait_for.signal,
                match=dict(step.wait_for.match),
                timeout=timeout.total_seconds() if timeout else None,
            )
        retry = DEFAULT_RETRY if step.retry is None else retry_from_config(step.retry)
        steps.append(
            Step(
                name=step.name,
                action=action,
                delay=step.delay.total_seconds() if step.delay else None,
                timeout=step.timeout.total_seconds() if step.timeout else DEFAULT_TIMEOUT,
                retry=retry,
                compensate=_compensation(step.compensate),
            )
        )
    return Definition(
        name=workflow.name,
        steps=tuple(steps),
        route=workflow.route,
        trigger=workflow.trigger.event if workflow.trigger else None,
        deadline=workflow.deadline.total_seconds() if workflow.deadline else None,
        objective=workflow.objective,
        queue=workflow.queue,
        output=workflow.output,
        respond_after=workflow.respond_after,
        spec=workflow.model_dump(mode="json", exclude_defaults=True),
    )


def definition_from_json(data: Mapping[str, Any]) -> Definition:
    """A stored or deployed definition (a config.yaml entry as JSON), checked as config.yaml
    is; `workflows.errors.InvalidDefinition` (a ValueError) names each bad field's path."""
    return definition_from_config(cfg.parse_workflow(data))


def _compensation(spec: cfg.Call | cfg.TaskCompensation | None) -> Call | Task | None:
    if spec is None:
        return None
    return Task(name=spec.task) if isinstance(spec, cfg.TaskCompensation) else _call(spec)


def _call(spec: cfg.Call) -> Call:
    return Call(
        service=spec.service,
        method=spec.method,
        path=spec.path,
        body=spec.body,
        headers=dict(spec.headers),
    )


def definitions_from_config(config: cfg.Config) -> list[Definition]:
    return [definition_from_config(workflow) for workflow in config.workflows]


def bus_topic_label(definitions: list[Definition], config: cfg.Config) -> Callable[[str], str]:
    """The bus's metric label for a topic: the topics workflows and notifications name."""
    return topic_label(definitions, (e for n in config.notifications for e in n.events))


def tokens(config: cfg.Config) -> list[tuple[str, tuple[str, ...]]]:
    auth = config.server.auth
    return [] if auth is None else [(t.token.get_secret_value(), t.scopes) for t in auth.tokens]


def protect_reads(config: cfg.Config) -> bool:
    return config.server.auth is not None and config.server.auth.protect_reads


def dependencies(config: cfg.Config) -> dict[str, tuple[str, ...]]:
    return {s.name: tuple(s.depends_on) for s in config.services}


def service_probes(config: cfg.Config) -> dict[str, ProbeSpec]:
    return {s.name: s.probe for s in config.services if s.probe is not None}


def static_instances(config: cfg.Config) -> list[Instance]:
    return [
        Instance(
            service=service.name,
            id=instance.id,
            url=instance.url,
            tags=service.tags,
            meta={**service.meta, **instance.meta},
            probe=service.probe,
            static=True,
        )
        for service in config.services
        for instance in service.instances
    ]
