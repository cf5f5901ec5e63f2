"""Registry benchmark: heartbeats/s, durable registrations/s, p99, RSS with 10k instances, restart.

Measured as a fleet uses the daemon: every instance is probed (nginx answers,
every 10 s), each registration PUTs a new instance id (a new row, an fsync'd
commit, a first probe), re-registrations of unchanged instances are shown
apart (they write nothing), and RSS is summed over every process the daemon
runs. Registrations use 32 connections, heartbeats 64.

Every figure is printed next to its peers measured in the same run: bare
aiohttp answering a trivial POST on the same machine, on the same event loop
as the daemon (uvloop), is the ceiling any aiohttp daemon can reach (asyncio's
default loop is measured too; the higher median is the ceiling); single-node
etcd 3.4 (fsync'd, its default) over its v3 JSON gateway takes durable puts
of new keys and lease keep-alives, the nearest thing to registrations and
heartbeats. Servers run as subprocesses on 127.0.0.1 free ports; the load
comes from wrk (bench/tools.sh installs wrk, nginx and etcd). Without wrk an
aiohttp load generator in this process is used (it then competes for the
same cores, so its figures are lower bounds).

    python -m bench.registry [--duration 10] [--repeat 3] [--no-peers] [--smoke]

HMS_BENCH_DAEMON_ROOT=<another checkout> runs that checkout's daemon (before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.http import Retries, put_all
from bench.processes import descendants, tree_rss_mb

ROOT = Path(__file__).resolve().parent.parent
# Before/after figures: HMS_BENCH_DAEMON_ROOT=<another checkout> runs its daemon instead.
DAEMON_ROOT = Path(os.environ.get("HMS_BENCH_DAEMON_ROOT", ROOT))

BARE_SERVER = textwrap.dedent(
    """
    import asyncio
    import sys
    from aiohttp import web

    async def handle(request):
        await request.read()
        return web.json_response({"ok": True})

    async def ready(request):
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.add_routes([web.post("/{tail:.*}", handle), web.put("/{tail:.*}", handle),
                    web.get("/readyz", ready)])
    loop = asyncio.new_event_loop()
    if sys.argv[2] == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=loop)
    """
)

HEARTBEAT_LUA = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/services/bench/instances/i" .. (counter % {n}) .. "/heartbeat")
end
"""


def json_lua(
    method: str, path: str, body: str, prelude: str = "", headers: dict[str, str] | None = None
) -> str:
    """A wrk script sending JSON; `path` and `body` are Lua expressions of `counter`;
    `headers` are sent besides Content-Type (wrk's -H is ignored by a script's requests)."""
    fields = {"Content-Type": "application/json", **(headers or {})}
    table = ", ".join(f'["{name}"] = "{value}"' for name, value in fields.items())
    return f"""{prelude}
counter = 0
request = function()
  counter = counter + 1
  local headers = {{{table}}}
  return wrk.format("{method}", {path}, headers, {body})
end
"""


def register_lua(run: int, target: str, headers: dict[str, str] | None = None) -> str:
    """Each PUT a new instance id, also across runs: `run` makes every run's ids its own
    (the old script drew its prefix from an unseeded math.random, so runs after the first
    re-sent the same ids and bodies: no-op renewals, never written)."""
    body = f"""'{{"url": "{target}", "ttl": "1h", "meta": {{"n": "' .. counter .. '"}}}}'"""
    path = f'"/v1/services/reg/instances/r{run}-" .. counter'
    return json_lua("PUT", path, body, headers=headers)


def renew_lua(n: int, target: str) -> str:
    """The same `n` ids and bodies again and again: what a restarting fleet sends (no write)."""
    body = f"""'{{"url": "{target}", "ttl": "1h"}}'"""
    return json_lua("PUT", f'"/v1/services/bench/instances/i" .. (counter % {n})', body)


def etcd_put_lua(run: int, value: str) -> str:
    """etcd's v3 JSON gateway: keys and values are base64, so keys are spelled in its
    alphabet (12 characters: every key decodes to its own 9 bytes)."""
    key = f'string.format("k%03d%08d", {run}, counter)'
    body = f"""'{{"key": "' .. {key} .. '", "value": "{value}"}}'"""
    return json_lua("POST", '"/v3/kv/put"', body)


def etcd_keepalive_lua(leases: list[str]) -> str:
    prelude = "leases = {" + ", ".join(f'"{lease}"' for lease in leases) + "}"
    body = """'{"ID": "' .. leases[(counter % #leases) + 1] .. '"}'"""
    return json_lua("POST", '"/v3/lease/keepalive"', body, prelude)


@dataclass
class Load:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str

    def line(self) -> str:
        return (
            f"{self.requests_per_second:10,.0f} req/s   p50 {self.p50_ms:6.2f} ms   "
            f"p99 {self.p99_ms:6.2f} ms   non-2xx/errors {self.errors}   ({self.tool})"
        )


def tree_pss_mb(pid: int) -> float:
    """PSS of `pid` and every process it runs: RSS (the goal's measure) counts the shared
    libraries the daemon and its workers both map once in each; PSS splits them."""
    total = 0.0
    for process in descendants(pid):
        with contextlib.suppress(OSError):
            rollup = Path(f"/proc/{process}/smaps_rollup").read_text()
            if match := re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE):
                total += int(match.group(1)) / 1024
    return total


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/readyz", timeout=1) as resp,  # noqa: S310
        ):
            if resp.status == 200:
                return time.perf_counter() - start
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def server(
    argv: list[str],
    url: str | None,
    log: Path,
    *,
    preexec_fn: Callable[[], None] | None = None,
    root: Path = DAEMON_ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the length of the block: ready when `url`/readyz answers (or after
    half a second without one); SIGTERM, then SIGKILL, at the end."""
    process = spawn(argv, log, preexec_fn=preexec_fn, root=root)
    try:
        if url is None:
            time.sleep(0.5)
        else:
            wait_ready(url)
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-1500:]}")
        yield process
    finally:
        stop(process)


def spawn(
    argv: list[str],
    log: Path,
    *,
    preexec_fn: Callable[[], None] | None = None,
    root: Path = DAEMON_ROOT,
) -> subprocess.Popen[bytes]:
    """`argv` run in the daemon's checkout `root`, its output appended to `log`; not waited
    for. `python -m monitor` imports the daemon from `root`: the working directory comes
    first on sys.path, ahead of the venv's editable install of another checkout."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )


def stop(process: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM (SIGCONT first: it may be paused), SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def daemon_argv(config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monitor",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]


def write_daemon_config(directory: Path, port: int, *, probe: str = "{type: none}") -> Path:
    path = directory / "config.yaml"
    path.write_text(
        f"server: {{listen: '127.0.0.1:{port}'}}\nstorage: {{path: '{directory / 'hms.db'}'}}\n"
        # By default the registry alone is measured (bench/probes measures probing).
        f"defaults: {{probe: {probe}}}\n"
    )
    return path


# Probed as a fleet is, every instance with its probe state (bench.registry's figures).
PROBED = "{type: http, interval: 10s, timeout: 2s}"


def run_wrk(url: str, script: str, duration: int, connections: int, workdir: Path) -> Load:
    lua = workdir / "load.lua"
    lua.write_text(script)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: .*?(\d+)"):
        if match := re.search(pattern, out):
            errors += int(match.group(1))
    return Load(rps, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), errors, "wrk")


def _wrk_ms(out: str, percentile: str) -> float:
    match = re.search(rf"{re.escape(percentile)}\s+([\d.]+)(us|ms|s)", out)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def run_aiohttp_load(
    url: str,
    method: str,
    paths: Iterator[tuple[str, bytes | None]],
    duration: int,
    connections: int,
    headers: dict[str, str] | None = None,
) -> Load:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=connections)
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession(url, connector=connector, headers=headers) as http:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                path, body = next(paths)
                started = time.perf_counter()
                async with http.request(method, path, data=body) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(connections)))
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return Load(len(latencies) / duration, p(0.5), p(0.99), errors, "aiohttp generator")


_runs = itertools.count(1)


def load(
    url: str,
    kind: str,
    args: argparse.Namespace,
    workdir: Path,
    *,
    connections: int | None = None,
    target: str = "http://127.0.0.1:9/",
) -> Load:
    """`kind`: heartbeat (POST, known ids), register (PUT, a new id each), renew (PUT, the
    same ids and bodies again)."""
    run, n = next(_runs), args.heartbeat_instances
    connections = connections or args.connections
    if shutil.which("wrk"):
        scripts = {
            "heartbeat": lambda: HEARTBEAT_LUA.format(n=n),
            "register": lambda: register_lua(run, target),
            "renew": lambda: renew_lua(n, target),
        }
        return run_wrk(url, scripts[kind](), args.duration, connections, workdir)
    counter = iter(range(10**12))
    if kind == "heartbeat":
        paths = ((f"/v1/services/bench/instances/i{k % n}/heartbeat", None) for k in counter)
        return asyncio.run(run_aiohttp_load(url, "POST", paths, args.duration, connections))
    ids = (f"r{run}-{k}" for k in counter) if kind == "register" else (f"i{k % n}" for k in counter)
    service = "reg" if kind == "register" else "bench"
    body = json.dumps({"url": target, "ttl": "1h"}).encode()
    bodies = ((f"/v1/services/{service}/instances/{i}", body) for i in ids)
    return asyncio.run(run_aiohttp_load(url, "PUT", bodies, args.duration, connections))


async def register_many(
    url: str,
    service: str,
    count: int,
    connections: int = 64,
    *,
    target: str | None = None,
    retries: Retries | None = None,
) -> float:
    """Register i0..i<count-1> of `service` (503s waited out); seconds it took."""
    return await put_all(
        url,
        (
            (
                f"/v1/services/{service}/instances/i{n}",
                {
                    "url": target or f"http://127.0.0.1:{10000 + n % 50000}",
                    "ttl": "1h",
                    "tags": ["bench"],
                    "meta": {"zone": "a"},
                },
            )
            for n in range(count)
        ),
        connections=connections,
        retries=retries,
    )


def measure_ceiling(loop: str, args: argparse.Namespace, workdir: Path) -> Load:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (workdir / "bare.py").write_text(BARE_SERVER)
    argv = [sys.executable, str(workdir / "bare.py"), str(port), loop]
    with server(argv, url, workdir / "bare.log"):
        return load(url, "heartbeat", args, workdir)


def median(runs: list[Load]) -> Load:
    """The run with the median throughput (this VM's neighbours make single runs noisy)."""
    ordered = sorted(runs, key=lambda run: run.requests_per_second)
    return ordered[len(ordered) // 2]


# -- the peer: single-node etcd, fsync'd (its default) -------------------------------------


@contextlib.contextmanager
def etcd(workdir: Path) -> Iterator[tuple[str, int]]:
    """Debian's etcd on 127.0.0.1 free ports, data in `workdir`; (client URL, pid)."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    argv = [
        "etcd",
        "--name=bench",
        f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=bench={peer}",
        "--log-level=error",
    ]
    with server(argv, None, workdir / "etcd.log") as process:
        _wait_etcd(client)
        yield client, process.pid


def _wait_etcd(client: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(client + "/health") as resp:  # noqa: S310
            if json.loads(resp.read()).get("health") == "true":
                return
        time.sleep(0.1)
    raise RuntimeError(f"etcd at {client} not healthy after {timeout}s")


def _etcd_post(client: str, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 (127.0.0.1, the bench's own etcd)
        client + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        answer: dict[str, object] = json.loads(resp.read())
        return answer


def etcd_puts(client: str, args: argparse.Namespace, workdir: Path, target: str) -> Load:
    """Durable puts of new keys, each body the size of our registration body."""
    value = base64.b64encode(json.dumps({"url": target, "ttl": "1h"}).encode()).decode()
    lua = etcd_put_lua(next(_runs) % 1000, value)
    return run_wrk(client, lua, args.duration, args.register_connections, workdir)


def etcd_keepalives(client: str, args: argparse.Namespace, workdir: Path) -> Load:
    """Lease keep-alives over the gateway, one lease per instance (as heartbeats are)."""
    leases = [
        str(_etcd_post(client, "/v3/lease/grant", {"TTL": 3600})["ID"])
        for _ in range(args.heartbeat_instances)
    ]
    return run_wrk(client, etcd_keepalive_lua(leases), args.duration, args.connections, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--connections", type=int, default=64, help="for heartbeats")
    parser.add_argument("--register-connections", type=int, default=32)
    parser.add_argument("--instances", type=int, default=10_000, help="for RSS and restart")
    parser.add_argument("--heartbeat-instances", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; median shown")
    parser.add_argument("--no-peers", action="store_true", help="the daemon's figures only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no peers, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.repeat, args.no_peers = 1, 1, True
        args.instances, args.heartbeat_instances = 300, 50
        args.connections = args.register_connections = 8
    peers = not args.no_peers
    if peers and not (shutil.which("wrk") and shutil.which("etcd")):
        sys.exit("the peers need wrk and etcd: run bench/tools.sh (or pass --no-peers)")

    print(
        f"hms-mgmt registry benchmark: {os.cpu_count()} cores, heartbeats over "
        f"{args.connections} connections, registrations over {args.register_connections}, "
        f"{args.duration}s per run, median of {args.repeat}"
    )
    retries = Retries()
    with tempfile.TemporaryDirectory(prefix="hms-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        target = stack.enter_context(probe_target(workdir)) if peers else None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # Probed as a fleet is: the daemon itself is the target when nginx is not at hand.
        target = target or f"{url}/healthz"
        config = write_daemon_config(workdir, port, probe=PROBED)
        runs: dict[str, list[Load]] = {
            name: []
            for name in ("asyncio", "uvloop", "beats", "new", "renew", "etcd put", "etcd lease")
        }
        with contextlib.ExitStack() as peer_stack:
            client = peer_stack.enter_context(etcd(workdir))[0] if peers else ""
            with server(daemon_argv(config), url, workdir / "daemon.log") as daemon:
                idle_rss = tree_rss_mb(daemon.pid)
                asyncio.run(
                    register_many(
                        url, "bench", args.heartbeat_instances, target=target, retries=retries
                    )
                )
                for _ in range(args.repeat):  # interleaved, so a noisy minute hits them all
                    if peers:
                        runs["asyncio"].append(measure_ceiling("asyncio", args, workdir))
                        runs["uvloop"].append(measure_ceiling("uvloop", args, workdir))
                        runs["etcd lease"].append(etcd_keepalives(client, args, workdir))
                        runs["etcd put"].append(etcd_puts(client, args, workdir, target))
                    runs["beats"].append(load(url, "heartbeat", args, workdir, target=target))
                    connections = args.register_connections
                    runs["new"].append(
                        load(url, "register", args, workdir, connections=connections, target=target)
                    )
                    runs["renew"].append(
                        load(url, "renew", args, workdir, connections=connections, target=target)
                    )
        figures = {name: median(loads) for name, loads in runs.items() if loads}

        for leftover in workdir.glob("hms.db*"):
            leftover.unlink()
        with server(daemon_argv(config), url, workdir / "daemon.log") as daemon:
            seconds = asyncio.run(
                register_many(url, "fleet", args.instances, target=target, retries=retries)
            )
            # Every instance probed once at least: its probe state exists (interval 10s).
            time.sleep(12.0 if not args.smoke else 1.0)
            fleet_rss, fleet_pss = tree_rss_mb(daemon.pid), tree_pss_mb(daemon.pid)
            processes = len(descendants(daemon.pid))
        restart_started = time.perf_counter()
        with server(daemon_argv(config), url, workdir / "daemon.log") as daemon:
            restart = time.perf_counter() - restart_started
            with urllib.request.urlopen(url + "/v1/services/fleet") as resp:  # noqa: S310
                restored = len(json.loads(resp.read())["instances"])

    print()
    print("throughput on loopback (every instance probed every 10s, as a fleet is)")
    if peers:
        ceiling = max(figures["asyncio"], figures["uvloop"], key=lambda r: r.requests_per_second)
        print(f"  bare aiohttp, trivial POST, asyncio loop     {figures['asyncio'].line()}")
        print(f"  bare aiohttp, trivial POST, uvloop           {figures['uvloop'].line()}")
        print(f"  etcd 3.4 lease keep-alives (JSON gateway)    {figures['etcd lease'].line()}")
        print(f"  etcd 3.4 durable puts, new keys (fsync'd)    {figures['etcd put'].line()}")
    print(f"  hms-mgmt heartbeats (POST)                   {figures['beats'].line()}")
    print(f"  hms-mgmt registrations, new ids (PUT)        {figures['new'].line()}")
    print(f"  hms-mgmt re-registrations, unchanged (PUT)   {figures['renew'].line()}")
    if peers:

        def ratio(ours: Load, theirs: Load) -> str:
            return f"{ours.requests_per_second / theirs.requests_per_second:5.2f}x"

        print(
            f"  heartbeats     {ratio(figures['beats'], ceiling)} of the higher ceiling "
            f"(goal >= 0.7x), {ratio(figures['beats'], figures['etcd lease'])} etcd keep-alives"
        )
        print(
            f"  registrations  {ratio(figures['new'], ceiling)} of the higher ceiling, "
            f"{ratio(figures['new'], figures['etcd put'])} etcd durable puts"
        )
    print("  goal: p99 < 20 ms for heartbeats and for new registrations")
    print(f"  503s waited out while registering (Retry-After): {retries.count}")
    print()
    print("memory and restart")
    print(f"  RSS idle                            {idle_rss:7.1f} MB")
    print(
        f"  RSS with {args.instances:,} probed instances {fleet_rss:7.1f} MB   goal < 100 MB "
        f"({processes} process(es); registered in {seconds:.1f}s)"
    )
    print(f"  PSS of the same                  {fleet_pss:7.1f} MB   (shared pages split)")
    print(
        f"  restart to ready, {restored:,} restored   {restart:7.2f} s    goal < 2 s "
        "(includes interpreter start)"
    )


@contextlib.contextmanager
def probe_target(workdir: Path) -> Iterator[str | None]:
    """nginx answering every probe (None without nginx: the caller picks another)."""
    if shutil.which("nginx") is None:
        yield None
        return
    from bench.probes import nginx_config

    port = free_port()
    argv = ["nginx", "-c", str(nginx_config(workdir, [port])), "-p", str(workdir)]
    with server(argv, None, workdir / "nginx.log"):
        yield f"http://127.0.0.1:{port}/"


if __name__ == "__main__":
    main()
