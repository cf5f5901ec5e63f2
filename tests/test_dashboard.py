"""The Grafana dashboard: its shape, every query run by a real Prometheus, and deploy/ in sync."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from monitor.config import Config, load_config, parse_config
from monitor.dashboard import build_dashboard, panel_queries, render_dashboard
from monitor.rules import render_rules

from .conftest import AppClient, require_tool
from .processes import ROOT, running_prometheus
from .test_rules import CONFIG


def test_dashboard_shape() -> None:
    dashboard = json.loads(render_dashboard(parse_config(CONFIG)))
    assert dashboard["schemaVersion"] == 39
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["service", "instance"]
    titles = [panel["title"] for panel in dashboard["panels"]]
    for expected in (
        "Fleet health",
        "Probe latency p50 / p95 / p99",
        "Availability (1h) vs objective",
        "Error budget remaining (period)",
        "Burn rate by window",
        "SLA this month",
        "Workflow throughput",
        "Workflow failures",
        "Workflow duration p95",
        "Deadline misses",
        "Scheduler lateness p99",
    ):
        assert expected in titles
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(titles)


def test_deploy_folder_matches_the_generators() -> None:
    """deploy/ ships what `hms-mgmt rules` and `dashboard` make of config.yaml."""
    config = load_config(ROOT / "config.yaml", env={})
    assert (ROOT / "deploy" / "hms-rules.yml").read_text() == render_rules(config)
    shipped = ROOT / "deploy" / "grafana" / "dashboards" / "hms-mgmt.json"
    assert shipped.read_text() == render_dashboard(config, datasource="hms-prometheus")


def test_deploy_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_panel_query_runs_on_prometheus_against_a_live_daemon(
    tmp_path: Path,
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
) -> None:
    prometheus = require_tool("prometheus")
    config = make_config(
        services=[
            {
                "name": "hms",
                "instances": [{"id": "self", "url": "http://127.0.0.1:9"}],
                "slos": [{"name": "availability", "objective": 99.9}],
            }
        ],
        defaults={"probe": {"type": "tcp", "interval": "200ms", "timeout": "100ms"}},
    )
    daemon = await start_daemon(config)
    (tmp_path / "rules.yml").write_text(render_rules(config))
    prometheus_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "hms",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}],
            }
        ],
    }
    with running_prometheus(prometheus, tmp_path, prometheus_config) as url:
        await check_every_panel_query(f"{url}/api/v1/query", config)


async def check_every_panel_query(base: str, config: Config) -> None:
    async with aiohttp.ClientSession() as http:

        async def query(expr: str) -> dict[str, Any]:
            async with http.get(base, params={"query": expr}) as resp:
                return dict(await resp.json())

        deadline = time.monotonic() + 30
        while True:  # until Prometheus has scraped the daemon and seen the instance
            try:
                health = await query('hms_instance_health{state="critical"} == 1')
                if health["data"]["result"]:
                    break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "Prometheus never saw the daemon's metrics"
            await asyncio.sleep(0.3)

        queries = [
            expr.replace("$__rate_interval", "1m")
            .replace("$service", ".*")
            .replace("$instance", ".*")
            for expr in panel_queries(build_dashboard(config))
        ]
        for expr in queries:
            answer = await query(expr)
            assert answer["status"] == "success", (expr, answer)
        table = await query(queries[0])  # the fleet health table has the probed instance
        assert table["data"]["result"][0]["metric"]["instance"] == "self"
