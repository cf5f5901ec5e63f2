"""Burn-rate tiers: the multiwindow pairs behind both the daemon's burn events and
the Prometheus alerts, so the two agree on when an SLO burns too fast."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from registry import parse_duration


class Severity(StrEnum):
    """How urgently a burning SLO wants a human; the alert label Alertmanager routes on."""

    PAGE = "page"
    TICKET = "ticket"


SEVERITIES = tuple(Severity)


@dataclass(frozen=True, slots=True)
class BurnTier:
    """One multiwindow pair: alert when both windows burn faster than `factor`."""

    severity: Severity
    long: str
    short: str
    budget_spent: float  # fraction of the period's budget spent in `long` at `factor`

    def factor(self, period: timedelta) -> float:
        return self.budget_spent * period / parse_duration(self.long)


TIERS = (
    BurnTier(Severity.PAGE, "1h", "5m", 0.02),
    BurnTier(Severity.PAGE, "6h", "30m", 0.05),
    BurnTier(Severity.TICKET, "1d", "2h", 0.10),
    BurnTier(Severity.TICKET, "3d", "6h", 0.10),
)
