"""The cluster's gauges, read from the membership at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .membership import Membership


class ClusterCollector(Collector):
    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    def collect(self) -> Iterator[Metric]:
        membership = self._membership
        yield GaugeMetricFamily(
            "hms_cluster_members",
            "Live replicas as this one sees them (itself alone while cut from the database)",
            value=len(membership.members),
        )
        leader = GaugeMetricFamily(
            "hms_cluster_leader",
            "1 while this replica leads the singleton jobs (retention, reaping, SLO events)",
            labels=["replica"],
        )
        leader.add_metric([membership.replica_id], 1.0 if membership.is_leader else 0.0)
        yield leader
