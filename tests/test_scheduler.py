"""The event bus and the job layer, on a real event loop (short real intervals)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from scheduler import Event, EventBus, Scheduler, Timetable


async def test_subscribers_get_events_matching_their_globs() -> None:
    bus = EventBus()
    health: list[str] = []
    everything: list[str] = []
    bus.subscribe("health.*", lambda e: health.append(e.topic), name="health")
    bus.subscribe(["*"], lambda e: everything.append(e.topic), name="all")
    bus.publish("health.changed", {"service": "a"})
    bus.publish("workflow.failed", {})
    await asyncio.sleep(0.01)
    assert health == ["health.changed"]
    assert everything == ["health.changed", "workflow.failed"]
    assert bus.published["health.changed"] == 1
    await bus.close()


async def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    bus = EventBus()
    seen: list[int] = []

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    bus.subscribe("*", broken, name="broken")
    bus.subscribe("*", lambda e: seen.append(e.id), name="fine")
    for _ in range(3):
        bus.publish("x", {})
    await asyncio.sleep(0.01)
    assert len(seen) == 3
    await bus.close()


async def test_a_slow_subscriber_does_not_block_publishers_or_others() -> None:
    bus = EventBus()
    release = asyncio.Event()
    fast: list[int] = []

    async def slow(event: Event) -> None:
        await release.wait()

    bus.subscribe("*", slow, name="slow", queue_size=2)
    bus.subscribe("*", lambda e: fast.append(e.id), name="fast")
    for _ in range(10):
        bus.publish("x", {})  # returns at once although `slow` is stuck
    await asyncio.sleep(0.01)
    assert len(fast) == 10
    release.set()
    await bus.close()


async def test_iterating_a_subscription_yields_events_in_order() -> None:
    bus = EventBus()
    subscription = bus.subscribe(["a.*"], name="stream")
    bus.publish("a.one", {"n": 1})
    bus.publish("b.two", {"n": 2})
    bus.publish("a.three", {"n": 3})
    iterator: AsyncIterator[Event] = aiter(subscription)
    first, second = await anext(iterator), await anext(iterator)
    assert [first.data["n"], second.data["n"]] == [1, 3]
    await subscription.close()


async def test_stored_events_are_delivered_in_id_order_whatever_order_their_writes_end() -> None:
    bus = EventBus()
    bus.start_after(10)
    seen: list[tuple[str, int]] = []
    bus.subscribe("*", name="all", sink=lambda e: seen.append((e.topic, e.id)))
    first, second, third = bus.reserve(), bus.reserve(), bus.reserve()
    bus.publish("b.second", {}, reserved=second)  # its write ended first: held
    bus.publish("health.changed", {})  # not stored: goes at once, after the last delivered
    bus.release(third)  # a duplicate: never published
    assert seen == [("health.changed", 10)]
    bus.publish("a.first", {}, reserved=first)
    assert seen == [("health.changed", 10), ("a.first", 11), ("b.second", 12)]
    assert bus.position == 12
    await bus.close()


async def test_events_relayed_from_other_replicas_keep_their_ids_once_each() -> None:
    """monitor/relay.py hands the bus what other replicas published: stored events with
    their ids, each once (a notification and the poll may both bring one), uncounted here."""
    bus = EventBus()
    bus.start_after(4)
    seen: list[tuple[str, int, bool]] = []
    bus.subscribe("*", name="all", sink=lambda e: seen.append((e.topic, e.id, e.remote)))
    bus.relay("grant.paid", {"n": 1}, 1.0, 5)
    bus.relay("grant.paid", {"n": 1}, 1.0, 5)  # read again: not delivered twice
    bus.relay("grant.old", {}, 1.0, 3)  # at or below the position: delivered before
    bus.relay("health.changed", {}, 2.0, None)  # the other replica's own news
    assert seen == [("grant.paid", 5, True), ("health.changed", 5, True)]
    assert bus.position == 5
    assert not bus.published  # counted where they were published
    await bus.close()


async def test_relayed_news_is_wanted_only_where_a_subscriber_takes_relayed_events() -> None:
    """The relay decodes another replica's news only when something here would get it: the
    notifier and the relay's own sender are `local_only` and do not count."""
    bus = EventBus()
    bus.subscribe("health.*", name="notifier", sink=lambda e: None, local_only=True)
    assert not bus.wants_relayed("health.changed")
    stream = bus.subscribe("health.*", name="sse", sink=lambda e: None)
    assert bus.wants_relayed("health.changed")
    assert not bus.wants_relayed("workflow.started")
    await stream.close()
    assert not bus.wants_relayed("health.changed")
    await bus.close()


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    running = Scheduler(CollectorRegistry())
    running.start()
    yield running
    running.shutdown()


async def test_recurring_job_runs_and_records_lateness(scheduler: Scheduler) -> None:
    runs: list[float] = []
    scheduler.every("job", 0.05, lambda: runs.append(1), first_in=0)
    await asyncio.sleep(0.3)
    assert len(runs) >= 3
    assert scheduler.lateness.collect()[0].samples  # observations exist
    count = next(s for s in scheduler.lateness.collect()[0].samples if s.name.endswith("_count"))
    assert count.value >= 3


async def test_timetable_runs_each_entry_at_its_interval(scheduler: Scheduler) -> None:
    started: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    table: Timetable[str] = Timetable(scheduler, lambda key: started.append((key, loop.time())))
    table.start()
    table.add("fast", 0.05, first_in=0)
    table.add("slow", 0.2, first_in=0)
    await asyncio.sleep(0.42)
    table.stop()
    fast = [t for k, t in started if k == "fast"]
    slow = [t for k, t in started if k == "slow"]
    # The first run (first_in=0) is off the grid; the next slot may follow it at once (its
    # phase decides), so 0.42 s hold up to 1 + 3 slow runs, 1 + 9 fast ones.
    assert 5 <= len(fast) <= 10
    assert 2 <= len(slow) <= 4
    # After the first run the entry keeps to its slots: no drift.
    mean_gap = (fast[-1] - fast[1]) / (len(fast) - 2)
    assert 0.045 < mean_gap < 0.06, mean_gap
    assert all(0.15 < b - a < 0.25 for a, b in itertools.pairwise(slow[1:])), slow


async def test_timetable_entries_come_and_go_without_restart(scheduler: Scheduler) -> None:
    started: list[str] = []
    table: Timetable[str] = Timetable(scheduler, started.append)
    table.start()
    table.add("a", 0.05, first_in=0)
    await asyncio.sleep(0.12)
    table.remove("a")
    count = len(started)
    table.add("b", 0.05, first_in=0)
    await asyncio.sleep(0.12)
    table.stop()
    assert len(started) > count
    assert started.count("a") == count
    assert "b" in started
    assert "a" not in table


async def test_a_replaced_entry_starts_at_its_new_time_only(scheduler: Scheduler) -> None:
    """Replacing or moving an entry leaves its old heap item behind: it must not start
    the entry a second time when its old time comes, and such items must not pile up."""
    started: list[str] = []
    table: Timetable[str] = Timetable(scheduler, started.append)
    table.start()
    table.add("a", 3600.0, first_in=0.2)  # its next slot: almost surely not in this test
    table.add("a", 3600.0, first_in=0.05)  # brought forward, as a re-registration does
    for n in range(20_000):  # a churning fleet: every move leaves a stale item
        table.add(f"churn-{n % 10}", 3600.0, first_in=3000.0 + n)
    await asyncio.sleep(0.4)
    table.stop()
    assert started == ["a"]
    assert table._stored < 2 * len(table) + 1100


async def test_an_entry_started_after_a_sweep_in_the_same_wake_up_runs_again(
    scheduler: Scheduler,
) -> None:
    """A start that moves entries (a probe refused by the budget backs off) may sweep the
    heap while its wake-up still pushes the next runs of the entries it started."""
    started: Counter[str] = Counter()
    table: Timetable[str]

    def start(key: str) -> None:
        started[key] += 1
        if key == "a" and started[key] == 1:
            for n in range(1100):  # enough moves to sweep
                table.add("churn", 3600.0, first_in=3000.0 + n)

    table = Timetable(scheduler, start)
    table.start()
    table.add("a", 0.05, first_in=0)
    table.add("b", 0.05, first_in=0)  # the same wake-up, after "a"
    await asyncio.sleep(0.5)
    table.stop()
    assert started["a"] >= 5 and started["b"] >= 5


async def test_entries_that_back_off_as_they_start_all_keep_running(
    scheduler: Scheduler,
) -> None:
    loop = asyncio.get_running_loop()
    last: dict[str, float] = {}
    table: Timetable[str]

    def start(key: str) -> None:
        last[key] = loop.time()
        table.add(key, 1.0, first_in=0.02)  # paced again at each start, as _pace does

    table = Timetable(scheduler, start)
    table.start()
    for n in range(600):
        table.add(f"i{n}", 1.0, first_in=0)
    await asyncio.sleep(2.0)
    table.stop()
    now = loop.time()
    assert [key for key in table._entries if now - last.get(key, 0) > 0.5] == []


async def test_shortening_the_interval_brings_the_next_run_forward(scheduler: Scheduler) -> None:
    started: list[str] = []
    table: Timetable[str] = Timetable(scheduler, started.append)
    table.start()
    table.add("a", 10.0, first_in=10.0)
    table.set_interval("a", 0.05)  # like a probe switching to down_interval
    await asyncio.sleep(0.2)
    table.stop()
    assert started.count("a") >= 2


async def test_entries_added_together_spread_over_the_interval(scheduler: Scheduler) -> None:
    loop = asyncio.get_running_loop()
    starts: dict[str, float] = {}
    table: Timetable[str] = Timetable(scheduler, lambda key: starts.setdefault(key, loop.time()))
    table.start()
    added = loop.time()
    for n in range(200):  # a fleet registering at once
        table.add(f"instance-{n}", 0.5)
    await asyncio.sleep(0.6)
    table.stop()
    assert len(starts) == 200
    tenths = Counter(min(int((start - added) / 0.05), 9) for start in starts.values())
    # Spread over the interval: most tenths got some, none got a herd (uniform: ~20 each).
    assert len(tenths) >= 8
    assert max(tenths.values()) <= 50, tenths


def test_the_slot_after_a_slot_is_one_interval_later() -> None:
    from scheduler.jobs import _Entry

    for phase in (0.1, 0.3, 0.7, 0.123456789):
        entry = _Entry(key="k", interval=10.0, due=0.0, phase=phase)
        slot = entry.next_slot(12_345.678)
        for _ in range(1000):  # slots computed from slots: no repeats, no drift
            following = entry.next_slot(slot)
            assert abs(following - slot - 10.0) < 1e-6, (phase, slot, following)
            slot = following
