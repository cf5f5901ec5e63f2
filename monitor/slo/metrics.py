"""The SLO metrics of DESIGN.md §4: rendered on the loop a slice of SLOs per turn,
deflated in a thread, once a minute."""

from __future__ import annotations

import asyncio
import itertools
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monitor.metrics.exposition import Deflated
from monitor.slo.ledger import PERIOD_INDEX, WINDOW_INDEX, months_around, window_sums

if TYPE_CHECKING:  # book.py imports this module for its older import path
    from monitor.slo.book import SloBook
    from monitor.slo.book import _Tracked as SloEntry


@dataclass(frozen=True, slots=True)
class SloRow:
    labels: str  # 'service="payments",slo="availability"'
    objective: float
    budget: float
    sums: array[int]  # a copy of the ledger's window sums
    open_block: tuple[int, int]
    period_name: str
    months: tuple[tuple[str, float | None], ...]

    def windows(self) -> list[tuple[str, int, int]]:
        """(window, good, valid) for every window, the period last."""
        out = []
        for name, index in (*WINDOW_INDEX.items(), (self.period_name, PERIOD_INDEX)):
            out.append((name, *window_sums(self.sums, self.open_block, index)))
        return out


PER_TURN = 100  # SLOs advanced, copied and rendered per turn of the loop: ~2,000 lines, ~5 ms


class SloMetrics:
    """The SLO metrics of DESIGN.md §4, rendered once a minute.

    Every value comes from closed minutes (window sums, the open 5-minute block,
    month sums), so the text changes only when a minute closes. The first call
    in a minute renders it and keeps it, plain and deflated; every other scrape
    that minute reuses them. A scheduler job calls `current()` every few seconds,
    so scrapes find them ready.

    20,000 SLOs are 380,000 lines, ~1 s of CPU. Formatted in a worker thread, that
    thread held the GIL the whole second: the loop got it back every 5 ms at best
    and now and then after 30-80 ms, so every request and probe start of that second
    waited. So the ledgers are advanced, copied and formatted on the loop, PER_TURN
    SLOs per turn, and only the joining and deflating (both let go of the GIL) run in a
    thread.
    """

    def __init__(self, book: SloBook, clock: Callable[[], float]) -> None:
        self._book, self._clock = book, clock
        self._rendered: tuple[int, asyncio.Future[Deflated]] | None = None
        self._renders: set[asyncio.Task[Deflated]] = set()  # running (after `invalidate` too)

    async def close(self) -> None:
        """Cancel the renders still running (shutdown)."""
        for task in list(self._renders):
            task.cancel()
        await asyncio.gather(*self._renders, return_exceptions=True)

    def invalidate(self) -> None:
        """SLOs were added or removed: render afresh at the next scrape."""
        self._rendered = None

    async def current(self) -> Deflated:
        """This minute's text, plain and deflated (see monitor/metrics/exposition.py)."""
        minute = int(self._clock() // 60)
        rendered = self._rendered
        if rendered is None or rendered[0] != minute or _failed(rendered[1]):
            task = asyncio.get_running_loop().create_task(self._render(), name="slo.metrics")
            self._renders.add(task)
            task.add_done_callback(self._renders.discard)
            self._rendered = rendered = (minute, task)
        # Shielded: a scrape that gives up must not cancel the render others wait on.
        return await asyncio.shield(rendered[1])

    async def _render(self) -> Deflated:
        entries, now = list(self._book.entries()), self._clock()
        month_names: dict[str, tuple[str, str]] = {}  # per time zone, not per SLO
        families: list[list[bytes]] = [[head.encode()] for head in HEADS]
        for start in range(0, len(entries), PER_TURN):
            rows = self.rows(entries[start : start + PER_TURN], now, month_names)
            for family, samples in zip(families, render_slo_families(rows), strict=True):
                family.append(samples.encode())
            await asyncio.sleep(0)
        # Joined there too: 30 MB copied into fresh pages took 32 ms (a join this big lets
        # go of the GIL).
        return await asyncio.get_running_loop().run_in_executor(None, _deflated, families)

    def rows(
        self,
        entries: Sequence[SloEntry],
        now: float,
        month_names: dict[str, tuple[str, str]],
    ) -> list[SloRow]:
        """Advance `entries`' ledgers to now and copy their sums; no event publishing here.
        `month_names`: the months shown per time zone, filled as zones come."""
        minute, rows = int(now // 60), []
        for entry in entries:
            ledger = entry.ledger
            ledger.advance(minute)
            zone = str(ledger.zone)
            if zone not in month_names:
                month_names[zone] = months_around(ledger, now)
            rows.append(
                SloRow(
                    entry.labels,
                    ledger.objective,
                    ledger.budget,
                    array("q", ledger.sums),
                    ledger.open_block,
                    entry.period_name,
                    tuple((m, ledger.month_sums(m).sli) for m in month_names[zone]),
                )
            )
        return rows


def _deflated(families: list[list[bytes]]) -> Deflated:
    return Deflated.of(b"".join(itertools.chain.from_iterable(families)))


def _failed(future: asyncio.Future[Deflated]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


HEADS = (
    "# HELP hms_slo_objective_ratio The SLO's objective.\n# TYPE hms_slo_objective_ratio gauge\n",
    "# HELP hms_slo_sli_ratio Good over valid events in the window.\n"
    "# TYPE hms_slo_sli_ratio gauge\n",
    "# HELP hms_slo_burn_rate Error ratio over the error budget.\n# TYPE hms_slo_burn_rate gauge\n",
    "# HELP hms_slo_error_budget_remaining_ratio Error budget left over the SLO period.\n"
    "# TYPE hms_slo_error_budget_remaining_ratio gauge\n",
    "# HELP hms_sla_availability_ratio Availability of the calendar month.\n"
    "# TYPE hms_sla_availability_ratio gauge\n",
)


def render_slo_families(rows: Sequence[SloRow]) -> tuple[str, str, str, str, str]:
    """The samples of `rows` in each of the five families (in HEADS' order), one pass."""
    objectives: list[str] = []
    slis: list[str] = []
    burns: list[str] = []
    remaining: list[str] = []
    slas: list[str] = []
    for row in rows:
        labels = row.labels
        objectives.append(f"hms_slo_objective_ratio{{{labels}}} {row.objective!r}\n")
        windows = row.windows()
        for window, good, valid in windows:
            if valid:
                sli = good / valid
                slis.append(f'hms_slo_sli_ratio{{{labels},window="{window}"}} {sli!r}\n')
                rate = (1 - sli) / row.budget
                burns.append(f'hms_slo_burn_rate{{{labels},window="{window}"}} {rate!r}\n')
        _, good, valid = windows[-1]
        if valid:
            left = 1 - (1 - good / valid) / row.budget
            remaining.append(f"hms_slo_error_budget_remaining_ratio{{{labels}}} {left!r}\n")
        for month, availability in row.months:
            if availability is not None:
                slas.append(
                    f'hms_sla_availability_ratio{{{labels},month="{month}"}} {availability!r}\n'
                )
    join = "".join
    return join(objectives), join(slis), join(burns), join(remaining), join(slas)
