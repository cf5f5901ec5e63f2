"""Probe and health metrics (DESIGN.md §4): one series set per instance, rendered directly.

With 10,000 instances these families are ~220,000 lines. Built through
prometheus_client's collector objects they took 1.7 s per scrape, all of it
blocking the event loop (every probe due meanwhile started late). So the
values are copied on the loop (a few milliseconds) and the text is formatted
in a worker thread from that copy, with each instance's label string built
once. The small families (registry, scheduler) stay in the app's
CollectorRegistry, with the runtime ones (`process_*`, `python_gc_*`,
`hms_build_info`) that monitor/metrics/runtime.py adds.

With several replicas each exports the instances it probes, labelled
`replica="<replica_id>"`: Prometheus scrapes them with `honor_labels`, so two
replicas' series of one instance (a handover) stay apart, and the rules sum
over the label.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from monitor.health.checker import HealthChecker
from monitor.health.results import bucket_label
from registry import HealthState

STATES = tuple(HealthState)


@dataclass(frozen=True, slots=True)
class _Row:
    labels: str  # 'instance="p1",replica="r1",service="payments"'
    successes: int
    failures: int
    buckets: tuple[int, ...]
    duration_sum: float
    last_ok: bool | None
    certificate_expires_at: float | None
    state: HealthState
    suppressed: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    rows: tuple[_Row, ...]
    boundaries: tuple[str, ...]
    maintenance: tuple[tuple[str, bool], ...]


class ProbeMetrics:
    def __init__(
        self,
        checker: HealthChecker,
        maintenance_services: Callable[[], Iterable[str]],
        *,
        replica: str = "",
    ) -> None:
        """`replica`: this replica's id (`cluster.replica_id`; empty: host name and pid)."""
        self._checker = checker
        self._replica = _escaped(replica or f"{socket.gethostname()}-{os.getpid()}")
        self._maintenance_services = maintenance_services  # the calendar's, after reloads too
        self._labels: dict[tuple[str, str], str] = {}

    def snapshot(self) -> Snapshot:
        """Copy every value; runs on the event loop, so the copy is consistent."""
        book = self._checker.book
        rows = []
        stats = self._checker.stats
        for key, target in sorted(self._checker.targets.items()):  # the ones probed here
            labels = self._labels.get(key)
            if labels is None:  # names are [A-Za-z0-9._-]: nothing to escape
                labels = self._labels[key] = (
                    f'instance="{key[1]}",replica="{self._replica}",service="{key[0]}"'
                )
            rows.append(
                _Row(labels, *stats.row(target.stats), book.state_of(key), book.suppressed(key))
            )
        if len(self._labels) > 2 * len(rows) + 1000:
            self._labels.clear()  # forget departed instances now and then
        boundaries = tuple(bucket_label(b) for b in self._checker.store.boundaries)
        services = sorted(self._maintenance_services())
        maintenance = tuple((s, book.in_maintenance(s)) for s in services)
        return Snapshot(tuple(rows), boundaries, maintenance)


def render(snapshot: Snapshot) -> str:
    """The text exposition of the snapshot (safe to run in a worker thread)."""
    out: list[str] = []
    add = out.append
    rows = snapshot.rows

    _family(add, "hms_probe_total", "counter", "Probes run outside maintenance windows, by result.")
    for row in rows:
        add(f'hms_probe_total{{{row.labels},result="success"}} {row.successes}\n')
        add(f'hms_probe_total{{{row.labels},result="failure"}} {row.failures}\n')

    _family(
        add,
        "hms_probe_duration_seconds",
        "histogram",
        "Response time of successful probes (SLO latency thresholds are boundaries).",
    )
    for row in rows:
        cumulative = 0
        counts = row.buckets or (0,) * len(snapshot.boundaries)
        for le, count in zip(snapshot.boundaries, counts, strict=True):
            cumulative += count
            add(f'hms_probe_duration_seconds_bucket{{{row.labels},le="{le}"}} {cumulative}\n')
        add(f"hms_probe_duration_seconds_count{{{row.labels}}} {cumulative}\n")
        add(f"hms_probe_duration_seconds_sum{{{row.labels}}} {row.duration_sum!r}\n")

    _family(add, "hms_probe_success", "gauge", "1 when the last probe passed.")
    for row in rows:
        if row.last_ok is not None:
            add(f"hms_probe_success{{{row.labels}}} {1 if row.last_ok else 0}\n")

    _family(
        add,
        "hms_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the instance's TLS certificate expires.",
    )
    for row in rows:
        if row.certificate_expires_at is not None:
            value = row.certificate_expires_at
            add(f"hms_certificate_expiry_timestamp_seconds{{{row.labels}}} {value!r}\n")

    _family(add, "hms_instance_health", "gauge", "1 for the instance's current state.")
    for row in rows:
        for state in STATES:
            flag = 1 if state is row.state else 0
            add(f'hms_instance_health{{{row.labels},state="{state.value}"}} {flag}\n')

    _family(
        add,
        "hms_instance_suppressed",
        "gauge",
        "1 while a dependency of the instance is down (its alerts are held).",
    )
    for row in rows:
        add(f"hms_instance_suppressed{{{row.labels}}} {1 if row.suppressed else 0}\n")

    _family(add, "hms_maintenance", "gauge", "1 while the service is in a maintenance window.")
    for service, active in snapshot.maintenance:
        add(f'hms_maintenance{{service="{service}"}} {1 if active else 0}\n')
    return "".join(out)


def _family(add: Callable[[str], None], name: str, kind: str, help_text: str) -> None:
    add(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")


def _escaped(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
