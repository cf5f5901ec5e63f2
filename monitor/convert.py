"""Config entries turned into the domain's values: definitions, retry policies, instances.

The packages below the daemon know nothing of config.yaml; the composition root
hands them values built here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from monitor import config as cfg
from registry import Instance, ProbeSpec
from registry.conditions import Condition, parse_conditions, parse_context_condition
from scheduler.retry import DEFAULT_RETRY, RETRYABLE, Retry
from workflows.definition import (
    DEFAULT_TIMEOUT,
    Acquire,
    Action,
    Call,
    Definition,
    Parallel,
    Publish,
    Resource,
    Schedule,
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


def definition_from_config(
    workflow: cfg.Workflow, written: Any = None, variables: tuple[tuple[str, str], ...] = ()
) -> Definition:
    """The same frozen value as the builder's, from a validated config entry. Its `spec`
    (stored, shown by the API) holds each string as `written` (`${VAR}`, not the value)
    and no variable's value elsewhere either: a secret is neither stored nor served."""
    steps = [_step(step) for step in workflow.steps]
    return Definition(
        name=workflow.name,
        steps=tuple(steps),
        route=workflow.route,
        trigger=workflow.trigger.event if workflow.trigger else None,
        schedule=_schedule(workflow.trigger),
        deadline=workflow.deadline.total_seconds() if workflow.deadline else None,
        objective=workflow.objective,
        queue=workflow.queue,
        output=workflow.output,
        respond_after=workflow.respond_after,
        spec=_as_written(
            workflow.model_dump(mode="json", exclude_defaults=True), written, variables
        ),
    )


def definition_from_json(
    data: Mapping[str, Any],
    *,
    source: str = "api",
    capacities: Mapping[str, int] | None = None,
) -> Definition:
    """A stored or deployed definition (a config.yaml entry as JSON), checked as config.yaml
    is (its `acquire`s against `capacities` when given: a new definition);
    `workflows.errors.InvalidDefinition` (a ValueError) names each bad field's path.
    A stored config.yaml version has its `${VAR}`s expanded from today's environment (it
    was stored as written); an API one never is (a deployer may not read the environment)."""
    if source != "config":
        return definition_from_config(cfg.parse_workflow(data, capacities))
    return definition_from_config(cfg.parse_workflow(cfg.expand_variables(data)), data)


def _as_written(dumped: Any, written: Any, variables: tuple[tuple[str, str], ...]) -> Any:
    """`dumped` (a validated entry as JSON) with each string that had `$` in `written`
    (the entry before expansion) as written; where the two differ in shape, each
    variable's value left in a string is put back as its `${VAR}`."""
    if isinstance(written, str) and "$" in written:
        return written
    if isinstance(dumped, dict):
        at = written if isinstance(written, dict) else {}
        return {k: _as_written(v, at.get(k), variables) for k, v in dumped.items()}
    if isinstance(dumped, list):
        same = isinstance(written, list) and len(written) == len(dumped)
        return [
            _as_written(v, written[i] if same else None, variables) for i, v in enumerate(dumped)
        ]
    if isinstance(dumped, str) and written is None:  # not where it was written: moved
        for value, form in variables:
            if len(value) >= cfg.MIN_HIDDEN_ELSEWHERE:  # "1" would change every "1" in it
                dumped = dumped.replace(value, form)
    return dumped


def _acquire(spec: cfg.Acquire | None) -> Acquire | None:
    if spec is None:
        return None
    return Acquire(resource=spec.resource, units=spec.units, key=spec.key)


def resources_from_config(config: cfg.Config) -> list[Resource]:
    return [Resource(name=r.name, capacity=r.capacity) for r in config.resources]


def _schedule(trigger: cfg.Trigger | None) -> Schedule | None:
    if trigger is None or trigger.schedule is None:
        return None
    return Schedule(cron=trigger.schedule, timezone=trigger.timezone or "UTC")


def _step(step: cfg.Step) -> Step:
    action: Action
    if step.call is not None:
        action = _call(step.call)
    elif step.publish is not None:
        action = Publish(topic=step.publish, data=step.data)
    elif step.task is not None:
        action = Task(name=step.task)
    elif step.parallel is not None:
        action = Parallel(branches=tuple(_step(branch) for branch in step.parallel))
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
    return Step(
        name=step.name,
        action=action,
        delay=step.delay.total_seconds() if step.delay else None,
        timeout=step.timeout.total_seconds() if step.timeout else DEFAULT_TIMEOUT,
        retry=retry,
        compensate=_compensation(step.compensate),
        when=_when(step.when),
        acquire=_acquire(step.acquire),
        expect=parse_conditions(step.expect),  # checked by the config already
    )


def _when(when: str | list[str] | None) -> tuple[Condition, ...]:
    """A step's `when`, parsed (config checks made sure it parses)."""
    texts = [when] if isinstance(when, str) else (when or [])
    return tuple(parse_context_condition(text) for text in texts)


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
    return [
        definition_from_config(workflow, config.workflow_as_written(i), config.variables)
        for i, workflow in enumerate(config.workflows)
    ]


def bus_topic_label(definitions: list[Definition], config: cfg.Config) -> Callable[[str], str]:
    """The bus's metric label for a topic: the topics workflows and notifications name."""
    return topic_label(definitions, (e for n in config.notifications for e in n.events))


def tokens(config: cfg.Config) -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, token, scopes) of each configured token."""
    auth = config.server.auth
    if auth is None:
        return []
    return [(t.name, t.token.get_secret_value(), t.scopes) for t in auth.tokens]


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
