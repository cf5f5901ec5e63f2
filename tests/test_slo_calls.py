"""SLIs from real workflow calls: metrics, `source: calls` SLOs, their rules and dashboard."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from monitor.config import Config, ConfigError, parse_config
from monitor.keys import BUS
from monitor.slo import build_dashboard, build_rules, panel_queries, render_rules
from scheduler import Event

from .conftest import AppClient, FakeClock, metric_families
from .test_rules import promtool, run_tests, samples

SERVICES = [
    {
        "name": "ach",
        "slos": [
            {"name": "availability", "objective": 99.9},  # probes: none here, so no data
            {"name": "calls", "objective": 99.5, "source": "calls"},
            {
                "name": "calls-latency",
                "objective": 99,
                "latency_threshold": "300ms",
                "source": "calls",
            },
        ],
    }
]
PAY = {
    "name": "Pay",
    "steps": [
        {
            "name": "pay",
            "call": {"service": "ach", "path": "/transfers"},
            "retry": {"max_attempts": 1},
        }
    ],
}


@pytest.fixture
async def ach() -> AsyncIterator[tuple[TestServer, list[int]]]:
    """A bank that fails one transfer in five with 503; statuses queued in the list first."""
    numbers = itertools.count(1)
    queued: list[int] = []

    async def transfer(request: web.Request) -> web.Response:
        if queued:
            return web.json_response({"error": "queued"}, status=queued.pop(0))
        if next(numbers) % 5 == 0:
            return web.json_response({"error": "bank link busy"}, status=503)
        return web.json_response({"payment_id": "pay-1", "passed": False})

    app = web.Application()
    app.router.add_post("/transfers", transfer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, queued
    await server.close()


@pytest.fixture
async def daemon(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    ach: tuple[TestServer, list[int]],
) -> AppClient:
    client = await start_daemon(make_config(services=SERVICES, workflows=[PAY]))
    url = str(ach[0].make_url("/"))
    resp = await client.put("/v1/services/ach/instances/a1", json={"url": url})
    assert resp.status == 201, await resp.text()
    return client


async def pay(client: AppClient, workflow: str = "Pay") -> dict[str, Any]:
    resp = await client.post(f"/v1/workflows/{workflow}", params={"wait": "10s"}, json={})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def slos(client: AppClient) -> dict[str, dict[str, Any]]:
    resp = await client.get("/v1/services/ach/slos")
    assert resp.status == 200, await resp.text()
    return {slo["name"]: slo for slo in (await resp.json())["slos"]}


def counted(families: dict[str, Any], result: str) -> float:
    family = families["hms_service_calls"]
    return sum(
        s.value
        for s in family.samples
        if s.name == "hms_service_calls_total" and s.labels == {"service": "ach", "result": result}
    )


async def test_calls_to_a_service_that_fails_one_in_five_show_in_metrics_and_its_slo(
    daemon: AppClient, clock: FakeClock
) -> None:
    events: list[Event] = []
    daemon.app[BUS].subscribe("slo.*", events.append, name="test")
    before = await metric_families(daemon)
    assert (counted(before, "success"), counted(before, "failure")) == (0, 0)  # declared

    statuses = [(await pay(daemon))["status"] for _ in range(10)]
    assert statuses.count("failed") == 2

    families = await metric_families(daemon)
    assert (counted(families, "success"), counted(families, "failure")) == (8, 2)
    durations = {
        (s.name, s.labels.get("le")): s.value
        for s in families["hms_service_call_duration_seconds"].samples
        if s.labels["service"] == "ach"
    }
    assert durations[("hms_service_call_duration_seconds_count", None)] == 8  # served only
    assert ("hms_service_call_duration_seconds_bucket", "0.3") in durations  # the threshold

    assert (await slos(daemon))["calls"]["sli"] is None  # the minute is still open
    clock.advance(60)
    report = await slos(daemon)
    assert report["calls"]["source"] == "calls"
    assert report["calls"]["sli"] == pytest.approx(0.8)
    assert report["calls"]["burn_rates"]["1h"] == pytest.approx(0.2 / 0.005)
    assert report["calls"]["error_budget_remaining"] < 0
    assert report["calls-latency"]["sli"] == pytest.approx(0.8)  # fast, but 2 not served
    assert (report["availability"]["source"], report["availability"]["sli"]) == ("probes", None)

    await asyncio.sleep(0.05)
    burns = {(e.topic, e.data.get("severity")) for e in events if e.data["slo"] == "calls"}
    assert ("slo.burn", "page") in burns and ("slo.budget_exhausted", None) in burns
    metrics = await (await daemon.get("/metrics")).text()
    assert 'hms_slo_sli_ratio{service="ach",slo="calls",window="1h"} 0.8' in metrics

    page = await (await daemon.get("/services/ach")).text()
    assert 'class="slo slo-down" data-slo="calls" data-source="calls"' in page
    assert "(workflow calls)" in page


async def test_a_minute_without_calls_is_no_data(daemon: AppClient, clock: FakeClock) -> None:
    for _ in range(4):
        await pay(daemon)
    clock.advance(60)
    assert (await slos(daemon))["calls"]["sli_by_window"]["5m"] == 1.0
    clock.advance(600)  # ten quiet minutes: the 5 m window holds no calls at all
    report = await slos(daemon)
    assert report["calls"]["sli_by_window"]["5m"] is None
    assert report["calls"]["burn_rates"]["5m"] is None
    assert report["calls"]["sli"] == 1.0  # the period still has the four


async def test_what_counts_as_a_failure_of_the_service(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    ach: tuple[TestServer, list[int]],
    clock: FakeClock,
) -> None:
    """A 4xx it means and a 2xx failing `expect` are its answers; a retry_on status and a
    call with no instance to take it are failures."""
    checked = {
        "name": "Checked",
        "steps": [
            {
                "name": "pay",
                "call": {"service": "ach", "path": "/transfers"},
                "retry": {"max_attempts": 1, "retry_on": [409]},
                "expect": ["[BODY].passed == true"],
            }
        ],
    }
    client = await start_daemon(make_config(services=SERVICES, workflows=[checked]))
    url = str(ach[0].make_url("/"))
    assert (await client.put("/v1/services/ach/instances/a1", json={"url": url})).status == 201
    done = await pay(client, "Checked")  # 200 {"passed": false}: expect fails the step
    assert done["error"]["message"] == "expect [BODY].passed == true (got false)"
    ach[1].append(422)
    await pay(client, "Checked")
    ach[1].append(409)  # the step retries it: the service was not able to
    await pay(client, "Checked")
    assert (await client.delete("/v1/services/ach/instances/a1")).status == 204
    await pay(client, "Checked")  # no instance at all
    families = await metric_families(client)
    assert (counted(families, "success"), counted(families, "failure")) == (2, 2)
    clock.advance(60)
    assert (await slos(client))["calls"]["sli"] == 0.5


async def test_every_attempt_and_every_compensation_is_a_call(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    ach: tuple[TestServer, list[int]],
) -> None:
    retried = {
        "name": "Retried",
        "steps": [
            {
                "name": "reserve",
                "call": {"service": "ach", "path": "/transfers"},
                "compensate": {"service": "ach", "path": "/transfers"},
            },
            {
                "name": "pay",
                "call": {"service": "ach", "path": "/transfers"},
                "retry": {"max_attempts": 3, "backoff": "10ms"},
            },
        ],
    }
    client = await start_daemon(make_config(services=SERVICES, workflows=[retried]))
    url = str(ach[0].make_url("/"))
    assert (await client.put("/v1/services/ach/instances/a1", json={"url": url})).status == 201
    # reserve 200; pay 503, then 400 (fails for good); the compensation of reserve 200.
    ach[1].extend([200, 503, 400, 200])
    done = await pay(client, "Retried")
    assert done["status"] == "compensated"
    assert len(done["history"]) == 4 and not ach[1]
    families = await metric_families(client)
    assert (counted(families, "success"), counted(families, "failure")) == (3, 1)


def test_source_calls_with_a_raw_sli_is_a_config_error() -> None:
    text = (
        "services:\n  - name: ach\n    slos:\n"
        "      - {name: x, objective: 99, source: calls, "
        "sli: {error_query: a, total_query: b}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="c.yaml")
    assert any(
        e.startswith("c.yaml:4: services[0].slos[0]") and "takes no source" in e
        for e in caught.value.errors
    ), caught.value.errors
    with pytest.raises(ConfigError) as caught:
        parse_config(text.replace("source: calls", "source: logs"), source="c.yaml")
    assert "services[0].slos[0].source" in caught.value.errors[0]


CONFIG = """
services:
  - name: ach
    slos:
      - {name: calls, objective: 99.5, source: calls}
      - {name: fast, objective: 99, latency_threshold: 300ms, source: calls}
"""


def test_the_rules_of_a_calls_slo_read_the_call_metrics() -> None:
    groups = {g["name"]: g for g in build_rules(parse_config(CONFIG))["groups"]}
    for name, metric in (("calls", "hms_service_calls_total"), ("fast", "_bucket")):
        rules = groups[f"hms-slo-ach-{name}"]["rules"]
        five = next(r for r in rules if r.get("record") == "slo:sli_error:ratio_rate5m")
        assert metric in five["expr"] and "hms_probe" not in five["expr"], five["expr"]


def test_promtool_accepts_and_evaluates_the_calls_slo_rules(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(render_rules(parse_config(CONFIG)))
    check = promtool("check", "rules", str(rule_file))
    assert check.returncode == 0, check.stdout + check.stderr
    calls = 'hms_service_calls_total{{service="ach",result="{r}"}}'
    bucket = 'hms_service_call_duration_seconds_bucket{{service="ach",le="{le}"}}'

    def sli_error(slo: str, value: float) -> dict[str, Any]:
        labels = (
            f'slo:sli_error:ratio_rate1h{{sloth_id="ach-{slo}",sloth_service="ach",'
            f'sloth_slo="{slo}",sloth_window="1h"}}'
        )
        return {"labels": labels, "value": value}

    run_tests(
        tmp_path,
        rule_file,
        [
            {"series": calls.format(r="failure"), "values": "0+1x200"},
            {"series": calls.format(r="success"), "values": "0+4x200"},
            {"series": bucket.format(le="0.3"), "values": "0+3x200"},
            {"series": bucket.format(le="+Inf"), "values": "0+4x200"},
        ],
        expr_tests=(
            samples(
                'slo:sli_error:ratio_rate1h{sloth_id="ach-calls"}', "2h", [sli_error("calls", 0.2)]
            ),
            samples(
                'slo:sli_error:ratio_rate1h{sloth_id="ach-fast"}', "2h", [sli_error("fast", 0.4)]
            ),
        ),
    )


def test_quiet_minutes_give_the_calls_rules_no_sample(tmp_path: Path) -> None:
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(render_rules(parse_config(CONFIG)))
    calls = 'hms_service_calls_total{{service="ach",result="{r}"}}'
    run_tests(
        tmp_path,
        rule_file,
        [
            {"series": calls.format(r="failure"), "values": "0x200"},
            {"series": calls.format(r="success"), "values": "0x200"},
        ],
        expr_tests=(samples("slo:sli_error:ratio_rate5m", "2h", []),),
    )


def test_the_dashboard_has_panels_for_the_calls() -> None:
    dashboard = build_dashboard(parse_config(CONFIG))
    titles = {p["title"]: p for p in dashboard["panels"]}
    failing = titles["Service calls failing (workflow calls)"]
    assert "hms_service_calls_total" in failing["targets"][0]["expr"]
    latency = titles["Service call latency p95 (workflow calls)"]
    assert "hms_service_call_duration_seconds_bucket" in latency["targets"][0]["expr"]
    assert sum("hms_service_call" in q for q in panel_queries(dashboard)) == 3


async def test_a_calls_slo_burning_within_its_budget_is_an_amber_line(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    ach: tuple[TestServer, list[int]],
    clock: FakeClock,
) -> None:
    services = [{"name": "ach", "slos": [{"name": "calls", "objective": 90, "source": "calls"}]}]
    client = await start_daemon(make_config(services=services, workflows=[PAY]))
    url = str(ach[0].make_url("/"))
    assert (await client.put("/v1/services/ach/instances/a1", json={"url": url})).status == 201
    ach[1].extend([200] * 20)
    for _ in range(20):
        await pay(client)
    clock.advance(2 * 3600)  # out of the last hour, still in the period
    ach[1].append(503)
    await pay(client)
    clock.advance(60)
    calls = (await slos(client))["calls"]
    assert calls["error_budget_remaining"] == pytest.approx(1 - (1 / 21) / 0.1)
    assert calls["burn_rates"]["1h"] == pytest.approx(10)
    page = await (await client.get("/services/ach")).text()
    assert 'class="slo slo-partial" data-slo="calls"' in page
