"""The retry policy every package uses: workflow steps, notifications (DESIGN §1)."""

from __future__ import annotations

from dataclasses import dataclass

RETRYABLE = frozenset({429, *range(500, 600)})


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with full jitter; which HTTP statuses are worth another try."""

    max_attempts: int = 3
    backoff: float = 1.0  # seconds before the second attempt (before jitter)
    factor: float = 2.0
    max_backoff: float = 60.0
    retry_on: frozenset[int] = RETRYABLE  # plus connection errors and timeouts, always

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based); jitter in [0, 1)."""
        ceiling = min(self.max_backoff, self.backoff * self.factor ** (attempt - 1))
        return ceiling * (0.5 + jitter / 2)  # "equal jitter": never less than half


NO_RETRY = Retry(max_attempts=1)
DEFAULT_RETRY = Retry()
