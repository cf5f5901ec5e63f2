"""The engine's memory of processes that just left it (workflows/residency.py): a read
that ran while one left must not bring back its stale row, and the memory stays bounded
by time, dropped oldest first, however many finish a second."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from workflows.residency import FORGET_LEFT, Residency


def test_departures_are_remembered_for_a_while_then_dropped_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the module reads time.monotonic
    memory = Residency(
        cast(Any, None), clock=lambda: now[0], live={}, creating=(), spawn=lambda _: None
    )
    for n in range(50_000):  # a sustained 1,000 finishes a second for 50 s
        memory.left(f"p{n}")
        now[0] += 0.001
    began = 1000.0 + 49.0  # a read that began a second before the last departure
    assert memory.left_after("p49999", began)
    assert not memory.left_after("p48000", began)  # left before that read began
    memory.left("p0")  # p0 leaves again (it parked, came back, finished)
    now[0] += FORGET_LEFT - 1
    memory.left("p-late")
    assert memory.left_after("p0", began)  # its second departure is still remembered
    assert memory.left_after("p-late", began)
    assert memory.left_after("p49500", 0)  # 59.5 s ago
    assert not memory.left_after("p48000", 0)  # 61 s ago: forgotten
    assert len(memory._left) == 1002  # the last second's 1,000, p0 again and p-late
