"""Paths and headers from registrations, config and process input never become extra request
bytes: refused where they come in (422, config error), percent-encoded when they are only
unusual, and a request that cannot be built is a failed probe or step that sends nothing."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from monitor.config import Config, ConfigError, parse_config
from monitor.probing import Probe, Prober

from .conftest import AppClient, until

FAST = {"type": "http", "interval": "100ms", "down_interval": "50ms", "timeout": "300ms"}
INSTANCE = "/v1/services/payments/instances/p1"


@dataclass
class Recorder:
    """A raw TCP server on 127.0.0.1 that keeps every byte it receives and answers 200."""

    port: int = 0
    received: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request_lines(self) -> list[bytes]:
        return [line for data in self.received for line in data.split(b"\r\n") if b"HTTP/1" in line]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    state = Recorder()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            async with asyncio.timeout(1):
                while b"\r\n\r\n" not in data:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
                await asyncio.sleep(0.05)  # whatever was smuggled behind the first request
                data += await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            pass
        state.received.append(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()


@pytest.fixture
def probing(make_config: Callable[..., Config]) -> Config:
    return make_config(defaults={"probe": {**FAST, "failure_threshold": 1}})


INJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("CRLF in path", {"path": "/health HTTP/1.1\r\nHost: x\r\n\r\nDELETE /admin"}, "probe.path"),
    ("LF in path", {"path": "/a\nb"}, "probe.path"),
    ("NUL in path", {"path": "/a\x00"}, "probe.path"),
    ("CRLF in header value", {"headers": {"X-A": "1\r\nContent-Length: 9"}}, "probe.headers"),
    ("CR in header value", {"headers": {"X-A": "1\rX"}}, "probe.headers"),
    ("CRLF in header name", {"headers": {"X-A: 1\r\nX-B": "2"}}, "probe.headers"),
    ("space in header name", {"headers": {"X A": "1"}}, "probe.headers"),
    ("colon in header name", {"headers": {"X:A": "1"}}, "probe.headers"),
    ("empty header name", {"headers": {"": "1"}}, "probe.headers"),
    ("header value outside Latin-1", {"headers": {"X-A": "😀"}}, "probe.headers"),
    ("framing header", {"headers": {"Transfer-Encoding": "chunked"}}, "probe.headers"),
]


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/\r\nX-Evil: 1", "http://127.0.0.1:1/a\tb"])
async def test_a_url_with_control_characters_is_422(daemon: AppClient, url: str) -> None:
    resp = await daemon.put(INSTANCE, json={"url": url})
    assert resp.status == 422
    assert [d["field"] for d in (await resp.json())["error"]["details"]] == ["url"]


@pytest.mark.parametrize(
    ("case", "probe", "field_name"), INJECTIONS, ids=[case for case, _, _ in INJECTIONS]
)
async def test_a_registration_that_would_inject_request_bytes_is_422(
    start_daemon: Callable[[Config], Awaitable[AppClient]],
    probing: Config,
    recorder: Recorder,
    case: str,
    probe: dict[str, Any],
    field_name: str,
) -> None:
    client = await start_daemon(probing)
    resp = await client.put(INSTANCE, json={"url": recorder.url, "probe": probe})
    assert resp.status == 422, case
    error = (await resp.json())["error"]
    assert [d["field"] for d in error["details"]] == [field_name]
    assert (await (await client.get("/v1/services")).json())["services"] == []
    await asyncio.sleep(0.3)  # three probe intervals: nothing may have been sent
    assert recorder.received == []


async def test_a_non_ascii_path_is_percent_encoded_and_probed(
    start_daemon: Callable[[Config], Awaitable[AppClient]], probing: Config, recorder: Recorder
) -> None:
    client = await start_daemon(probing)
    probe = {"path": "/😀/a b/%41%zz?q=é", "headers": {"X-Name": "Zoë"}}
    resp = await client.put(INSTANCE, json={"url": recorder.url, "probe": probe})
    assert resp.status == 201, await resp.text()

    async def passing() -> bool:
        body = await (await client.get("/v1/health")).json()
        return [i["state"] for i in body["instances"]] == ["passing"]

    await until(passing)
    # A valid %41 is kept as it is; a stray % is encoded; the header is sent as Latin-1.
    assert recorder.request_lines()[0] == (b"GET /%F0%9F%98%80/a%20b/%41%25zz?q=%C3%A9 HTTP/1.1")
    assert b"\r\nX-Name: Zo\xeb\r\n" in recorder.received[0]


CONFIG = """\
services:
  - name: payments
    probe:
      path: "/a\\r\\nX: y"
      headers: {"Bad Name": v}
workflows:
  - name: Grant
    steps:
      - name: pay
        call:
          service: payments
          path: "/pay\\r\\nDELETE /all"
          headers: {X-Amount: "1\\nX-Evil: 1"}
"""


def test_config_probes_and_calls_refuse_injection_naming_key_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG, source="config.yaml")
    assert caught.value.errors == [
        "config.yaml:4: services[0].probe.path: path must not contain control characters"
        " (CR, LF, NUL, ...)",
        "config.yaml:5: services[0].probe.headers: header name 'Bad Name' is not an HTTP token"
        " (letters, digits, !#$%&'*+-.^_`|~)",
        "config.yaml:12: workflows[0].steps[0].call.path: path must not contain control"
        " characters (CR, LF, NUL, ...)",
        "config.yaml:13: workflows[0].steps[0].call.headers: header 'X-Amount': value must not"
        " contain control characters (CR, LF, NUL, ...)",
    ]


async def test_a_probe_that_cannot_be_built_fails_with_a_reason_and_sends_nothing(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    prober = Prober(concurrency=4)
    await prober.start()
    try:
        smuggling = Probe(path="/ok HTTP/1.1\r\nHost: a\r\n\r\nDELETE /all", timeout=1)
        result = await prober.run(recorder.url, smuggling)
        assert not result.connected
        assert result.error is not None and result.error.startswith("request not sent: path")
        # Anything unexpected while building or sending is a failed probe too, logged once.
        broken = Probe(headers=(("X-Count", 5),), timeout=1)  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="monitor.probing"):
            first = await prober.run(recorder.url, broken)
            second = await prober.run(recorder.url, broken)
    finally:
        await prober.close()
    assert first.error is not None and first.error.startswith("probe failed:")
    assert second.error == first.error
    assert len([r for r in caplog.records if "failed unexpectedly" in r.message]) == 1
    assert recorder.received == []


@pytest.mark.parametrize("keepalive", [False, True], ids=["raw", "pooled"])
async def test_a_probe_path_without_a_leading_slash_fails_unsent_as_a_call_would(
    recorder: Recorder, keepalive: bool
) -> None:
    """Probes and workflow calls check a request the same way: "health" is no request target."""
    prober = Prober(concurrency=4)
    await prober.start()
    try:
        result = await prober.run(recorder.url, Probe(path="health", keepalive=keepalive))
    finally:
        await prober.close()
    assert result.error == "request not sent: path must start with /, got 'health'"
    assert recorder.received == []


async def test_a_bad_probe_stored_by_an_older_version_loads_and_fails_with_its_reason(
    start_daemon: Callable[[Config], Awaitable[AppClient]],
    probing: Config,
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    client = await start_daemon(probing)
    resp = await client.put(INSTANCE, json={"url": recorder.url, "probe": {"path": "/ok"}})
    assert resp.status == 201
    await client.close()
    with sqlite3.connect(tmp_path / "hms.db") as db:  # what a version without the checks kept
        db.execute(
            "UPDATE registry_instances SET probe = ?",
            ('{"path": "/ok\\r\\n\\r\\nDELETE /all HTTP/1.1", "headers": {"X": "\\u00e9\\n"}}',),
        )
    recorder.received.clear()
    client = await start_daemon(probing)

    async def critical() -> bool:
        body = await (await client.get("/v1/health")).json()
        return [i["state"] for i in body["instances"]] == ["critical"]

    await until(critical)
    instance = (await (await client.get("/v1/health")).json())["instances"][0]
    assert instance["last_probe"]["error"].startswith("request not sent: path must not contain")
    assert instance["failing"][0] == {
        "condition": "probe",
        "observed": instance["last_probe"]["error"],
    }
    assert recorder.received == []


SMUGGLE = "1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /steal"
TEMPLATED = {
    "name": "Refund",
    "steps": [
        {
            "name": "reserve",
            "call": {"service": "ach", "path": "/reserve"},
            "compensate": {"service": "ach", "path": "/release-{input.ref}"},
        },
        {
            "name": "pay",
            "call": {
                "service": "ach",
                "path": "/pay/{input.ref}",
                "headers": {"X-Note": "{input.note}"},
            },
            "retry": {"max_attempts": 3, "backoff": "20ms"},
        },
    ],
}


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ({"ref": SMUGGLE, "note": "ok"}, "path must not contain control characters"),
        ({"ref": "r1", "note": "a\r\nX-Evil: 1"}, "value must not contain control characters"),
        ({"ref": "r1", "note": "😀"}, "value must be Latin-1"),
    ],
    ids=["path", "header", "header outside Latin-1"],
)
async def test_a_call_rendered_into_bad_request_bytes_fails_its_step_unsent(
    make_config: Callable[..., Config],
    start_daemon: Callable[[Config], Awaitable[AppClient]],
    inputs: dict[str, str],
    problem: str,
) -> None:
    from aiohttp.test_utils import TestServer

    from .services import Calls, service_app

    calls = Calls()
    service = TestServer(service_app(calls), host="127.0.0.1")
    await service.start_server()
    try:
        client = await start_daemon(make_config(workflows=[TEMPLATED]))
        url = str(service.make_url("/"))
        await client.put("/v1/services/ach/instances/i1", json={"url": url})
        resp = await client.post(
            "/v1/workflows/Refund", params={"wait": "10s"}, json={"input": inputs}
        )
        done = await resp.json()
    finally:
        await service.close()
    assert done["status"] in ("failed", "compensated"), done
    error = done["error"]
    assert error["step"] == "pay" and error["message"].startswith("request not sent: ")
    assert problem in error["message"]
    pay = [a for a in done["history"] if a["step"] == "pay"]
    assert len(pay) == 1  # not retried: the same input would render the same request
    sent = calls.paths()
    assert sent[0] == "/reserve" and "/steal" not in sent and not any("pay" in p for p in sent)
    if "ref" in inputs and inputs["ref"] == SMUGGLE:  # the compensation renders it too
        assert done["status"] == "failed" and "compensation of reserve failed" in error["message"]
        assert sent == ["/reserve"]
    else:
        assert done["status"] == "compensated" and sent == ["/reserve", "/release-r1"]
