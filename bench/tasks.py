"""Task-queue benchmark: 3-step workflows whose steps are Python functions run by a worker.

One `hms_mgmt.Worker` process (concurrency 4) deploys the workflow and serves its three
function steps; workflows are started through `hms_mgmt.Client`; the daemon keeps them
on its SQLite file (the default storage). Beside it, in the same run, DBOS Transact runs
the same three functions as `@DBOS.step()`s of a `@DBOS.workflow()` on its SQLite system
database (the peer `make bench` installs), in its own process so CPU is measured apart.

    python -m bench.tasks [--processes 2000] [--dbos 600] [--only hms|dbos] [--smoke]

How each figure is measured:
- workflows/s and steps/s: N workflows started with 64 starts in flight, from the
  first start until the daemon counts N completed.
- step latency: each task attempt in the daemon's history, its start to its end (the
  task created, queued, polled, run by the worker, completed and checkpointed).
- pickup latency (goal: due -> worker < 5 ms p99): from the moment the task was
  committed and known due to the daemon's queue (the poll answer's `due_at`) to the
  moment the worker's function starts (the poll answered, decoded and dispatched), both
  on this machine's wall clock. Its old upper bound, from the start of the step's
  attempt in the history (before the task's commit), is printed beside it. Measured with
  2 workflows in flight, fewer than the worker's 4 slots, so a long poll is always
  waiting; under the saturated run it includes the time a task waits for a free slot,
  printed apart.
- CPU per step: user + system CPU of the daemon and of the worker process over the
  saturated run, divided by its steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from bench.http import get_json
from bench.probes import process
from bench.processes import cpu_seconds
from bench.registry import free_port

WORKFLOW = "TaskBench"
CONCURRENCY = 4  # the worker's task slots
STARTS_IN_FLIGHT = 64
CALM_IN_FLIGHT = 2  # fewer than the worker's slots: one of its polls is always waiting
SERVE = [sys.executable, "-m", "monitor", "serve", "--log-level", "warning", "--config"]


# The three functions, the same for both engines: trivial bodies, so the figures are the
# engines' own cost per durable step.
def validate(n: int) -> dict[str, Any]:
    return {"valid": n >= 0, "n": n}


def compute(n: int) -> dict[str, Any]:
    return {"amount": n * 3 + 1}


def record(n: int, amount: int) -> dict[str, Any]:
    return {"record": f"rec-{n}-{amount}"}


# When each delivery the worker took became due (the poll answer's `due_at`), by
# (idempotency key, attempt): the step function reads it as it starts.
DUE_AT: dict[tuple[str, int], float | None] = {}


def stamps(context: Any) -> dict[str, Any]:
    """When the function started, and when its task became due (committed, known to the
    queue), so pickup latency comes from the outputs."""
    due = DUE_AT.pop((context.idempotency_key, context.attempt), None)
    return {"picked_at": time.time(), "due_at": due}


# hms-mgmt step functions take a StepContext. Async: the bodies are trivial, and a sync
# step function would be run in a thread.
async def validate_step(context: Any) -> dict[str, Any]:
    return {**validate(context.input["n"]), **stamps(context)}


async def compute_step(context: Any) -> dict[str, Any]:
    return {**compute(context.steps["validate"]["n"]), **stamps(context)}


async def record_step(context: Any) -> dict[str, Any]:
    return {**record(context.input["n"], context.steps["compute"]["amount"]), **stamps(context)}


def bench_workflow() -> Any:
    from hms_mgmt import Workflow  # the SDK; imported here so the DBOS side runs without it

    return (
        Workflow(WORKFLOW)
        .step("validate", validate_step)
        .step("compute", compute_step)
        .step("record", record_step)
    )


async def serve_worker(url: str) -> None:
    """The worker process: deploys the workflow, serves its steps until SIGTERM."""
    from hms_mgmt import Worker

    class StampingWorker(Worker):
        async def _outcome(self, queue: str, delivery: Any) -> tuple[str, Any]:
            key = (str(delivery["idempotency_key"]), int(delivery["attempt"]))
            DUE_AT[key] = delivery.get("due_at")
            return await super()._outcome(queue, delivery)

    await StampingWorker(url, workflows=[bench_workflow()], concurrency=CONCURRENCY).run()


def write_config(workdir: Path, port: int) -> Path:
    config = {
        # Shedding off: the bench measures the queue, and the SDK's client does not wait
        # out a 503 the way bench/http.py does.
        "server": {"listen": f"127.0.0.1:{port}", "overload_lag": "0s"},
        "storage": {"path": str(workdir / "hms.db")},
        "defaults": {"probe": {"type": "none"}},
    }
    path = workdir / "hms.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_deployed(url: str, limit: float = 30) -> None:
    """The worker has put the definition (PUT /v1/workflows/{name})."""
    deadline = time.monotonic() + limit
    while True:
        try:
            get_json(f"{url}/v1/workflows/{WORKFLOW}")
            return
        except urllib.error.HTTPError as error:
            if error.code != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def counts(url: str) -> dict[str, int]:
    for entry in get_json(url + "/v1/workflows")["workflows"]:
        if entry["name"] == WORKFLOW:
            return {k: int(v) for k, v in entry["counts"].items()}
    return {}


def wait_completed(url: str, count: int, limit: float = 600) -> float:
    deadline = time.monotonic() + limit
    while (seen := counts(url)).get("completed", 0) < count:
        if seen.get("failed", 0) or time.monotonic() > deadline:
            raise RuntimeError(f"{count} workflows started, now {seen}")
        time.sleep(0.05)
    return time.monotonic()


async def start_all(url: str, first: int, count: int, in_flight: int) -> None:
    """`count` workflows, `in_flight` starts at a time, each answered 202 at once."""
    from hms_mgmt import Client

    numbers = iter(range(first, first + count))
    async with Client(url) as hms:

        async def starter() -> None:
            for n in numbers:
                await hms.start(WORKFLOW, {"n": n})

        await asyncio.gather(*(starter() for _ in range(in_flight)))


async def run_calm(url: str, first: int, count: int) -> None:
    """`count` workflows run to their end, CALM_IN_FLIGHT at a time."""
    from hms_mgmt import Client

    numbers = iter(range(first, first + count))
    async with Client(url) as hms:

        async def runner() -> None:
            for n in numbers:
                report = await hms.run(WORKFLOW, {"n": n}, timeout=30)
                if not report.success:
                    raise RuntimeError(f"workflow {n}: {report.status} {report.error}")

        await asyncio.gather(*(runner() for _ in range(CALM_IN_FLIGHT)))


def task_attempts(db: Path, numbers: range) -> tuple[list[float], list[float], list[float]]:
    """Step latencies, pickup latencies (due -> function start) and their upper bounds
    (attempt start -> function start), in seconds, of the processes whose input `n` is in
    `numbers`, from the history and the outputs the step functions stamped."""
    latencies, pickups, bounds = [], [], []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        outputs = {
            seq: json.loads(raw)
            for seq, text, raw in conn.execute("SELECT seq, input, outputs FROM processes")
            if json.loads(text)["n"] in numbers
        }
        rows = conn.execute(
            "SELECT process, step, started_at, ended_at FROM process_history WHERE kind = 'task'"
        )
        for seq, step, started, ended in rows:
            if seq in outputs:
                stamped = outputs[seq][step]
                latencies.append(ended - started)
                bounds.append(stamped["picked_at"] - started)
                if stamped.get("due_at") is not None:
                    pickups.append(stamped["picked_at"] - stamped["due_at"])
    return latencies, pickups, bounds


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.contextmanager
def daemon_and_worker(workdir: Path) -> Iterator[tuple[str, int, int]]:
    """A daemon on a free port and one worker process: (url, daemon pid, worker pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(workdir, port)
    with process([*SERVE, str(config)], workdir / "daemon.log", url) as daemon:
        worker = [sys.executable, "-m", "bench.tasks", "--serve-worker", url]
        with process(worker, workdir / "worker.log") as serving:
            wait_deployed(url)
            yield url, daemon.pid, serving.pid


def hms(workdir: Path, count: int, calm: int) -> dict[str, Any]:
    with daemon_and_worker(workdir) as (url, daemon, worker):
        asyncio.run(run_calm(url, 0, calm))
        daemon0, worker0 = cpu_seconds(daemon), cpu_seconds(worker)
        started = time.monotonic()
        asyncio.run(start_all(url, calm, count, STARTS_IN_FLIGHT))
        seconds = wait_completed(url, calm + count) - started
        daemon_cpu, worker_cpu = cpu_seconds(daemon) - daemon0, cpu_seconds(worker) - worker0
    calm_latencies, calm_pickups, calm_bounds = task_attempts(workdir / "hms.db", range(calm))
    latencies, busy_pickups, _ = task_attempts(workdir / "hms.db", range(calm, calm + count))
    return {
        "seconds": seconds,
        "cpu": daemon_cpu + worker_cpu,
        "daemon_cpu": daemon_cpu,
        "worker_cpu": worker_cpu,
        "latencies": latencies,
        "calm_latencies": calm_latencies,
        "calm_pickups": calm_pickups,
        "calm_bounds": calm_bounds,
        "busy_pickups": busy_pickups,
    }


def run_dbos(count: int, threads: int, path: str) -> None:
    """The peer's process: prints one JSON line (seconds, cpu, step latencies)."""
    from dbos import DBOS

    DBOS(config={"name": "bench-tasks", "system_database_url": f"sqlite:///{path}"})
    validate_peer = DBOS.step()(validate)
    compute_peer = DBOS.step()(compute)
    record_peer = DBOS.step()(record)

    @DBOS.workflow()
    def three_steps(n: int) -> None:
        validated = validate_peer(n)
        computed = compute_peer(validated["n"])
        record_peer(n, computed["amount"])

    DBOS.launch()
    started, cpu = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(three_steps, range(count)))
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    DBOS.destroy()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        spans = conn.execute(
            "SELECT completed_at_epoch_ms - started_at_epoch_ms FROM operation_outputs"
        ).fetchall()
    latencies = [ms / 1000 for (ms,) in spans if ms is not None]
    print(json.dumps({"seconds": seconds, "cpu": cpu, "latencies": latencies}))


def dbos(workdir: Path, count: int, threads: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.tasks", "--dbos-peer", str(count), str(threads)]
    out = subprocess.run(
        [*argv, str(workdir / "dbos.sqlite")],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def print_rates(count: int, result: dict[str, Any], cpu_of: str) -> float:
    steps = 3 * count
    rate: float = steps / result["seconds"]
    print(f"    completed workflows/s              {count / result['seconds']:8.0f}")
    print(
        f"    durable steps/s                    {rate:8.0f}   "
        f"({result['cpu'] / steps * 1000:.2f} ms CPU per step, {cpu_of})"
    )
    return rate


def print_spread(label: str, values: list[float], note: str) -> None:
    p50, p99 = quantile(values, 0.5) * 1000, quantile(values, 0.99) * 1000
    print(f"    {label:38} {p50:6.2f} / {p99:.2f} ms   {note}")


def use_this_trees_sdk() -> None:
    """Import hms_mgmt from this tree's client/, in this process and the worker's: the
    shared virtualenv's editable install points at one checkout only, so without this a
    worktree's bench would measure another tree's worker."""
    client = str(Path(__file__).resolve().parent.parent / "client")
    sys.path.insert(0, client)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [client, os.environ.get("PYTHONPATH")]))


def main() -> None:
    use_this_trees_sdk()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2000)
    parser.add_argument("--calm", type=int, default=300, help="workflows for pickup latency")
    parser.add_argument("--dbos", type=int, default=600, help="DBOS workflows (it is slower)")
    parser.add_argument("--dbos-threads", type=int, default=16, help="its best on 2 cores")
    parser.add_argument("--only", choices=["hms", "dbos"], help="one side only")
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds, no DBOS peer")
    parser.add_argument("--serve-worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--dbos-peer", nargs=3, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        asyncio.run(serve_worker(args.serve_worker))
        return
    if args.dbos_peer:
        count, threads, path = args.dbos_peer
        run_dbos(int(count), int(threads), path)
        return
    if args.smoke:
        args.processes, args.calm, args.only = 60, 10, args.only or "hms"
    with tempfile.TemporaryDirectory(prefix="hms-tasks-") as tmp:
        workdir = Path(tmp)
        peer = None if args.only == "hms" else dbos(workdir, args.dbos, args.dbos_threads)
        ours = None if args.only == "dbos" else hms(workdir, args.processes, args.calm)

    print("hms-mgmt task benchmark: 3-step workflows, each step a Python function")
    rate = peer_rate = float("nan")
    if ours is not None:
        print(
            f"  hms-mgmt, {args.processes:,} workflows, {STARTS_IN_FLIGHT} starts in flight, "
            f"one worker with concurrency {CONCURRENCY}"
        )
        rate = print_rates(args.processes, ours, "daemon + worker")
        steps = 3 * args.processes
        print(
            f"    CPU per step: daemon {ours['daemon_cpu'] / steps * 1000:.2f} ms, "
            f"worker {ours['worker_cpu'] / steps * 1000:.2f} ms"
        )
        calm = f"({args.calm:,} workflows, {CALM_IN_FLIGHT} in flight)"
        print_spread("step latency p50 / p99, saturated", ours["latencies"], "(queueing included)")
        print_spread(
            f"step latency p50 / p99, {CALM_IN_FLIGHT} in flight", ours["calm_latencies"], calm
        )
        print_spread(
            "pickup due -> worker p50 / p99", ours["calm_pickups"], "goal p99 < 5 ms " + calm
        )
        print_spread(
            "pickup upper bound p50 / p99", ours["calm_bounds"], "(from the attempt's start)"
        )
        print_spread("pickup, saturated", ours["busy_pickups"], "(waiting for a free slot)")
    if peer is not None:
        print(f"  DBOS Transact (SQLite), {args.dbos:,} workflows, {args.dbos_threads} threads")
        peer_rate = print_rates(args.dbos, peer, "its process")
        print_spread("step latency p50 / p99", peer["latencies"], "(its steps' own start to end)")
    if ours is not None and peer is not None:
        print(f"  hms-mgmt / DBOS steps/s              {rate / peer_rate:8.1f}x   goal >= 3x")


if __name__ == "__main__":
    main()
