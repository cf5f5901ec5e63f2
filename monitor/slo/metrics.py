"""The SLO metrics of DESIGN.md §4: copied from the ledgers on the loop, rendered and
deflated in a thread once a minute."""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monitor.metrics.exposition import Deflated
from monitor.slo.ledger import PERIOD_INDEX, WINDOW_INDEX, months_around, window_sums

if TYPE_CHECKING:  # book.py imports this module for its older import path
    from monitor.slo.book import SloBook


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


class SloMetrics:
    """The SLO metrics of DESIGN.md §4, rendered once a minute.

    Every value comes from closed minutes (window sums, the open 5-minute block,
    month sums), so the text changes only when a minute closes. The first call
    in a minute advances the ledgers and copies their sums on the loop (one array
    copy per SLO), formats and deflates the text in a worker thread (20,000 SLOs
    are 380,000 lines, ~1 s) and keeps both; every other scrape that minute
    reuses them. A scheduler job calls `current()` every few seconds, so scrapes
    find them ready.
    """

    def __init__(self, book: SloBook, clock: Callable[[], float]) -> None:
        self._book, self._clock = book, clock
        self._rendered: tuple[int, asyncio.Future[Deflated]] | None = None

    def invalidate(self) -> None:
        """SLOs were added or removed: render afresh at the next scrape."""
        self._rendered = None

    async def current(self) -> Deflated:
        """This minute's text, plain and deflated (see monitor/metrics/exposition.py)."""
        minute = int(self._clock() // 60)
        rendered = self._rendered
        if rendered is None or rendered[0] != minute or _failed(rendered[1]):
            rows = self.snapshot()

            def render() -> Deflated:
                return Deflated.of(render_slo_metrics(rows).encode())

            future = asyncio.get_running_loop().run_in_executor(None, render)
            self._rendered = rendered = (minute, future)
        # Shielded: a scrape that gives up must not cancel the render others wait on.
        return await asyncio.shield(rendered[1])

    def snapshot(self) -> tuple[SloRow, ...]:
        """Runs on the loop: advance to now and copy sums; no event publishing here."""
        now, rows = self._clock(), []
        minute = int(now // 60)
        month_names: dict[str, tuple[str, str]] = {}  # per time zone, not per SLO
        for entry in self._book.entries():
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
        return tuple(rows)


def _failed(future: asyncio.Future[Deflated]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def render_slo_metrics(rows: tuple[SloRow, ...]) -> str:
    """The text exposition; one pass over the SLOs fills all five families."""
    objectives = [
        "# HELP hms_slo_objective_ratio The SLO's objective.\n",
        "# TYPE hms_slo_objective_ratio gauge\n",
    ]
    slis = [
        "# HELP hms_slo_sli_ratio Good over valid events in the window.\n",
        "# TYPE hms_slo_sli_ratio gauge\n",
    ]
    burns = [
        "# HELP hms_slo_burn_rate Error ratio over the error budget.\n",
        "# TYPE hms_slo_burn_rate gauge\n",
    ]
    remaining = [
        "# HELP hms_slo_error_budget_remaining_ratio Error budget left over the SLO period.\n",
        "# TYPE hms_slo_error_budget_remaining_ratio gauge\n",
    ]
    slas = [
        "# HELP hms_sla_availability_ratio Availability of the calendar month.\n",
        "# TYPE hms_sla_availability_ratio gauge\n",
    ]
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
    return "".join(objectives + slis + burns + remaining + slas)
