"""Schedules: a process at each tick of a workflow's `trigger: {schedule, timezone}`.

APScheduler's cron trigger computes the ticks (`scheduler.Cron`); the firing is this
module's own loop, over the engine's injectable clock (epoch seconds), not an APScheduler
job: APScheduler reads the system clock, and a test must move time without waiting for
minutes. The loop sleeps until the next tick, one second at most: the wall clock can jump
(NTP, a suspended machine) while loop timers run on the monotonic clock, and a clock a test
moved is seen within that second too.

Each tick starts one process, input `{"scheduled_at": "<the tick, ISO 8601 in the
schedule's time zone>"}`, idempotency key `schedule:<workflow>:<tick epoch seconds>`: the
same tick never starts two processes, whatever restarts or reloads happen. How far each
schedule has been served is its mark (`ScheduleStore`), moved in the transaction that
inserts the tick's process. At start a schedule resumes from its mark: ticks missed while
the daemon was down are coalesced into one process, for the latest of them. A schedule
armed anew (a new workflow, a changed cron or time zone, by a reload or `PUT
/v1/workflows/{name}`) owes nothing before that moment; its mark says so at once, so a
tick missed between arming and a crash still runs at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from registry import StoreUnavailable
from scheduler import Cron

from .abc import ScheduleMark, ScheduleStore
from .definition import Definition, Schedule

__all__ = ["RECHECK", "Schedules"]

log = logging.getLogger("workflows.schedules")

RECHECK = 1.0  # seconds: the longest the loop sleeps without looking at the clock

# Start the process of a tick: (mark to store with it, `scheduled_at`); raises when the
# write failed (the tick is tried again on the next round).
Fire = Callable[[ScheduleMark, str], Awaitable[None]]


@dataclass(slots=True)
class _Armed:
    schedule: Schedule
    cron: Cron
    served: float  # every tick up to here started its process, or was not owed
    due: float | None  # the first tick after `served` (None: it never fires again)

    def mark(self, workflow: str, tick: float) -> ScheduleMark:
        schedule = self.schedule
        return ScheduleMark(
            workflow=workflow, cron=schedule.cron, timezone=schedule.timezone, tick=tick
        )


class Schedules:
    """The engine's scheduled workflows and the loop that starts their ticks."""

    def __init__(
        self, store: ScheduleStore, fire: Fire, clock: Callable[[], float], recheck: float
    ) -> None:
        self._store, self._fire, self._clock, self._recheck = store, fire, clock, recheck
        self._wanted: dict[str, Schedule] = {}
        self._armed: dict[str, _Armed] = {}
        self._stored: dict[str, ScheduleMark] = {}  # read at open, taken by the first round
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def update(self, definitions: Iterable[Definition]) -> None:
        """The definitions in force (at open, on a reload, on `PUT`); the loop arms,
        changes and drops schedules to match, at once."""
        self._wanted = {d.name: d.schedule for d in definitions if d.schedule is not None}
        self._changed.set()

    async def open(self) -> None:
        """Load the marks; `start` then fires the schedules."""
        await self._store.create_tables()
        self._stored = {mark.workflow: mark for mark in await self._store.marks()}

    def start(self) -> None:
        """Begin firing. No await: the engine starts it right after resuming its processes,
        and an await there would let 1,000 resumed processes run before the daemon serves."""
        self._task = asyncio.create_task(self._run(), name="workflow-schedules")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        first = True
        while True:
            self._changed.clear()
            try:
                await self._sync(first)
                first = False
                await self._fire_due()
            except StoreUnavailable:  # the database logs the outage; the next round retries
                log.debug("workflow schedules: waiting for storage")
            except Exception:
                log.exception("workflow schedules: a round failed")
            await self._sleep()

    async def _sync(self, first: bool) -> None:
        """Arm what is wanted and not armed (or armed with another schedule), drop the
        rest; at the first round, marks of schedules no longer wanted go too."""
        for name in [n for n in self._armed if n not in self._wanted]:
            await self._store.forget(name)
            del self._armed[name]
        if first:
            for name in [n for n in self._stored if n not in self._wanted]:
                await self._store.forget(name)
        for name, schedule in self._wanted.items():
            armed = self._armed.get(name)
            if armed is None or armed.schedule != schedule:
                await self._arm(name, schedule, self._stored.pop(name, None) if first else None)
        if first:
            self._stored = {}

    async def _arm(self, name: str, schedule: Schedule, stored: ScheduleMark | None) -> None:
        try:
            cron = Cron(schedule.cron, schedule.timezone)
        except (ValueError, KeyError) as exc:  # checked at the edge; a zone gone from tzdata
            log.error("workflow %s: schedule %r not armed: %s", name, schedule.cron, exc)
            return
        same = stored is not None and (stored.cron, stored.timezone) == (
            cron.expression,
            cron.timezone,
        )
        # Resumed: ticks since its mark were missed while down. Else it owes nothing before now.
        served = stored.tick if same and stored is not None else self._clock()
        armed = _Armed(schedule, cron, served, cron.next_after(served))
        if not same:
            await self._store.mark(armed.mark(name, served))
        self._armed[name] = armed

    async def _fire_due(self) -> None:
        now = self._clock()
        for name, armed in list(self._armed.items()):
            if armed.due is None or armed.due > now:
                continue
            tick = armed.cron.latest(armed.served, now)  # the latest missed: coalesced
            if tick is None:
                continue
            scheduled_at = armed.cron.local(tick).isoformat()
            try:
                await self._fire(armed.mark(name, tick), scheduled_at)
            except StoreUnavailable:  # the database logs the outage; the next round retries
                log.debug("workflow %s: the tick of %s waits for storage", name, scheduled_at)
                continue
            except Exception:
                log.exception("workflow %s: the tick of %s did not start", name, scheduled_at)
                continue
            armed.served, armed.due = tick, armed.cron.next_after(tick)

    async def _sleep(self) -> None:
        now = self._clock()
        # A tick already due here did not start (the store refused): the next round, not
        # a busy loop, tries it again.
        dues = [a.due for a in self._armed.values() if a.due is not None and a.due > now]
        wait: float | None = min([self._recheck, *(due - now for due in dues)])
        if not self._wanted and not self._armed:
            wait = None  # no schedule: nothing to look at until one comes (update)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._changed.wait()
