"""Probe and health metrics (DESIGN.md §4), collected from the checker's state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from registry import HealthState

from .checker import HealthChecker
from .results import bucket_label

LABELS = ["service", "instance"]


class ProbeCollector(Collector):
    def __init__(self, checker: HealthChecker, maintenance_services: frozenset[str]) -> None:
        self._checker = checker
        self._maintenance_services = maintenance_services

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "hms_probe", "Probes run, by result.", labels=[*LABELS, "result"]
        )
        duration = HistogramMetricFamily(
            "hms_probe_duration_seconds",
            "Response time of successful probes (SLO latency thresholds are boundaries).",
            labels=LABELS,
        )
        success = GaugeMetricFamily(
            "hms_probe_success", "1 when the last probe passed.", labels=LABELS
        )
        expiry = GaugeMetricFamily(
            "hms_certificate_expiry_timestamp_seconds",
            "When the instance's TLS certificate expires.",
            labels=LABELS,
        )
        health = GaugeMetricFamily(
            "hms_instance_health",
            "1 for the instance's current state.",
            labels=[*LABELS, "state"],
        )
        suppressed = GaugeMetricFamily(
            "hms_instance_suppressed",
            "1 while a dependency of the instance is down (its alerts are held).",
            labels=LABELS,
        )
        book = self._checker.book
        for key, target in sorted(self._checker.targets.items()):
            stats, labels = target.stats, list(key)
            total.add_metric([*labels, "success"], stats.successes)
            total.add_metric([*labels, "failure"], stats.failures)
            cumulative, buckets = 0, []
            counts = stats.buckets or [0] * len(stats.boundaries)
            for boundary, count in zip(stats.boundaries, counts, strict=True):
                cumulative += count
                buckets.append((bucket_label(boundary), cumulative))
            duration.add_metric(labels, buckets, stats.duration_sum)
            if stats.last_ok is not None:
                success.add_metric(labels, 1.0 if stats.last_ok else 0.0)
            if stats.certificate_expires_at is not None:
                expiry.add_metric(labels, stats.certificate_expires_at)
            state = book.state_of(key)
            for candidate in HealthState:
                health.add_metric([*labels, candidate.value], 1.0 if candidate is state else 0.0)
            suppressed.add_metric(labels, 1.0 if book.suppressed(key) else 0.0)
        yield from (total, duration, success, expiry, health, suppressed)
        maintenance = GaugeMetricFamily(
            "hms_maintenance", "1 while the service is in a maintenance window.", labels=["service"]
        )
        for service in sorted(self._maintenance_services):
            maintenance.add_metric([service], 1.0 if book.in_maintenance(service) else 0.0)
        yield maintenance
