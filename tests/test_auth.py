"""Bearer tokens and scopes on the registry."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest

from monitor.config import Config

from .conftest import AppClient

ADMIN = "admin-token-123"
PAYMENTS = "payments-token-123"
BODY = {"url": "http://127.0.0.1:8001"}


@pytest.fixture
async def secured(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    auth = {
        "tokens": [
            {"name": "admin", "token": ADMIN, "scopes": ["*"]},
            {
                "name": "payments",
                "token": PAYMENTS,
                "scopes": ["register:payments*", "publish:payment.*"],
            },
        ]
    }
    return await start_daemon(make_config(server={"auth": auth}))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_writes_without_a_token_are_401(secured: AppClient) -> None:
    resp = await secured.put("/v1/services/payments/instances/p1", json=BODY)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_a_wrong_token_is_401(secured: AppClient) -> None:
    resp = await secured.put(
        "/v1/services/payments/instances/p1", json=BODY, headers=bearer("not-a-token")
    )
    assert resp.status == 401


async def test_scoped_token_registers_its_services(secured: AppClient) -> None:
    headers = bearer(PAYMENTS)
    body = {**BODY, "ttl": "30s"}
    resp = await secured.put("/v1/services/payments-eu/instances/p1", json=body, headers=headers)
    assert resp.status == 201
    beat = await secured.post("/v1/services/payments-eu/instances/p1/heartbeat", headers=headers)
    assert beat.status == 200
    gone = await secured.delete("/v1/services/payments-eu/instances/p1", headers=headers)
    assert gone.status == 204


async def test_scoped_token_is_403_outside_its_scopes(secured: AppClient) -> None:
    resp = await secured.put("/v1/services/ach/instances/a1", json=BODY, headers=bearer(PAYMENTS))
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"
    listed = await secured.get("/v1/services")
    assert (await listed.json())["services"] == []


async def test_star_scope_allows_everything(secured: AppClient) -> None:
    resp = await secured.put("/v1/services/ach/instances/a1", json=BODY, headers=bearer(ADMIN))
    assert resp.status == 201


async def test_reads_are_open_unless_protected(secured: AppClient) -> None:
    assert (await secured.get("/v1/services")).status == 200
    assert (await secured.get("/metrics")).status == 200


async def test_protect_reads_covers_gets_and_metrics_but_not_probes(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    auth = {"tokens": [{"name": "admin", "token": ADMIN, "scopes": ["*"]}], "protect_reads": True}
    client = await start_daemon(make_config(server={"auth": auth}))
    for path in ("/v1/services", "/v1/services/x", "/v1/sd", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 401, path
        assert (await client.get(path, headers=bearer(ADMIN))).status == 200, path
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_tokens_never_appear_in_logs_or_errors(
    secured: AppClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    resp = await secured.put("/v1/services/ach/instances/a1", json=BODY, headers=bearer(PAYMENTS))
    text = await resp.text()
    wrong = await secured.put("/v1/services/ach/instances/a1", json=BODY, headers=bearer("guess"))
    text += await wrong.text()
    assert PAYMENTS not in text and "guess" not in text
    assert PAYMENTS not in caplog.text and "guess" not in caplog.text


async def test_open_daemon_on_a_public_address_warns(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    from monitor import build_app

    build_app(make_config(server={"listen": "0.0.0.0:9797"}))
    assert "no auth tokens configured" in caplog.text


async def test_open_daemon_on_loopback_does_not_warn(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    from monitor import build_app

    build_app(make_config(server={"listen": "127.0.0.1:9797"}))
    assert "no auth tokens configured" not in caplog.text
