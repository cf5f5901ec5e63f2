"""The health state machine, maintenance windows and dependency suppression (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from monitor.config import parse_config
from monitor.health import HealthBook, MaintenanceCalendar, Tracker, judge
from monitor.probing import ProbeResult, resolve_probe
from registry import HealthState, ProbeSpec
from scheduler import Event, EventBus

PASS = ProbeResult(at=0.0, response_time=0.05, connected=True, status=200)
FAIL = ProbeResult(at=0.0, response_time=0.05, connected=True, status=503)
SLOW = ProbeResult(at=0.0, response_time=0.9, connected=True, status=200)


def tracker(**settings: Any) -> Tracker:
    return Tracker(resolve_probe([ProbeSpec.model_validate(settings)]))


def feed(machine: Tracker, *results: ProbeResult) -> list[HealthState]:
    states = []
    for result in results:
        machine.record(result, judge(machine.probe, result))
        states.append(machine.state)
    return states


def test_unknown_until_the_first_result() -> None:
    assert tracker().state is HealthState.UNKNOWN
    assert feed(tracker(), PASS) == [HealthState.PASSING]


def test_failure_threshold_consecutive_failures_to_go_critical() -> None:
    machine = tracker(failure_threshold=3)
    assert feed(machine, PASS, FAIL, FAIL, FAIL) == [
        HealthState.PASSING,
        HealthState.PASSING,
        HealthState.PASSING,
        HealthState.CRITICAL,
    ]
    assert machine.reason == "3 consecutive failures"


def test_a_success_resets_the_failure_count() -> None:
    machine = tracker(failure_threshold=3)
    assert feed(machine, PASS, FAIL, FAIL, PASS, FAIL, FAIL)[-1] is HealthState.PASSING


def test_success_threshold_successes_to_come_back() -> None:
    machine = tracker(failure_threshold=1, success_threshold=2)
    assert feed(machine, FAIL, PASS, FAIL, PASS, PASS) == [
        HealthState.CRITICAL,
        HealthState.CRITICAL,  # one success is not enough: damped
        HealthState.CRITICAL,
        HealthState.CRITICAL,
        HealthState.PASSING,
    ]


def test_warning_for_a_slow_passing_probe() -> None:
    machine = tracker(warning_latency="500ms")
    assert feed(machine, PASS, SLOW, PASS) == [
        HealthState.PASSING,
        HealthState.WARNING,
        HealthState.PASSING,
    ]


def test_warning_for_a_certificate_expiring_soon() -> None:
    expiring = ProbeResult(
        at=0.0, response_time=0.05, connected=True, status=200, certificate_expires_at=86400.0
    )
    machine = tracker(warning_certificate="7d")
    assert feed(machine, expiring) == [HealthState.WARNING]
    assert machine.reason == "certificate expires in 1.0 days"


def test_down_interval_while_not_passing() -> None:
    machine = tracker(failure_threshold=2)
    assert machine.wants_down_interval  # unknown
    feed(machine, PASS)
    assert not machine.wants_down_interval
    feed(machine, FAIL)
    assert machine.wants_down_interval  # failing, below the threshold: confirm quickly


def test_failing_conditions_say_what_was_observed() -> None:
    probe = resolve_probe([ProbeSpec(conditions=("[STATUS] == 200", "[RESPONSE_TIME] < 10ms"))])
    verdict = judge(probe, FAIL)
    assert [(f.condition, f.observed) for f in verdict.failing] == [
        ("[STATUS] == 200", "503"),
        ("[RESPONSE_TIME] < 10ms", "50ms"),
    ]


def calendar(yaml_text: str) -> MaintenanceCalendar:
    return MaintenanceCalendar(parse_config(yaml_text).maintenance)


def at(text: str) -> float:
    return datetime.fromisoformat(text).astimezone(UTC).timestamp()


@pytest.mark.parametrize(
    ("moment", "active"),
    [
        ("2026-11-22T22:59:00+01:00", False),  # a Sunday, Paris time
        ("2026-11-22T23:00:00+01:00", True),
        ("2026-11-22T23:59:59+01:00", True),
        ("2026-11-23T00:00:00+01:00", True),  # crosses midnight into Monday
        ("2026-11-23T00:30:00+01:00", False),
        ("2026-11-21T23:30:00+01:00", False),  # a Saturday
        ("2026-11-22T22:30:00+00:00", True),  # the same instant written in UTC
    ],
)
def test_weekly_window_in_its_time_zone(moment: str, active: bool) -> None:
    weekly = calendar(
        "maintenance:\n  - {services: [pay], start: '23:00', duration: 90m, "
        "timezone: Europe/Paris, every: [sunday]}\n"
    )
    assert weekly.active("pay", at(moment)) is active
    assert weekly.active("other", at(moment)) is False


def test_daily_window() -> None:
    daily = calendar("maintenance:\n  - {services: [pay], start: '02:00', duration: 1h}\n")
    assert daily.active("pay", at("2026-03-04T02:30:00+00:00"))
    assert not daily.active("pay", at("2026-03-04T03:00:00+00:00"))


def test_one_off_window() -> None:
    once = calendar(
        "maintenance:\n  - {services: [pay], at: '2026-12-01T22:00:00Z', duration: 2h}\n"
    )
    assert once.active("pay", at("2026-12-01T23:59:00+00:00"))
    assert not once.active("pay", at("2026-12-02T00:00:00+00:00"))
    assert not once.active("pay", at("2026-12-08T23:00:00+00:00"))


def test_daylight_saving_time_keeps_the_local_start() -> None:
    daily = calendar(
        "maintenance:\n  - {services: [pay], start: '01:30', duration: 30m, "
        "timezone: Europe/Paris}\n"
    )
    assert daily.active("pay", at("2026-01-15T01:45:00+01:00"))  # winter, UTC+1
    assert daily.active("pay", at("2026-07-15T01:45:00+02:00"))  # summer, UTC+2


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def book(maintenance: str = "", depends: dict[str, list[str]] | None = None) -> Any:
    events: list[Event] = []
    bus = EventBus()
    bus.publish = lambda topic, data: (
        events.append(Event(id=0, topic=topic, data=data)) or events[-1]
    )  # type: ignore[method-assign]
    clock = Clock(at("2026-11-22T12:00:00+00:00"))
    health = HealthBook(
        bus=bus, calendar=calendar(maintenance or "{}"), dependencies=depends or {}, clock=clock
    )
    return health, events, clock


PROBE = resolve_probe([ProbeSpec(failure_threshold=1, success_threshold=1)])


def test_state_changes_are_published_with_reason_and_failures() -> None:
    health, events, _ = book()
    health.track(("pay", "p1"), PROBE)
    health.record(("pay", "p1"), PASS)
    health.record(("pay", "p1"), PASS)  # no change: nothing published
    health.record(("pay", "p1"), FAIL)
    assert [(e.data["from"], e.data["to"]) for e in events] == [
        ("unknown", "passing"),
        ("passing", "critical"),
    ]
    assert events[-1].topic == "health.changed"
    assert events[-1].data["failing"] == [{"condition": "[STATUS] < 400", "observed": "503"}]
    assert events[-1].data["reason"] == "1 consecutive failures"


def test_maintenance_holds_the_state_and_probes_continue_underneath() -> None:
    health, events, clock = book(
        "maintenance:\n  - {services: [pay], at: '2026-11-22T12:10:00Z', duration: 10m}\n"
    )
    key = ("pay", "p1")
    health.track(key, PROBE)
    health.record(key, PASS)
    clock.now += 600
    health.reevaluate()
    assert health.state_of(key) is HealthState.MAINTENANCE
    health.record(key, FAIL)  # held: no critical during the window
    assert health.state_of(key) is HealthState.MAINTENANCE
    clock.now += 600
    health.reevaluate()
    assert health.state_of(key) is HealthState.CRITICAL  # what the probes found meanwhile
    assert [e.data["to"] for e in events] == ["passing", "maintenance", "critical"]


def test_lapsed_lease_is_critical() -> None:
    health, events, _ = book()
    key = ("pay", "p1")
    health.track(key, PROBE)
    health.record(key, PASS)
    health.set_lapsed(key, True)
    assert health.state_of(key) is HealthState.CRITICAL
    assert events[-1].data["reason"] == "lease lapsed"
    health.set_lapsed(key, False)
    assert health.state_of(key) is HealthState.PASSING


def test_dependents_of_a_down_service_are_suppressed() -> None:
    health, events, _ = book(depends={"payments": ["ledger"]})
    health.track(("ledger", "l1"), PROBE)
    health.track(("ledger", "l2"), PROBE)
    health.track(("payments", "p1"), PROBE)
    health.record(("payments", "p1"), FAIL)
    health.record(("ledger", "l1"), FAIL)
    assert not health.suppressed(("payments", "p1"))  # l2 is not critical yet
    health.record(("ledger", "l2"), FAIL)
    assert health.suppressed(("payments", "p1"))
    assert events[-1].data == {
        "service": "payments",
        "instance": "p1",
        "from": "critical",
        "to": "critical",
        "reason": "1 consecutive failures",
        "failing": [{"condition": "[STATUS] < 400", "observed": "503"}],
        "suppressed": True,
    }
    health.record(("ledger", "l2"), PASS)
    assert not health.suppressed(("payments", "p1"))
