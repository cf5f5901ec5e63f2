"""Probe benchmark: CPU per probe next to blackbox_exporter, and 10,000 targets in one daemon.

Targets are served by nginx (Debian `nginx-light`), hung targets by a separate
process that accepts connections and never answers; blackbox_exporter (Debian
`prometheus-blackbox-exporter`) is driven by a real Prometheus at the same
rate, fresh connections on both sides. Everything listens on 127.0.0.1.

The mass-outage case registers 10,000 instances (interval 1h, down_interval
2s) whose targets refuse connections, and measures heartbeats with wrk (32
connections) against the daemon beside bare aiohttp answering the same route
shape, and beside the same daemon with all 10,000 up. Clients answer 503 as
real ones do: the request is sent again after its Retry-After.

    python -m bench.probes [--window 20] [--case all|outage] [--runs 3]
    python -m bench.probes --smoke      # a few seconds, the daemon's side only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import cpu_seconds, tree_rss_mb
from bench.registry import BARE_SERVER, free_port, server

ROOT = Path(__file__).resolve().parent.parent
NGINX_PORTS = 8  # spreads the 4-tuples of fresh connections over several ports
SETTLE = 25.0

HANG_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    async def main():
        async def hold(reader, writer):
            await reader.read()  # never answers; holds until the client gives up
            writer.close()
        server = await asyncio.start_server(hold, "127.0.0.1", int(sys.argv[1]), backlog=4096)
        async with server:
            await server.serve_forever()
    asyncio.run(main())
    """
)


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process(
    argv: list[str], log: Path, ready_url: str | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """bench.registry.server with the file limit raised (10,000 sockets in flight)."""
    return server(argv, ready_url, log, preexec_fn=raise_file_limit)


def nginx_config(workdir: Path, ports: list[int]) -> Path:
    listens = "\n".join(f"    listen 127.0.0.1:{port} backlog=4096;" for port in ports)
    conf = workdir / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            worker_processes 1;
            daemon off;
            pid {workdir}/nginx.pid;
            error_log {workdir}/nginx-error.log;
            events {{ worker_connections 16384; }}
            http {{
              access_log off;
              client_body_temp_path {workdir}/nginx-body;
              proxy_temp_path {workdir}/nginx-proxy;
              fastcgi_temp_path {workdir}/nginx-fastcgi;
              uwsgi_temp_path {workdir}/nginx-uwsgi;
              scgi_temp_path {workdir}/nginx-scgi;
              server {{
            {listens}
                location / {{ default_type application/json; return 200 '{{"status":"UP"}}'; }}
              }}
            }}
            """
        )
    )
    return conf


def target_urls(ports: list[int], count: int) -> list[str]:
    return [f"http://127.0.0.1:{ports[n % len(ports)]}/t/{n}" for n in range(count)]


async def register(
    url: str,
    targets: list[str],
    prefix: str,
    probe: dict[str, object],
    *,
    service_each: bool = False,
    ttl: str | None = None,
) -> None:
    """Register each target as instance i<n> of `prefix`, or as `prefix`-<n>/i0."""
    queue = iter(enumerate(targets))
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=64)) as http:

        async def worker() -> None:
            for n, target in queue:
                body: dict[str, object] = {"url": target, "probe": probe}
                if ttl is not None:
                    body["ttl"] = ttl
                path = f"{prefix}-{n}/instances/i0" if service_each else f"{prefix}/instances/i{n}"
                while True:  # a shedding daemon says when to come back, as clients do
                    async with http.put(f"/v1/services/{path}", json=body) as resp:
                        if resp.status in (200, 201):
                            break
                        if resp.status != 503:
                            raise RuntimeError(f"register: {resp.status} {await resp.text()}")
                        wait = float(resp.headers.get("Retry-After", "1"))
                    await asyncio.sleep(wait)

        await asyncio.gather(*(worker() for _ in range(64)))


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310
        text: str = resp.read().decode()
        return text


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    return parse(fetch(url))


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    families: dict[str, list[tuple[dict[str, str], float, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(family.name, []).append((sample.labels, sample.value, sample.name))
    return families


def probes_done(
    metrics: dict[str, list[tuple[dict[str, str], float, str]]], result: str = ""
) -> float:
    samples = metrics.get("hms_probe", [])
    return sum(value for labels, value, _ in samples if not result or labels["result"] == result)


def lateness_buckets(
    metrics: dict[str, list[tuple[dict[str, str], float, str]]],
) -> dict[float, float]:
    return {
        float(labels["le"]): value
        for labels, value, name in metrics.get("hms_scheduler_lateness_seconds", [])
        if name.endswith("_bucket")
    }


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """histogram_quantile over the delta of two cumulative bucket sets."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank, lower, previous = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - previous) / max(count - previous, 1e-9)
        lower, previous = bound, count
    return lower


@dataclass
class Measured:
    cpu: float  # CPU seconds of the daemon
    seconds: float  # wall clock between the two snapshots
    probes: float
    failed: float
    before: dict[float, float]
    after: dict[float, float]

    def rate(self) -> float:
        return self.probes / self.seconds

    def core(self) -> float:
        return self.cpu / self.seconds


def measure_daemon(pid: int, url: str, window: float) -> Measured:
    """Probes, CPU and lateness between two /metrics snapshots `window` seconds apart.

    Time and CPU are read at the moment of each scrape; parsing the text (slow for
    220,000 lines) happens after both, outside the measured interval.
    """
    t0, cpu0, text0 = time.monotonic(), cpu_seconds(pid), fetch(url + "/metrics")
    time.sleep(window)
    t1, cpu1, text1 = time.monotonic(), cpu_seconds(pid), fetch(url + "/metrics")
    before, after = parse(text0), parse(text1)
    return Measured(
        cpu=cpu1 - cpu0,
        seconds=t1 - t0,
        probes=probes_done(after) - probes_done(before),
        failed=probes_done(after, "failure") - probes_done(before, "failure"),
        before=lateness_buckets(before),
        after=lateness_buckets(after),
    )


def daemon_config(workdir: Path, port: int, name: str) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(
        f"server: {{listen: '127.0.0.1:{port}'}}\n"
        f"storage: {{path: '{workdir / name}.db'}}\n"
        "defaults: {probe: {timeout: 2s, conditions: ['[STATUS] == 200']}}\n"
    )
    return path


def run_blackbox(workdir: Path, targets: list[str], window: float) -> tuple[float, float, float]:
    """(blackbox CPU s, Prometheus CPU s, probes) over the window, Prometheus scraping every 1s."""
    bb_port, prom_port = free_port(), free_port()
    (workdir / "blackbox.yml").write_text(
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 2s\n"
        "    http: {preferred_ip_protocol: ip4, valid_status_codes: [200]}\n"
    )
    # Static targets must look like host names: a placeholder each, the URL in a label.
    static = "\n".join(
        f"  - {{targets: [target-{n}], labels: {{url: '{target}'}}}}"
        for n, target in enumerate(targets)
    )
    (workdir / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: blackbox
    metrics_path: /probe
    params: {{module: [http_2xx]}}
    relabel_configs:
      - {{source_labels: [url], target_label: __param_target}}
      - {{source_labels: [url], target_label: instance}}
      - {{target_label: __address__, replacement: "127.0.0.1:{bb_port}"}}
    static_configs:
"""
        + textwrap.indent(static, "    ")
        + "\n"
    )
    blackbox = [
        "prometheus-blackbox-exporter",
        f"--config.file={workdir / 'blackbox.yml'}",
        f"--web.listen-address=127.0.0.1:{bb_port}",
    ]
    prometheus = [
        "prometheus",
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    prom_url = f"http://127.0.0.1:{prom_port}"
    with (
        process(blackbox, workdir / "blackbox.log") as bb,
        process(prometheus, workdir / "prometheus.log") as prom,
    ):
        time.sleep(8)  # Prometheus spreads its first scrapes over one interval
        before = _scrapes(prom_url), cpu_seconds(bb.pid), cpu_seconds(prom.pid)
        time.sleep(window)
        after = _scrapes(prom_url), cpu_seconds(bb.pid), cpu_seconds(prom.pid)
    return after[1] - before[1], after[2] - before[2], after[0] - before[0]


def _scrapes(prom_url: str) -> float:
    metrics = scrape(prom_url + "/metrics")
    return sum(
        value
        for labels, value, name in metrics.get("prometheus_target_interval_length_seconds", [])
        if name.endswith("_count")
    )


# Heartbeats to `n` instances; a 503 sends a request again after its Retry-After, as the
# SDK does. wrk cannot tell which response belongs to which request, so any heartbeat
# path is retried: the delay is what matters, every path costs the same.
HEARTBEAT_RETRY_LUA = """
counter = 0
waits = {{}}
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/services/beats/instances/i" .. (counter % {n}) .. "/heartbeat")
end
delay = function()
  return table.remove(waits, 1) or 0
end
response = function(status, headers, body)
  if status == 503 then
    table.insert(waits, (tonumber(headers["Retry-After"]) or 1) * 1000)
  end
end
"""


@dataclass
class Beats:
    """Heartbeats answered 2xx per second, p99, and how many were refused with 503."""

    per_second: float
    p99_ms: float
    refused: int
    probes_per_second: float = float("nan")
    timeouts: int = 0

    def line(self) -> str:
        probes = f"   probes {self.probes_per_second:6.0f}/s"
        if math.isnan(self.probes_per_second):
            probes = ""
        return (
            f"{self.per_second:8,.0f} heartbeats/s   p99 {self.p99_ms:7.2f} ms   "
            f"503 {self.refused:6d}   timeouts {self.timeouts:4d}{probes}"
        )


def wrk_beats(url: str, instances: int, seconds: float, connections: int, workdir: Path) -> Beats:
    lua = workdir / "beats.lua"
    lua.write_text(HEARTBEAT_RETRY_LUA.format(n=instances))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(lua), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    assert total is not None, out
    elapsed = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    refused = int(match.group(1)) if (match := re.search(r"Non-2xx.*?: (\d+)", out)) else 0
    # wrk's timeouts (no answer within 2s) are not among its requests: they count as none.
    timeouts = int(match.group(1)) if (match := re.search(r"timeout (\d+)", out)) else 0
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    answered = (int(total.group(1)) - refused) / elapsed
    return Beats(answered, float(p99.group(1)) * scale, refused, timeouts=timeouts)


async def aiohttp_beats(url: str, instances: int, seconds: float, connections: int) -> Beats:
    """The same load from this process when wrk is missing (then a lower bound)."""
    latencies: list[float] = []
    refused = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as http:

        async def client(first: int) -> None:
            nonlocal refused
            n = first
            while time.perf_counter() < stop:
                n += connections
                started = time.perf_counter()
                path = f"/v1/services/beats/instances/i{n % instances}/heartbeat"
                async with http.post(path) as resp:
                    await resp.read()
                if resp.status == 503:
                    refused += 1
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                elif resp.status < 300:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client(c) for c in range(connections)))
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else float("nan")
    return Beats(len(latencies) / seconds, p99, refused)


def heartbeats(url: str, args: argparse.Namespace, workdir: Path) -> Beats:
    if shutil.which("wrk") and not args.smoke:
        return wrk_beats(url, args.beat_instances, args.duration, args.connections, workdir)
    return asyncio.run(aiohttp_beats(url, args.beat_instances, args.duration, args.connections))


def outage_config(path: Path, port: int, probed: bool) -> Path:
    kind = "http" if probed else "none"
    path.write_text(
        f"server: {{listen: '127.0.0.1:{port}'}}\n"
        f"storage: {{path: '{path.with_suffix('.db')}'}}\n"
        f"defaults: {{probe: {{type: {kind}, interval: 1h, down_interval: 2s, timeout: 2s}}}}\n"
    )
    return path


def daemon_beats(workdir: Path, name: str, target: str, args: argparse.Namespace) -> Beats:
    """A daemon with `args.outage` instances probing `target`, under the heartbeat load."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "monitor", "serve", "--log-level", "warning", "--config"]
    config = outage_config(workdir / f"{name}.yaml", port, probed=False)
    with process([*argv, str(config)], workdir / f"{name}.log", url) as daemon:
        beats = [f"http://127.0.0.1:{port}/unprobed/{n}" for n in range(args.beat_instances)]
        asyncio.run(register(url, beats, "beats", {"type": "none"}, ttl="1h"))
        # Registered unprobed, then probed from a reload: all within a second, as when a
        # network splits. (Registering 10,000 into an outage took the old code minutes:
        # it shed the registrations.)
        asyncio.run(register(url, [target] * args.outage, "fleet", {}))
        outage_config(config, port, probed=True)
        daemon.send_signal(signal.SIGHUP)
        time.sleep(args.settle)  # past the first probes and the thresholds: steady state
        before, started = probes_done(scrape(url + "/metrics")), time.monotonic()
        result = heartbeats(url, args, workdir)
        probes = probes_done(scrape(url + "/metrics")) - before
        result.probes_per_second = probes / (time.monotonic() - started)
        return result


def bare_beats(workdir: Path, args: argparse.Namespace) -> Beats:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (workdir / "bare.py").write_text(BARE_SERVER)
    argv = [sys.executable, str(workdir / "bare.py"), str(port), "uvloop"]
    with server(argv, url, workdir / "bare.log"):
        return heartbeats(url, args, workdir)


def run_outage(args: argparse.Namespace) -> None:
    """Heartbeats with every probed instance down, beside all up and bare aiohttp."""
    print(
        f"mass outage: {args.outage:,} instances (interval 1h, down_interval 2s), "
        f"heartbeats from {args.connections} connections for {args.duration:g}s, "
        f"{args.runs} run(s), medians"
    )
    runs: dict[str, list[Beats]] = {"bare": [], "up": [], "down": []}
    with tempfile.TemporaryDirectory(prefix="hms-outage-") as tmp:
        workdir = Path(tmp)
        refused = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
        target_port = free_port()
        up = f"http://127.0.0.1:{target_port}"
        (workdir / "target.py").write_text(BARE_SERVER)
        target = [sys.executable, str(workdir / "target.py"), str(target_port), "uvloop"]
        with contextlib.ExitStack() as stack:
            if not args.smoke:
                stack.enter_context(server(target, up, workdir / "target.log"))
            for n in range(args.runs):
                if not args.smoke:
                    runs["bare"].append(bare_beats(workdir, args))
                    runs["up"].append(daemon_beats(workdir, f"up{n}", up + "/readyz", args))
                runs["down"].append(daemon_beats(workdir, f"down{n}", refused, args))
                for name, got in runs.items():
                    if got:
                        print(f"  run {n + 1} {name:5} {got[-1].line()}", flush=True)

    def middle(name: str) -> Beats:
        ordered = sorted(runs[name], key=lambda beats: beats.per_second)
        return ordered[len(ordered) // 2]

    down = middle("down")
    print(f"  all {args.outage:,} down        {down.line()}")
    if args.smoke:
        return
    bare, up = middle("bare"), middle("up")
    print(f"  all {args.outage:,} up          {up.line()}")
    print(f"  bare aiohttp             {bare.line()}")
    print(
        f"  down / bare {down.per_second / bare.per_second:5.2f}x   "
        f"up / bare {up.per_second / bare.per_second:5.2f}x   goal >= 0.7x, p99 < 20 ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--side-by-side", type=int, default=1000, help="targets probed every 1s")
    parser.add_argument("--fleet", type=int, default=10_000, help="targets probed every 10s")
    parser.add_argument("--hung", type=int, default=1000)
    parser.add_argument("--case", choices=("all", "outage"), default="all")
    parser.add_argument("--outage", type=int, default=10_000, help="instances down at once")
    parser.add_argument("--beat-instances", type=int, default=1000, help="heartbeat senders")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of heartbeats")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, the daemon's side only, no peers"
    )
    args = parser.parse_args()
    raise_file_limit()
    if args.smoke:
        args.outage, args.beat_instances, args.connections = 50, 10, 4
        args.duration, args.settle, args.runs = 1.0, 1.0, 1
        run_outage(args)
        return
    if args.case == "outage":
        run_outage(args)
        return
    for tool in ("nginx", "prometheus", "prometheus-blackbox-exporter"):
        if shutil.which(tool) is None:
            packages = "nginx-light prometheus prometheus-blackbox-exporter"
            sys.exit(f"{tool} is not installed (apt-get install {packages})")

    print(f"hms-mgmt probe benchmark: {os.cpu_count()} cores, {args.window:g}s measured per phase")
    with tempfile.TemporaryDirectory(prefix="hms-probes-") as tmp:
        workdir = Path(tmp)
        ports = [free_port() for _ in range(NGINX_PORTS)]
        hang_port = free_port()
        (workdir / "hang.py").write_text(HANG_SERVER)
        nginx = ["nginx", "-c", str(nginx_config(workdir, ports)), "-p", str(workdir)]
        with (
            process(nginx, workdir / "nginx.log"),
            process(
                [sys.executable, str(workdir / "hang.py"), str(hang_port)], workdir / "hang.log"
            ),
        ):
            side = target_urls(ports, args.side_by_side)

            # 1. The same targets at the same rate: hms-mgmt, then blackbox_exporter + Prometheus.
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "monitor", "serve", "--log-level", "warning", "--config"]
            with process(
                [*argv, str(daemon_config(workdir, port, "side"))], workdir / "d1.log", url
            ) as daemon:
                asyncio.run(register(url, side, "side", {"interval": "1s"}))
                time.sleep(5)
                side_by_side = measure_daemon(daemon.pid, url, args.window)
            bb_cpu, prom_cpu, bb_probes = run_blackbox(workdir, side, args.window)

            # 2. The fleet: 10,000 targets every 10s, then 1,000 hung ones among them.
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with process(
                [*argv, str(daemon_config(workdir, port, "fleet"))], workdir / "d2.log", url
            ) as daemon:
                asyncio.run(
                    register(url, target_urls(ports, args.fleet), "fleet", {"interval": "10s"})
                )
                time.sleep(SETTLE)  # past every instance's prompt first probe: steady state
                fleet = measure_daemon(daemon.pid, url, args.window)
                fleet_rss = tree_rss_mb(daemon.pid)
                hung = [f"http://127.0.0.1:{hang_port}/h/{n}" for n in range(args.hung)]
                asyncio.run(register(url, hung, "hung", {"interval": "10s"}))
                time.sleep(SETTLE)  # past every instance's prompt first probe: steady state
                with_hung = measure_daemon(daemon.pid, url, args.window)
                hung_rss = tree_rss_mb(daemon.pid)

    def per_probe(cpu: float, probes: float, rate: float) -> str:
        return f"{cpu / probes * 1000:6.3f} ms CPU/probe  ({rate:7.0f} probes/s)"

    def lateness(m: Measured) -> str:
        p50, p99 = quantile(0.5, m.before, m.after), quantile(0.99, m.before, m.after)
        return f"{p50 * 1000:6.1f} / {p99 * 1000:6.1f} ms"

    hms = side_by_side
    bb_rate = bb_probes / args.window
    print()
    print(f"side by side: {args.side_by_side:,} HTTP targets every 1s, fresh connections")
    print(f"  hms-mgmt daemon                  {per_probe(hms.cpu, hms.probes, hms.rate())}")
    print(f"  blackbox_exporter                {per_probe(bb_cpu, bb_probes, bb_rate)}")
    both = bb_cpu + prom_cpu
    print(f"  blackbox_exporter + Prometheus   {per_probe(both, bb_probes, bb_rate)}")
    ratio = (hms.cpu / hms.probes) / (bb_cpu / bb_probes)
    print(f"  hms-mgmt / blackbox_exporter     {ratio:6.1%}   goal <= 50%")
    for name, m in (
        (f"fleet: {args.fleet:,} targets every 10s, steady state", fleet),
        (f"the fleet plus {args.hung:,} hung targets (2s timeout)", with_hung),
    ):
        print()
        print(name)
        print(f"  CPU                              {m.core():6.1%} of one core   goal < 60%")
        print(f"  start lateness p50 / p99         {lateness(m)}   goal p99 < 100 ms")
        print(f"  probes/s                         {m.rate():6.0f}   ({m.failed:.0f} failed)")
    print(
        f"  RSS                              {fleet_rss:6.1f} MB without, {hung_rss:.1f} MB with "
        "the hung targets   goal < 150 MB at 10,000"
    )
    change = quantile(0.99, with_hung.before, with_hung.after) - quantile(
        0.99, fleet.before, fleet.after
    )
    print(f"  p99 lateness change              {change * 1000:+6.1f} ms   goal within 50 ms")
    print()
    run_outage(args)


if __name__ == "__main__":
    main()
