"""A call step's `expect:` against a real HTTP service, in a real daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hms_mgmt import DefinitionError, Workflow, call, publish
from monitor.config import Config, ConfigError, parse_config

from .conftest import AppClient

FAST_RETRY = {"max_attempts": 3, "backoff": "10ms", "max_backoff": "20ms"}


@dataclass
class Governance:
    """Answers POST /check with `{"passed": <passed>}` after `delay`; `statuses` first."""

    passed: bool = True
    delay: float = 0.0
    statuses: list[int] = field(default_factory=list)
    calls: int = 0


@pytest.fixture
def governance() -> Governance:
    return Governance()


@pytest.fixture
async def service(governance: Governance) -> AsyncIterator[TestServer]:
    async def check(request: web.Request) -> web.Response:
        governance.calls += 1
        await asyncio.sleep(governance.delay)
        if governance.statuses:
            return web.json_response({"error": "busy"}, status=governance.statuses.pop(0))
        return web.json_response({"passed": governance.passed, "case": "C-1"})

    app = web.Application()
    app.router.add_post("/check", check)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def checked(*expect: str) -> dict[str, Any]:
    return {
        "name": "Case",
        "steps": [
            {
                "name": "validate",
                "call": {"service": "governance", "path": "/check"},
                "retry": FAST_RETRY,
                "expect": list(expect),
            },
            {"name": "done", "publish": "case.checked"},
        ],
    }


async def up(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    *expect: str,
) -> AppClient:
    client = await start_daemon(make_config(workflows=[checked(*expect)]))
    url = str(service.make_url("/"))
    resp = await client.put("/v1/services/governance/instances/g1", json={"url": url})
    assert resp.status == 201, await resp.text()
    return client


async def run(client: AppClient) -> dict[str, Any]:
    resp = await client.post("/v1/workflows/Case", params={"wait": "10s"}, json={"input": {}})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_an_answer_that_fails_an_expectation_fails_the_step_once_without_retry(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    governance: Governance,
) -> None:
    governance.passed = False
    client = await up(
        make_config, start_daemon, service, "[STATUS] == 200", "[BODY].passed == true"
    )
    done = await run(client)
    assert done["status"] == "failed"
    assert governance.calls == 1  # max_attempts 3, yet asked once: the service answered
    error = done["error"]
    assert error["step"] == "validate"
    assert error["message"] == "expect [BODY].passed == true (got false)"
    assert error["status"] == 200
    assert '"passed":false' in error["body"].replace(" ", "")
    [attempt] = done["history"]
    assert (attempt["outcome"], attempt["http_status"]) == ("error", 200)


async def test_an_answer_that_meets_every_expectation_completes(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    governance: Governance,
) -> None:
    client = await up(
        make_config,
        start_daemon,
        service,
        "[STATUS] == 200",
        "[BODY].passed == true",
        "[BODY].case == pat(C-*)",
        "[RESPONSE_TIME] < 5s",
    )
    done = await run(client)
    assert done["status"] == "completed"
    assert done["outputs"]["validate"] == {"passed": True, "case": "C-1"}


async def test_a_5xx_is_still_retried_and_expect_judges_the_answer_that_follows(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    governance: Governance,
) -> None:
    governance.statuses = [503]
    client = await up(make_config, start_daemon, service, "[BODY].passed == true")
    done = await run(client)
    assert done["status"] == "completed"
    assert [(a["outcome"], a["http_status"]) for a in done["history"][:2]] == [
        ("error", 503),
        ("ok", 200),
    ]


async def test_a_4xx_fails_as_before_expect_does_not_turn_it_into_success(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    governance: Governance,
) -> None:
    governance.statuses = [404]
    client = await up(make_config, start_daemon, service, "[STATUS] == 404")
    done = await run(client)
    assert (done["status"], done["error"]["message"]) == ("failed", "HTTP 404")


async def test_response_time_is_the_call_s_own(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    governance: Governance,
) -> None:
    governance.delay = 0.15
    client = await up(make_config, start_daemon, service, "[RESPONSE_TIME] < 100ms")
    done = await run(client)
    assert done["status"] == "failed"
    message = done["error"]["message"]
    assert message.startswith("expect [RESPONSE_TIME] < 100ms (got "), message
    seen_ms = int(message.rsplit("got ", 1)[1].removesuffix("ms)"))
    assert 150 <= seen_ms < 5000
    assert governance.calls == 1


def config_errors(expect: Any, **step: Any) -> list[str]:
    steps = [
        {"name": "other", "publish": "x"},
        {"name": "validate", "call": {"service": "governance", "path": "/check"}, **step},
    ]
    if expect is not None:
        steps[1]["expect"] = expect
    text = "workflows:\n  - name: Case\n    steps:\n" + "".join(
        f"      - {_flow(s)}\n" for s in steps
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="c.yaml")
    return caught.value.errors


def _flow(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: one step per line, so lines are known


def test_a_condition_that_does_not_parse_is_a_config_error_at_its_key_and_line() -> None:
    [error] = config_errors(["[STATUS] == 200", "[BODY].passed = true"])
    assert error.startswith("c.yaml:5: workflows[0].steps[1].expect[1]: "), error
    assert "expected <placeholder> <op> <value>" in error


def test_expect_on_a_step_that_is_not_a_call_is_a_config_error() -> None:
    text = (
        "workflows:\n  - name: Case\n    steps:\n"
        "      - name: tell\n        publish: x\n        expect: ['[STATUS] == 200']\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="c.yaml")
    assert caught.value.errors == [
        "c.yaml:6: workflows[0].steps[0].expect: expect checks a call's answer: "
        "only a call step may have it"
    ]


async def test_put_refuses_a_bad_expect_with_422_naming_the_condition(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
) -> None:
    client = await up(make_config, start_daemon, service, "[STATUS] == 200")
    body = checked("[STATUS] == 200", "[NOPE] == 1")
    resp = await client.put("/v1/workflows/Other", json={**body, "name": "Other"})
    assert resp.status == 422
    [problem] = (await resp.json())["error"]["details"]
    assert problem["path"] == "steps.0.expect.1"
    assert "unknown placeholder '[NOPE]'" in problem["message"]
    publish = {"name": "P", "steps": [{"name": "p", "publish": "x", "expect": ["[STATUS] == 200"]}]}
    resp = await client.put("/v1/workflows/P", json=publish)
    assert resp.status == 422
    assert (await resp.json())["error"]["details"][0]["path"] == "steps.0.expect"
    good = await client.put("/v1/workflows/Other", json={**checked(), "name": "Other"})
    assert good.status == 201, await good.text()


async def test_the_sdk_builder_s_expect_deploys_and_judges_the_answer(
    make_config: Callable[..., Config],
    start_daemon: Callable[..., Awaitable[AppClient]],
    service: TestServer,
    governance: Governance,
) -> None:
    built = Workflow("Built").step(
        "validate",
        call("governance", "POST", "/check"),
        expect=["[STATUS] == 200", "[BODY].passed == true"],
    )
    definition = built.definition()
    assert definition["steps"][0]["expect"] == ["[STATUS] == 200", "[BODY].passed == true"]
    client = await up(make_config, start_daemon, service)
    assert (await client.put("/v1/workflows/Built", json=definition)).status == 201
    governance.passed = False
    resp = await client.post("/v1/workflows/Built", params={"wait": "10s"}, json={"input": {}})
    done = await resp.json()
    assert done["error"]["message"] == "expect [BODY].passed == true (got false)"


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: Workflow("W").step("a", publish("t"), expect=["[STATUS] == 200"]), "call"),
        (lambda: Workflow("W").step("a", call("s"), expect="[STATUS] == 200"), "a list"),
    ],
)
def test_the_sdk_refuses_expect_where_it_cannot_apply(build: Any, problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        build()
