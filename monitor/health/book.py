"""Health states: from probe results to `passing | warning | critical | maintenance | unknown`.

Per instance, a small state machine damps flapping: `failure_threshold`
consecutive failures to go critical, `success_threshold` successes to come
back. The first result decides at once from `unknown` when it passes (there
is nothing to damp yet); failures still need the threshold. On top of the
probe state:

- a maintenance window shows `maintenance` (probes keep running underneath,
  and the state they reach shows when the window closes);
- a lapsed lease shows `critical`;
- an instance whose dependency (`depends_on`) is down, i.e. has instances and
  none of them up, is `suppressed`: it keeps its state but raises no alert.

Every change of the shown state or of suppression is published as
`health.changed`, by the replica that owns the instance (`announce_only`): with
several replicas every one keeps every instance's state, applying the owner's
(`apply`), and only the one probing it speaks for it, so an alert is sent once.

One slotted `Tracker` per instance holds all of it (no second per-instance
object), keeping the last result without its body and sharing the verdict of
every plain pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.health.maintenance import MaintenanceCalendar
from monitor.probing.probe import Probe, ProbeResult
from registry import HealthState, Instance
from scheduler import EventBus

Key = tuple[str, str]
UP = (HealthState.PASSING, HealthState.WARNING)


@dataclass(frozen=True, slots=True)
class Failure:
    condition: str
    observed: str

    def to_json(self) -> dict[str, str]:
        return {"condition": self.condition, "observed": self.observed}


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    failing: tuple[Failure, ...]
    warning: str | None = None


PASSED = Verdict(True, ())  # most probes: one object, not one per instance


def judge(probe: Probe, result: ProbeResult) -> Verdict:
    """Evaluate every condition; a probe that could not connect fails on its error."""
    failing: list[Failure] = []
    if result.error is not None:
        failing.append(Failure("probe", result.error))
    for condition in probe.conditions:
        holds, observed = condition.check(result)
        if not holds:
            failing.append(Failure(condition.text, observed))
    if failing:
        return Verdict(False, tuple(failing))
    warning: str | None = None
    if probe.warning_latency is not None and result.response_time > probe.warning_latency:
        warning = f"response time {result.response_time * 1000:.0f}ms over warning_latency"
    expires_in = result.certificate_expires_in
    certificate_limit = probe.warning_certificate
    if certificate_limit is not None and expires_in is not None and expires_in < certificate_limit:
        warning = f"certificate expires in {expires_in / 86400:.1f} days"
    return Verdict(True, (), warning) if warning else PASSED


@dataclass(slots=True)
class Tracker:
    """One instance's probe state machine, and the state shown (HealthBook's)."""

    probe: Probe
    state: HealthState = HealthState.UNKNOWN
    successes: int = 0
    failures: int = 0
    result: ProbeResult | None = None  # the last one, without its body
    verdict: Verdict | None = None
    reason: str = "no probe result yet"
    shown: HealthState = HealthState.UNKNOWN  # with maintenance and lapses on top
    suppressed: bool = False
    since: float = 0.0  # when `shown` last changed

    def record(self, result: ProbeResult, verdict: Verdict) -> None:
        # The body was for the conditions: 10,000 nginx pages kept would be 6 MB.
        self.result = ProbeResult(
            at=result.at,
            response_time=result.response_time,
            connected=result.connected,
            status=result.status,
            certificate_expires_at=result.certificate_expires_at,
            error=result.error,
        )
        self.verdict = verdict
        if verdict.ok:
            self.successes, self.failures = self.successes + 1, 0
            up = HealthState.WARNING if verdict.warning else HealthState.PASSING
            if self.state in UP or self.state is HealthState.UNKNOWN:
                self.state, self.reason = up, verdict.warning or "probe passed"
            elif self.successes >= self.probe.success_threshold:
                self.state = up
                self.reason = verdict.warning or f"{self.successes} consecutive successes"
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= self.probe.failure_threshold:
                self.state = HealthState.CRITICAL
                self.reason = f"{self.failures} consecutive failures"

    @property
    def wants_down_interval(self) -> bool:
        """Probe faster while down, unknown, or failing below the threshold."""
        return self.state not in UP or self.failures > 0


class HealthBook:
    """Every probed instance's health; the registry's health source.

    Kept whole at 20 methods: one state machine (track, record, lapse, reevaluate)
    and the views of its state (health_of, status, suppressed) that the registry,
    routes and page read; suppression needs every tracker of a dependency, so a
    split part would reach into the others' state."""

    def __init__(
        self,
        *,
        bus: EventBus,
        calendar: MaintenanceCalendar,
        dependencies: Mapping[str, Iterable[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bus, self._calendar, self._clock = bus, calendar, clock
        self._dependencies = {name: tuple(deps) for name, deps in dependencies.items()}
        self._trackers: dict[Key, Tracker] = {}
        self._lapsed: set[Key] = set()
        self._by_service: dict[str, set[Key]] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._announces: Callable[[Key], bool] = lambda key: True

    def announce_only(self, owns: Callable[[Key], bool]) -> None:
        """Publish `health.changed` only for the instances `owns` holds (this replica
        probes them); the others' changes are shown here but announced by their prober."""
        self._announces = owns

    def configure(self, dependencies: Mapping[str, Sequence[str]]) -> None:
        """New depends_on lists (config reload); suppression follows at once."""
        self._dependencies = {name: tuple(deps) for name, deps in dependencies.items()}
        self.reevaluate()
        for key, tracker in list(self._trackers.items()):
            self._refresh(key, tracker)

    def on_change(self, listener: Callable[[str], None]) -> None:
        """`listener(service)` after any shown change (the registry bumps its index)."""
        self._listeners.append(listener)

    def track(self, key: Key, probe: Probe) -> Tracker:
        tracker = self._trackers.get(key)
        if tracker is None:
            tracker = self._trackers[key] = Tracker(probe, since=self._clock())
            self._by_service.setdefault(key[0], set()).add(key)
        else:
            tracker.probe = probe
        return tracker

    def forget(self, key: Key) -> None:
        self._trackers.pop(key, None)
        self._lapsed.discard(key)
        keys = self._by_service.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_service[key[0]]

    def tracker(self, key: Key) -> Tracker | None:
        return self._trackers.get(key)

    def instance_keys(self) -> list[Key]:
        return sorted(self._trackers)

    def record(self, key: Key, result: ProbeResult) -> Verdict | None:
        tracker = self._trackers.get(key)
        if tracker is None:
            return None  # deregistered while the probe ran
        verdict = judge(tracker.probe, result)
        tracker.record(result, verdict)
        self._refresh(key, tracker)
        return verdict

    def apply(
        self,
        key: Key,
        state: HealthState,
        *,
        successes: int,
        failures: int,
        reason: str,
        result: ProbeResult | None,
        verdict: Verdict | None,
    ) -> None:
        """Take the probe state another replica reached (it probed, it announced): shown
        here at once, announced only for the instances it suppresses or releases that this
        replica owns."""
        tracker = self._trackers.get(key)
        if tracker is None:
            return
        tracker.state, tracker.successes, tracker.failures = state, successes, failures
        tracker.reason, tracker.result, tracker.verdict = reason, result, verdict
        self._refresh(key, tracker, quiet=True)

    def set_lapsed(self, key: Key, lapsed: bool) -> None:
        (self._lapsed.add if lapsed else self._lapsed.discard)(key)
        tracker = self._trackers.get(key)
        if tracker is not None:
            self._refresh(key, tracker)

    def reevaluate(self) -> None:
        """Apply maintenance windows opening or closing (they follow the clock, not probes).

        Only services with windows are visited: this runs every second, and a walk over
        every instance would cost a registry of 50,000 a blocked loop each time.
        Suppression needs no walk; it follows its dependencies' changes as they happen.
        """
        for service in self._calendar.services:
            for key in list(self._by_service.get(service, ())):
                self._refresh(key, self._trackers[key])

    # -- reads ---------------------------------------------------------------------

    def health_of(self, instance: Instance) -> HealthState:
        return self.state_of(instance.key)

    def state_of(self, key: Key) -> HealthState:
        tracker = self._trackers.get(key)
        return tracker.shown if tracker is not None else HealthState.UNKNOWN

    def suppressed(self, key: Key) -> bool:
        tracker = self._trackers.get(key)
        return tracker.suppressed if tracker is not None else False

    def in_maintenance(self, service: str) -> bool:
        return self._calendar.active(service, self._clock())

    def status(self, key: Key) -> dict[str, Any] | None:
        tracker = self._trackers.get(key)
        if tracker is None:
            return None
        result, verdict = tracker.result, tracker.verdict
        return {
            "service": key[0],
            "instance": key[1],
            "state": tracker.shown.value,
            "since": tracker.since,
            "suppressed": tracker.suppressed,
            "reason": self._reason(key, tracker),
            "last_probe": _result_json(result, verdict) if result is not None else None,
            "failing": [f.to_json() for f in verdict.failing] if verdict else [],
        }

    # -- internals -----------------------------------------------------------------

    def _shown_state(self, key: Key, tracker: Tracker) -> HealthState:
        if self._calendar.active(key[0], self._clock()):
            return HealthState.MAINTENANCE
        if key in self._lapsed:
            return HealthState.CRITICAL
        return tracker.state

    def _reason(self, key: Key, tracker: Tracker) -> str:
        if self._calendar.active(key[0], self._clock()):
            return "maintenance window"
        if key in self._lapsed:
            return "lease lapsed"
        return tracker.reason

    def _is_suppressed(self, service: str) -> bool:
        return any(
            self._service_down(dependency) for dependency in self._dependencies.get(service, ())
        )

    def _service_down(self, service: str) -> bool:
        keys = self._by_service.get(service, set())
        return bool(keys) and all(self._trackers[k].shown is HealthState.CRITICAL for k in keys)

    def _refresh(self, key: Key, tracker: Tracker, *, quiet: bool = False) -> None:
        state = self._shown_state(key, tracker)
        suppressed = self._is_suppressed(key[0])
        if state is tracker.shown and suppressed == tracker.suppressed:
            return
        before = tracker.shown
        tracker.shown, tracker.suppressed = state, suppressed
        if state is not before:
            tracker.since = self._clock()
        if not quiet and self._announces(key):
            self._announce(key, tracker, before)
        for listener in self._listeners:
            listener(key[0])
        # A service going down or up changes its dependents' suppression.
        for dependent, dependencies in self._dependencies.items():
            if key[0] in dependencies:
                for other in list(self._by_service.get(dependent, ())):
                    self._refresh(other, self._trackers[other])

    def _announce(self, key: Key, tracker: Tracker, before: HealthState) -> None:
        verdict = tracker.verdict
        self._bus.publish(
            "health.changed",
            {
                "service": key[0],
                "instance": key[1],
                "from": before.value,
                "to": tracker.shown.value,
                "reason": self._reason(key, tracker),
                "failing": [f.to_json() for f in verdict.failing] if verdict else [],
                "suppressed": tracker.suppressed,
            },
        )


def _result_json(result: ProbeResult, verdict: Verdict | None) -> dict[str, Any]:
    return {
        "at": result.at,
        "ok": verdict.ok if verdict else None,
        "response_time": round(result.response_time, 6),
        "status": result.status,
        "connected": result.connected,
        "error": result.error,
        "certificate_expires_at": result.certificate_expires_at,
    }
