"""A mass outage stays within the probe budget, and probing still sees what it must."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from monitor.config import Config, ConfigError
from monitor.health import ProbeBucket

from .conftest import AppClient, FakeClock, metric_families, until

DOWN_FAST = {
    "type": "http",
    "interval": "1h",  # an outage's faster probes all come from down_interval
    "down_interval": "50ms",
    "timeout": "300ms",
    "failure_threshold": 1,
    "success_threshold": 1,
}


def refused_url() -> str:
    """An address on 127.0.0.1 where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/health"


async def budgeted(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    per_second: int,
) -> AppClient:
    return await start_daemon(
        make_config(
            server={"probe_budget": {"per_second": per_second}}, defaults={"probe": DOWN_FAST}
        )
    )


async def register_down(client: AppClient, count: int) -> None:
    url = refused_url()
    for n in range(count):
        resp = await client.put(f"/v1/services/down/instances/d{n}", json={"url": url})
        assert resp.status == 201, await resp.text()


async def probes(client: AppClient, service: str | None = None) -> dict[str, float]:
    """hms_probe_total by instance (of one service, or all)."""
    counts: dict[str, float] = {}
    for sample in (await metric_families(client))["hms_probe"].samples:
        if sample.name == "hms_probe_total" and service in (None, sample.labels["service"]):
            instance = sample.labels["instance"]
            counts[instance] = counts.get(instance, 0.0) + sample.value
    return counts


async def probed_over_a_window(client: AppClient, service: str) -> tuple[dict[str, float], float]:
    """Probes per instance over about a second, and the seconds it really took."""
    loop = asyncio.get_running_loop()
    before, started = await probes(client, service), loop.time()
    await asyncio.sleep(1.0)  # the window probes are counted over; nothing waited for
    after, ended = await probes(client, service), loop.time()
    return {k: v - before.get(k, 0.0) for k, v in after.items()}, ended - started


async def all_probed(client: AppClient, service: str, count: int) -> None:
    """Past every instance's first probe (those run within a second of registering)."""

    async def probed() -> bool:
        counts = await probes(client, service)
        return len(counts) == count and min(counts.values()) >= 1

    await until(probed)


async def test_probes_started_stay_within_the_budget_while_many_are_down(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    client = await budgeted(make_config, start_daemon, per_second=20)
    await register_down(client, 40)  # at their down_interval: 800 probes a second
    await all_probed(client, "down", 40)
    counted, seconds = await probed_over_a_window(client, "down")
    # The budget's rate over the window, plus the one second it may hold in reserve.
    assert sum(counted.values()) <= 20 * seconds + 20


async def test_a_down_instance_is_still_reprobed_and_recovers(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    client = await budgeted(make_config, start_daemon, per_second=10)
    await register_down(client, 30)
    body = {"url": str(target.make_url("/")), "probe": {"path": "/switchable"}}
    async with aiohttp.ClientSession() as http:
        await http.post(target.make_url("/status/503"))
        await client.put("/v1/services/payments/instances/p1", json=body)
        await state_is(client, "p1", "critical")
        await http.post(target.make_url("/status/200"))
    # Its interval is 1h: only its share of the budget can bring it back this soon.
    await state_is(client, "p1", "passing", timeout=30.0)


async def test_up_instances_keep_their_interval_during_an_outage(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    client = await budgeted(make_config, start_daemon, per_second=10)
    await register_down(client, 30)  # they want 600 probes a second of a budget of 10
    body = {"url": str(target.make_url("/")), "probe": {"path": "/switchable", "interval": "100ms"}}
    await client.put("/v1/services/payments/instances/p1", json=body)
    await all_probed(client, "down", 30)
    await state_is(client, "p1", "passing")
    counted, seconds = await probed_over_a_window(client, "payments")
    # Every 100 ms whatever the outage takes of the budget (a third of that: a loaded machine
    # skips late runs). Sharing the budget with the down ones would leave it ~0.3 a second.
    assert counted["p1"] >= seconds / 0.1 / 3


async def state_is(client: AppClient, instance: str, state: str, timeout: float = 10.0) -> None:
    async def reached() -> bool:
        body: dict[str, Any] = await (await client.get("/v1/health")).json()
        return any(i["instance"] == instance and i["state"] == state for i in body["instances"])

    await until(reached, timeout)


def test_first_probes_go_before_re_probes_of_down_instances(clock: FakeClock) -> None:
    budget = ProbeBucket(10, clock.monotonic)
    assert [budget.take() for _ in range(10)] == [True] * 9 + [False]  # one kept back
    assert budget.take(first=True)  # a new instance's first probe takes it
    assert not budget.take(first=True)
    clock.advance(0.1)  # one probe's worth: a first probe's again, not a re-probe's
    assert not budget.take()
    assert budget.take(first=True)


def test_the_budget_refuses_extras_beyond_its_rate(clock: FakeClock) -> None:
    budget = ProbeBucket(5, clock.monotonic)
    assert [budget.take(first=True) for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.2)  # one more probe's worth at 5 a second
    assert [budget.take(first=True) for _ in range(2)] == [True, False]


@pytest.mark.parametrize("setting", [{"per_second": 0}, {"in_flight": 0}, {"rate": 10}])
def test_a_bad_probe_budget_is_a_config_error_naming_the_key(
    make_config: Callable[..., Config], setting: dict[str, int]
) -> None:
    with pytest.raises(ConfigError, match=r"server\.probe_budget\."):
        make_config(server={"probe_budget": setting})


async def test_a_down_interval_longer_than_the_interval_slows_probing_while_down(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    client = await budgeted(make_config, start_daemon, per_second=1000)
    probe = {"path": "/fail", "interval": "100ms", "down_interval": "1h"}
    await client.put(
        "/v1/services/payments/instances/p1",
        json={"url": str(target.make_url("/")), "probe": probe},
    )
    await state_is(client, "p1", "critical")
    counted, _ = await probed_over_a_window(client, "payments")
    assert counted["p1"] <= 1  # not every 100 ms (10 a second): next in an hour


async def test_probes_in_flight_are_capped(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    held, most = 0, 0

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held, most
        held += 1
        most = max(most, held)
        await reader.read()  # until the probe gives up and closes
        held -= 1
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await start_daemon(
        make_config(
            server={"probe_budget": {"in_flight": 3}},
            defaults={"probe": {**DOWN_FAST, "timeout": "500ms"}},
        )
    )
    for n in range(10):  # all ten probed within a second of registering
        body = {"url": f"http://127.0.0.1:{port}/hang"}
        assert (await client.put(f"/v1/services/hung/instances/h{n}", json=body)).status == 201
    await all_probed(client, "hung", 10)
    server.close()
    await server.wait_closed()
    assert most == 3  # reached, never passed (all ten at once without the cap, checked)


async def test_a_burst_of_registrations_starts_first_probes_within_the_budget(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    target: TestServer,
) -> None:
    client = await budgeted(make_config, start_daemon, per_second=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = {"url": str(target.make_url("/ok"))}
    for n in range(40):  # new, so unknown: each wants its first probe within a second
        resp = await client.put(f"/v1/services/burst/instances/b{n}", json=body)
        assert resp.status == 201, await resp.text()
    await asyncio.sleep(1.0)  # the window probes are counted over; nothing waited for
    counted, seconds = await probes(client, "burst"), loop.time() - started
    # The budget's rate, plus the second's worth it holds (all 40 at once without it, checked).
    assert sum(counted.values()) <= 10 * seconds + 10

    async def all_passing() -> bool:
        listed: dict[str, Any] = await (await client.get("/v1/health?service=burst")).json()
        states = [i["state"] for i in listed["instances"]]
        return len(states) == 40 and set(states) == {"passing"}

    # Every one still probed soon, though their interval is 1h: refused, they retry on
    # the budget (backing off) rather than wait for their interval.
    await until(all_passing, timeout=60.0)
