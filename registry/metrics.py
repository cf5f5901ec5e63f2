"""The registry's Prometheus metrics (DESIGN.md §4), collected from the catalog at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .catalog import Catalog
from .model import HealthState


class RegistryCollector(Collector):
    """Reads the catalog on scrape: no gauge to keep in step with every change."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def collect(self) -> Iterator[Metric]:
        instances = GaugeMetricFamily(
            "hms_registry_instances",
            "Instances in the registry by service and health state.",
            labels=["service", "health"],
        )
        for service, statuses in self._catalog.services().items():
            counts = dict.fromkeys(HealthState, 0)
            for status in statuses:
                counts[status.health] += 1
            for state, count in counts.items():
                instances.add_metric([service, state.value], count)
        yield instances
        yield CounterMetricFamily(
            "hms_registry_heartbeats",
            "Lease renewals accepted.",
            value=self._catalog.heartbeats_total,
        )
        yield CounterMetricFamily(
            "hms_registry_expirations",
            "Leases that lapsed (the instance turned critical).",
            value=self._catalog.expirations_total,
        )
        yield GaugeMetricFamily(
            "hms_registry_index",
            "The registry's modify index; grows on every change.",
            value=self._catalog.index,
        )
