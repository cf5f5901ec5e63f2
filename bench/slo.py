"""SLO benchmark: one evaluation cycle and the SLO metrics at 20,000 SLOs; memory per SLO;
and whether an evaluation costs more after 30 days of history (it should not).

    python -m bench.slo [--services 10000]
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from datetime import timedelta

from monitor.config import Service, Slo
from monitor.slo import SloBook, SloLedger, SloMetrics, render_slo_metrics
from scheduler import EventBus

START = 29_500_000  # an epoch minute (2026)


def services(count: int) -> list[Service]:
    slos = (
        Slo(name="availability", objective=99.9, period=timedelta(days=30)),
        Slo(name="latency", objective=99.0, latency_threshold=timedelta(milliseconds=300)),
    )
    return [Service(name=f"service-{n}", slos=slos) for n in range(count)]


def cpu() -> float:
    return time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=10_000, help="each with two SLOs")
    args = parser.parse_args()

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = SloBook(services(args.services), bus=EventBus())
    per_slo = (tracemalloc.get_traced_memory()[0] - before) / (2 * args.services)
    tracemalloc.stop()

    # A minute of probes for every service (one per instance, 10 s apart: 6 a minute).
    now = START * 60.0
    for n in range(args.services):
        for second in range(0, 60, 10):
            book.record(
                f"service-{n}", now + second, ok=True, response_time=0.05, maintenance=False
            )
    gc.freeze()  # as the daemon does every second (monitor/app.py)
    started = cpu()
    book.evaluate(now + 60)  # closes the minute for every SLO and checks every burn tier
    cycle = cpu() - started

    metrics = SloMetrics(book, lambda: now + 90)  # a scrape within the evaluated minute
    started = cpu()
    snapshot = metrics.snapshot()
    on_loop = cpu() - started
    text = render_slo_metrics(snapshot).encode()
    scrape = cpu() - started

    fresh, aged = SloLedger(0.999, 43_200), SloLedger(0.999, 43_200)
    for minute in range(START, START + 43_200):  # 30 days of history
        aged.record(minute, 6, 6)
    fresh.record(START + 43_200, 6, 6)

    def per_evaluation(ledger: SloLedger) -> float:
        minute, started = START + 43_201, cpu()
        for step in range(10_000):
            ledger.advance(minute + step)
            ledger.budget_remaining()
            for window in ("5m", "1h", "6h", "3d"):
                ledger.burn_rate(window)
        return (cpu() - started) / 10_000

    lines = text.count(b"\n")
    print(f"hms-mgmt SLO benchmark: {args.services:,} services x 2 SLOs")
    print(f"  memory per SLO (30d period)            {per_slo / 1024:7.1f} KiB")
    print(f"  evaluation cycle, all SLOs             {cycle * 1000:7.1f} ms CPU   goal < 1 s")
    print(
        f"  SLO metrics, all SLOs                  {scrape * 1000:7.1f} ms CPU   goal < 500 ms "
        f"({lines:,} lines; {on_loop * 1000:.0f} ms of it on the event loop)"
    )
    print(
        f"  one SLO, minute step + reads: fresh    {per_evaluation(fresh) * 1e6:7.1f} us; "
        f"after 30 days {per_evaluation(aged) * 1e6:.1f} us (flat by design)"
    )


if __name__ == "__main__":
    main()
