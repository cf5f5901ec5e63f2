"""Workflow and event metrics (DESIGN.md §4); label values come from the config, so bounded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.bus import DAEMON_TOPICS

from .definition import Definition, Publish, Task, WaitFor
from .states import AttemptOutcome, ProcessStatus

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
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


class ProcessCollector(Collector):
    """`hms_workflow_processes{workflow,status}` and `hms_events_published_total{topic}`."""

    def __init__(
        self,
        counts: Callable[[], Counter[tuple[str, str]]],
        published: Callable[[], Counter[str]],
    ) -> None:
        self._counts, self._published = counts, published

    def collect(self) -> Iterator[Metric]:
        processes = GaugeMetricFamily(
            "hms_workflow_processes",
            "Processes held (finished ones until process_retention), by status.",
            labels=["workflow", "status"],
        )
        for (workflow, status), count in sorted(self._counts().items()):
            processes.add_metric([workflow, status], count)
        yield processes
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
