"""Workflow and event metrics (DESIGN.md §4); label values come from the config, so bounded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.bus import DAEMON_TOPICS

from .definition import Definition, Publish, Task, WaitFor
from .states import AttemptOutcome, ProcessStatus

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A freed unit's handover: one commit, then a wakeup (bench goal: p99 < 10 ms).
GRANT_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1)
OTHER_TOPIC = "other"
GLOB = frozenset("*?[")


def topic_label(definitions: Iterable[Definition], named: Iterable[str]) -> Callable[[str], str]:
    """The `topic` label of `hms_events_published_total`: whoever may publish may invent
    topics, so only the daemon's own and those the config names (workflow triggers, publish
    and wait_for steps, `named`: notification events) count by name; the rest as "other"."""
    known = {topic for topic in named if not GLOB & set(topic)}
    for definition in definitions:
        if definition.trigger is not None:
            known.add(definition.trigger)
        for step in definition.all_steps():  # a parallel step's branches too
            if isinstance(step.action, Publish):
                known.add(step.action.topic)
            elif isinstance(step.action, WaitFor) and step.action.event is not None:
                known.add(step.action.event)
    frozen = frozenset(known)

    def label(topic: str) -> str:
        return topic if topic in frozen or topic.startswith(DAEMON_TOPICS) else OTHER_TOPIC

    return label


class WorkflowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._started = PromCounter(
            "hms_workflow_started", "Processes started.", ["workflow"], registry=registry
        )
        self._finished = PromCounter(
            "hms_workflow_finished",
            "Processes that ended, by status.",
            ["workflow", "status"],
            registry=registry,
        )
        self._duration = Histogram(
            "hms_workflow_duration_seconds",
            "Start to end of a process.",
            ["workflow"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._step = Histogram(
            "hms_workflow_step_duration_seconds",
            "One attempt of a step (a call, a publish, a wait, a compensation).",
            ["workflow", "step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self._attempts = PromCounter(
            "hms_workflow_step_attempts",
            "Step attempts by result (ok, error, timeout, skipped).",
            ["workflow", "step", "result"],
            registry=registry,
        )
        self._missed = PromCounter(
            "hms_workflow_deadline_missed",
            "Processes past their deadline.",
            ["workflow"],
            registry=registry,
        )
        self._grants = Histogram(
            "hms_resource_grant_seconds",
            "From a release freeing units to the next holder resuming to run its step "
            "(the handover's commit included).",
            ["resource"],
            buckets=GRANT_BUCKETS,
            registry=registry,
        )

    def declare(self, workflow: str) -> None:
        """Series at zero from the start, so rates and alerts see a defined counter."""
        self._started.labels(workflow)
        self._missed.labels(workflow)

    def started(self, workflow: str) -> None:
        self._started.labels(workflow).inc()

    def finished(self, workflow: str, status: ProcessStatus, seconds: float) -> None:
        self._finished.labels(workflow, status).inc()
        self._duration.labels(workflow).observe(seconds)

    def attempt(self, workflow: str, step: str, result: AttemptOutcome, seconds: float) -> None:
        self._attempts.labels(workflow, step, result).inc()
        self._step.labels(workflow, step).observe(seconds)

    def deadline_missed(self, workflow: str) -> None:
        self._missed.labels(workflow).inc()

    def granted(self, resource: str, seconds: float) -> None:
        """A waiter resumes `seconds` after the release that freed its units."""
        self._grants.labels(resource).observe(seconds)


class CallMetrics:
    """`hms_service_calls_total{service,result}` and `hms_service_call_duration_seconds{service}`:
    workflow calls to each service, the `source: calls` SLIs' events (DESIGN.md §4).

    As with probes, only calls the service served go into the histogram, so a latency SLI
    `1 - fast / total` counts a failure as not fast. Series are cached per service: the
    counting runs on every call of every process."""

    def __init__(self, registry: CollectorRegistry, buckets: Iterable[float]) -> None:
        self._calls = PromCounter(
            "hms_service_calls",
            "Workflow calls to the service (each attempt, compensations too), by result: "
            "failure is no answer (no instance, connection, timeout), a 5xx or a step's "
            "retry_on status.",
            ["service", "result"],
            registry=registry,
        )
        self._duration = Histogram(
            "hms_service_call_duration_seconds",
            "Answer time of the workflow calls the service served; SLO latency thresholds "
            "are bucket boundaries.",
            ["service"],
            buckets=tuple(buckets),
            registry=registry,
        )
        self._series: dict[str, tuple[PromCounter, PromCounter, Histogram]] = {}

    def declare(self, service: str) -> tuple[PromCounter, PromCounter, Histogram]:
        """Both results at zero from the start, so an error ratio has a numerator."""
        series = self._series.get(service)
        if series is None:
            series = (
                self._calls.labels(service, "success"),
                self._calls.labels(service, "failure"),
                self._duration.labels(service),
            )
            self._series[service] = series
        return series

    def observe(self, service: str, served: bool, seconds: float) -> None:
        success, failure, duration = self._series.get(service) or self.declare(service)
        if served:
            success.inc()
            duration.observe(seconds)
        else:
            failure.inc()


class ProcessCollector(Collector):
    """`hms_workflow_processes{workflow,status}`, `hms_workflow_processes_in_memory` and
    `hms_events_published_total{topic}`."""

    def __init__(
        self,
        counts: Callable[[], Counter[tuple[str, str]]],
        published: Callable[[], Counter[str]],
        in_memory: Callable[[], int] = lambda: 0,
    ) -> None:
        self._counts, self._published, self._in_memory = counts, published, in_memory

    def collect(self) -> Iterator[Metric]:
        processes = GaugeMetricFamily(
            "hms_workflow_processes",
            "Processes held (finished ones until process_retention), by status.",
            labels=["workflow", "status"],
        )
        for (workflow, status), count in sorted(self._counts().items()):
            processes.add_metric([workflow, status], count)
        yield processes
        yield GaugeMetricFamily(
            "hms_workflow_processes_in_memory",
            "Unfinished processes the engine holds in memory: those running or due within "
            "its horizon; the others wait as rows.",
            value=self._in_memory(),
        )
        events = CounterMetricFamily(
            "hms_events_published",
            'Events published on the bus, by topic (topics the config does not name: "other").',
            labels=["topic"],
        )
        for topic, count in sorted(self._published().items()):
            events.add_metric([topic], count)
        yield events


class TaskCollector(Collector):
    """`hms_task_queue_depth{queue}` and `hms_task_workers{queue}` (workflows/tasks.py),
    for the queues the definitions name: a poll may name any queue, a label may not."""

    def __init__(
        self,
        queues: Callable[[], Iterable[str]],
        depths: Callable[[], dict[str, int]],
        workers: Callable[[], dict[str, int]],
    ) -> None:
        self._queues, self._depths, self._workers = queues, depths, workers

    def collect(self) -> Iterator[Metric]:
        queues = sorted(set(self._queues()))
        depths, workers = self._depths(), self._workers()
        depth = GaugeMetricFamily(
            "hms_task_queue_depth", "Tasks due, waiting for a worker.", labels=["queue"]
        )
        polling = GaugeMetricFamily(
            "hms_task_workers",
            "Workers that polled the queue in the last minute.",
            labels=["queue"],
        )
        for queue in queues:
            depth.add_metric([queue], depths.get(queue, 0))
            polling.add_metric([queue], workers.get(queue, 0))
        yield depth
        yield polling


def task_queues(definitions: Iterable[Definition]) -> set[str]:
    """The queues the definitions' task steps and task compensations go to."""
    return {
        definition.task_queue
        for definition in definitions
        for step in definition.steps
        if isinstance(step.action, Task) or isinstance(step.compensate, Task)
    }


class ResourceCollector(Collector):
    """`hms_resource_in_use{resource}` (units held) and `hms_resource_waiting{resource}`
    (requests queued) from the pool's memory (workflows/resources.py), for the resources
    the config defines: a series per resource, at zero when idle."""

    def __init__(
        self,
        capacities: Callable[[], Mapping[str, int]],
        in_use: Callable[[], Mapping[str, int]],
        waiting: Callable[[], Mapping[str, int]],
    ) -> None:
        self._capacities, self._in_use, self._waiting = capacities, in_use, waiting

    def collect(self) -> Iterator[Metric]:
        names = sorted(self._capacities())
        in_use, waiting = self._in_use(), self._waiting()
        held = GaugeMetricFamily(
            "hms_resource_in_use",
            "Units of the resource held by processes (across its keys).",
            labels=["resource"],
        )
        queued = GaugeMetricFamily(
            "hms_resource_waiting",
            "Processes waiting for units of the resource.",
            labels=["resource"],
        )
        for name in names:
            held.add_metric([name], in_use.get(name, 0))
            queued.add_metric([name], waiting.get(name, 0))
        yield held
        yield queued
