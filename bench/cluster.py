"""Replicas on PostgreSQL (DESIGN §8), beside one daemon on SQLite, in the same run.

Figures: registrations/s and heartbeats/s (wrk, as bench.registry measures them) and
durable workflow steps/s (3 HTTP calls a process, as bench.workflows) on SQLite with one
daemon, PostgreSQL with one replica and with three (the load spread over the three);
failover to a new leader after kill -9 of the leader and after a pause (SIGSTOP) beyond
the lease; the time until a killed replica's instances are probed again; and how long a
blocking query on one replica takes to wake after a registration on another (p50/p99).

The PostgreSQL server is the run's own (initdb in a temp dir, as tests/pg.py starts it),
with fsync on: a 2xx is as durable as on SQLite.

    python -m bench.cluster [--duration 5] [--processes 1500] [--lease 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from bench.http import get_json
from bench.probes import process
from bench.registry import Load, free_port, load
from bench.workflows import start_many, steps_target, workflow
from tests.pg import PostgresCluster, pg_bin
from tests.services import Recorder

NOWHERE = {"url": "http://127.0.0.1:9/"}
SERVE = [sys.executable, "-m", "monitor", "serve", "--log-level", "warning", "--config"]


@dataclass
class Daemon:
    name: str
    url: str
    popen: subprocess.Popen[bytes]


def daemon_config(
    workdir: Path, name: str, port: int, storage: dict[str, str], lease: float, target: str
) -> Path:
    config = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "storage": storage,
        "cluster": {"replica_id": name, "lease": f"{lease}s"},
        "defaults": {"probe": {"type": "none"}},
        "services": [{"name": "svc", "instances": [{"id": "target", "url": target}]}],
        "workflows": [workflow()],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def daemons(
    workdir: Path, names: list[str], storage: dict[str, str], lease: float, target: str
) -> Iterator[list[Daemon]]:
    with contextlib.ExitStack() as stack:
        started = []
        for name in names:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = daemon_config(workdir, name, port, storage, lease, target)
            popen = stack.enter_context(
                process([*SERVE, str(config)], workdir / f"{name}.log", url)
            )
            started.append(Daemon(name, url, popen))
        yield started


def spread(group: list[Daemon], kind: str, args: argparse.Namespace, workdir: Path) -> Load:
    """`kind` load on every daemon at once, the connections split between them; summed."""
    results: list[Load] = []
    connections = max(2, args.connections // len(group))

    def run(daemon: Daemon) -> None:
        home = workdir / f"load-{daemon.name}"
        home.mkdir(exist_ok=True)
        results.append(load(daemon.url, kind, args, home, connections=connections))

    threads = [threading.Thread(target=run, args=(d,)) for d in group]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Load(
        sum(r.requests_per_second for r in results),
        max(r.p50_ms for r in results),
        max(r.p99_ms for r in results),
        sum(r.errors for r in results),
        results[0].tool,
    )


def put(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")  # noqa: S310
    request.add_header("Content-Type", "application/json")
    urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 (127.0.0.1 only)


def heartbeat_fleet(group: list[Daemon], count: int) -> None:
    """The instances the heartbeat load renews (bench.registry's `bench` service)."""
    for n in range(count):
        put(f"{group[0].url}/v1/services/bench/instances/i{n}", NOWHERE | {"ttl": "1h"})


def completed(database: str | None, group: list[Daemon]) -> int:
    if database is None:
        counts = get_json(group[0].url + "/v1/workflows")["workflows"][0]["counts"]
        return int(counts["completed"])
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT count(*) FROM processes WHERE status = 'completed'").fetchone()
        return int(row[0]) if row else 0


def steps_per_second(group: list[Daemon], database: str | None, count: int) -> float:
    """3-step processes started through every replica in turn; steps/s to the last end."""
    started = time.monotonic()

    async def start_all() -> None:
        share = count // len(group)
        await asyncio.gather(*(start_many(d.url, share, max(4, 64 // len(group))) for d in group))

    asyncio.run(start_all())
    total = count // len(group) * len(group)
    deadline = time.monotonic() + 300
    while completed(database, group) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {completed(database, group)} of {total} completed")
        time.sleep(0.05)
    return 3 * total / (time.monotonic() - started)


def cluster_view(daemon: Daemon) -> dict[str, Any]:
    view: dict[str, Any] = get_json(daemon.url + "/v1/cluster", timeout=2)
    return view


def agreed_leader(group: list[Daemon], timeout: float = 60) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            views = [cluster_view(d) for d in group]
            leaders = {(v["leader"], v["epoch"]) for v in views}
            if len(leaders) == 1 and None not in next(iter(leaders)):
                leader, epoch = leaders.pop()
                return str(leader), int(epoch)
        time.sleep(0.02)
    raise RuntimeError("no leader agreed")


def failover(group: list[Daemon], how: str) -> float:
    """Seconds from killing (or pausing) the leader to the survivors agreeing on another."""
    leader, epoch = agreed_leader(group)
    victim = next(d for d in group if d.name == leader)
    survivors = [d for d in group if d is not victim]
    began = time.monotonic()
    victim.popen.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        while True:
            new_leader, new_epoch = agreed_leader(survivors)
            if new_leader != leader and new_epoch > epoch:
                return time.monotonic() - began
            time.sleep(0.01)
    finally:
        if how == "pause":
            victim.popen.send_signal(signal.SIGCONT)


def probes_resumed(workdir: Path, database: str, lease: float, instances: int) -> float:
    """Seconds from kill -9 of a replica until every instance has been probed again."""
    counter = Recorder()
    storage = {"url": database}
    with daemons(workdir, ["p1", "p2", "p3"], storage, lease, counter.url) as group:
        agreed_leader(group)
        probe = {"type": "http", "interval": "1s"}
        for n in range(instances):
            body = {"url": f"{counter.url}/i{n}", "probe": probe}
            put(f"{group[0].url}/v1/services/fleet/instances/i{n}", body)
        time.sleep(3)
        group[1].popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(lease + 3)
        gaps = []
        for n in range(instances):
            times = counter.times(f"/i{n}")
            before = [t for t in times if t <= killed]
            after = [t for t in times if t > killed]
            if before and after:
                gaps.append(after[0] - before[-1])
    counter.close()
    return max(gaps) if gaps else float("nan")


def wakeups(group: list[Daemon], samples: int) -> list[float]:
    """Seconds from a registration's 2xx on one replica to a blocking query on another
    returning with it."""
    writer, reader = group[0], group[1]
    times = []
    for n in range(samples):
        service = f"{writer.url}/v1/services/wake{n}"
        put(f"{service}/instances/a", NOWHERE)
        index = 0
        deadline = time.monotonic() + 10
        while not index and time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{reader.url}/v1/services/wake{n}", timeout=5) as seen,  # noqa: S310
            ):
                index = int(seen.headers["X-Registry-Index"])
        returned: list[float] = []
        blocking = f"{reader.url}/v1/services/wake{n}?index={index}&wait=10s"
        waiter = threading.Thread(target=_block, args=(blocking, returned))
        waiter.start()
        time.sleep(0.05)
        put(f"{service}/instances/b", NOWHERE)
        acknowledged = time.monotonic()
        waiter.join(15)
        if returned:
            times.append(returned[0] - acknowledged)
    return times


def _block(url: str, returned: list[float]) -> None:
    with urllib.request.urlopen(url, timeout=15) as answer:  # noqa: S310 (127.0.0.1 only)
        answer.read()
    returned.append(time.monotonic())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--heartbeat-instances", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1500)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--wakeups", type=int, default=100)
    parser.add_argument("--probed", type=int, default=60)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.heartbeat_instances, args.processes = 1, 20, 30
        args.wakeups, args.probed, args.lease = 5, 6, 1.0
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
    if not args.smoke and shutil.which("wrk") is None:
        sys.exit("wrk is not installed (bash bench/tools.sh)")
    rows: dict[str, dict[str, Any]] = {}
    postgres = PostgresCluster(initdb, pg_ctl, fsync=True)
    try:
        postgres.init()
        with tempfile.TemporaryDirectory(prefix="hms-cluster-") as tmp:
            workdir = Path(tmp)
            port = free_port()
            target = f"http://127.0.0.1:{port}"
            with steps_target(workdir, port, smoke=args.smoke):
                setups = [
                    ("SQLite, 1 daemon", ["s1"], {"path": str(workdir / "s.db")}),
                    ("PostgreSQL, 1 replica", ["a1"], {"url": postgres.database()}),
                    ("PostgreSQL, 3 replicas", ["b1", "b2", "b3"], {"url": postgres.database()}),
                ]
                for label, names, storage in setups:
                    with daemons(workdir, names, storage, args.lease, target) as group:
                        heartbeat_fleet(group, args.heartbeat_instances)
                        rows[label] = {
                            "register": spread(group, "register", args, workdir),
                            "heartbeat": spread(group, "heartbeat", args, workdir),
                            "steps": steps_per_second(group, storage.get("url"), args.processes),
                        }
                        if len(group) > 1:
                            rows[label]["wake"] = wakeups(group, args.wakeups)
                            rows[label]["kill"] = failover(group, "kill")
                with daemons(
                    workdir, ["c1", "c2", "c3"], {"url": postgres.database()}, args.lease, target
                ) as group:
                    paused = failover(group, "pause")
                resumed = probes_resumed(workdir, postgres.database(), args.lease, args.probed)
    finally:
        postgres.destroy()

    print("hms-mgmt replicas on PostgreSQL beside one daemon on SQLite (same run, same machine)")
    print(f"  {'':26} {'registrations/s':>16} {'heartbeats/s':>14} {'workflow steps/s':>17}")
    for label, row in rows.items():
        print(
            f"  {label:26} {row['register'].requests_per_second:16,.0f} "
            f"{row['heartbeat'].requests_per_second:14,.0f} {row['steps']:17,.0f}"
        )
    three = rows["PostgreSQL, 3 replicas"]
    wake = sorted(three["wake"])
    p50 = statistics.median(wake) * 1000
    p99 = wake[min(len(wake) - 1, int(0.99 * len(wake)))] * 1000
    print(
        f"  cross-replica blocking-query wake-up p50 / p99   {p50:6.1f} / {p99:.1f} ms   "
        "goal p99 <= 100 ms"
    )
    print(
        f"  new leader after kill -9 of the leader           {three['kill']:6.2f} s   goal <= 3 s"
    )
    print(
        f"  new leader after SIGSTOP of the leader           {paused:6.2f} s   "
        f"goal <= lease + 1 s = {args.lease + 1:.0f} s"
    )
    print(
        f"  a killed replica's instances probed again after  {resumed:6.2f} s   "
        f"(longest gap between two probes of one instance; interval 1 s, lease {args.lease:.0f} s)"
    )


if __name__ == "__main__":
    main()
