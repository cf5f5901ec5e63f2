"""`hms-mgmt dashboard`: a Grafana dashboard (schemaVersion 39) over the metrics and rules."""

from __future__ import annotations

import json
from typing import Any

from monitor.config import Config

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SERVICE = 'service=~"$service"'
INSTANCE = 'instance=~"$instance"'
SLO = 'sloth_service=~"$service"'
WORKFLOW = 'workflow=~"$workflow"'
# The month of the dashboard's end time, as the daemon labels SLA months ("2026-11"), so
# the stat shows this month only and not the previous one the daemon exports beside it.
THIS_MONTH = "${__to:date:YYYY-MM}"
HEALTH_COLOURS = {
    "passing": "green",
    "warning": "orange",
    "critical": "red",
    "maintenance": "blue",
    "unknown": "text",
}


def build_dashboard(config: Config) -> dict[str, Any]:
    panels = _layout(
        [
            _health_table(
                "Fleet health",
                f"max without (replica) (hms_instance_health{{{SERVICE},{INSTANCE}}}) == 1",
                "Every probed instance and its current state.",
            ),
            _timeseries(
                "Probe latency p50 / p95 / p99",
                [
                    (
                        f"histogram_quantile({q}, sum by (le, service) (rate("
                        f"hms_probe_duration_seconds_bucket{{{SERVICE},{INSTANCE}}}[$__rate_interval])))",
                        f"p{round(q * 100)} {{{{service}}}}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
                unit="s",
            ),
            _timeseries(
                "Availability (1h) vs objective",
                [
                    (f"1 - slo:sli_error:ratio_rate1h{{{SLO}}}", "{{sloth_id}}"),
                    (f"slo:objective:ratio{{{SLO}}}", "objective {{sloth_id}}"),
                ],
                unit="percentunit",
            ),
            _timeseries(
                "Error budget remaining (period)",
                [(f"slo:period_error_budget_remaining:ratio{{{SLO}}}", "{{sloth_id}}")],
                unit="percentunit",
                thresholds=[("red", None), ("orange", 0), ("green", 0.25)],  # spent: red
            ),
            _timeseries(
                "Burn rate by window",
                [
                    (
                        f'{{__name__=~"slo:sli_error:ratio_rate.+",{SLO}}} '
                        "/ on(sloth_id, sloth_slo, sloth_service) group_left "
                        f"slo:error_budget:ratio{{{SLO}}}",
                        "{{sloth_id}} {{sloth_window}}",
                    )
                ],
                # 1x spends the budget exactly over the period; 14.4x is the fastest page.
                thresholds=[("green", None), ("orange", 1), ("red", 14.4)],
            ),
            # `source: calls` SLOs: the workflow calls made to each service, as they fared.
            _timeseries(
                "Service calls failing (workflow calls)",
                [
                    (
                        "sum by (service) (rate(hms_service_calls_total"
                        f'{{{SERVICE},result="failure"}}[$__rate_interval])) / (sum by (service) '
                        f"(rate(hms_service_calls_total{{{SERVICE}}}[$__rate_interval])) > 0)",
                        "{{service}} failing",
                    ),
                    (
                        "sum by (service) (rate(hms_service_calls_total"
                        f"{{{SERVICE}}}[$__rate_interval]))",
                        "{{service}} calls/s",
                    ),
                ],
                thresholds=[("green", None), ("red", 0.01)],
            ),
            _timeseries(
                "Service call latency p95 (workflow calls)",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, service) (rate("
                        f"hms_service_call_duration_seconds_bucket{{{SERVICE}}}[$__rate_interval])))",
                        "{{service}}",
                    )
                ],
                unit="s",
            ),
            _stat(
                "SLA this month",
                f'hms_sla_availability_ratio{{{SERVICE},month="{THIS_MONTH}"}}',
                "{{service}} {{slo}}",
            ),
            _timeseries(
                "Workflow throughput",
                [
                    (
                        "sum by (workflow, status) "
                        f"(rate(hms_workflow_finished_total{{{WORKFLOW}}}[$__rate_interval]))",
                        "{{workflow}} {{status}}",
                    ),
                    (
                        "sum by (workflow) "
                        f"(rate(hms_workflow_started_total{{{WORKFLOW}}}[$__rate_interval]))",
                        "{{workflow}} started",
                    ),
                ],
                unit="ops",
            ),
            _timeseries(
                "Workflow failures",
                [
                    (
                        "sum by (workflow, status) (increase(hms_workflow_finished_total"
                        f'{{{WORKFLOW},status=~"failed|compensated|cancelled"}}'
                        "[$__rate_interval]))",
                        "{{workflow}} {{status}}",
                    )
                ],
                thresholds=[("green", None), ("red", 1)],
            ),
            _timeseries(
                "Workflow duration p95",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, workflow) (rate("
                        f"hms_workflow_duration_seconds_bucket{{{WORKFLOW}}}[$__rate_interval])))",
                        "{{workflow}}",
                    )
                ],
                unit="s",
            ),
            _timeseries(
                "Deadline misses",
                [
                    (
                        "sum by (workflow) "
                        f"(increase(hms_workflow_deadline_missed_total{{{WORKFLOW}}}[1h]))",
                        "{{workflow}}",
                    )
                ],
                thresholds=[("green", None), ("red", 1)],
            ),
            _timeseries(
                "Scheduler lateness p99",
                [
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(hms_scheduler_lateness_seconds_bucket[$__rate_interval])))",
                        "p99",
                    )
                ],
                unit="s",
            ),
            # The daemon's own faults (RELIABILITY.md): how late its loop runs, what it refuses.
            _timeseries("Event-loop lag", [("max(hms_event_loop_lag_seconds)", "lag")], unit="s"),
            _timeseries(
                "Refused by the daemon",
                [
                    ("sum(rate(hms_http_shed_total[$__rate_interval]))", "shed (503)/s"),
                    ("1 - min(hms_storage_writable)", "storage refusing writes (1)"),
                ],
            ),
        ]
    )
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "title": "hms-mgmt",
        "uid": "hms-mgmt",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",  # SLA months are UTC unless an SLO names another zone
        "refresh": "30s",
        "tags": ["hms-mgmt", "slo"],
        "templating": {
            "list": [
                _variable("service", "hms_instance_health"),
                _instance_variable(),
                _variable("workflow", "hms_workflow_processes"),
            ]
        },
        "panels": panels,
        "description": f"hms-mgmt: {len(config.services)} configured service(s).",
    }


def render_dashboard(config: Config, *, datasource: str | None = None) -> str:
    """The JSON; `datasource` fixes the uid for provisioning (Grafana does not resolve
    `__inputs` for provisioned dashboards, only on import)."""
    text = json.dumps(build_dashboard(config), indent=2) + "\n"
    return text if datasource is None else text.replace("${DS_PROMETHEUS}", datasource)


def panel_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard (for tests and linting)."""
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _variable(name: str, metric: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": f"label_values({metric}, {name})", "refId": f"{name}-variable"},
        "definition": f"label_values({metric}, {name})",
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "refresh": 2,
        "current": {"selected": True, "text": "All", "value": "$__all"},
    }


def _instance_variable() -> dict[str, Any]:
    return _variable("instance", f"hms_instance_health{{{SERVICE}}}")


def _target(expr: str, legend: str, ref: str, **extra: Any) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


Steps = list[tuple[str, float | None]]  # (colour, from this value up); the first from None


def _timeseries(
    title: str,
    queries: list[tuple[str, str]],
    *,
    unit: str = "short",
    thresholds: Steps | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if thresholds is not None:  # lines take the colour of the step they are in
        defaults |= {
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds(thresholds),
            "custom": {"thresholdsStyle": {"mode": "dashed"}},
        }
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [_target(expr, legend, chr(65 + i)) for i, (expr, legend) in enumerate(queries)],
    }


def _thresholds(steps: Steps) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def _health_table(title: str, expr: str, description: str) -> dict[str, Any]:
    """One row per instance; the state cell coloured (critical red)."""
    colours = {
        state: {"color": colour, "index": index, "text": state}
        for index, (state, colour) in enumerate(HEALTH_COLOURS.items())
    }
    state_column = {
        "matcher": {"id": "byName", "options": "state"},
        "properties": [
            {"id": "mappings", "value": [{"type": "value", "options": colours}]},
            {"id": "custom.cellOptions", "value": {"type": "color-background"}},
        ],
    }
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {}, "overrides": [state_column]},
        "targets": [_target(expr, "", "A", instant=True, format="table")],
        "transformations": [
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            }
        ],
    }


def _stat(title: str, expr: str, legend: str) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": "percentunit", "decimals": 3}, "overrides": []},
        "targets": [_target(expr, legend, "A", instant=True)],
    }


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two panels per row, 12 columns each; ids in order."""
    for index, panel in enumerate(panels):
        panel["id"] = index + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)}
    return panels
