"""The status page's Audit view at /audit (issue 18, DESIGN §3 Audit): for readers of the
trail only, and linked from the nav for them alone."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from monitor.audit.abc import AuditRecord
from monitor.config import Config
from monitor.http.audit import TRAIL

from .conftest import BOTH_STORES, AppClient, until
from .test_reload import signed_in

STORES = BOTH_STORES  # newest first is the stores' own ORDER BY

ADMIN, PAYMENTS, LEDGER, AUDITOR = "admin-token-1", "payments-token", "ledger-token", "auditor-tkn"
TOKENS = [
    {"name": "admin", "token": ADMIN, "scopes": ["*"]},
    {"name": "payments", "token": PAYMENTS, "scopes": ["register:payments*"]},
    {"name": "ledger", "token": LEDGER, "scopes": ["register:ledger*"]},
    {"name": "auditor", "token": AUDITOR, "scopes": ["audit:read"]},
]
AUDIT_LINK = '<a href="/audit">Audit</a>'
SCRIPT, ESCAPED_SCRIPT = "<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"
BODY = {"url": "http://127.0.0.1:1"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def secured(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    config = make_config(server={"auth": {"tokens": TOKENS, "protect_reads": True}})
    client = await start_daemon(config)
    for token, path in (
        (PAYMENTS, "/v1/services/payments/instances/p1"),
        (LEDGER, "/v1/services/ledger/instances/l1"),
        (PAYMENTS, "/v1/services/payments/instances/p2"),
    ):
        assert (await client.put(path, json=BODY, headers=bearer(token))).status == 201
    return client


def rows(html: str) -> list[list[str]]:
    """The audit table's rows, each as its cells' text."""
    body = html.split('<table class="audit">', 1)[1].split("</table>", 1)[0]
    return [
        [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td.*?</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1], re.S)
    ]


async def test_a_reader_of_the_trail_sees_it_newest_first_and_the_nav_link(
    secured: AppClient,
) -> None:
    session = await signed_in(secured, AUDITOR)
    overview = await secured.get("/", cookies=session)
    assert AUDIT_LINK in await overview.text()
    resp = await secured.get("/audit", cookies=session)
    assert resp.status == 200
    assert resp.content_type == "text/html"
    table = rows(await resp.text())
    registrations = [row[1:] for row in table if row[2] == "instance.register"]
    assert registrations == [
        ["payments", "instance.register", "payments/p2", "201", "1"],
        ["ledger", "instance.register", "ledger/l1", "201", "1"],
        ["payments", "instance.register", "payments/p1", "201", "1"],
    ]
    assert ["auditor", "session.login", "session", "303", "1"] in [row[1:] for row in table]


async def test_the_filter_form_narrows_by_actor_and_action(secured: AppClient) -> None:
    session = await signed_in(secured, AUDITOR)
    by_ledger = await (await secured.get("/audit?actor=ledger", cookies=session)).text()
    assert [row[3] for row in rows(by_ledger)] == ["ledger/l1"]
    assert 'name="actor" value="ledger"' in by_ledger
    by_prefix = await (await secured.get("/audit?action=instance.*", cookies=session)).text()
    assert len(rows(by_prefix)) == 3
    none = await (await secured.get("/audit?action=process.start", cookies=session)).text()
    assert rows(none) == [["No records match."]]


async def test_a_reader_without_audit_read_gets_no_link_and_a_403_page(
    secured: AppClient,
) -> None:
    session = await signed_in(secured, PAYMENTS)
    overview = await secured.get("/", cookies=session)
    assert overview.status == 200
    assert AUDIT_LINK not in await overview.text()
    resp = await secured.get("/audit?actor=admin", cookies=session)
    assert resp.status == 403
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "needs a token with the audit:read scope" in html
    assert 'href="/login?next=/audit%3Factor%3Dadmin"' in html
    assert "payments/p1" not in html

    async def refusal_recorded() -> bool:
        records = await trail(secured, actor="payments", action="auth.refused")
        return [(r["target"], r["outcome"]) for r in records] == [("GET /audit", 403)]

    await until(refusal_recorded)  # refusals are written within a second


async def test_without_auth_the_audit_page_is_open_to_all(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await start_daemon(make_config())
    assert (await client.put("/v1/services/payments/instances/p1", json=BODY)).status == 201
    assert AUDIT_LINK in await (await client.get("/workflows")).text()
    resp = await client.get("/audit")
    assert resp.status == 200
    assert [row[1:4] for row in rows(await resp.text())] == [
        ["anonymous", "instance.register", "payments/p1"]
    ]


async def test_what_a_record_holds_is_escaped(secured: AppClient) -> None:
    # Every target an API change records today is a restricted name or an id, and a refused
    # request's target is its route's pattern; a record is written straight to the daemon's
    # trail so the page is held to escaping whatever a later action puts there.
    trail_of_the_daemon = secured.app[TRAIL]
    await trail_of_the_daemon.record(
        AuditRecord(time=1.8e9, actor="<b>x</b>", action="probe.test", target=SCRIPT, outcome=200)
    )
    html = await (await secured.get("/audit", headers=bearer(AUDITOR))).text()
    assert SCRIPT not in html and "<b>x</b>" not in html
    assert rows(html)[0][1:] == ["&lt;b&gt;x&lt;/b&gt;", "probe.test", ESCAPED_SCRIPT, "200", "1"]


async def test_the_filter_values_are_escaped(secured: AppClient) -> None:
    resp = await secured.get("/audit", params={"actor": f'">{SCRIPT}'}, headers=bearer(AUDITOR))
    html = await resp.text()
    assert resp.status == 200
    assert SCRIPT not in html
    assert f'name="actor" value="&#34;&gt;{ESCAPED_SCRIPT}"' in html


async def test_a_filter_no_record_can_match_is_a_400_not_a_500(secured: AppClient) -> None:
    for name in ("actor", "action"):  # a NUL reached PostgreSQL, which refuses it
        resp = await secured.get("/audit", params={name: "a\x00b"}, headers=bearer(AUDITOR))
        assert resp.status == 400, (name, await resp.text())


async def trail(client: AppClient, **query: str) -> list[dict[str, Any]]:
    resp = await client.get("/v1/audit", params=query, headers=bearer(AUDITOR))
    assert resp.status == 200, await resp.text()
    records: list[dict[str, Any]] = (await resp.json())["records"]
    return records
