"""Probe benchmark: CPU per probe next to blackbox_exporter, and 10,000 targets in one daemon.

Targets are served by nginx (Debian `nginx-light`), hung targets by a separate
process that accepts connections and never answers; blackbox_exporter (Debian
`prometheus-blackbox-exporter`) is driven by a real Prometheus at the same
rate, fresh connections on both sides. Everything listens on 127.0.0.1.

    python -m bench.probes [--window 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
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

from bench.registry import free_port, rss_mb, server

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


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
) -> None:
    """Register each target as instance i<n> of `prefix`, or as `prefix`-<n>/i0."""
    queue = iter(enumerate(targets))
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=64)) as http:

        async def worker() -> None:
            for n, target in queue:
                body = {"url": target, "probe": probe}
                path = f"{prefix}-{n}/instances/i0" if service_each else f"{prefix}/instances/i{n}"
                async with http.put(f"/v1/services/{path}", json=body) as resp:
                    if resp.status not in (200, 201):
                        raise RuntimeError(f"register: {resp.status} {await resp.text()}")

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--side-by-side", type=int, default=1000, help="targets probed every 1s")
    parser.add_argument("--fleet", type=int, default=10_000, help="targets probed every 10s")
    parser.add_argument("--hung", type=int, default=1000)
    args = parser.parse_args()
    for tool in ("nginx", "prometheus", "prometheus-blackbox-exporter"):
        if shutil.which(tool) is None:
            packages = "nginx-light prometheus prometheus-blackbox-exporter"
            sys.exit(f"{tool} is not installed (apt-get install {packages})")
    raise_file_limit()

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
                fleet_rss = rss_mb(daemon.pid)
                hung = [f"http://127.0.0.1:{hang_port}/h/{n}" for n in range(args.hung)]
                asyncio.run(register(url, hung, "hung", {"interval": "10s"}))
                time.sleep(SETTLE)  # past every instance's prompt first probe: steady state
                with_hung = measure_daemon(daemon.pid, url, args.window)
                hung_rss = rss_mb(daemon.pid)

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


if __name__ == "__main__":
    main()
