"""The load shedder in-process, its samples fed by hand: what is refused, what never is,
and leases that do not lapse because the daemon itself refused their heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from monitor.config import Config
from monitor.http.errors import error_response
from monitor.http.shedding import BODY
from monitor.keys import SHEDDER

from .conftest import AppClient, FakeClock, metric_families


async def overloaded_daemon(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    client = await start_daemon(make_config(server={"overload_lag": "50ms"}))
    shedder = client.app[SHEDDER]
    assert shedder.task is not None
    shedder.task.cancel()  # this test is the only one sampling now
    with contextlib.suppress(asyncio.CancelledError):
        await shedder.task
    return client


async def test_overload_refuses_with_503_but_serves_health_and_metrics(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await overloaded_daemon(make_config, start_daemon)
    shedder = client.app[SHEDDER]
    shedder.sample(0.2)
    shedder.sample(0.2)
    assert (await client.get("/v1/services")).status == 200  # two slow samples: not yet
    shedder.sample(0.2)
    refused = await client.put("/v1/services/a/instances/b", json={"url": "http://127.0.0.1:1"})
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["Connection"] == "close"
    assert (await refused.json())["error"]["code"] == "overloaded"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200, path
    families = await metric_families(client)
    assert families["hms_http_shed"].samples[0].value == 1
    shedder.sample(0.04)  # under the threshold but not under half of it: still shedding
    assert (await client.get("/v1/services")).status == 503
    shedder.sample(0.01)
    assert (await client.get("/v1/services")).status == 200


async def test_leases_do_not_lapse_while_heartbeats_are_refused(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    client = await overloaded_daemon(make_config, start_daemon)
    shedder = client.app[SHEDDER]
    body = {"url": "http://127.0.0.1:1", "ttl": "10s"}
    assert (await client.put("/v1/services/a/instances/b", json=body)).status == 201
    for _ in range(3):
        shedder.sample(0.5)
    beat = await client.post("/v1/services/a/instances/b/heartbeat")
    assert beat.status == 503
    clock.advance(60)  # six ttls of refused heartbeats
    for _ in range(3):
        shedder.sample(0.0)
    listed = await (await client.get("/v1/services/a")).json()
    assert [i["health"] for i in listed["instances"]] != ["critical"]
    assert listed["instances"][0]["lease"]["expires_in"] == 10.0  # a whole ttl from now
    clock.advance(11)  # and then it lapses as usual when the client stays away
    listed = await (await client.get("/v1/services/a")).json()
    assert [i["health"] for i in listed["instances"]] == ["critical"]


async def test_with_overload_lag_zero_nothing_is_ever_shed(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    clock: FakeClock,
) -> None:
    client = await start_daemon(make_config(server={"overload_lag": "0s"}))
    for _ in range(5):
        client.app[SHEDDER].sample(10.0)
    assert (await client.get("/v1/services")).status == 200
    body = {"url": "http://127.0.0.1:1", "ttl": "10s"}
    assert (await client.put("/v1/services/a/instances/b", json=body)).status == 201
    clock.advance(11)  # leases still lapse: expiry was not paused either
    listed = await (await client.get("/v1/services/a")).json()
    assert [i["health"] for i in listed["instances"]] == ["critical"]


def test_the_shed_answer_is_the_error_shape_every_route_uses() -> None:
    """The shedder sends bytes encoded once (it answers while the loop is behind);
    they must stay the JSON error shape with its overloaded code."""
    expected = error_response(
        503, "the daemon is overloaded; retry after the Retry-After seconds", code="overloaded"
    )
    assert expected.body == BODY
