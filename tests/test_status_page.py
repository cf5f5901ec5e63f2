"""The status page: server-rendered HTML, and live in a real headless Chromium."""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright, expect
from prometheus_client import CollectorRegistry

from monitor import build_app
from monitor.config import Config

from .conftest import AppClient, FakeClock, require_tool, until
from .processes import free_port
from .test_checker import FAST, register, state_is

ARTIFACTS = Path(os.environ.get("HMS_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
ANNOUNCE = {"name": "Announce", "steps": [{"name": "announce", "publish": "grant.paid"}]}
SLOW = {
    "name": "Slow",
    "steps": [
        {"name": "announce", "publish": "grant.paid"},
        {"name": "check", "delay": "1h", "publish": "grant.checked"},
        {"name": "docs", "wait_for": {"event": "docs.validated"}},
    ],
}
DOCS = {
    "name": "Docs",
    "steps": [
        {"name": "docs", "wait_for": {"event": "docs.validated", "match": {"app": "{input.app}"}}}
    ],
}
# Flags from the machine notes: no background networking, no first-run, a fresh profile.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def site(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> AppClient:
    client = await start_daemon(
        make_config(
            defaults={"probe": {"type": "http", **FAST}},
            services=[
                {
                    "name": "payments",
                    "tags": ["money"],
                    "slos": [{"name": "availability", "objective": 99.5}],
                }
            ],
            workflows=[ANNOUNCE],
        )
    )
    await register(client, target)
    await state_is(client, "passing")
    return client


async def test_overview_lists_services_by_tag_with_health_and_slo(site: AppClient) -> None:
    resp = await site.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert '<h2 id="group-1">money</h2>' in html
    assert 'data-service="payments"' in html
    assert 'class="state state-passing"' in html
    assert html.count('class="bar bar-') == 90  # one bar per day


async def test_pages_send_security_headers(site: AppClient) -> None:
    resp = await site.get("/")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"


async def test_service_page_shows_instances_and_slos(site: AppClient) -> None:
    html = await (await site.get("/services/payments")).text()
    assert 'data-instance="payments/p1"' in html
    assert "availability" in html and "99.5%" in html


async def test_unknown_pages_get_the_json_error_shape(site: AppClient) -> None:
    for path in ("/services/nope", "/processes/nope", "/static/nope.js", "/?page=9"):
        resp = await site.get(path)
        assert resp.status in (400, 404), path
        assert "message" in (await resp.json())["error"]


async def test_a_service_page_lasts_as_long_as_the_service(
    site: AppClient, target: TestServer
) -> None:
    body = {"url": str(target.make_url("/")), "probe": {"type": "none"}}
    assert (await site.put("/v1/services/temp/instances/t1", json=body)).status == 201
    assert (await site.get("/services/temp")).status == 200
    assert (await site.delete("/v1/services/temp/instances/t1")).status == 204
    assert (await site.get("/services/temp")).status == 404
    # payments is declared in config: its page stays when no instance is left.
    assert (await site.delete("/v1/services/payments/instances/p1")).status == 204
    resp = await site.get("/services/payments")
    assert resp.status == 200
    assert "data-instance=" not in await resp.text()


async def test_names_are_escaped(site: AppClient, target: TestServer) -> None:
    resp = await site.put(
        "/v1/services/payments/instances/x1",
        json={"url": str(target.make_url("/")), "meta": {"a": "b"}},
    )
    assert resp.status == 201
    body = {"input": {"note": "<script>alert(1)</script>"}}
    started = await (await site.post("/v1/workflows/Announce?wait=5s", json=body)).json()
    html = await (await site.get(f"/processes/{started['id']}")).text()
    assert "<script>alert(1)</script>" not in html
    assert "\\u003cscript\\u003e" in html or "&lt;script&gt;" in html


async def test_banner_counts_the_failing_services_among_all(site: AppClient) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    resp = await site.put("/v1/services/ledger/instances/l1", json={"url": down})
    assert resp.status == 201

    async def ledger_critical() -> bool:
        body = await (await site.get("/v1/health", params={"service": "ledger"})).json()
        return [i["state"] for i in body["instances"]] == ["critical"]

    await until(ledger_critical)
    html = await (await site.get("/")).text()
    assert re.search(r'id="summary">\s*1 of 2 services is failing.\s*</p>', html), html


async def test_banner_says_all_pass_when_they_do(site: AppClient) -> None:
    html = await (await site.get("/")).text()
    assert re.search(r'id="summary">\s*The service is passing.\s*</p>', html)


class MinuteAhead:
    """Real time, one minute ahead: the minute being probed counts as over at once, so
    the results flush adds it to the page's hourly figures (probes stamp real time)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time() + 60


async def test_first_hour_shows_latency_and_a_drawn_sparkline(
    make_config: Callable[..., Config],
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    config = make_config(
        defaults={"probe": {"type": "http", **FAST}},
        services=[
            {"name": "payments", "instances": [{"id": "p1", "url": str(target.make_url("/ok"))}]}
        ],
    )
    site = await aiohttp_client(build_app(config, clock=MinuteAhead(), metrics=CollectorRegistry()))

    async def spark() -> bool:
        return 'class="spark"' in await (await site.get("/")).text()

    await until(spark)
    html = await (await site.get("/")).text()
    (points,) = re.findall(r'<polyline points="([^"]*)"', html)
    assert len(points.split()) >= 2  # a single point draws nothing
    assert re.search(r'<span class="latency">\d+ ms</span>', html)


async def test_the_uptime_footnote_shows_only_beside_uptime_bars(site: AppClient) -> None:
    note = "Uptime bars: one per UTC day"
    assert note in await (await site.get("/")).text()
    assert note in await (await site.get("/services/payments")).text()
    assert note not in await (await site.get("/workflows")).text()


async def start_until_waiting(site: AppClient, workflow: str, input_: dict[str, Any]) -> str:
    started = await site.post(f"/v1/workflows/{workflow}", json={"input": input_})
    process_id: str = (await started.json())["id"]

    async def waiting() -> bool:
        body = await (await site.get(f"/v1/processes/{process_id}")).json()
        return bool(body["status"] == "waiting")

    await until(waiting)
    return process_id


async def test_a_waiting_process_says_for_what_and_until_when_and_lists_steps_to_come(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    site = await start_daemon(make_config(workflows=[SLOW]))
    process_id = await start_until_waiting(site, "Slow", {"app": "A-7"})
    body = await (await site.get(f"/v1/processes/{process_id}")).json()
    assert body["waiting_for"] == {
        "kind": "delay",
        "until": clock.time() + 3600,
        "detail": "check starts",
    }
    assert [(s["name"], s["state"]) for s in body["steps"]] == [
        ("announce", "completed"),
        ("check", "waiting"),
        ("docs", "pending"),
    ]
    html = await (await site.get(f"/processes/{process_id}")).text()
    until_text = datetime.fromtimestamp(clock.time() + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert re.search(rf'id="waiting-for">delay: check starts, until <time[^>]*>{until_text}<', html)
    assert re.search(r"<h3>check <span class=\"status status-waiting\">waiting</span>", html)
    assert re.search(r"<h3>docs <span class=\"status status-pending\">pending</span>", html)


async def test_a_process_waiting_for_an_event_names_it(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
) -> None:
    site = await start_daemon(make_config(workflows=[DOCS]))
    process_id = await start_until_waiting(site, "Docs", {"app": "A-7"})
    html = await (await site.get(f"/processes/{process_id}")).text()
    assert 'id="waiting-for">event: docs.validated with app=A-7, no time limit<' in html


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    chromium = require_tool("chromium")

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


async def test_page_turns_critical_live_and_shows_a_process_timeline(
    site: AppClient, target: TestServer, browser: Any
) -> None:
    started = await site.post("/v1/workflows/Announce?wait=5s", json={"input": {"amount": 5}})
    assert started.status == 200
    page = await browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    base = str(site.make_url("/"))

    await page.goto(base + "services/payments")
    badge = page.locator('[data-instance="payments/p1"] .health .state')
    assert await badge.text_content() == "passing"
    await expect(page.locator("#live")).to_have_text(re.compile(r"^Live"))
    async with aiohttp.ClientSession() as http:
        await http.post(target.make_url("/status/503"))
    # No reload: the badge changes because the SSE event arrived.
    await expect(badge).to_have_text("critical", timeout=10_000)
    await expect(page.locator("#service-state .state")).to_have_text("critical")

    await page.keyboard.press("Tab")  # keyboard users land on the skip link first
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"

    await page.goto(base + "workflows")
    await page.get_by_role("link", name=(await started.json())["id"]).click()
    await page.wait_for_url("**/processes/*")
    timeline = page.locator("#timeline")
    assert "announce" in (await timeline.text_content() or "")
    assert await page.locator("#process-status").text_content() == "completed"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.goto(base)
    await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    assert problems == []


async def test_with_protected_reads_a_person_signs_in_and_the_page_is_live(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
    browser: Any,
) -> None:
    token = "reader-token-123"
    auth = {
        "tokens": [{"name": "token", "token": token, "scopes": ["subscribe:none"]}],
        "protect_reads": True,
    }
    site = await start_daemon(
        make_config(
            server={"auth": auth},
            defaults={"probe": {"type": "http", **FAST}},
            services=[
                {
                    "name": "payments",
                    "instances": [{"id": "p1", "url": str(target.make_url("/"))}],
                    "probe": {"path": "/switchable"},
                }
            ],
        )
    )
    page = await browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    base = str(site.make_url("/"))

    await page.goto(base + "services/payments")  # no session: the sign-in form instead
    await page.wait_for_url(re.compile(r"/login\?next=(/|%2F)services(/|%2F)payments$"))
    await page.get_by_label("Token").fill("not-the-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    problems.clear()  # the form came back as a 401 document, which the console reports
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/services/payments")
    badge = page.locator('[data-instance="payments/p1"] .health .state')
    await expect(badge).to_have_text("passing", timeout=10_000)
    await expect(page.locator("#live")).to_have_text(re.compile(r"^Live"))  # SSE with the cookie
    async with aiohttp.ClientSession() as http:
        await http.post(target.make_url("/status/503"))
    await expect(badge).to_have_text("critical", timeout=10_000)
    cookies = await page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("hms_session", True, "Strict")
    ]
    assert problems == []
