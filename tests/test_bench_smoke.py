"""Every bench runs to its end: `python -m bench.<name> --smoke` for each bench/*.py.

Benches are not run by anyone day to day, so they rot unseen (a shedder came after
bench.slo and made it die on a 503). Here each runs at tiny sizes, the daemon's side
only, and must exit 0 having printed its figures. Nothing about a figure is asserted:
timings are for people (STYLE.md). A new bench/*.py is picked up by itself; only the
helpers below are not benches.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Modules of bench/ that are not benches: shared code, and a peer run by bench.workflows.
HELPERS = {"__init__", "http", "dbos_peer", "processes"}
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in HELPERS)
# A figure: a number with its unit, as every bench prints them.
FIGURE = re.compile(r"\d[\d,.]*\s*(ms|us|s|MB|KiB|req/s|/s|%|x)\b")


def test_every_bench_module_is_found() -> None:
    benches = {"registry", "page", "slo", "workflows", "overload", "probes", "tasks", "audit"}
    assert benches <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_to_the_end_in_smoke_mode(name: str) -> None:
    try:
        run = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", "--smoke"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as hung:  # where it hung: what it printed so far
        printed = hung.stderr or b""  # bytes even with text=True (the output so far)
        text = printed.decode(errors="replace") if isinstance(printed, bytes) else printed
        pytest.fail(f"bench.{name} --smoke ran over {hung.timeout} s:\n{text}")
    assert run.returncode == 0, f"bench.{name} --smoke exited {run.returncode}:\n{run.stderr}"
    assert FIGURE.search(run.stdout), f"bench.{name} printed no figure:\n{run.stdout}"
