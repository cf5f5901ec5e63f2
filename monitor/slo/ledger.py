"""SLO ledgers: SLIs over rolling windows, error budgets, burn rates, monthly SLAs.

One ledger per SLO counts good and valid events per minute (maintenance-time
probes are neither). Cost stays flat as history grows: every window keeps a
running sum, updated when a minute closes (add the minute that enters,
subtract the one that leaves), so an evaluation reads sums instead of
scanning a month of rows. Windows up to 2 hours move minute by minute, 6h to
3d by 5-minute blocks, the SLO's period (30 days, say) by the hour.

No data is no data: an SLI over a window without valid events is None,
never 100% and never NaN.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

WINDOWS = {"5m": 5, "30m": 30, "1h": 60, "2h": 120, "6h": 360, "1d": 1440, "3d": 4320}
MINUTE_CELLS = 120  # windows up to 2h: minute-exact
BLOCK = 5  # windows 6h, 1d, 3d: in 5-minute blocks
BLOCK_CELLS = 4320 // BLOCK
HOUR = 60
QUARTER = 15


def _cells(count: int) -> array[int]:
    # int32: a service probed 10,000 times a second fills an hour cell to 36 million.
    return array("i", bytes(4 * count))


@dataclass(frozen=True, slots=True, kw_only=True)
class Sums:
    good: int = 0
    valid: int = 0

    @property
    def error_ratio(self) -> float | None:
        return None if self.valid == 0 else 1 - self.good / self.valid

    @property
    def sli(self) -> float | None:
        return None if self.valid == 0 else self.good / self.valid


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthReport:
    month: str  # 2026-11
    availability: float | None  # ratio; None without data
    downtime_minutes: float | None
    allowed_minutes: float

    def to_json(self) -> dict[str, object]:
        return {
            "month": self.month,
            "availability_percent": None
            if self.availability is None
            else round(self.availability * 100, 6),
            "downtime_minutes": None
            if self.downtime_minutes is None
            else round(self.downtime_minutes, 3),
            "allowed_minutes": round(self.allowed_minutes, 3),
        }


WINDOW_INDEX = {name: i for i, name in enumerate(WINDOWS)}
PERIOD_INDEX = len(WINDOWS)
BLOCK_INDEXES = tuple(i for i, m in enumerate(WINDOWS.values()) if m > MINUTE_CELLS)


def window_sums(sums: array[int], open_block: tuple[int, int], index: int) -> tuple[int, int]:
    """(good, valid) of window `index` in a ledger's sums (or a copy of them); block
    windows include the open block's minutes."""
    good, valid = sums[2 * index], sums[2 * index + 1]
    if index in BLOCK_INDEXES:
        good, valid = good + open_block[0], valid + open_block[1]
    return good, valid


@dataclass(slots=True)
class SloLedger:
    """Good and valid events of one SLO, minute by minute, with running window sums.

    ~14 KB per SLO at a 30-day period: 120 minute cells, 864 five-minute blocks,
    720 hours, two int32 counters each.
    """

    objective: float  # ratio, e.g. 0.999
    period_minutes: int
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    keep_closed: bool = False
    closed: list[tuple[int, int, int]] = field(default_factory=list)  # to persist
    _current_minute: int = -1
    _good: int = 0
    _valid: int = 0
    _minutes: tuple[array[int], array[int]] = field(
        default_factory=lambda: (_cells(MINUTE_CELLS), _cells(MINUTE_CELLS))
    )
    _blocks: tuple[array[int], array[int]] = field(
        default_factory=lambda: (_cells(BLOCK_CELLS), _cells(BLOCK_CELLS))
    )
    _hours: tuple[array[int], array[int]] = field(default_factory=lambda: (_cells(1), _cells(1)))
    # Every window's running (good, valid) in one flat int64 array: window i at 2i, 2i+1,
    # the period last. A snapshot for /metrics is then one C-level copy per SLO.
    sums: array[int] = field(default_factory=lambda: array("q", bytes(16 * (len(WINDOWS) + 1))))
    _minute_windows: tuple[tuple[int, int], ...] = ()  # (index, cells)
    _block_windows: tuple[tuple[int, int], ...] = ()
    open_block: tuple[int, int] = (0, 0)
    _open_hour: tuple[int, int] = (0, 0)
    _months: dict[str, Sums] = field(default_factory=dict)
    _month_quarter: tuple[int, str] = (-1, "")

    def __post_init__(self) -> None:
        hours = max(1, -(-self.period_minutes // HOUR))
        self._hours = (_cells(hours), _cells(hours))
        self._minute_windows = tuple(
            (WINDOW_INDEX[n], m) for n, m in WINDOWS.items() if m <= MINUTE_CELLS
        )
        self._block_windows = tuple(
            (WINDOW_INDEX[n], m // BLOCK) for n, m in WINDOWS.items() if m > MINUTE_CELLS
        )

    @property
    def budget(self) -> float:
        return 1 - self.objective

    def record(self, minute: int, good: int, valid: int) -> None:
        """Count events of `minute` (epoch minutes). Minutes arrive in order; a late one
        for a closed minute is added to the current one rather than rewriting history."""
        if minute > self._current_minute:
            self.advance(minute)
        self._good += good
        self._valid += valid

    def advance(self, minute: int) -> None:
        """Close every minute before `minute`."""
        if self._current_minute < 0:
            self._current_minute = minute
            return
        if minute - self._current_minute > self.period_minutes:
            # Down for longer than the period: nothing to carry, start afresh.
            self._close(self._current_minute, self._good, self._valid)
            self._reset_to(minute)
            return
        while self._current_minute < minute:
            self._close(self._current_minute, self._good, self._valid)
            self._good = self._valid = 0
            self._current_minute += 1

    def restore(self, rows: Iterable[tuple[int, int, int]], minute: int) -> None:
        """Set the ledger from stored (minute, good, valid) rows as of `minute`.

        The same state as recording the rows and advancing to `minute`, without
        stepping through every minute in between: a restart after 30 days costs
        one pass over the rows, not 43,200 closes per SLO. Rows must be older
        than `minute` (the open minute is never stored); `history_start` says
        how far back they are needed.
        """
        self._reset_to(minute)
        self._months.clear()
        hour_cells = len(self._hours[0])
        open_block, open_hour = minute // BLOCK, minute // HOUR
        block_good = block_valid = hour_good = hour_valid = 0
        for at, good, valid in rows:
            if at >= minute or not valid:  # a minute from the future: the clock went back
                continue
            month = self.month_of(at)
            before = self._months.get(month, Sums())
            self._months[month] = Sums(good=before.good + good, valid=before.valid + valid)
            if minute - at <= MINUTE_CELLS:
                _put(self._minutes, at, good, valid)
            if (block := at // BLOCK) == open_block:
                block_good, block_valid = block_good + good, block_valid + valid
            elif open_block - block <= BLOCK_CELLS:
                _put(self._blocks, block, good, valid)
            if (hour := at // HOUR) == open_hour:
                hour_good, hour_valid = hour_good + good, hour_valid + valid
            elif open_hour - hour <= hour_cells:
                _put(self._hours, hour, good, valid)
        self.open_block, self._open_hour = (block_good, block_valid), (hour_good, hour_valid)
        for index, cells in self._minute_windows:
            span = [(at % MINUTE_CELLS) for at in range(minute - cells, minute)]
            self.sums[2 * index] = sum(self._minutes[0][i] for i in span)
            self.sums[2 * index + 1] = sum(self._minutes[1][i] for i in span)
        for index, cells in self._block_windows:
            span = [(block % BLOCK_CELLS) for block in range(open_block - cells, open_block)]
            self.sums[2 * index] = sum(self._blocks[0][i] for i in span)
            self.sums[2 * index + 1] = sum(self._blocks[1][i] for i in span)
        self.sums[2 * PERIOD_INDEX] = sum(self._hours[0]) + hour_good
        self.sums[2 * PERIOD_INDEX + 1] = sum(self._hours[1]) + hour_valid
        while len(self._months) > 3:
            del self._months[min(self._months)]

    def history_start(self, minute: int) -> int:
        """The oldest minute `restore` needs: the period, the 3-day blocks, last month."""
        this_month = self.month_of(minute)
        year, number = (int(part) for part in this_month.split("-"))
        year, number = (year - 1, 12) if number == 1 else (year, number - 1)
        previous = datetime(year, number, 1, tzinfo=self.zone).timestamp() // 60
        hours = len(self._hours[0])
        return int(
            min(previous, (minute // HOUR - hours) * HOUR, minute - BLOCK * BLOCK_CELLS - BLOCK)
        )

    def window(self, name: str) -> Sums:
        good, valid = self._window(WINDOW_INDEX[name])
        return Sums(good=good, valid=valid)

    def _window(self, index: int) -> tuple[int, int]:
        return window_sums(self.sums, self.open_block, index)

    def period(self) -> Sums:
        return Sums(good=self.sums[2 * PERIOD_INDEX], valid=self.sums[2 * PERIOD_INDEX + 1])

    def budget_remaining(self) -> float | None:
        """1 - (period error ratio / budget): 1 untouched, 0 spent, below 0 overspent."""
        error = self.period().error_ratio
        return None if error is None else 1 - error / self.budget

    def budget_remaining_minutes(self) -> float | None:
        remaining = self.budget_remaining()
        return None if remaining is None else remaining * self.budget * self.period_minutes

    def burn_rate(self, name: str) -> float | None:
        # No Sums object: evaluation asks 8 of these per SLO, of 20,000 SLOs.
        good, valid = self._window(WINDOW_INDEX[name])
        return None if valid == 0 else (1 - good / valid) / (1 - self.objective)

    def month_sums(self, month: str) -> Sums:
        return self._months.get(month, Sums())

    def month_report(self, month: str) -> MonthReport:
        sums = self._months.get(month, Sums())
        year, number = (int(part) for part in month.split("-"))
        following = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=self.zone)
        first = datetime(year, number, 1, tzinfo=self.zone)
        minutes = (following - first).total_seconds() / 60
        availability = sums.sli
        downtime = None if availability is None else (1 - availability) * minutes
        return MonthReport(
            month=month,
            availability=availability,
            downtime_minutes=downtime,
            allowed_minutes=self.budget * minutes,
        )

    def month_of(self, minute: int) -> str:
        # UTC offsets are whole quarter hours (Asia/Kolkata +5:30, Asia/Kathmandu +5:45),
        # so months change on quarter-hour boundaries: compute once a quarter.
        quarter = minute // QUARTER
        if self._month_quarter[0] != quarter:
            moment = datetime.fromtimestamp(minute * 60, UTC).astimezone(self.zone)
            self._month_quarter = (quarter, moment.strftime("%Y-%m"))
        return self._month_quarter[1]

    def _close(self, minute: int, good: int, valid: int) -> None:
        _roll(self._minutes, self._minute_windows, self.sums, minute, good, valid)
        block_good, block_valid = self.open_block[0] + good, self.open_block[1] + valid
        if (minute + 1) % BLOCK:
            self.open_block = (block_good, block_valid)
        else:
            _roll(
                self._blocks,
                self._block_windows,
                self.sums,
                minute // BLOCK,
                block_good,
                block_valid,
            )
            self.open_block = (0, 0)
        period = 2 * PERIOD_INDEX
        self.sums[period] += good
        self.sums[period + 1] += valid
        hour_good, hour_valid = self._open_hour[0] + good, self._open_hour[1] + valid
        if (minute + 1) % HOUR:
            self._open_hour = (hour_good, hour_valid)
        else:
            # The period gained this hour minute by minute; the hour leaving it goes now.
            good_cells, valid_cells = self._hours
            slot = (minute // HOUR) % len(good_cells)
            self.sums[period] -= good_cells[slot]
            self.sums[period + 1] -= valid_cells[slot]
            good_cells[slot], valid_cells[slot] = hour_good, hour_valid
            self._open_hour = (0, 0)
        if valid:
            if self.keep_closed:
                self.closed.append((minute, good, valid))
            month = self.month_of(minute)
            before = self._months.get(month, Sums())
            self._months[month] = Sums(good=before.good + good, valid=before.valid + valid)
            if len(self._months) > 3:
                del self._months[min(self._months)]

    def _reset_to(self, minute: int) -> None:
        """Forget every window (all of it is older than the period); keep the months."""
        for ring in (*self._minutes, *self._blocks, *self._hours):
            ring[:] = _cells(len(ring))
        self.sums[:] = array("q", bytes(16 * (len(WINDOWS) + 1)))
        self.open_block = self._open_hour = (0, 0)
        self._good = self._valid = 0
        self._current_minute = minute


def _put(rings: tuple[array[int], array[int]], index: int, good: int, valid: int) -> None:
    good_cells, valid_cells = rings
    good_cells[index % len(good_cells)] += good
    valid_cells[index % len(valid_cells)] += valid


def _roll(
    rings: tuple[array[int], array[int]],
    windows: tuple[tuple[int, int], ...],
    sums: array[int],
    index: int,
    good: int,
    valid: int,
) -> None:
    """Close cell `index`: each window adds it and drops the cell `cells` back (for the
    longest window, the very cell about to be overwritten)."""
    good_cells, valid_cells = rings
    size = len(good_cells)
    for window, cells in windows:
        leaving = (index - cells) % size
        sums[2 * window] += good - good_cells[leaving]
        sums[2 * window + 1] += valid - valid_cells[leaving]
    good_cells[index % size], valid_cells[index % size] = good, valid


def months_around(ledger: SloLedger, now: float) -> tuple[str, str]:
    """This calendar month and the previous one, in the ledger's time zone."""
    current = ledger.month_of(int(now // 60))
    year, month = (int(x) for x in current.split("-"))
    return current, f"{year - 1}-12" if month == 1 else f"{year}-{month - 1:02d}"


def ledger_report(ledger: SloLedger, months: tuple[str, str]) -> dict[str, object]:
    """SLI, budget, windows and this and last month's SLA, as the API shows them."""
    this_month, previous = months
    return {
        "sli": ledger.period().sli,
        "error_budget_remaining": ledger.budget_remaining(),
        "error_budget_remaining_minutes": ledger.budget_remaining_minutes(),
        "sli_by_window": {name: ledger.window(name).sli for name in WINDOWS},
        "burn_rates": {name: ledger.burn_rate(name) for name in WINDOWS},
        "sla": {
            "current": ledger.month_report(this_month).to_json(),
            "previous": ledger.month_report(previous).to_json(),
        },
    }
