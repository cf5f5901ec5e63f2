"""Workflow SLOs: one ledger per workflow, good = completed within its deadline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

from monitor.slo.ledger import SloLedger, ledger_report, months_around


class WorkflowSlos:
    """The SLO of each workflow: good = completed within its deadline (over 30 days).

    A process counts once: bad when its deadline passes, else at its end (good
    when completed). Restored at start from the processes table itself.
    """

    PERIOD_MINUTES = 30 * 24 * 60

    def __init__(self, objectives: dict[str, float], timezone: str = "UTC") -> None:
        self._zone = ZoneInfo(timezone)
        self.objectives = objectives
        self.ledgers = {
            name: SloLedger(objective / 100, self.PERIOD_MINUTES, self._zone)
            for name, objective in objectives.items()
        }

    async def configure(
        self,
        objectives: dict[str, float],
        outcomes: Callable[[str, float], Awaitable[list[tuple[int, int, int]]]],
        now: float,
    ) -> None:
        """New workflow objectives (reload): unchanged ledgers go on, others are rebuilt."""
        minute = int(now // 60)
        ledgers = {}
        for name, objective in objectives.items():
            ledger = self.ledgers.get(name)
            if ledger is None or self.objectives.get(name) != objective:
                ledger = SloLedger(objective / 100, self.PERIOD_MINUTES, self._zone)
                ledger.restore(await outcomes(name, ledger.history_start(minute) * 60.0), minute)
            ledgers[name] = ledger
        self.objectives, self.ledgers = objectives, ledgers

    def declare(self, workflow: str, objective: float) -> None:
        """A workflow defined while running (PUT /v1/workflows/{name}): a ledger from now
        on; `load` at the next start restores its history from the processes table."""
        if self.objectives.get(workflow) != objective:
            self.ledgers[workflow] = SloLedger(objective / 100, self.PERIOD_MINUTES, self._zone)
            self.objectives = {**self.objectives, workflow: objective}

    def record(self, workflow: str, at: float, good: bool) -> None:
        ledger = self.ledgers.get(workflow)
        if ledger is not None:
            ledger.record(int(at // 60), int(good), 1)

    async def load(
        self, outcomes: Callable[[str, float], Awaitable[list[tuple[int, int, int]]]], now: float
    ) -> None:
        minute = int(now // 60)
        for name, ledger in self.ledgers.items():
            rows = await outcomes(name, ledger.history_start(minute) * 60.0)
            ledger.restore(rows, minute)

    def status(self, workflow: str, now: float) -> dict[str, object] | None:
        ledger = self.ledgers.get(workflow)
        if ledger is None:
            return None
        ledger.advance(int(now // 60))
        return {
            "workflow": workflow,
            "objective": self.objectives[workflow],
            "period": "30d",
            "good": "completed within the deadline",
            **ledger_report(ledger, months_around(ledger, now)),
        }
