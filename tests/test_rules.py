"""`hms-mgmt rules`, checked and unit-tested by the real promtool."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.config import parse_config
from monitor.slo import TIERS, build_rules, render_rules

from .conftest import require_tool

CONFIG = """
alerting: {labels: [team]}
services:
  - name: payments
    meta: {team: money, tier: "1"}
    slos:
      - {name: availability, objective: 99.9, period: 30d}
      - {name: latency, objective: 99, latency_threshold: 300ms}
  - name: reports
    slos:
      - {name: availability, objective: 99, period: 7d}
      - name: external
        objective: 99.5
        sli:
          error_query: sum(rate(http_requests_total{job="reports",code=~"5.."}[{{window}}]))
          total_query: sum(rate(http_requests_total{job="reports"}[{{window}}]))
"""


@pytest.fixture
def rule_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yml"
    path.write_text(render_rules(parse_config(CONFIG)))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_promtool_accepts_the_rule_file(rule_file: Path) -> None:
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_burn_rate_factors_follow_the_workbook_at_30_days() -> None:
    assert [round(t.factor(timedelta(days=30)), 6) for t in TIERS] == [14.4, 6.0, 3.0, 1.0]
    # A 7-day period spends the same budget fractions in the same windows.
    assert [round(t.factor(timedelta(days=7)), 4) for t in TIERS] == [3.36, 1.4, 0.7, 0.2333]


def test_the_raw_sli_is_used_with_its_window() -> None:
    groups = build_rules(parse_config(CONFIG))["groups"]
    external = next(g for g in groups if g["name"] == "hms-slo-reports-external")
    five = next(r for r in external["rules"] if r.get("record") == "slo:sli_error:ratio_rate5m")
    assert "[5m]" in five["expr"] and "{{window}}" not in five["expr"]


def sample(metric: str, slo: str, window: str, value: float) -> dict[str, Any]:
    """An expected recording-rule sample of the payments service."""
    labels = (
        f'{metric}{{sloth_id="payments-{slo}",sloth_service="payments",'
        f'sloth_slo="{slo}",sloth_window="{window}"}}'
    )
    return {"labels": labels, "value": value}


def alerts_for(service: str, slo: str, *severities: str) -> list[dict[str, Any]]:
    """The expected HmsSloBurnRate alerts (labels and annotations) for the given tiers."""
    groups = build_rules(parse_config(CONFIG))["groups"]
    group = next(g for g in groups if g["name"] == f"hms-slo-{service}-{slo}")
    return [
        {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}
        for rule in group["rules"]
        if rule.get("alert") == "HmsSloBurnRate" and rule["labels"]["severity"] in severities
    ]


def probes(
    failures_per_minute: int, successes_per_minute: int, minutes: int = 400
) -> list[dict[str, str]]:
    series = 'hms_probe_total{{service="payments",instance="p1",result="{result}"}}'
    return [
        {"series": series.format(result="failure"), "values": f"0+{failures_per_minute}x{minutes}"},
        {
            "series": series.format(result="success"),
            "values": f"0+{successes_per_minute}x{minutes}",
        },
    ]


def alerts(alertname: str, eval_time: str, expected: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": alertname, "exp_alerts": expected}


def samples(expr: str, eval_time: str, expected: list[dict[str, Any]]) -> dict[str, Any]:
    return {"expr": expr, "eval_time": eval_time, "exp_samples": expected}


def run_tests(
    tmp_path: Path,
    rule_file: Path,
    input_series: list[dict[str, str]],
    *,
    alert_tests: tuple[dict[str, Any], ...] = (),
    expr_tests: tuple[dict[str, Any], ...] = (),
) -> None:
    """One `promtool test rules` case, series sampled every minute; fails on any mismatch."""
    case: dict[str, Any] = {"interval": "1m", "input_series": input_series}
    if alert_tests:
        case["alert_rule_test"] = list(alert_tests)
    if expr_tests:
        case["promql_expr_test"] = list(expr_tests)
    path = tmp_path / "tests.yml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rule_file)], "evaluation_interval": "1m", "tests": [case]}
        )
    )
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def burn_labels(severity: str) -> dict[str, str]:
    """What Alertmanager and Sloth's dashboards see on a payments availability alert."""
    return {
        "service": "payments",
        "slo": "availability",
        "severity": severity,
        "sloth_severity": severity,
        "sloth_id": "payments-availability",
        "sloth_service": "payments",
        "sloth_slo": "availability",
        "team": "money",  # alerting.labels: [team]; `tier` is not copied
    }


def test_page_alerts_fire_when_everything_fails(tmp_path: Path, rule_file: Path) -> None:
    # Both page pairs and both ticket pairs burn: still one alert per severity.
    annotations = [a["exp_annotations"] for a in alerts_for("payments", "availability", "page")]
    ticket = [a["exp_annotations"] for a in alerts_for("payments", "availability", "ticket")]
    expected = [
        {"exp_labels": burn_labels("page"), "exp_annotations": annotations[0]},
        {"exp_labels": burn_labels("ticket"), "exp_annotations": ticket[0]},
    ]
    run_tests(
        tmp_path,
        rule_file,
        probes(10, 0),
        alert_tests=(alerts("HmsSloBurnRate", "70m", expected),),
    )


def test_each_slo_has_one_burn_alert_per_severity() -> None:
    groups = build_rules(parse_config(CONFIG))["groups"]
    for group in (g for g in groups if g["name"].startswith("hms-slo-")):
        burn = [r for r in group["rules"] if r.get("alert") == "HmsSloBurnRate"]
        assert [(r["labels"]["severity"], r["labels"]["sloth_severity"]) for r in burn] == [
            ("page", "page"),
            ("ticket", "ticket"),
        ]
        assert all(r["expr"].count(" or ") == 1 for r in burn)  # its two pairs


def test_sloth_slo_info_lists_each_slo(tmp_path: Path, rule_file: Path) -> None:
    info = {
        "sloth_id": "payments-latency",
        "sloth_service": "payments",
        "sloth_slo": "latency",
        "sloth_objective": "99",
        "sloth_mode": "hms-mgmt",
    }
    labels = "sloth_slo_info{" + ",".join(f'{k}="{v}"' for k, v in info.items()) + "}"
    run_tests(
        tmp_path,
        rule_file,
        probes(0, 0, minutes=5),
        expr_tests=(
            samples(
                'sloth_slo_info{sloth_id="payments-latency"}',
                "1m",
                [{"labels": labels, "value": 1}],
            ),
        ),
    )


def test_a_slow_burn_raises_tickets_and_no_page(tmp_path: Path, rule_file: Path) -> None:
    # 0.4% errors: above the ticket thresholds (0.3%, 0.1%), under the page ones (1.44%, 0.6%).
    run_tests(
        tmp_path,
        rule_file,
        probes(4, 996),
        alert_tests=(
            alerts("HmsSloBurnRate", "3h", alerts_for("payments", "availability", "ticket")),
        ),
        expr_tests=(
            samples(
                'slo:sli_error:ratio_rate1h{sloth_id="payments-availability"}',
                "3h",
                [sample("slo:sli_error:ratio_rate1h", "availability", "1h", 0.004)],
            ),
        ),
    )


def test_a_healthy_service_raises_nothing(tmp_path: Path, rule_file: Path) -> None:
    remaining = "slo:period_error_budget_remaining:ratio"
    run_tests(
        tmp_path,
        rule_file,
        probes(0, 100),
        alert_tests=(alerts("HmsSloBurnRate", "6h", []),),
        expr_tests=(
            samples(
                f"{remaining}{{sloth_slo='availability'}}",
                "6h",
                [sample(remaining, "availability", "30d", 1)],
            ),
        ),
    )


def test_zero_traffic_yields_no_sample_and_no_alert(tmp_path: Path, rule_file: Path) -> None:
    run_tests(
        tmp_path,
        rule_file,
        probes(0, 0),
        alert_tests=(alerts("HmsSloBurnRate", "2h", []),),
        expr_tests=(
            samples("slo:sli_error:ratio_rate5m", "2h", []),
            samples("slo:current_burn_rate:ratio", "2h", []),
        ),
    )


def test_latency_sli_counts_probes_over_the_threshold_bucket(
    tmp_path: Path, rule_file: Path
) -> None:
    bucket = 'hms_probe_duration_seconds_bucket{{service="payments",instance="p1",le="{le}"}}'
    run_tests(
        tmp_path,
        rule_file,
        [
            *probes(0, 100),
            {"series": bucket.format(le="0.3"), "values": "0+98x400"},
            {"series": bucket.format(le="+Inf"), "values": "0+100x400"},
        ],
        expr_tests=(
            samples(
                'slo:sli_error:ratio_rate1h{sloth_id="payments-latency"}',
                "2h",
                [sample("slo:sli_error:ratio_rate1h", "latency", "1h", 0.02)],
            ),
        ),
    )


def test_instance_down_respects_for_and_suppression(tmp_path: Path, rule_file: Path) -> None:
    health = 'hms_instance_health{{service="{s}",instance="{i}",state="critical"}}'
    suppressed = 'hms_instance_suppressed{{service="{s}",instance="{i}"}}'

    def down(service: str, instance: str, **extra: str) -> dict[str, Any]:
        return {
            "exp_labels": {
                "severity": "page",
                "service": service,
                "instance": instance,
                "state": "critical",
                **extra,
            },
            "exp_annotations": {
                "summary": f"{service}/{instance} is critical",
                "description": f"Probes of {instance} have been failing for 2 minutes. "
                "Instances whose dependency is down are not reported.",
                "runbook_url": "docs/runbooks.md#hmsinstancedown",
            },
        }

    run_tests(
        tmp_path,
        rule_file,
        [
            {"series": health.format(s="payments", i="p1"), "values": "1x10"},
            {"series": suppressed.format(s="payments", i="p1"), "values": "0x10"},
            {"series": health.format(s="ledger-client", i="c1"), "values": "1x10"},
            {"series": suppressed.format(s="ledger-client", i="c1"), "values": "1x10"},
            # A self-registered service config.yaml does not name: no copied labels.
            {"series": health.format(s="adhoc", i="a1"), "values": "1x10"},
            {"series": suppressed.format(s="adhoc", i="a1"), "values": "0x10"},
        ],
        alert_tests=(
            alerts("HmsInstanceDown", "1m", []),
            alerts(
                "HmsInstanceDown",
                "3m",
                [down("payments", "p1", team="money"), down("adhoc", "a1")],
            ),
        ),
    )


def test_the_daemon_alerts_on_an_unwritable_disk_and_on_shedding(
    tmp_path: Path, rule_file: Path
) -> None:
    runbook = "docs/runbooks.md#"
    run_tests(
        tmp_path,
        rule_file,
        [
            {"series": 'hms_storage_writable{instance="d"}', "values": "1 0x5 1x5"},
            {"series": 'hms_http_shed_total{instance="d",reason="loop_lag"}', "values": "0x5 40x5"},
        ],
        alert_tests=(
            alerts("HmsStorageUnwritable", "1m", []),  # "for: 1m" not yet over
            alerts(
                "HmsStorageUnwritable",
                "3m",
                [
                    {
                        "exp_labels": {"severity": "page", "instance": "d"},
                        "exp_annotations": {
                            "summary": "hms-mgmt cannot write its database",
                            "description": "Registrations, events and workflow starts are "
                            "refused with 503 until the disk has space or is writable again.",
                            "runbook_url": runbook + "hmsstorageunwritable",
                        },
                    }
                ],
            ),
            alerts("HmsStorageUnwritable", "9m", []),  # recovered
            alerts("HmsOverloaded", "4m", []),
            alerts(
                "HmsOverloaded",
                "7m",
                [
                    {
                        "exp_labels": {"severity": "ticket", "instance": "d"},
                        "exp_annotations": {
                            "summary": "hms-mgmt is refusing requests as overloaded (503)",
                            "description": "Its event loop lagged past server.overload_lag "
                            "and it answered 503 with Retry-After instead of queueing.",
                            "runbook_url": runbook + "hmsoverloaded",
                        },
                    }
                ],
            ),
        ),
    )


def test_the_cli_writes_the_rule_file(tmp_path: Path) -> None:
    from .test_config import run_cli

    (tmp_path / "config.yaml").write_text(CONFIG)
    out = tmp_path / "out.yml"
    result = run_cli("rules", "--config", str(tmp_path / "config.yaml"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == render_rules(parse_config(CONFIG))
    printed = run_cli("rules", "--config", str(tmp_path / "config.yaml"))
    assert printed.stdout == out.read_text()


def test_copied_labels_match_service_names_exactly(tmp_path: Path) -> None:
    """`.` in a service name is not a regex wildcard: apixv2 does not get api.v2's team."""
    config = "alerting: {labels: [team]}\nservices:\n  - {name: api.v2, meta: {team: web}}\n"
    rules = tmp_path / "rules.yml"
    rules.write_text(render_rules(parse_config(config)))
    health = 'hms_instance_health{{service="{s}",instance="i",state="critical"}}'
    suppressed = 'hms_instance_suppressed{{service="{s}",instance="i"}}'

    def down(service: str, **extra: str) -> dict[str, Any]:
        return {
            "exp_labels": {
                "severity": "page",
                "service": service,
                "instance": "i",
                "state": "critical",
                **extra,
            },
            "exp_annotations": {
                "summary": f"{service}/i is critical",
                "description": "Probes of i have been failing for 2 minutes. "
                "Instances whose dependency is down are not reported.",
                "runbook_url": "docs/runbooks.md#hmsinstancedown",
            },
        }

    services = ("api.v2", "apixv2")
    run_tests(
        tmp_path,
        rules,
        [
            *({"series": health.format(s=s), "values": "1x5"} for s in services),
            *({"series": suppressed.format(s=s), "values": "0x5"} for s in services),
        ],
        alert_tests=(
            alerts("HmsInstanceDown", "3m", [down("api.v2", team="web"), down("apixv2")]),
        ),
    )
