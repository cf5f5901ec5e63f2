"""What Prometheus and Alertmanager are given: runbooks that resolve, routing labels, deploy/."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from monitor.config import ConfigError, load_config, parse_config
from monitor.slo import build_rules

from .conftest import require_tool
from .processes import ROOT, free_port, running_server
from .test_rules import CONFIG

DEPLOY = ROOT / "deploy"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to
    hyphens, repeats suffixed -1, -2 ..."""
    seen: Counter[str] = Counter()
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param(lambda: build_rules(parse_config(CONFIG)), id="generated"),
        pytest.param(lambda: yaml.safe_load((DEPLOY / "hms-rules.yml").read_text()), id="shipped"),
    ],
)
def test_every_runbook_url_resolves_to_a_heading_in_the_repository(rules: Any) -> None:
    alerts = alert_rules(rules())
    assert {rule["alert"] for rule in alerts} >= {
        "HmsSloBurnRate",
        "HmsInstanceDown",
        "HmsWorkflowDeadlineMissed",
    }
    for rule in alerts:
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        page = ROOT / path  # the default base is relative to the repository root
        assert page.is_file(), rule["annotations"]["runbook_url"]
        assert anchor in github_anchors(page.read_text()), rule["annotations"]["runbook_url"]


def test_every_alert_has_a_summary_and_a_description() -> None:
    for rule in alert_rules(build_rules(parse_config(CONFIG))):
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_runbook_base_is_configurable() -> None:
    wiki = "alerting: {runbook_base: https://wiki.example.org/hms/runbooks}"
    config = parse_config(CONFIG.replace("alerting: {labels: [team]}", wiki))
    urls = {r["annotations"]["runbook_url"] for r in alert_rules(build_rules(config))}
    assert "https://wiki.example.org/hms/runbooks#hmssloburnrate" in urls
    assert all(url.startswith("https://wiki.example.org/hms/runbooks#") for url in urls)


def test_alert_labels_must_be_label_names_the_alerts_do_not_set() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("alerting:\n  labels: [team, severity, 'a b']\n  runbook_base: 'x#y'\n")
    assert error.value.errors == [
        "config.yaml:2: alerting.labels[1]: 'severity' is a label the alerts set themselves",
        "config.yaml:2: alerting.labels[2]: 'a b' is not a Prometheus label name "
        "([a-zA-Z_][a-zA-Z0-9_]*)",
        "config.yaml:3: alerting.runbook_base: expected a URL or path without '#' or spaces "
        "(#<alert> is appended)",
    ]


def test_the_shipped_config_has_an_slo_and_routes_alerts_by_team() -> None:
    config = load_config(ROOT / "config.yaml", env={})
    (service,) = [s for s in config.services if s.slos]
    assert service.instances[0].url == "http://127.0.0.1:9797"  # the daemon probes itself
    burn = [r for r in alert_rules(build_rules(config)) if r["alert"] == "HmsSloBurnRate"]
    assert {r["labels"]["team"] for r in burn} == {service.meta["team"]}


def test_prometheus_sends_alerts_to_alertmanager_and_keeps_health_out_of_labels() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (manager,) = prometheus["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    for job in prometheus["scrape_configs"]:
        for relabel in job.get("relabel_configs", []):
            # A health change would start new series for every metric of the target.
            assert "__meta_hms_health" not in relabel.get("source_labels", []) or relabel.get(
                "action"
            ) in ("keep", "drop"), relabel


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("amtool"), *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_amtool_accepts_the_alertmanager_config() -> None:
    result = amtool("check-config", str(DEPLOY / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=page", "team=money", "alertname=HmsSloBurnRate"], "money-pager"),
        (["severity=ticket", "team=money", "alertname=HmsSloBurnRate"], "money-tickets"),
        (["severity=page", "team=platform", "alertname=HmsInstanceDown"], "ops-pager"),
        (["severity=ticket", "alertname=HmsWorkflowDeadlineMissed"], "ops-tickets"),
    ],
)
def test_alertmanager_routes_by_team_then_severity(labels: list[str], receiver: str) -> None:
    result = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={DEPLOY / 'alertmanager.yml'}",
        f"--verify.receivers={receiver}",
        *labels,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


@contextmanager
def running_alertmanager(directory: Path) -> Iterator[str]:
    """The real Alertmanager (Debian names it prometheus-alertmanager) with the shipped
    config, alone (no cluster) on a free 127.0.0.1 port; yields its base URL."""
    name = "alertmanager" if shutil.which("alertmanager") else "prometheus-alertmanager"
    port = free_port()
    argv = [
        require_tool(name),
        f"--config.file={DEPLOY / 'alertmanager.yml'}",
        f"--storage.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with running_server(argv, directory / "alertmanager.log"):
        yield f"http://127.0.0.1:{port}"


def burn_alert(sloth_id: str, severity: str) -> dict[str, Any]:
    service, slo = sloth_id.rsplit("-", 1)
    labels = {
        "alertname": "HmsSloBurnRate",
        "service": service,
        "slo": slo,
        "severity": severity,
        "sloth_severity": severity,
        "sloth_id": sloth_id,
        "team": "money",
    }
    return {"labels": labels, "annotations": {"summary": "burning"}}


async def test_a_page_holds_back_the_ticket_of_the_same_slo(tmp_path: Path) -> None:
    with running_alertmanager(tmp_path) as url:
        async with aiohttp.ClientSession() as http:
            alerts = [
                burn_alert("payments-availability", "page"),
                burn_alert("payments-availability", "ticket"),
                burn_alert("payments-latency", "ticket"),  # no page for this SLO
            ]
            for _ in range(100):  # until it listens
                try:
                    async with http.post(f"{url}/api/v2/alerts", json=alerts) as resp:
                        assert resp.status == 200, await resp.text()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail((tmp_path / "alertmanager.log").read_text())

            states: dict[tuple[str, str], str] = {}
            for _ in range(100):  # inhibitions are computed as the alerts come in
                async with http.get(f"{url}/api/v2/alerts") as resp:
                    states = {
                        (a["labels"]["sloth_id"], a["labels"]["severity"]): a["status"]["state"]
                        for a in await resp.json()
                    }
                if states.get(("payments-availability", "ticket")) == "suppressed":
                    break
                await asyncio.sleep(0.1)
    assert states == {
        ("payments-availability", "page"): "active",
        ("payments-availability", "ticket"): "suppressed",
        ("payments-latency", "ticket"): "active",
    }
