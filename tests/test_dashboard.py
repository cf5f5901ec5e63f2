"""The Grafana dashboard: its shape, every query run by a real Prometheus, and deploy/ in sync."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from monitor.config import Config, load_config, parse_config
from monitor.slo import build_dashboard, panel_queries, render_dashboard, render_rules

from .conftest import AppClient, FakeClock, require_tool
from .processes import ROOT, running_prometheus
from .test_rules import CONFIG, run_tests, samples


def test_dashboard_shape() -> None:
    dashboard = json.loads(render_dashboard(parse_config(CONFIG)))
    assert dashboard["schemaVersion"] == 39
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert [v["name"] for v in dashboard["templating"]["list"]] == [
        "service",
        "instance",
        "workflow",
    ]
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


def panel(title: str) -> dict[str, Any]:
    dashboard = build_dashboard(parse_config(CONFIG))
    return next(p for p in dashboard["panels"] if p["title"] == title)


def colour_at(panel: dict[str, Any], value: float) -> str:
    """The colour Grafana gives `value` under the panel's absolute thresholds."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[0]["value"] is None  # the base step, below every other
    return str([s["color"] for s in steps if s["value"] is None or value >= s["value"]][-1])


def test_an_overspent_error_budget_is_red() -> None:
    budget = panel("Error budget remaining (period)")
    assert budget["fieldConfig"]["defaults"]["color"] == {"mode": "thresholds"}
    assert colour_at(budget, -0.2) == "red"
    assert colour_at(budget, 0.8) == "green"


def test_burn_rates_turn_red_at_the_fastest_page() -> None:
    burn = panel("Burn rate by window")
    assert [colour_at(burn, rate) for rate in (0.5, 2, 14.4)] == ["green", "orange", "red"]


def test_critical_instances_are_red_in_the_fleet_table() -> None:
    (state,) = panel("Fleet health")["fieldConfig"]["overrides"]
    assert state["matcher"] == {"id": "byName", "options": "state"}
    properties = {p["id"]: p["value"] for p in state["properties"]}
    (mapping,) = properties["mappings"]
    assert mapping["options"]["critical"]["color"] == "red"
    assert mapping["options"]["passing"]["color"] == "green"
    assert properties["custom.cellOptions"] == {"type": "color-background"}


def test_workflow_panels_follow_the_workflow_variable() -> None:
    dashboard = build_dashboard(parse_config(CONFIG))
    workflow_panels = [p for p in dashboard["panels"] if "workflow" in p["targets"][0]["expr"]]
    assert len(workflow_panels) == 4
    for expr in panel_queries({"panels": workflow_panels}):
        assert 'workflow=~"$workflow"' in expr


def test_sla_this_month_leaves_out_the_previous_month(tmp_path: Path) -> None:
    """The daemon exports this month and the previous one; the stat shows the month of the
    dashboard's end time, which Grafana puts in place of `${__to:date:YYYY-MM}`."""
    (expr,) = panel_queries({"panels": [panel("SLA this month")]})
    assert 'month="${__to:date:YYYY-MM}"' in expr
    sla = 'hms_sla_availability_ratio{{service="payments",slo="availability",month="{}"}}'
    (tmp_path / "empty.yml").write_text("groups: []\n")
    run_tests(
        tmp_path,
        tmp_path / "empty.yml",
        [
            {"series": sla.format("1969-12"), "values": "0.98x5"},
            {"series": sla.format("1970-01"), "values": "0.999x5"},
        ],
        expr_tests=(
            samples(
                # promtool evaluates from the epoch: "now" is in January 1970.
                expr.replace("$service", ".*").replace("${__to:date:YYYY-MM}", "1970-01"),
                "5m",
                [{"labels": sla.format("1970-01"), "value": 0.999}],
            ),
        ),
    )


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
    clock: FakeClock,
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
        this_month = datetime.fromtimestamp(clock.time(), UTC).strftime("%Y-%m")
        await check_every_panel_query(f"{url}/api/v1/query", config, this_month)


async def check_every_panel_query(base: str, config: Config, this_month: str) -> None:
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

        dashboard = build_dashboard(config)
        queries = [
            expr.replace("$__rate_interval", "1m")
            .replace("$service", ".*")
            .replace("$instance", ".*")
            .replace("$workflow", ".*")
            .replace("${__to:date:YYYY-MM}", this_month)  # Grafana's month of the range end
            for expr in panel_queries(dashboard)
        ]
        for expr in queries:
            answer = await query(expr)
            assert answer["status"] == "success", (expr, answer)
        table = await query(queries[0])  # the fleet health table has the probed instance
        assert table["data"]["result"][0]["metric"]["instance"] == "self"
