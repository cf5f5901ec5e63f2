"""Audit trail benchmark (issue 18): what the trail costs the writes it records.

Each changed registration and each workflow start writes one more row, the audit record,
in the change's own transaction. Measured here beside the same figures from the commit
before issue 18 (`--base`, efa205f), built and run in the same run: the bench checks that
commit out in a detached git worktree of its own (removed at the end) and runs its daemon
with this checkout's venv python, from that worktree. Both daemons run with auth on (the
trail records the token's name; the older config had no `name` key, so each daemon gets a
config of its own), on SQLite (fsync'd, as shipped) and on PostgreSQL (the run's own
server, fsync on, as tests/pg.py starts it) when it is installed.

Figures, before and after interleaved (the order alternating from one repeat to the
next, so a noisy minute or a growing table hits both), median of `--repeat`:
new-instance registrations/s and p99 (wrk, each PUT a new id, as bench.registry) and
workflow starts/s and p99 (wrk POSTs starting a workflow of one `publish` step; between
runs the started processes are waited for, so the next run has the cores). Rates count
2xx answers only: a start the daemon sheds (503 overloaded) starts nothing; the non-2xx
are shown. Goal: after within 10% of before.

    python -m bench.audit [--base efa205f] [--duration 10] [--repeat 3] [--no-postgres] [--smoke]

--smoke: tiny sizes, SQLite only, seconds; an aiohttp load when wrk is absent; "after"
alone when the base commit is not in the clone's history (a shallow clone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.http import get_json
from bench.registry import (
    ROOT,
    Load,
    daemon_argv,
    free_port,
    json_lua,
    register_lua,
    run_aiohttp_load,
    run_wrk,
    server,
)
from tests.pg import PostgresCluster, pg_bin

BASE = "efa205f"  # the commit before issue 18's first (07318a1)
TOKEN = "bench-audit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TARGET = "http://127.0.0.1:9/"
# One step, a publish: little work after the start, so the start is what is measured.
WORKFLOW = {"name": "Bench", "steps": [{"name": "tell", "publish": "bench.done"}]}
UNFINISHED = ("started", "running", "waiting", "compensating")
GOAL = 0.9  # after/before: within 10%


@dataclass(frozen=True)
class Side:
    label: str  # "before" or "after"
    root: Path  # the checkout its daemon runs from
    named_tokens: bool  # issue 18 made a token's name required (and unknown before it)


def phase(text: str) -> None:
    """Where the run is, on stderr (tests/test_bench_smoke.py shows it when one hangs)."""
    print(f"bench.audit {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def git(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)


@contextlib.contextmanager
def base_checkout(rev: str, workdir: Path) -> Iterator[Path | None]:
    """`rev` checked out in a detached worktree under `workdir`, removed at the end; None
    when the clone does not have it (a shallow CI clone)."""
    if git("cat-file", "-e", f"{rev}^{{commit}}").returncode != 0:
        phase(f"{rev} is not in this clone's history (shallow?): measuring 'after' alone")
        yield None
        return
    path = workdir / "base"
    added = git("worktree", "add", "--detach", str(path), rev)
    if added.returncode != 0:
        raise RuntimeError(f"git worktree add {rev}: {added.stderr}")
    try:
        yield path
    finally:
        git("worktree", "remove", "--force", str(path))


def write_config(workdir: Path, side: Side, port: int, storage: dict[str, str]) -> Path:
    token: dict[str, Any] = {"token": TOKEN, "scopes": ["*"]}
    if side.named_tokens:
        token = {"name": "bench"} | token
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "auth": {"tokens": [token]}},
        "storage": storage,
        "defaults": {"probe": {"type": "none"}},
        "workflows": [WORKFLOW],
    }
    path = workdir / f"{side.label}-{'pg' if 'url' in storage else 'sqlite'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_runs = itertools.count(1)


def registrations(url: str, args: argparse.Namespace, workdir: Path) -> Load:
    """New instance ids only: each a registration written, so each an audit record."""
    run = next(_runs)
    if shutil.which("wrk"):
        script = register_lua(run, TARGET, AUTH)
        return run_wrk(url, script, args.duration, args.connections, workdir)
    body = json.dumps({"url": TARGET, "ttl": "1h"}).encode()
    paths = ((f"/v1/services/reg/instances/r{run}-{n}", body) for n in itertools.count())
    return asyncio.run(run_aiohttp_load(url, "PUT", paths, args.duration, args.connections, AUTH))


def starts(url: str, args: argparse.Namespace, workdir: Path) -> Load:
    """Starts of the one-step workflow, then every started process waited for."""
    if shutil.which("wrk"):
        body = """'{"input": {"n": ' .. counter .. '}}'"""
        script = json_lua("POST", '"/v1/workflows/Bench"', body, headers=AUTH)
        figure = run_wrk(url, script, args.duration, args.connections, workdir)
    else:
        paths = (
            ("/v1/workflows/Bench", json.dumps({"input": {"n": n}}).encode())
            for n in itertools.count()
        )
        figure = asyncio.run(
            run_aiohttp_load(url, "POST", paths, args.duration, args.connections, AUTH)
        )
    wait_finished(url)
    return figure


def wait_finished(url: str, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while (left := unfinished(url)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} processes still unfinished after {limit:.0f} s")
        time.sleep(0.1)


def unfinished(url: str) -> int:
    counts = get_json(url + "/v1/workflows")["workflows"][0]["counts"]
    return sum(int(counts.get(status, 0)) for status in UNFINISHED)


def audit_records(url: str) -> int | None:
    """Records of the trail (every page of GET /v1/audit); None where there is no trail."""
    count, cursor = 0, ""
    while True:
        request = urllib.request.Request(  # noqa: S310 (127.0.0.1, the bench's daemon)
            f"{url}/v1/audit?limit=1000" + (f"&cursor={cursor}" if cursor else ""), headers=AUTH
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
                page = json.load(resp)
        except urllib.error.HTTPError as missing:
            if missing.code == 404 and not count:
                return None
            raise
        count += len(page["records"])
        cursor = page.get("next_cursor") or ""
        if not cursor:
            return count


@dataclass
class Figures:
    """One store's runs, per side and figure ("register", "start")."""

    runs: dict[tuple[str, str], list[Load]]
    records: int | None = None  # audit records the after daemon wrote
    base_has_trail: bool = False  # the before daemon answered GET /v1/audit: a wrong base


def measure(
    workdir: Path, sides: list[Side], storages: dict[str, dict[str, str]], args: argparse.Namespace
) -> Figures:
    """Both daemons up on their own databases of one store; the figures interleaved."""
    figures = Figures({})
    with contextlib.ExitStack() as stack:
        urls = {}
        for side in sides:
            port = free_port()
            urls[side.label] = url = f"http://127.0.0.1:{port}"
            config = write_config(workdir, side, port, storages[side.label])
            log = workdir / f"{config.stem}.log"
            stack.enter_context(server(daemon_argv(config), url, log, root=side.root))
        for repeat in range(args.repeat):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for kind, run in (("register", registrations), ("start", starts)):
                for side in order:
                    phase(f"{side.label}: {kind} ({repeat + 1} of {args.repeat})")
                    load = run(urls[side.label], args, workdir)
                    figures.runs.setdefault((side.label, kind), []).append(load)
        figures.records = audit_records(urls["after"])
        if "before" in urls:
            figures.base_has_trail = audit_records(urls["before"]) is not None
    return figures


def succeeded(load: Load, duration: int) -> float:
    """2xx answers/s: a start shed with 503 (overloaded) started nothing."""
    return load.requests_per_second - load.errors / duration


def report(store: str, figures: Figures, duration: int) -> list[str]:
    """A line per figure: each side's median 2xx answers/s and p99, their ratio and the
    verdict."""
    lines = []
    for kind, name in (("register", "registrations (new ids)"), ("start", "workflow starts")):
        cells, rates, errors = [], {}, []
        for side in ("before", "after"):
            loads = figures.runs.get((side, kind))
            if not loads:
                cells.append(f"{'(not run)':>19}")
                continue
            rates[side] = statistics.median(succeeded(load, duration) for load in loads)
            p99 = statistics.median(load.p99_ms for load in loads)
            cells.append(f"{rates[side]:7,.0f} /s {p99:6.1f} ms")
            if failed := sum(load.errors for load in loads):
                errors.append(f"{side} {failed}")
        verdict = "n/a"
        if len(rates) == 2:
            ratio = rates["after"] / rates["before"]
            verdict = f"{ratio:6.3f}x {'met' if ratio >= GOAL else 'missed'}"
        failures = f"  non-2xx/errors: {', '.join(errors)}" if errors else ""
        lines.append(f"  {store:10} {name:23} {cells[0]}  {cells[1]}  {verdict}{failures}")
    return lines


def spread(store: str, figures: Figures, duration: int) -> list[str]:
    """Every run's 2xx answers/s, in the order run: how far one run is from the median."""
    lines = []
    for kind, name in (("register", "registrations"), ("start", "starts")):
        sides = []
        for side in ("before", "after"):
            loads = figures.runs.get((side, kind), [])
            rates = " ".join(f"{succeeded(load, duration):,.0f}" for load in loads)
            sides.append(f"{side} {rates or '-'}")
        lines.append(f"  {store:10} {name:14} {' | '.join(sides)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=BASE, help="the commit before the trail")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; median shown")
    parser.add_argument(
        "--postgres",
        action=argparse.BooleanOptionalAction,
        default=pg_bin("initdb") is not None,
        help="PostgreSQL too (default: when it is installed)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, SQLite only, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.repeat, args.connections, args.postgres = 1, 1, 8, False
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if args.postgres and (initdb is None or pg_ctl is None):
        sys.exit("PostgreSQL is not installed (apt-get install postgresql, or --no-postgres)")
    if not args.smoke and shutil.which("wrk") is None:
        sys.exit("wrk is not installed (bash bench/tools.sh)")
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    base = git("rev-parse", "--short", args.base).stdout.strip() or args.base
    load_average = os.getloadavg()[0]
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="hms-audit-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        checkout = stack.enter_context(base_checkout(args.base, workdir))
        sides = [Side("after", ROOT, named_tokens=True)]
        if checkout is not None:
            sides.insert(0, Side("before", checkout, named_tokens=False))
        phase("SQLite")
        sqlite = {side.label: {"path": str(workdir / f"{side.label}.db")} for side in sides}
        results["SQLite"] = measure(workdir, sides, sqlite, args)
        if args.postgres:
            assert initdb is not None and pg_ctl is not None
            postgres = PostgresCluster(initdb, pg_ctl, fsync=True)
            stack.callback(postgres.destroy)
            postgres.init()
            phase("PostgreSQL")
            databases = {side.label: {"url": postgres.database()} for side in sides}
            results["PostgreSQL"] = measure(workdir, sides, databases, args)

    tools = {load.tool for f in results.values() for loads in f.runs.values() for load in loads}
    before = f"{base} (no trail)" if checkout is not None else "not run"
    print(
        f"hms-mgmt audit trail (issue 18): before = {before}, after = {head} "
        "(a record per change, in its transaction)"
    )
    print(
        f"  {os.cpu_count()} cores (load average {load_average:.1f} at the start), auth on, "
        f"{', '.join(sorted(tools))} over {args.connections} connections, {args.duration} s "
        f"per run, median of {args.repeat}, before and after interleaved"
    )
    print(
        f"  {'store':10} {'figure':23} {'before: 2xx, p99':>19}  {'after: 2xx, p99':>19}  "
        f"after/before, goal >= {GOAL:.2f}x"
    )
    for store, figures in results.items():
        print("\n".join(report(store, figures, args.duration)))
    print("  each run, 2xx answers/s:")
    for store, figures in results.items():
        print("\n".join(spread(store, figures, args.duration)))
    for store, figures in results.items():
        print(f"  audit records written by 'after' on {store}: {figures.records or 0:,}")
        if figures.base_has_trail:
            print(f"  warning: 'before' on {store} answered GET /v1/audit: {base} has the trail")
    if checkout is None:
        print(f"  before: not run ({args.base} is not in this clone's history)")


if __name__ == "__main__":
    main()
