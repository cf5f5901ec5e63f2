"""The probe results' store interface, and the rows that cross it.

Rows are plain tuples, as the buffer (`ProbeResults`) batches them: a flush hands over
thousands at a time and a record per row would cost more than the write. Implementations
live in `monitor/health/stores/`."""

from __future__ import annotations

from typing import Any, Protocol

# Raw results are kept two days whatever the SLO retention; minutes and hours follow it.
RAW_RETENTION = 2 * 86400.0

# service, instance, at, ok (0/1), response_time, status, error, failing (JSON list), maintenance
RawRow = tuple[str, str, float, int, float, int | None, str | None, str | None, int]
# service, instance, minute, count, successes, latency_sum, buckets (JSON: cumulative count
# per `le`, as Prometheus buckets are), maintenance
MinuteRow = tuple[str, str, int, int, int, float, str, int]
DayRow = tuple[str, int, int, int]  # service, day, count, successes
HourRow = tuple[str, int, int, int, float]  # service, hour, count, successes, latency_sum


class ResultStore(Protocol):
    """Probe results on disk: raw results, per-minute aggregates per instance (the SLOs'),
    and a per-service hourly rollup (the status page's uptime bars)."""

    async def open(self, now: float) -> tuple[list[DayRow], list[HourRow]]:
        """Create the tables if need be; return the rollup the uptime bars restore from:
        whole days of the last UPTIME_DAYS, single hours of the last SPARK_HOURS."""
        ...

    async def write(
        self, raw: list[RawRow], minutes: list[MinuteRow], hours: list[HourRow]
    ) -> None:
        """Store all three in one transaction. A minute or hour already stored is added to
        (counts, sums and buckets): one written at shutdown may come again after a restart."""
        ...

    async def prune(self, now: float, retention: float) -> None:
        """Drop raw results older than RAW_RETENTION, minutes and hours older than
        `retention` (seconds before `now`)."""
        ...

    async def minutes(self, service: str, since: float, until: float) -> list[dict[str, Any]]:
        """A service's minutes in [since, until), by minute then instance, `buckets` decoded:
        instance, minute, count, successes, latency_sum, buckets, maintenance."""
        ...

    async def raw(self, service: str, instance: str) -> list[dict[str, Any]]:
        """An instance's raw results by time: at, ok, response_time, status, error, failing,
        maintenance."""
        ...
