"""Probe and health metrics (DESIGN.md §4): one series set per instance, rendered directly.

With 10,000 instances these families are ~220,000 lines. Built through
prometheus_client's collector objects they took 1.7 s per scrape, all of it
blocking the event loop (every probe due meanwhile started late). So the
values are copied and the text formatted on the loop a slice of instances at a
time (`ProbeMetrics.texts`), each instance's label string built once, and the
scrape streams out as it is rendered (monitor/http/routes/operations.py). The
small families (registry, scheduler) stay in the app's CollectorRegistry, with
the runtime ones (`process_*`, `python_gc_*`, `hms_build_info`) that
monitor/metrics/runtime.py adds.

With several replicas each exports the instances it probes, labelled
`replica="<replica_id>"`: Prometheus scrapes them with `honor_labels`, so two
replicas' series of one instance (a handover) stay apart, and the rules sum
over the label.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

from monitor.health.book import Key
from monitor.health.checker import HealthChecker
from monitor.health.results import bucket_label
from registry import HealthState

STATES = tuple(HealthState)
SLICE = 250  # instances rendered per turn of the event loop: at most ~3,500 lines, a few ms


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
        """Copy every value at once (tests; a scrape copies a slice at a time, `texts`)."""
        rows = self._rows(sorted(self._checker.targets))
        return Snapshot(tuple(rows), self._boundaries(), self._maintenance())

    async def texts(self, *, maintenance: bool = True) -> AsyncIterator[str]:
        """The families as text, SLICE instances at a time, the loop free between slices.

        Copied on the loop in one go and formatted in one go in a worker thread (which
        held the GIL ~0.6 s for 11,000 instances' 230,000 lines), a scrape stalled the
        event loop up to 230 ms: every probe due and every heartbeat meanwhile waited.
        Each instance's values are copied at once (its counters and histogram agree),
        instances a few milliseconds apart.
        `maintenance=False`: no `hms_maintenance` samples (only the leader exports them)."""
        keys = sorted(self._checker.targets)
        rows: list[_Row] = []
        for start in range(0, len(keys), SLICE):
            rows += self._rows(keys[start : start + SLICE])
            await asyncio.sleep(0)
        boundaries = self._boundaries()
        for family in FAMILIES:
            for start in range(0, max(1, len(rows)), SLICE):  # HELP and TYPE even for none
                yield family(rows[start : start + SLICE], boundaries, start == 0)
                await asyncio.sleep(0)
        yield _maintenance(self._maintenance() if maintenance else ())

    def _rows(self, keys: Iterable[Key]) -> list[_Row]:
        """Rows of the instances of `keys` still probed here, copied now."""
        book, stats, targets = self._checker.book, self._checker.stats, self._checker.targets
        rows = []
        for key in keys:
            target = targets.get(key)
            if target is None:
                continue  # gone since the scrape began
            labels = self._labels.get(key)
            if labels is None:  # names are [A-Za-z0-9._-]: nothing to escape
                labels = self._labels[key] = (
                    f'instance="{key[1]}",replica="{self._replica}",service="{key[0]}"'
                )
            rows.append(
                _Row(labels, *stats.row(target.stats), book.state_of(key), book.suppressed(key))
            )
        if len(self._labels) > 2 * len(targets) + 1000:
            self._labels.clear()  # forget departed instances now and then
        return rows

    def _boundaries(self) -> tuple[str, ...]:
        return tuple(bucket_label(b) for b in self._checker.store.boundaries)

    def _maintenance(self) -> tuple[tuple[str, bool], ...]:
        book = self._checker.book
        return tuple((s, book.in_maintenance(s)) for s in sorted(self._maintenance_services()))


def render(snapshot: Snapshot) -> str:
    """The text exposition of the snapshot, every family whole."""
    rows, boundaries = list(snapshot.rows), snapshot.boundaries
    texts = [family(rows, boundaries, True) for family in FAMILIES]
    return "".join(texts) + _maintenance(snapshot.maintenance)


# Each renders its family's lines for `rows`, with its HELP and TYPE lines when `first`.
Family = Callable[[Sequence[_Row], tuple[str, ...], bool], str]


def _probes(rows: Sequence[_Row], boundaries: tuple[str, ...], first: bool) -> str:
    help_text = "Probes run outside maintenance windows, by result."
    out = [_family("hms_probe_total", "counter", help_text)] if first else []
    for row in rows:
        out.append(f'hms_probe_total{{{row.labels},result="success"}} {row.successes}\n')
        out.append(f'hms_probe_total{{{row.labels},result="failure"}} {row.failures}\n')
    return "".join(out)


def _durations(rows: Sequence[_Row], boundaries: tuple[str, ...], first: bool) -> str:
    help_text = "Response time of successful probes (SLO latency thresholds are boundaries)."
    out = [_family("hms_probe_duration_seconds", "histogram", help_text)] if first else []
    add = out.append
    for row in rows:
        cumulative = 0
        counts = row.buckets or (0,) * len(boundaries)
        for le, count in zip(boundaries, counts, strict=True):
            cumulative += count
            add(f'hms_probe_duration_seconds_bucket{{{row.labels},le="{le}"}} {cumulative}\n')
        add(f"hms_probe_duration_seconds_count{{{row.labels}}} {cumulative}\n")
        add(f"hms_probe_duration_seconds_sum{{{row.labels}}} {row.duration_sum!r}\n")
    return "".join(out)


def _success(rows: Sequence[_Row], boundaries: tuple[str, ...], first: bool) -> str:
    out = [_family("hms_probe_success", "gauge", "1 when the last probe passed.")] if first else []
    for row in rows:
        if row.last_ok is not None:
            out.append(f"hms_probe_success{{{row.labels}}} {1 if row.last_ok else 0}\n")
    return "".join(out)


def _certificates(rows: Sequence[_Row], boundaries: tuple[str, ...], first: bool) -> str:
    help_text = "When the instance's TLS certificate expires."
    name = "hms_certificate_expiry_timestamp_seconds"
    out = [_family(name, "gauge", help_text)] if first else []
    for row in rows:
        if row.certificate_expires_at is not None:
            out.append(f"{name}{{{row.labels}}} {row.certificate_expires_at!r}\n")
    return "".join(out)


def _health(rows: Sequence[_Row], boundaries: tuple[str, ...], first: bool) -> str:
    help_text = "1 for the instance's current state."
    out = [_family("hms_instance_health", "gauge", help_text)] if first else []
    for row in rows:
        for state in STATES:
            flag = 1 if state is row.state else 0
            out.append(f'hms_instance_health{{{row.labels},state="{state.value}"}} {flag}\n')
    return "".join(out)


def _suppressed(rows: Sequence[_Row], boundaries: tuple[str, ...], first: bool) -> str:
    help_text = "1 while a dependency of the instance is down (its alerts are held)."
    out = [_family("hms_instance_suppressed", "gauge", help_text)] if first else []
    for row in rows:
        out.append(f"hms_instance_suppressed{{{row.labels}}} {1 if row.suppressed else 0}\n")
    return "".join(out)


FAMILIES: tuple[Family, ...] = (_probes, _durations, _success, _certificates, _health, _suppressed)


def _maintenance(services: Iterable[tuple[str, bool]]) -> str:
    help_text = "1 while the service is in a maintenance window."
    out = [_family("hms_maintenance", "gauge", help_text)]
    for service, active in services:
        out.append(f'hms_maintenance{{service="{service}"}} {1 if active else 0}\n')
    return "".join(out)


def _family(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _escaped(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
