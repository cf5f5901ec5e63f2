"""Workflow benchmark: 3-step workflows whose steps call a local HTTP service (nginx).

Beside it, in the same run, the same workload on DBOS Transact with its SQLite
system database (bench/dbos_peer.py), the closest peer. Then: step overhead
at moderate load, list queries over 100,000 finished processes, and recovery
of 1,000 in-flight processes after kill -9. And a contended resource (capacity 4,
200 processes, each holding a unit for its whole life): processes/s beside DBOS's
queue with the same global concurrency, and the grant latency of a freed unit.

    python -m bench.workflows [--processes 3000] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.http import Retries, get_json, send
from bench.probes import nginx_config, process
from bench.processes import cpu_seconds
from bench.registry import BARE_SERVER, free_port, server

SERVE = [sys.executable, "-m", "monitor", "serve", "--log-level", "warning", "--config"]


def workflow(delay: str | None = None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"name": "validate", "call": {"service": "svc", "path": "/validate"}},
        {"name": "pay", "call": {"service": "svc", "path": "/pay", "body": {"n": "{input.n}"}}},
        {"name": "notify", "call": {"service": "svc", "path": "/notify"}},
    ]
    if delay:
        steps[1]["delay"] = delay
    return {"name": "Bench", "steps": steps}


def parallel_workflow() -> dict[str, Any]:
    """Validate, then three calls run together (a parallel step), then notify."""
    branches = [
        {"name": unit, "call": {"service": "svc", "path": f"/{unit}", "body": {"n": "{input.n}"}}}
        for unit in ("fire", "ems", "police")
    ]
    return {
        "name": "Bench",
        "steps": [
            {"name": "validate", "call": {"service": "svc", "path": "/validate"}},
            {"name": "dispatch", "parallel": branches},
            {"name": "notify", "call": {"service": "svc", "path": "/notify"}},
        ],
    }


def write_config(
    workdir: Path,
    name: str,
    port: int,
    target: str,
    delay: str | None = None,
    spec: dict[str, Any] | None = None,
) -> Path:
    config = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "storage": {"path": str(workdir / f"{name}.db")},
        "defaults": {"probe": {"type": "none"}},
        "services": [{"name": "svc", "instances": [{"id": "nginx", "url": target}]}],
        "workflows": [spec or workflow(delay)],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_many(url: str, count: int, concurrency: int, wait: str | None = None) -> None:
    numbers = iter(range(count))
    path = "/v1/workflows/Bench" + (f"?wait={wait}" if wait else "")
    retries = Retries()  # a start refused with 503 is sent again after Retry-After
    async with aiohttp.ClientSession(
        url, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as http:

        async def worker() -> None:
            for n in numbers:
                await send(http, "POST", path, json={"input": {"n": n}}, retries=retries)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def completed(url: str) -> int:
    counts = get_json(url + "/v1/workflows")["workflows"][0]["counts"]
    return int(counts["completed"])


def wait_completed(url: str, count: int, limit: float = 300) -> float:
    deadline = time.monotonic() + limit
    while completed(url) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {completed(url)} of {count} completed")
        time.sleep(0.05)
    return time.monotonic()


def spans(db: Path) -> list[float]:
    """Per step after the first: its end minus the previous step's end (seconds)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT process, n, ended_at FROM process_history ORDER BY process, n")
        out, previous = [], (None, 0.0)
        for process_seq, n, ended in rows:
            if process_seq == previous[0] and n > 0:
                out.append(ended - previous[1])
            previous = (process_seq, ended)
    return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def throughput(workdir: Path, target: str, count: int) -> tuple[float, float, list[float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(
        [*SERVE, str(write_config(workdir, "run", port, target))], workdir / "d1.log", url
    ) as d:
        cpu0, t0 = cpu_seconds(d.pid), time.monotonic()
        asyncio.run(start_many(url, count, 64))
        t1 = wait_completed(url, count)
        cpu = cpu_seconds(d.pid) - cpu0
    steps = 3 * count
    return steps / (t1 - t0), cpu / steps, spans(workdir / "run.db")


def parallel_throughput(workdir: Path, target: str, count: int) -> float:
    """Processes/s of the parallel workflow (5 calls each, 3 of them together)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(workdir, "parallel", port, target, spec=parallel_workflow())
    with process([*SERVE, str(config)], workdir / "d5.log", url):
        t0 = time.monotonic()
        asyncio.run(start_many(url, count, 64))
        t1 = wait_completed(url, count)
    return count / (t1 - t0)


def overhead(workdir: Path, target: str, count: int) -> list[float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(
        [*SERVE, str(write_config(workdir, "calm", port, target))], workdir / "d2.log", url
    ):
        asyncio.run(start_many(url, count, 8, wait="30s"))
    return spans(workdir / "calm.db")


def listing(workdir: Path, target: str, held: int) -> dict[str, list[float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(workdir, "held", port, target)
    with process([*SERVE, str(config)], workdir / "d3.log", url):
        pass  # creates the tables
    now = time.time()
    with sqlite3.connect(workdir / "held.db") as conn:
        conn.executemany(
            "INSERT INTO processes (id, workflow, status, input, outputs, created_at, updated_at, "
            "finished_at, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 3)",
            (
                (
                    f"{n:024x}",
                    "Bench",
                    "completed" if n % 10 else "failed",
                    '{"n": 1}',
                    '{"pay": {"status": "UP"}}',
                    now - held + n,
                    now - held + n,
                    now - held + n + 1,
                )
                for n in range(held)
            ),
        )
    depth = min(500, held // 100 - 1)
    timings: dict[str, list[float]] = {
        "newest 100": [],
        "workflow+status, 100": [],
        f"page {depth} deep": [],
    }
    with process([*SERVE, str(config)], workdir / "d3.log", url):
        cursor = None
        for _ in range(depth):  # walk to a deep page to get its cursor
            query = f"/v1/processes?limit=100{'&cursor=' + cursor if cursor else ''}"
            with urllib.request.urlopen(url + query, timeout=30) as resp:  # noqa: S310
                cursor = json.load(resp)["next_cursor"]
        queries = {
            "newest 100": "/v1/processes?limit=100",
            "workflow+status, 100": "/v1/processes?workflow=Bench&status=failed&limit=100",
            f"page {depth} deep": f"/v1/processes?limit=100&cursor={cursor}",
        }
        for _ in range(20):
            for name, query in queries.items():
                started = time.perf_counter()
                with urllib.request.urlopen(url + query, timeout=30) as resp:  # noqa: S310
                    resp.read()
                timings[name].append(time.perf_counter() - started)
    return timings


def recovery(workdir: Path, target: str, count: int) -> tuple[float, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(workdir, "crash", port, target, delay="1s")
    with process([*SERVE, str(config)], workdir / "d4.log", url) as daemon:
        asyncio.run(start_many(url, count, 64))
        daemon.kill()
        daemon.wait()
    time.sleep(1.0)  # every delay is overdue by the restart
    started = time.monotonic()
    with process([*SERVE, str(config)], workdir / "d4.log", url):
        ready = time.monotonic()
        done = wait_completed(url, count)
    return ready - started, done - started


def contention(
    workdir: Path, target: str, count: int, capacity: int
) -> tuple[float, list[float], dict[float, float]]:
    """Processes/s of `count` processes whose first step acquires one unit of a resource
    of `capacity` (held to the end), started at once; per waiting process, the time from
    the end of the holder it followed (before that one's final commit) to its first step's
    start; and the daemon's own histogram of release → holder resumes (bucket: count)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = write_config(workdir, "contended", port, target)
    config = yaml.safe_load(path.read_text())
    config["resources"] = [{"name": "lanes", "capacity": capacity}]
    config["workflows"][0]["steps"][0]["acquire"] = {"resource": "lanes"}  # still "Bench"
    path.write_text(yaml.safe_dump(config))
    with process([*SERVE, str(path)], workdir / "d5.log", url):
        t0 = time.monotonic()
        asyncio.run(start_many(url, count, 64))
        rate = count / (wait_completed(url, count) - t0)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:  # noqa: S310
            exposition = resp.read().decode()
    buckets = {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "hms_resource_grant_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    with sqlite3.connect(workdir / "contended.db") as conn:
        rows = conn.execute(
            "SELECT p.created_at, p.finished_at, h.started_at FROM processes p "
            "JOIN process_history h ON h.process = p.seq AND h.n = 0"
        ).fetchall()
    ends = sorted(finished for _, finished, _ in rows)
    latencies = []
    for created, _, started in rows:
        freed = [end for end in ends if end <= started]
        if freed and created < freed[-1]:  # it was queued when that unit was freed
            latencies.append(started - freed[-1])
    return rate, latencies, buckets


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """A quantile of a cumulative histogram, interpolated inside its bucket (as PromQL's
    histogram_quantile does)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            share = (rank - below) / max(buckets[bound] - below, 1e-9)
            return lower + (bound - lower) * share
        lower, below = bound, buckets[bound]
    return lower


def dbos(workdir: Path, target: str, count: int, capacity: int | None = None) -> dict[str, float]:
    name = "dbos.sqlite" if capacity is None else "dbos-queue.sqlite"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.dbos_peer",
            target,
            str(count),
            "16",
            str(workdir / name),
            *([] if capacity is None else [str(capacity)]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def steps_target(workdir: Path, port: int, *, smoke: bool) -> Iterator[None]:
    """nginx answering the steps; in smoke mode bare aiohttp (no tools needed)."""
    if smoke:
        (workdir / "target.py").write_text(BARE_SERVER)
        argv = [sys.executable, str(workdir / "target.py"), str(port), "asyncio"]
        with server(argv, f"http://127.0.0.1:{port}", workdir / "target.log"):
            yield
        return
    nginx = ["nginx", "-c", str(nginx_config(workdir, [port])), "-p", str(workdir)]
    with process(nginx, workdir / "nginx.log"):
        time.sleep(0.3)
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=3000)
    parser.add_argument("--dbos", type=int, default=600, help="DBOS workflows (it is slower)")
    parser.add_argument("--held", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds, no DBOS peer")
    parser.add_argument("--contended", type=int, default=200, help="processes on one resource")
    parser.add_argument("--capacity", type=int, default=4, help="the contended resource's")
    parser.add_argument("--contended-only", action="store_true", help="that scenario alone")
    args = parser.parse_args()
    calm_count, in_flight = 500, 1000
    if args.smoke:
        args.processes, args.held, calm_count, in_flight = 60, 1_000, 20, 30
        args.contended = 40
    elif shutil.which("nginx") is None:
        sys.exit("nginx is not installed (apt-get install nginx-light)")
    contended = (args.contended, args.capacity)
    with tempfile.TemporaryDirectory(prefix="hms-workflows-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        target = f"http://127.0.0.1:{port}"
        with steps_target(workdir, port, smoke=args.smoke):
            shared, grants, handovers = contention(workdir, target, *contended)
            queue_peer = None if args.smoke else dbos(workdir, target, *contended)
            if args.contended_only:
                print_contention(*contended, shared, grants, handovers, queue_peer)
                return
            peer = None if args.smoke else dbos(workdir, target, args.dbos)
            rate, cpu, busy = throughput(workdir, target, args.processes)
            fanned = parallel_throughput(workdir, target, args.processes)
            calm = overhead(workdir, target, calm_count)
            lists = listing(workdir, target, args.held)
            ready, recovered = recovery(workdir, target, in_flight)

    print("hms-mgmt workflow benchmark: 3-step workflows, each step an HTTP call to nginx")
    print(f"  hms-mgmt, {args.processes:,} processes, 64 starts in flight")
    print(
        f"    durable steps/s                    {rate:8.0f}   ({cpu * 1000:.2f} ms CPU per step)"
    )
    print(f"    processes/s, 3 calls in a row      {rate / 3:8.0f}")
    print(f"    processes/s, 1 + 3 together + 1    {fanned:8.0f}   (a parallel step; no DBOS peer)")
    if peer is not None:
        peer_rate = peer["steps"] / peer["seconds"]
        print(f"  DBOS Transact (SQLite), {args.dbos:,} workflows, 16 threads")
        peer_cpu = peer["cpu"] / peer["steps"] * 1000
        label = "    durable steps/s                   "
        print(f"{label} {peer_rate:8.0f}   ({peer_cpu:.2f} ms CPU/step)")
        print(f"  hms-mgmt / DBOS                      {rate / peer_rate:8.1f}x   goal >= 10x")
    print(
        f"  step overhead p50 / p99, 8 in flight {quantile(calm, 0.5) * 1000:6.2f} / "
        f"{quantile(calm, 0.99) * 1000:.2f} ms   goal p99 < 5 ms"
    )
    print(
        f"  step overhead p50 / p99, saturated   {quantile(busy, 0.5) * 1000:6.2f} / "
        f"{quantile(busy, 0.99) * 1000:.2f} ms   (queueing included)"
    )
    print(f"  list queries with {args.held:,} finished processes held   goal < 50 ms")
    for name, times in lists.items():
        p50, worst = statistics.median(times) * 1000, max(times) * 1000
        print(f"    {name:24}            p50 {p50:6.1f} ms, max {worst:6.1f} ms")
    print(
        f"  recovery of {in_flight:,} in-flight processes after kill -9: ready {ready:.2f} s, "
        f"all completed {recovered:.2f} s after restart   goal < 2 s"
    )
    print_contention(*contended, shared, grants, handovers, queue_peer)


def print_contention(
    count: int,
    capacity: int,
    rate: float,
    grants: list[float],
    handovers: dict[float, float],
    peer: dict[str, float] | None,
) -> None:
    print(f"  contended resource: capacity {capacity}, {count} processes started at once")
    print(f"    hms-mgmt processes/s               {rate:8.1f}")
    if peer is not None:
        peer_rate = peer["steps"] / 3 / peer["seconds"]
        print(
            f"    DBOS queue (global_concurrency {capacity}) processes/s {peer_rate:8.1f}   "
            f"hms-mgmt / DBOS {rate / peer_rate:.1f}x"
        )
    else:
        print("    DBOS: not run (--smoke)")
    if handovers:
        p50, p99 = bucket_quantile(handovers, 0.5) * 1000, bucket_quantile(handovers, 0.99) * 1000
        print(
            f"    grant latency p50 / p99, release → next holder's step {p50:5.2f} / {p99:.2f} ms"
            f"   goal p99 < 10 ms ({handovers.get(float('inf'), 0):.0f} grants)"
        )
    if grants:
        p50, p99 = quantile(grants, 0.5) * 1000, quantile(grants, 0.99) * 1000
        print(
            f"    the same from the holder's end (its final commit too) {p50:5.2f} / {p99:.2f} ms"
        )


if __name__ == "__main__":
    main()
