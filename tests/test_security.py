"""Auth on every route the OpenAPI document lists, sessions for browsers, scoped SSE,
allowed_targets, and secrets kept out of logs and errors (SECURITY.md)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import yaml

from monitor import parse_config
from monitor.config import Config, ConfigError
from monitor.keys import PARTS
from monitor.reload import apply_config

from .conftest import AppClient, until
from .services import Calls, service_app
from .test_auth import ADMIN, PAYMENTS, bearer

LISTENER = "listener-token-123"
NOBODY = "no-scope-token-123"  # valid, but its one scope fits nothing the tests call
TOKENS = [
    {"name": "admin", "token": ADMIN, "scopes": ["*"]},
    {"name": "payments", "token": PAYMENTS, "scopes": ["register:payments*", "publish:payment.*"]},
    {"name": "listener", "token": LISTENER, "scopes": ["subscribe:grant.*"]},
    {"name": "nobody", "token": NOBODY, "scopes": ["subscribe:nothing"]},
]
WORKFLOW = {
    "name": "Grant",
    "route": "/api/grants",
    "steps": [{"name": "wait", "delay": "1h", "publish": "grant.done"}],
}
# The sign-in itself: it takes a token in its body, and logging out only clears a cookie.
SIGN_IN = {("POST", "/login"), ("POST", "/logout")}
OPEN_READS = {"/healthz", "/readyz", "/login", "/static/{name}"}
AUDIT_READS = {"/audit", "/v1/audit"}  # the trail: for audit:read holders only (DESIGN §3)


@pytest.fixture
def secured_config(make_config: Callable[..., Config]) -> Callable[..., Config]:
    def make(protect_reads: bool = False, **sections: Any) -> Config:
        auth = {"tokens": TOKENS, "protect_reads": protect_reads}
        server = {"auth": auth, **sections.pop("server", {})}
        payments = {"name": "payments", "slos": [{"name": "availability", "objective": 99}]}
        return make_config(server=server, services=[payments], workflows=[WORKFLOW], **sections)

    return make


async def operations(client: AppClient) -> list[tuple[str, str]]:
    document = await (await client.get("/openapi.json", headers=bearer(ADMIN))).json()
    return [
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    ]


async def fill(client: AppClient, path: str) -> str:
    """The path with its parameters naming things that exist."""
    resp = await client.post("/v1/workflows/Grant", json={"input": {}}, headers=bearer(ADMIN))
    process = (await resp.json())["id"]
    values = {
        "service": "payments",
        "id": process if path.startswith(("/v1/processes", "/processes")) else "p1",
        "name": "page.css" if path.startswith("/static") else "Grant",
        "topic": "payment.made",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


async def test_every_state_changing_route_needs_a_token_with_the_right_scope(
    secured_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(secured_config())
    await client.put(
        "/v1/services/payments/instances/p1",
        json={"url": "http://127.0.0.1:1"},
        headers=bearer(ADMIN),
    )
    changes = [op for op in await operations(client) if op[0] != "GET" and op not in SIGN_IN]
    # The document lists every kind of change: a new route shows up here by itself.
    assert {path for _, path in changes} >= {
        "/v1/services/{service}/instances/{id}",
        "/v1/workflows/{name}",
        "/v1/processes/{id}/cancel",
        "/v1/events/{topic}",
        "/api/grants",
    }
    for method, template in changes:
        path = await fill(client, template)
        anonymous = await client.request(method, path, json={"url": "http://127.0.0.1:1"})
        assert anonymous.status == 401, (method, template)
        forged = await client.request(method, path, json={}, headers=bearer("not-a-token-at-all"))
        assert forged.status == 401, (method, template)
        scoped = await client.request(
            method, path, json={"url": "http://127.0.0.1:1"}, headers=bearer(NOBODY)
        )
        assert scoped.status == 403, (method, template)
        assert (await scoped.json())["error"]["code"] == "forbidden"
    # Nothing above changed anything: the one instance and the admin's processes only.
    services = await (await client.get("/v1/services")).json()
    assert [(s["name"], s["instances"]) for s in services["services"]] == [("payments", 1)]
    processes = await (await client.get("/v1/processes")).json()
    assert {p["status"] for p in processes["processes"]} == {"waiting"}


async def test_protect_reads_covers_every_get_including_metrics_and_the_page(
    secured_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(secured_config(protect_reads=True))
    await client.put(
        "/v1/services/payments/instances/p1",
        json={"url": "http://127.0.0.1:1"},
        headers=bearer(ADMIN),
    )
    gets = [path for method, path in await operations(client) if method == "GET"]
    assert {"/metrics", "/", "/services/{service}", "/v1/events"} <= set(gets)
    session = await sign_in(client, PAYMENTS)
    admin_session = await sign_in(client, ADMIN)
    for template in gets:
        path = await fill(client, template)
        if template == "/v1/events":
            continue  # a stream: checked in the SSE tests below
        if template in OPEN_READS:
            assert (await client.get(path)).status == 200, template
            continue
        api = await client.get(path, headers={"Accept": "application/json"})
        assert api.status == 401, template
        assert (await api.json())["error"]["code"] == "unauthorized"
        browser = await client.get(path, headers={"Accept": "text/html"}, allow_redirects=False)
        assert browser.status == 303, template
        assert browser.headers["Location"].startswith("/login?next=")
        if template in AUDIT_READS:
            assert (await client.get(path, cookies=session)).status == 403, template
            assert (await client.get(path, cookies=admin_session)).status == 200, template
            continue
        signed_in = await client.get(path, cookies=session)
        assert signed_in.status == 200, template
        assert (await client.get(path, headers=bearer(PAYMENTS))).status == 200, template
    stream = await client.get("/v1/events")
    assert stream.status == 401


async def sign_in(client: AppClient, token: str) -> dict[str, str]:
    resp = await client.post(
        "/login", data={"token": token, "next": "/services/payments"}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/services/payments"
    cookie = resp.cookies["hms_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert token not in cookie.value
    client.session.cookie_jar.clear()  # requests below carry the cookie only when they say so
    return {"hms_session": cookie.value}


async def test_a_session_reads_but_never_writes_and_cannot_be_forged(
    secured_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(secured_config(protect_reads=True))
    session = await sign_in(client, ADMIN)
    assert (await client.get("/v1/services", cookies=session)).status == 200
    write = await client.put(
        "/v1/services/payments/instances/p1", json={"url": "http://127.0.0.1:1"}, cookies=session
    )
    assert write.status == 401  # a cross-site form could ride a cookie; it gets nothing
    value = session["hms_session"]
    expiry = value.split(".")[1]
    for forged in (
        value[:-1] + ("0" if value[-1] != "0" else "1"),
        value.replace(expiry, str(int(expiry) + 3600)),
        "v1.9999999999.0000000000000000.00",
    ):
        resp = await client.get("/v1/services", cookies={"hms_session": forged})
        assert resp.status == 401, forged


async def test_sign_in_refuses_bad_tokens_other_sites_and_open_redirects(
    secured_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(secured_config(protect_reads=True))
    wrong = await client.post("/login", data={"token": "guess-guess"}, allow_redirects=False)
    assert wrong.status == 401
    assert "That token is not valid" in await wrong.text()
    assert "hms_session" not in wrong.cookies
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        cross = await client.post("/login", data={"token": ADMIN}, headers=headers)
        assert cross.status == 403, headers
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        resp = await client.post(
            "/login", data={"token": ADMIN, "next": target}, allow_redirects=False
        )
        assert resp.headers["Location"] == "/", target
    form = await client.get("/login?next=/workflows")
    assert form.status == 200 and 'value="/workflows"' in await form.text()
    assert form.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in form.headers["Content-Security-Policy"]


async def events_seen(
    client: AppClient, headers: dict[str, str], publish: Callable[[], Any]
) -> set[str]:
    """Topics an SSE stream opened with `headers` delivers while `publish` runs."""
    seen: set[str] = set()
    async with client.get("/v1/events", headers=headers) as resp:
        assert resp.status == 200
        await resp.content.readline()  # ": connected"
        await publish()

        async def read() -> None:
            async for line in resp.content:
                if line.startswith(b"event: "):
                    seen.add(line[7:].strip().decode())
                    if "workflow.cancelled" in seen:  # the last event, and everyone's
                        return

        await asyncio.wait_for(read(), timeout=5)
    return seen


async def test_the_event_stream_sends_published_topics_only_to_subscribe_scopes(
    secured_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(secured_config())

    async def publish() -> None:
        for topic in ("grant.submitted", "payment.made"):
            resp = await client.post(f"/v1/events/{topic}", json={"a": 1}, headers=bearer(ADMIN))
            assert resp.status == 202
        process = await client.post("/v1/workflows/Grant", json={}, headers=bearer(ADMIN))
        pid = (await process.json())["id"]
        await client.post(f"/v1/processes/{pid}/cancel", headers=bearer(ADMIN))

    anonymous = await events_seen(client, {}, publish)
    listener = await events_seen(client, bearer(LISTENER), publish)
    admin = await events_seen(client, bearer(ADMIN), publish)
    publisher = await events_seen(client, bearer(PAYMENTS), publish)
    # The daemon's own topics reach whoever may read; what services publish needs a scope.
    assert "workflow.cancelled" in anonymous and "grant.submitted" not in anonymous
    assert {"grant.submitted", "workflow.cancelled"} <= listener
    assert "payment.made" not in listener
    assert {"grant.submitted", "payment.made", "workflow.cancelled"} <= admin
    assert "payment.made" not in publisher  # publishing a topic is not reading it


async def test_allowed_targets_refuse_registrations_elsewhere(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    server = {"allowed_targets": ["127.0.0.0/8", "10.1.0.0/16", "*.svc.internal"]}
    client = await start_daemon(make_config(server=server))
    for url in (
        "http://127.0.0.1:8001",
        "http://10.1.2.3:80",
        "https://payments.svc.internal",
        "http://PAYMENTS.SVC.INTERNAL.:8080",
    ):
        resp = await client.put("/v1/services/ok/instances/x", json={"url": url})
        assert resp.status in (200, 201), url
    for url in (
        "http://169.254.169.254/latest/meta-data",
        "http://10.2.0.1:6379",
        "http://[::1]:8080",
        "http://localhost:22",
        "http://svc.internal.evil.example",
        "http://2130706433:80",  # 127.0.0.1 spelled as a number: a name here, and not listed
    ):
        resp = await client.put("/v1/services/bad/instances/x", json={"url": url})
        assert resp.status == 403, url
        error = (await resp.json())["error"]
        assert error["code"] == "target_not_allowed"
        assert "allowed_targets" in error["message"]
    listed = await (await client.get("/v1/services")).json()
    assert [s["name"] for s in listed["services"]] == ["ok"]


def test_static_instances_outside_allowed_targets_are_a_config_error() -> None:
    text = yaml.safe_dump(
        {
            "server": {"allowed_targets": ["10.0.0.0/8"]},
            "services": [{"name": "s", "instances": [{"id": "a", "url": "http://192.168.1.1"}]}],
        }
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text)
    assert "services[0].instances[0].url: 192.168.1.1 is not in server.allowed_targets" in str(
        raised.value
    )
    with pytest.raises(ConfigError) as bad_entry:
        parse_config(yaml.safe_dump({"server": {"allowed_targets": ["10.0.0.0/33"]}}))
    assert "server.allowed_targets[0]" in str(bad_entry.value)


async def test_workflow_calls_follow_allowed_targets_after_a_reload(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    from aiohttp.test_utils import TestServer

    calls = Calls()
    service = TestServer(service_app(calls), host="127.0.0.1")
    await service.start_server()
    workflow = {
        "name": "Pay",
        "steps": [
            {
                "name": "pay",
                "call": {"service": "ach", "path": "/validate"},
                "retry": {"max_attempts": 2, "backoff": "10ms"},
            }
        ],
    }
    config = make_config(server={"allowed_targets": ["127.0.0.1"]}, workflows=[workflow])
    client = await start_daemon(config)
    try:
        url = str(service.make_url("/"))
        assert (await client.put("/v1/services/ach/instances/a", json={"url": url})).status == 201
        first = await client.post("/v1/workflows/Pay?wait=5s", json={})
        assert (await first.json())["status"] == "completed"
        narrowed = make_config(server={"allowed_targets": ["10.0.0.0/8"]}, workflows=[workflow])
        await apply_config(client.app[PARTS], config, narrowed)
        second = await client.post("/v1/workflows/Pay?wait=5s", json={})
        body = await second.json()
        assert body["status"] == "failed"
        assert "no passing instance" in str(body["history"])
    finally:
        await service.close()
    assert calls.paths().count("/validate") == 1  # only the first process reached the service


async def test_tokens_never_appear_in_logs_errors_or_config_errors(
    secured_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await start_daemon(secured_config(protect_reads=True))
    texts = []
    for headers in (bearer(PAYMENTS), bearer("guess-token-1"), {"Authorization": "Basic Z3Vlc3M="}):
        for method, path in (("PUT", "/v1/services/ach/instances/a"), ("GET", "/v1/nothing")):
            resp = await client.request(method, path, json={"url": "x"}, headers=headers)
            texts.append(await resp.text())
    login = await client.post("/login", data={"token": "guess-token-2"})
    texts.append(await login.text())
    short = yaml.safe_dump(
        {"server": {"auth": {"tokens": [{"name": "sh0rt", "token": "sh0rt", "scopes": ["*"]}]}}}
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(short)
    texts.append(str(raised.value))
    everything = "\n".join(texts) + caplog.text
    for secret in (PAYMENTS, "guess-token-1", "Z3Vlc3M=", "guess-token-2", "sh0rt"):
        assert secret not in everything, secret
    assert "at least 8 characters" in str(raised.value)


async def test_a_session_ends_with_its_token() -> None:
    from monitor.http.auth import Authorizer

    auth = Authorizer([("admin", ADMIN, ["*"])], protect_reads=True)
    grant = auth.identify(f"Bearer {ADMIN}")
    assert grant is not None
    cookie = auth.session(grant, now=1000.0)
    assert auth.from_session(cookie, now=1001.0) == grant
    assert auth.from_session(cookie, now=1000.0 + 13 * 3600) is None  # expired
    auth.replace([("admin", ADMIN, ["*"]), ("other", "another-token-1", ["*"])], protect_reads=True)
    assert auth.from_session(cookie, now=1001.0) == grant  # another token came: still good
    auth.replace([("admin", "rotated-token-1", ["*"])], protect_reads=True)
    assert auth.from_session(cookie, now=1001.0) is None  # its token went: ended
    # A new token never inherits the sessions of the one it replaced.
    assert (
        Authorizer([("admin", "rotated-token-1", ["*"])], protect_reads=True).from_session(
            cookie, now=1001.0
        )
        is None
    )


async def test_the_page_under_auth_signs_in_in_a_browser_flow(
    secured_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    """What a browser does: follow the redirect to the form, post it, land where it was."""
    client = await start_daemon(secured_config(protect_reads=True))
    jar = aiohttp.CookieJar(unsafe=True)  # the test server is an IP address
    async with aiohttp.ClientSession(str(client.make_url("")), cookie_jar=jar) as browser:
        async with browser.get("/workflows", headers={"Accept": "text/html"}) as form:
            assert form.url.path == "/login"
            assert 'name="next" value="/workflows"' in await form.text()
        async with browser.post("/login", data={"token": LISTENER, "next": "/workflows"}) as page:
            assert page.status == 200 and page.url.path == "/workflows"
            assert "<h1>Workflows" in await page.text()

        async def streams() -> bool:
            async with browser.get("/v1/events", timeout=aiohttp.ClientTimeout(total=1)) as s:
                return s.status == 200

        await until(streams)
