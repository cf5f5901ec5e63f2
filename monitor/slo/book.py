"""The SLO book: every configured SLO's ledger, fed by probe results, evaluated by a
job that publishes burn and exhaustion events; its minutes kept in a SloMinuteStore."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from monitor.config import Service, Slo
from monitor.slo.abc import SloMinuteStore
from monitor.slo.ledger import SloLedger, ledger_report, months_around
from monitor.slo.tiers import TIERS
from registry import format_duration
from scheduler import EventBus


@dataclass(slots=True)
class _Tracked:
    service: str
    slo: Slo
    ledger: SloLedger
    threshold: float | None  # latency SLO: seconds
    period_name: str = ""
    labels: str = ""
    factors: tuple[float, ...] = ()  # per TIERS entry, scaled to the SLO's period
    firing: set[str] = field(default_factory=set)  # burn tiers currently over
    exhausted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SloSummary:
    name: str
    budget: float | None  # error budget remaining, ratio
    sla: float | None  # this calendar month's availability, ratio


class SloBook:
    """Every configured SLO's ledger, fed by probe results (`source: probes`) or by the
    workflow calls made to the service (`source: calls`), evaluated by a job."""

    def __init__(
        self,
        services: Iterable[Service],
        *,
        bus: EventBus,
        timezone: str = "UTC",
        store: SloMinuteStore | None = None,
        publishes: Callable[[], bool] = lambda: True,
    ) -> None:
        """`store`: where closed minutes are kept (none: nothing is stored or restored,
        as in benchmarks that only evaluate). `publishes`: whether this replica announces
        burn and exhaustion (the leader's job); a follower still follows the transitions, so
        when it takes over it does not announce again what the old leader did."""
        self._bus = bus
        self._publishes = publishes
        self._store = store
        self._zone = ZoneInfo(timezone)
        self._tracked: dict[str, list[_Tracked]] = {}
        self._probed: dict[str, list[_Tracked]] = {}
        self._called: dict[str, list[_Tracked]] = {}
        self._set(self._track(services, {}))

    def _set(self, tracked: dict[str, list[_Tracked]]) -> None:
        """Every SLO (what is shown), and per source the ones each feed reaches."""
        self._tracked = tracked
        by_source: dict[str, dict[str, list[_Tracked]]] = {"probes": {}, "calls": {}}
        for service, entries in tracked.items():
            for entry in entries:
                by_source[entry.slo.source].setdefault(service, []).append(entry)
        self._probed, self._called = by_source["probes"], by_source["calls"]

    def _track(
        self, services: Iterable[Service], keep: Mapping[tuple[str, Slo], _Tracked]
    ) -> dict[str, list[_Tracked]]:
        """Ledgers for every SLO; one whose config is unchanged keeps its ledger."""
        tracked: dict[str, list[_Tracked]] = {}
        for service in services:
            for slo in service.slos:
                if slo.sli is not None:
                    continue  # raw SLIs live in Prometheus: rules only
                entry = keep.get((service.name, slo))
                if entry is None:
                    minutes = int(slo.period.total_seconds() // 60)
                    ledger = SloLedger(slo.objective / 100, minutes, self._zone, keep_closed=True)
                    latency = slo.latency_threshold
                    entry = _Tracked(
                        service.name,
                        slo,
                        ledger,
                        latency.total_seconds() if latency else None,
                        format_duration(slo.period),
                        f'service="{service.name}",slo="{slo.name}"',
                        tuple(tier.factor(slo.period) for tier in TIERS),
                    )
                tracked.setdefault(service.name, []).append(entry)
        return tracked

    async def configure(self, services: Iterable[Service], now: float) -> None:
        """New SLO config (reload): unchanged SLOs go on; new and changed ones are
        restored from the minutes stored under their name."""
        await self.flush()  # closed minutes of every ledger are on disk first
        old = {(e.service, e.slo): e for e in self._all()}
        tracked = self._track(services, old)
        minute = int(now // 60)
        for entry in (e for entries in tracked.values() for e in entries):
            if (entry.service, entry.slo) not in old and self._store is not None:
                since = entry.ledger.history_start(minute)
                rows = await self._store.minutes(entry.service, entry.slo.name, since)
                entry.ledger.restore(rows, minute)
        self._set(tracked)

    def record(
        self, service: str, at: float, *, ok: bool, response_time: float, maintenance: bool
    ) -> None:
        tracked = self._probed.get(service)
        if not tracked:
            return
        minute = int(at // 60)
        for entry in tracked:
            if maintenance:  # excluded from both good and valid
                entry.ledger.advance(minute)
                continue
            good = ok and (entry.threshold is None or response_time <= entry.threshold)
            entry.ledger.record(minute, int(good), 1)

    def record_call(self, service: str, at: float, *, served: bool, seconds: float) -> None:
        """A workflow call to `service` (workflows/caller.py `served`), for its `source:
        calls` SLOs. A minute without calls stays empty: no data, neither good nor bad."""
        tracked = self._called.get(service)
        if not tracked:
            return
        minute = int(at // 60)
        for entry in tracked:
            good = served and (entry.threshold is None or seconds <= entry.threshold)
            entry.ledger.record(minute, int(good), 1)

    def evaluate(self, now: float) -> None:
        """Close minutes up to now and publish burn and exhaustion transitions."""
        minute = int(now // 60)
        for entry in self._all():
            entry.ledger.advance(minute)
            self._publish_transitions(entry)

    def statuses(self, service: str, now: float) -> list[dict[str, object]] | None:
        if service not in self._tracked:
            return None
        self.evaluate(now)
        return [self._status(entry, now) for entry in self._tracked[service]]

    def summaries(self, service: str, now: float) -> list[SloSummary]:
        """Budget left and this month's SLA per SLO, as of the last evaluation (no evaluating:
        the status page evaluates once, then asks for every service)."""
        return [
            SloSummary(
                name=entry.slo.name,
                budget=entry.ledger.budget_remaining(),
                sla=entry.ledger.month_report(months_around(entry.ledger, now)[0]).availability,
            )
            for entry in self._tracked.get(service, ())
        ]

    def entries(self) -> list[_Tracked]:
        return self._all()

    async def load(self, now: float) -> None:
        """Restore every ledger from the stored minutes it still needs (see `restore`)."""
        store = self._store
        if store is None:
            return
        await store.create_tables()
        minute = int(now // 60)
        for entry in self._all():
            since = entry.ledger.history_start(minute)
            rows = await store.minutes(entry.service, entry.slo.name, since)
            entry.ledger.restore(rows, minute)

    async def flush(self) -> None:
        rows: list[tuple[str, str, int, int, int]] = []
        taken: list[tuple[_Tracked, int]] = []
        for entry in self._all():
            rows += [(entry.service, entry.slo.name, *m) for m in entry.ledger.closed]
            taken.append((entry, len(entry.ledger.closed)))
        if rows and self._store is not None:  # on failure they stay queued for the next
            await self._store.add(rows)
        for entry, count in taken:
            del entry.ledger.closed[:count]

    async def prune(self, now: float, retention: float) -> None:
        if self._store is not None:
            await self._store.prune(int((now - retention) // 60))

    def _all(self) -> list[_Tracked]:
        return [entry for entries in self._tracked.values() for entry in entries]

    def _status(self, entry: _Tracked, now: float) -> dict[str, object]:
        return {
            "name": entry.slo.name,
            "objective": entry.slo.objective,
            "period": format_duration(entry.slo.period),
            "kind": "latency" if entry.threshold is not None else "availability",
            "source": entry.slo.source,
            "latency_threshold": None
            if entry.threshold is None
            else format_duration(entry.threshold),
            **ledger_report(entry.ledger, months_around(entry.ledger, now)),
        }

    def _publish_transitions(self, entry: _Tracked) -> None:
        ledger = entry.ledger
        for tier, factor in zip(TIERS, entry.factors, strict=True):
            long_rate, short_rate = ledger.burn_rate(tier.long), ledger.burn_rate(tier.short)
            over = (
                long_rate is not None
                and short_rate is not None
                and long_rate > factor
                and short_rate > factor
            )
            name = f"{tier.long}-{tier.short}"
            if over and name not in entry.firing:
                entry.firing.add(name)
                if self._publishes():
                    self._bus.publish(
                        "slo.burn",
                        {
                            "service": entry.service,
                            "slo": entry.slo.name,
                            "severity": tier.severity,
                            "windows": [tier.long, tier.short],
                            "burn_rate": long_rate,
                            "threshold": factor,
                        },
                    )
            elif not over:
                entry.firing.discard(name)
        remaining = ledger.budget_remaining()
        exhausted = remaining is not None and remaining <= 0
        if exhausted and not entry.exhausted and self._publishes():
            self._bus.publish(
                "slo.budget_exhausted",
                {"service": entry.service, "slo": entry.slo.name, "remaining": remaining},
            )
        entry.exhausted = exhausted
