"""Scheduled workflows: a process per cron tick, on the injected clock, across restarts and
reloads; missed ticks coalesced into one; bad crons and zones refused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hms_mgmt import Workflow, publish
from monitor.config import Config, ConfigError, parse_config
from monitor.keys import DATABASE, ENGINE
from scheduler import Cron
from workflows.schedules import RECHECK

from .conftest import AppClient, FakeClock, until
from .test_reload import config_file, reloaded

__all__ = ["config_file"]  # a fixture used here

# FakeClock's wall clock starts at 2027-01-15T08:00:00Z, a Friday, in winter.
START = datetime(2027, 1, 15, 8, tzinfo=UTC)
HOUR = 3600.0


def nightly(schedule: str = "*/10 * * * *", **trigger: str) -> dict[str, Any]:
    return {
        "name": "Nightly",
        "trigger": {"schedule": schedule, **trigger},
        "steps": [{"name": "report", "publish": "nightly.report"}],
    }


async def scheduled(client: AppClient, workflow: str = "Nightly") -> list[dict[str, Any]]:
    """The workflow's processes, oldest first, as GET /v1/processes/{id} shows them."""
    listed = await (await client.get("/v1/processes", params={"workflow": workflow})).json()
    ids = [p["id"] for p in reversed(listed["processes"])]
    return [await (await client.get(f"/v1/processes/{i}")).json() for i in ids]


async def count_reaches(client: AppClient, n: int) -> list[dict[str, Any]]:
    async def reached() -> bool:
        return len(await scheduled(client)) >= n

    await until(reached)
    return await scheduled(client)


async def settled(client: AppClient) -> list[dict[str, Any]]:
    """The processes once the schedule loop has looked at the clock again (it does at
    least every RECHECK seconds): a second start of the same tick would be there."""
    await asyncio.sleep(RECHECK * 1.5)
    return await scheduled(client)


def ticks(processes: list[dict[str, Any]]) -> list[str]:
    return [p["input"]["scheduled_at"] for p in processes]


async def test_a_schedule_starts_one_process_per_tick(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    client = await start_daemon(make_config(workflows=[nightly()]))
    assert await settled(client) == []  # armed at 08:00:00: that tick was not owed

    clock.advance(600)
    await count_reaches(client, 1)
    once = await settled(client)
    assert ticks(once) == ["2027-01-15T08:10:00+00:00"]
    assert once[0]["idempotency_key"] == f"schedule:Nightly:{int(START.timestamp()) + 600}"
    assert once[0]["status"] == "completed"

    clock.advance(599)  # 08:19:59
    assert len(await settled(client)) == 1
    clock.advance(1)
    await count_reaches(client, 2)
    assert ticks(await settled(client)) == [
        "2027-01-15T08:10:00+00:00",
        "2027-01-15T08:20:00+00:00",
    ]


async def test_a_scheduled_process_is_started_by_the_schedule(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    client = await start_daemon(make_config(workflows=[nightly()]))
    clock.advance(600)
    [process] = await count_reaches(client, 1)
    assert process["started_by"] == "schedule"


async def test_a_schedule_is_read_in_its_time_zone(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    config = make_config(workflows=[nightly("0 2 * * *", timezone="Europe/Paris")])
    client = await start_daemon(config)
    clock.advance(17 * HOUR - 1)  # 2027-01-16T00:59:59Z: 01:59:59 in Paris
    assert await settled(client) == []
    clock.advance(1)
    [process] = await count_reaches(client, 1)
    assert process["input"] == {"scheduled_at": "2027-01-16T02:00:00+01:00"}
    assert process["created_at"] == datetime(2027, 1, 16, 1, tzinfo=UTC).timestamp()


async def test_ticks_missed_while_down_run_once_at_start_never_twice(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    config = make_config(workflows=[nightly("0 * * * *")])
    first = await start_daemon(config)
    clock.advance(HOUR)  # 09:00
    await count_reaches(first, 1)
    await first.close()

    clock.advance(2.5 * HOUR)  # down from 09:00 to 11:30: the 10:00 and 11:00 ticks missed
    second = await start_daemon(config)
    await count_reaches(second, 2)
    assert ticks(await settled(second)) == [
        "2027-01-15T09:00:00+00:00",
        "2027-01-15T11:00:00+00:00",  # coalesced: the latest missed tick only
    ]
    await second.close()

    third = await start_daemon(config)  # restarted again, no tick since: nothing owed
    assert len(await settled(third)) == 2
    clock.advance(HOUR / 2)  # 12:00
    await count_reaches(third, 3)
    assert ticks(await settled(third))[2] == "2027-01-15T12:00:00+00:00"


async def test_a_pruned_process_does_not_make_its_tick_run_again(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    config = make_config(workflows=[nightly("0 9 1 * *")])  # monthly: outlives retention
    first = await start_daemon(config)
    clock.advance(HOUR)  # 09:00 on the 15th: not a tick
    assert await settled(first) == []
    clock.advance(17 * 24 * HOUR)  # 2027-02-01T09:00
    await count_reaches(first, 1)
    clock.advance(1)
    await first.app[ENGINE].prune(0)  # finished processes forgotten, as retention does
    assert await scheduled(first) == []
    await first.close()

    second = await start_daemon(config)
    assert await settled(second) == []  # the schedule's mark, not the process, remembers


async def test_a_tick_due_while_storage_fails_starts_once_it_is_back(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    client = await start_daemon(make_config(workflows=[nightly()]))
    await settled(client)  # armed (its mark written) before the disk goes read-only
    await query_only(client, 1)  # as after a read-only remount
    clock.advance(600)
    assert await settled(client) == []
    await query_only(client, 0)
    assert ticks(await count_reaches(client, 1)) == ["2027-01-15T08:10:00+00:00"]
    assert len(await settled(client)) == 1


async def query_only(client: AppClient, value: int) -> None:
    await client.app[DATABASE].read(lambda d: d.execute(f"PRAGMA query_only = {value}"))


async def test_a_tick_missed_before_the_first_one_fired_still_runs(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    config = make_config(workflows=[nightly("30 8 * * *")])
    first = await start_daemon(config)  # armed at 08:00, first tick 08:30
    await first.close()
    clock.advance(HOUR)  # down over 08:30
    second = await start_daemon(config)
    assert ticks(await count_reaches(second, 1)) == ["2027-01-15T08:30:00+00:00"]


async def test_a_changed_schedule_owes_nothing_before_the_change(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    first = await start_daemon(make_config(workflows=[nightly("0 9 * * *")]))
    await first.close()
    clock.advance(2 * HOUR)  # 10:00: the 09:00 tick was missed, but the schedule changed
    second = await start_daemon(make_config(workflows=[nightly("30 9 * * *")]))
    assert await settled(second) == []


async def test_a_reload_removes_and_adds_schedules(
    config_file: Callable[..., Path],
    start_watched: Callable[[Path], Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    path = config_file(workflows=[nightly()])
    client = await start_watched(path)
    clock.advance(600)
    await count_reaches(client, 1)

    unscheduled = {k: v for k, v in nightly().items() if k != "trigger"}
    config_file(workflows=[unscheduled])
    await reloaded(client, "success")
    clock.advance(HOUR)
    assert len(await settled(client)) == 1  # stopped

    config_file(workflows=[nightly("15 * * * *")])
    await reloaded(client, "success", 2)
    assert len(await settled(client)) == 1  # 09:10 now: nothing owed before the reload
    clock.advance(5 * 60)  # 09:15
    assert ticks(await count_reaches(client, 2))[1] == "2027-01-15T09:15:00+00:00"


async def test_put_adds_changes_and_removes_a_schedule(daemon: AppClient, clock: FakeClock) -> None:
    resp = await daemon.put("/v1/workflows/Nightly", json=nightly())
    assert resp.status == 201
    listed = await (await daemon.get("/v1/workflows")).json()
    [summary] = listed["workflows"]
    assert summary["trigger"] == {"schedule": "*/10 * * * *", "timezone": "UTC"}
    clock.advance(600)
    await count_reaches(daemon, 1)

    resp = await daemon.put("/v1/workflows/Nightly", json=nightly("0 12 * * *"))
    assert (resp.status, (await resp.json())["version"]) == (200, 2)
    clock.advance(600)  # 08:20: the old schedule would fire
    assert len(await settled(daemon)) == 1
    clock.advance(3 * HOUR + 40 * 60)  # 12:00
    assert ticks(await count_reaches(daemon, 2))[1] == "2027-01-15T12:00:00+00:00"

    unscheduled = {k: v for k, v in nightly().items() if k != "trigger"}
    assert (await daemon.put("/v1/workflows/Nightly", json=unscheduled)).status == 200
    clock.advance(24 * HOUR)
    assert len(await settled(daemon)) == 2


async def test_bad_crons_and_zones_are_refused_by_put_with_their_paths(daemon: AppClient) -> None:
    body = nightly("0 25 * * *", timezone="Europe/Pariss")
    resp = await daemon.put("/v1/workflows/Nightly", json=body)
    assert resp.status == 422
    details = (await resp.json())["error"]["details"]
    assert [d["path"] for d in details] == ["trigger.schedule", "trigger.timezone"]
    assert "not a crontab expression" in details[0]["message"]
    assert details[1]["message"] == "unknown timezone 'Europe/Pariss'"
    both = {"event": "x", "schedule": "* * * * *"}
    resp = await daemon.put("/v1/workflows/Nightly", json={**nightly(), "trigger": both})
    assert resp.status == 422
    assert (await resp.json())["error"]["details"][0]["path"] == "trigger"


def test_bad_crons_and_zones_are_config_errors_with_their_lines() -> None:
    text = """\
workflows:
  - name: Nightly
    trigger:
      schedule: "0 2 * *"
      timezone: Mars/Olympus
    steps: [{name: report, publish: nightly.report}]
  - name: Weekly
    trigger: {event: week.started, timezone: UTC}
    steps: [{name: report, publish: weekly.report}]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [
        "config.yaml:4: workflows[0].trigger.schedule: not a crontab expression "
        "(Wrong number of fields; got 4, expected 5)",
        "config.yaml:5: workflows[0].trigger.timezone: unknown timezone 'Mars/Olympus'",
        "config.yaml:8: workflows[1].trigger: timezone applies to a schedule",
    ]


async def test_the_sdk_builder_deploys_a_schedule(daemon: AppClient) -> None:
    trigger = {"schedule": "0 2 * * *", "timezone": "Europe/Paris"}
    built = Workflow("Nightly", trigger=trigger).step("report", publish("nightly.report"))
    assert built.definition()["trigger"] == trigger
    resp = await daemon.put("/v1/workflows/Nightly", json=built.definition())
    assert resp.status == 201
    stored = await (await daemon.get("/v1/workflows/Nightly")).json()
    assert stored["definition"]["trigger"] == trigger


def test_numeric_weekdays_count_from_sunday_as_in_crontab() -> None:
    friday = START.timestamp()
    monday = datetime(2027, 1, 18, 2, tzinfo=UTC).timestamp()
    sunday = datetime(2027, 1, 17, 2, tzinfo=UTC).timestamp()
    assert Cron("0 2 * * 1").next_after(friday) == monday
    assert Cron("0 2 * * 0").next_after(friday) == sunday
    assert Cron("0 2 * * 7").next_after(friday) == sunday
    assert Cron("0 2 * * 1-5").next_after(friday) == monday
    assert Cron("0 2 * * sun").next_after(friday) == sunday
    with pytest.raises(ValueError, match="outside 0-7"):
        Cron("0 2 * * 8")


def test_the_latest_tick_of_a_long_downtime_is_found() -> None:
    now = START.timestamp()
    every_minute = Cron("* * * * *")
    assert every_minute.latest(now - 400 * 86400, now) == now
    assert every_minute.latest(now - 30, now - 1) is None
    yearly = Cron("0 0 1 1 *")
    assert yearly.latest(0, now) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert yearly.latest(datetime(2027, 1, 1, tzinfo=UTC).timestamp(), now) is None


def test_a_fixed_time_in_the_hour_clocks_repeat_fires_once() -> None:
    nightly = Cron("30 2 * * *", "Europe/Paris")
    before = datetime(2026, 10, 24, 12, tzinfo=UTC).timestamp()
    fires = [nightly.next_after(before)]
    for _ in range(2):
        fires.append(nightly.next_after(fires[-1] or 0))
    assert [datetime.fromtimestamp(f or 0, UTC).isoformat() for f in fires] == [
        "2026-10-25T00:30:00+00:00",  # 02:30 summer time; not 02:30 winter time again
        "2026-10-26T01:30:00+00:00",
        "2026-10-27T01:30:00+00:00",
    ]
    half_hourly = Cron("*/30 * * * *", "Europe/Paris")  # runs through the repeated hour
    start = datetime(2026, 10, 25, 0, tzinfo=UTC).timestamp()
    assert half_hourly.latest(start, start + 2 * HOUR) == start + 2 * HOUR
    seen = [start]
    while (after := half_hourly.next_after(seen[-1])) is not None and after <= start + 2 * HOUR:
        seen.append(after)
    assert len(seen) == 5  # 02:00, 02:30 (summer), 02:00, 02:30 (winter), 03:00
