"""Probe results on their way to disk: raw results for two days, per-minute aggregates for
the SLOs, an hourly rollup for the uptime bars.

Nothing touches storage per probe. Results collect in memory (`ProbeResults`); a flush job
hands the raw ones and each instance's minute once the minute is over (the current minute
too at shutdown, merged on conflict) to the ResultStore in one write, so 10,000 probes a
second cost a few statements a second.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.health.abc import RAW_RETENTION, HourRow, MinuteRow, RawRow, ResultStore
from monitor.health.uptime import Uptime
from monitor.probing.probe import ProbeResult

__all__ = ["RAW_RETENTION", "ProbeResults", "bucket_index", "bucket_label"]

MAX_UNFLUSHED_RAW = 200_000  # ~20 s of 10k instances at 1 s; minutes are never dropped

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(kw_only=True, slots=True)
class Minute:
    """One instance's probes within one minute (maintenance-time probes counted apart)."""

    count: int = 0
    successes: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=list)  # per boundary, not cumulative; last: +Inf
    maintenance: int = 0


@functools.lru_cache(maxsize=1024)
def _failing_json(failing: tuple[str, ...]) -> str:
    """An outage fails thousands of probes the same way: encode each way once."""
    return json.dumps(list(failing))


def bucket_index(boundaries: tuple[float, ...], value: float) -> int:
    """The bucket `value` falls in: the first boundary >= value (`le`), +Inf last."""
    return bisect.bisect_left(boundaries, value)


def bucket_label(boundary: float) -> str:
    """`le` as prometheus_client renders it (0.3 -> "0.3", 1 -> "1.0", +Inf)."""
    return "+Inf" if math.isinf(boundary) else repr(float(boundary))


class ProbeResults:
    """The buffer between the probes and the ResultStore, and the uptime kept in memory."""

    def __init__(self, store: ResultStore, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self._store = store
        self.uptime = Uptime()
        self.boundaries = (*sorted(set(buckets)), math.inf)
        self._raw: list[RawRow] = []
        self._minutes: dict[tuple[str, str, int], Minute] = {}

    async def create_tables(self, now: float) -> None:
        """Open the store (its tables) and restore the uptime bars from its rollup."""
        days, hours = await self._store.open(now)
        self.uptime.restore(days, hours, now)

    def add(
        self,
        service: str,
        instance: str,
        result: ProbeResult,
        *,
        ok: bool,
        failing: Sequence[str] = (),
        maintenance: bool = False,
    ) -> None:
        self._raw.append(
            (
                service,
                instance,
                result.at,
                int(ok),
                result.response_time,
                result.status,
                result.error,
                _failing_json(tuple(failing)) if failing else None,
                int(maintenance),
            )
        )
        key = (service, instance, int(result.at // 60))
        minute = self._minutes.get(key)
        if minute is None:
            minute = self._minutes[key] = Minute(buckets=[0] * len(self.boundaries))
        if maintenance:  # excluded from both good and valid events
            minute.maintenance += 1
            return
        minute.count += 1
        minute.successes += ok
        if ok:  # latency SLIs count successful probes under a threshold
            minute.latency_sum += result.response_time
            minute.buckets[bucket_index(self.boundaries, result.response_time)] += 1

    async def flush(self, now: float, *, everything: bool = False) -> int:
        """Write buffered raw results and finished minutes (all minutes with `everything`)."""
        raw, self._raw = self._raw, []
        current = int(now // 60)
        done = {k: m for k, m in self._minutes.items() if everything or k[2] < current}
        for key in done:
            del self._minutes[key]
        if not raw and not done:
            return 0
        rows: list[MinuteRow] = [
            (*key, m.count, m.successes, m.latency_sum, self._encode(m.buckets), m.maintenance)
            for key, m in done.items()
        ]
        hours = _by_hour(done)
        try:
            await self._store.write(raw, rows, hours)
        except Exception:
            self._requeue(raw, done)
            raise
        self.uptime.add(hours, now)
        return len(raw)

    def _requeue(self, raw: list[RawRow], done: dict[tuple[str, str, int], Minute]) -> None:
        """Keep what a failed flush did not store (storage full or read-only) for the next
        one. Minutes are small and all kept; raw results are capped, oldest dropped first."""
        for key, minute in done.items():
            self._minutes.setdefault(key, minute)
        self._raw = raw + self._raw
        dropped = len(self._raw) - MAX_UNFLUSHED_RAW
        if dropped > 0:
            del self._raw[:dropped]
            log.warning("storage failing: dropped %d raw probe results (minutes kept)", dropped)

    async def prune(self, now: float, retention: float) -> None:
        await self._store.prune(now, retention)

    async def minutes(self, service: str, since: float, until: float) -> list[dict[str, Any]]:
        """Stored per-minute aggregates of a service, oldest first."""
        return await self._store.minutes(service, since, until)

    async def raw(self, service: str, instance: str) -> list[dict[str, Any]]:
        return await self._store.raw(service, instance)

    def _encode(self, counts: list[int]) -> str:
        """Cumulative counts keyed by `le`, as Prometheus buckets are."""
        total, cumulative = 0, {}
        for boundary, count in zip(self.boundaries, counts, strict=True):
            total += count
            cumulative[bucket_label(boundary)] = total
        return json.dumps(cumulative)


def _by_hour(minutes: dict[tuple[str, str, int], Minute]) -> list[HourRow]:
    sums: dict[tuple[str, int], list[float]] = {}
    for (service, _, minute), m in minutes.items():
        total = sums.setdefault((service, minute // 60), [0, 0, 0.0])
        total[0] += m.count
        total[1] += m.successes
        total[2] += m.latency_sum
    return [(s, h, int(c), int(ok), lat) for (s, h), (c, ok, lat) in sums.items()]
