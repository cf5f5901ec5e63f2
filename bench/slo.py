"""SLO benchmark: 10,000 services with two SLOs each (20,000 SLOs).

In process: one evaluation cycle, the once-a-minute render of the SLO metrics
and a scrape that reuses it, memory per SLO, whether a minute step costs more
after 30 days of history (it should not), and a restart's restore of 30 days
of stored minutes next to replaying them minute by minute.

Live: a real daemon probing 10,000 instances (one per service, every 10 s,
nginx as the target) with all 20,000 SLOs; whole /metrics scrapes timed from
the client, the way Prometheus sees them.

    python -m bench.slo [--services 10000] [--no-live] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from datetime import timedelta
from pathlib import Path

import yaml

from bench.http import Retries, put_all
from bench.probes import NGINX_PORTS, fetch, nginx_config, process, target_urls
from bench.registry import free_port
from monitor.config import Service, Slo
from monitor.slo import SloBook, SloLedger, SloMetrics
from scheduler import EventBus

START = 29_500_000  # an epoch minute (2026)
THIRTY_DAYS = 43_200
SLOS = (
    {"name": "availability", "objective": 99.9, "period": "30d"},
    {"name": "latency", "objective": 99.0, "latency_threshold": "300ms"},
)


def services(count: int) -> list[Service]:
    slos = (
        Slo(name="availability", objective=99.9, period=timedelta(days=30)),
        Slo(name="latency", objective=99.0, latency_threshold=timedelta(milliseconds=300)),
    )
    return [Service(name=f"service-{n}", slos=slos) for n in range(count)]


def cpu() -> float:
    return time.process_time()


def in_process(count: int) -> None:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = SloBook(services(count), bus=EventBus())
    per_slo = (tracemalloc.get_traced_memory()[0] - before) / (2 * count)
    tracemalloc.stop()

    # A minute of probes for every service (one instance, 10 s apart: 6 a minute).
    now = START * 60.0
    for n in range(count):
        for second in range(0, 60, 10):
            book.record(
                f"service-{n}", now + second, ok=True, response_time=0.05, maintenance=False
            )
    gc.freeze()  # as the daemon does every second (monitor/app.py)
    started = cpu()
    book.evaluate(now + 60)  # closes the minute for every SLO and checks every burn tier
    cycle = cpu() - started

    async def scrapes() -> tuple[float, float, int]:
        metrics = SloMetrics(book, lambda: now + 90)  # within the evaluated minute
        started = cpu()
        text = (await metrics.current()).text  # the first in a minute renders (the job's share)
        render = cpu() - started
        started = cpu()
        await metrics.current()  # every later scrape that minute
        return render, cpu() - started, text.count(b"\n")

    render, cached, lines = asyncio.run(scrapes())

    fresh, aged = SloLedger(0.999, THIRTY_DAYS), SloLedger(0.999, THIRTY_DAYS)
    history = [(minute, 6, 6) for minute in range(START, START + THIRTY_DAYS)]
    started = cpu()
    for row in history:
        aged.record(*row)
    aged.advance(START + THIRTY_DAYS)
    replay = cpu() - started
    started = cpu()
    SloLedger(0.999, THIRTY_DAYS).restore(history, START + THIRTY_DAYS)
    restore = cpu() - started
    fresh.record(START + THIRTY_DAYS, 6, 6)

    def per_evaluation(ledger: SloLedger) -> float:
        minute, started = START + THIRTY_DAYS + 1, cpu()
        for step in range(10_000):
            ledger.advance(minute + step)
            ledger.budget_remaining()
            for window in ("5m", "1h", "6h", "3d"):
                ledger.burn_rate(window)
        return (cpu() - started) / 10_000

    print(f"hms-mgmt SLO benchmark: {count:,} services x 2 SLOs")
    print(f"  memory per SLO (30d period)            {per_slo / 1024:7.1f} KiB")
    print(f"  evaluation cycle, all SLOs             {cycle * 1000:7.1f} ms CPU   goal < 1 s")
    print(
        f"  SLO metrics, rendered once a minute    {render * 1000:7.1f} ms CPU "
        f"({lines:,} lines, a slice a loop turn, deflated in a thread)"
    )
    print(f"  SLO metrics, every other scrape        {cached * 1000:7.1f} ms CPU (the kept text)")
    print(
        f"  one SLO, minute step + reads: fresh    {per_evaluation(fresh) * 1e6:7.1f} us; "
        f"after 30 days {per_evaluation(aged) * 1e6:.1f} us (flat by design)"
    )
    print(
        f"  restart, one SLO with 30 days stored   {restore * 1000:7.1f} ms restore "
        f"(replaying minute by minute: {replay * 1000:.0f} ms)"
    )


def timed_scrape(url: str, *, gzip: bool) -> bytes:
    """The body as sent (compressed when asked), read to the end."""
    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        body: bytes = resp.read()
        return body


def live(count: int, *, smoke: bool = False) -> None:
    """`smoke`: the daemon probes its own /healthz (no nginx) and no minute is waited for."""
    if shutil.which("nginx") is None and not smoke:
        sys.exit("nginx is not installed (apt-get install nginx-light), or pass --no-live")
    with tempfile.TemporaryDirectory(prefix="hms-slo-") as tmp:
        workdir = Path(tmp)
        ports = [free_port() for _ in range(NGINX_PORTS)]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = {
            "server": {"listen": f"127.0.0.1:{port}"},
            "storage": {"path": str(workdir / "hms.db")},
            "defaults": {"probe": {"timeout": "2s"}},
            "services": [{"name": f"service-{n}", "slos": list(SLOS)} for n in range(count)],
        }
        (workdir / "hms.yaml").write_text(yaml.safe_dump(config))
        nginx = ["nginx", "-c", str(nginx_config(workdir, ports)), "-p", str(workdir)]
        serve = [sys.executable, "-m", "monitor", "serve", "--log-level", "warning"]
        with contextlib.ExitStack() as stack:
            if not smoke:
                stack.enter_context(process(nginx, workdir / "nginx.log"))
            daemon = [*serve, "--config", str(workdir / "hms.yaml")]
            stack.enter_context(process(daemon, workdir / "d.log", url))
            targets = [f"{url}/healthz"] * count if smoke else target_urls(ports, count)
            retries = Retries()  # the shedder answers a burst with 503 + Retry-After
            registrations = (
                (f"/v1/services/service-{n}/instances/i0", {"url": t, "probe": {"interval": "10s"}})
                for n, t in enumerate(targets)
            )
            asyncio.run(put_all(url, registrations, retries=retries))
            deadline = time.monotonic() + 150
            text = fetch(url + "/metrics")
            # A minute has closed (smoke: whatever the first scrape holds).
            while not smoke and 'hms_slo_sli_ratio{service="service-' not in text:
                if time.monotonic() > deadline:
                    sys.exit("no SLO samples after 150 s")
                time.sleep(5)
                text = fetch(url + "/metrics")
            times: dict[bool, list[float]] = {True: [], False: []}
            sizes = {}
            for n in range(4 if smoke else 20):
                gzip = n % 2 == 0
                started = time.perf_counter()
                sizes[gzip] = len(timed_scrape(url + "/metrics", gzip=gzip))
                times[gzip].append(time.perf_counter() - started)
                time.sleep(0.1 if smoke else 1)
    print()
    print(f"live daemon: {count:,} instances probed every 10s, {2 * count:,} SLOs")
    print(f"  ({retries.count} registrations refused with 503 and sent again after Retry-After)")
    lines, plain, packed = text.count("\n"), sizes[False] / 1e6, sizes[True] / 1e6
    print(f"  ({lines:,} lines, {plain:.1f} MB; gzip {packed:.1f} MB)")
    for gzip, how in ((True, "gzip, as Prometheus asks"), (False, "plain")):
        p50, worst = statistics.median(times[gzip]) * 1000, max(times[gzip]) * 1000
        print(f"  /metrics scrape, {how:24} p50 {p50:6.1f} ms, max {worst:6.1f} ms   goal < 500 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=10_000, help="each with two SLOs")
    parser.add_argument("--no-live", action="store_true", help="skip the live daemon")
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds, no nginx")
    args = parser.parse_args()
    if args.smoke:
        args.services = 20
    in_process(args.services)
    if not args.no_live:
        live(args.services, smoke=args.smoke)


if __name__ == "__main__":
    main()
