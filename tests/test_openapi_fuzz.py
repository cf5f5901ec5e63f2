"""Schemathesis against the daemon's own /openapi.json: every operation (the sign-in form and
workflow routes included), generated valid and invalid requests; no 5xx, every response is
what the document says (status, content type, body schema), and a refused request stores
nothing. Bodies of types no operation declares get a 4xx in the error shape too."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from monitor import parse_config
from monitor.app import openapi_document

from .processes import DaemonProcess, running_daemon

WORKFLOW = {
    "name": "Grant",
    "route": "/api/grants",
    "steps": [{"name": "later", "delay": "1h", "publish": "grant.done"}],
}
SERVICES = [
    {
        "name": "payments",
        "instances": [{"id": "p1", "url": "http://127.0.0.1:9"}],
        "slos": [{"name": "availability", "objective": 99.9}],
    }
]
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# Auth on, so the sign-in form parses its body; every generated request carries the token,
# so bodies reach their decoders (tests/test_security.py covers requests without one).
TOKEN = "fuzz-admin-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER = {"auth": {"tokens": [{"name": "token", "token": TOKEN, "scopes": ["*"]}]}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("openapi")
    with running_daemon(
        directory, server=SERVER, services=SERVICES, workflows=[WORKFLOW]
    ) as process:
        yield process


def document() -> dict[str, Any]:
    """The document the daemon below serves (test_the_document_is_the_daemons checks that):
    built here so the operations are known when pytest collects."""
    sections = {"server": SERVER, "services": SERVICES, "workflows": [WORKFLOW]}
    return openapi_document(parse_config(yaml.safe_dump(sections)))


def stored(daemon: DaemonProcess) -> tuple[float, ...]:
    """Marks that only grow when the daemon stores something, read from its database file:
    the newest registration or update, the number of processes and of events. (Expiry may
    remove an instance a fuzzed registration gave a short lease: the mark may then fall.)"""
    with sqlite3.connect(daemon.config.parent / "hms.db", timeout=10) as db:
        return tuple(
            db.execute(query).fetchone()[0]
            for query in (
                "SELECT coalesce(max(updated_at), 0) FROM registry_instances",
                "SELECT count(*) FROM processes",
                "SELECT count(*) FROM events",
            )
        )


def nothing_added(before: tuple[float, ...], after: tuple[float, ...]) -> bool:
    return all(now <= then for now, then in zip(after, before, strict=True))


# The event stream never ends by design: tests/test_security.py and test_workflows.py read it.
schema = schemathesis.openapi.from_dict(document()).exclude(path="/v1/events", method="GET")


def test_the_document_is_the_daemons(daemon: DaemonProcess) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(daemon.url + "/openapi.json", headers=AUTH)
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert json.load(resp) == document()


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same requests on every run: a failure reproduces
)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, daemon: DaemonProcess
) -> None:
    if isinstance(case.query, dict) and "index" in case.query:
        case.query["wait"] = "1s"  # a blocking query waits 5 minutes by default, as documented
    if isinstance(case.body, dict) and case.path == "/v1/tasks/poll":
        case.body["wait"] = "0s"  # a task poll waits 30s by default, as documented
    writes = case.method.upper() != "GET"
    before = stored(daemon) if writes else ()
    response = case.call_and_validate(base_url=daemon.url, headers=AUTH, checks=CHECKS, timeout=15)
    if writes and 400 <= response.status_code < 500:
        after = stored(daemon)
        assert nothing_added(before, after), f"{case.method} {case.formatted_path} stored"


# Bodies no operation declares. None is JSON: a route that took one as JSON would store it.
UNDECLARED: list[tuple[str, bytes]] = [
    ("text/plain", b'{"amount": 1}'),
    ("text/html", b"<p>hello</p>"),
    ("application/xml", b"<input><amount>1</amount></input>"),
    (
        "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="t"\r\n\r\n1\r\n--b--\r\n',
    ),
    ("multipart/form-data", b"no boundary"),
    ("application/x-www-form-urlencoded", b"input=1&amount=%ZZ&\xff"),
    ("application/json", b"\xff\xfe{]"),
    ("application/octet-stream", bytes(range(256))),
]
PARAMETERS = {"service": "payments", "id": "p1", "name": "Grant", "topic": "grant.submitted"}


def operations_with_bodies() -> list[tuple[str, str]]:
    return [
        (method.upper(), re.sub(r"\{(\w+)\}", lambda m: PARAMETERS[m.group(1)], path))
        for path, item in document()["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "requestBody" in operation
    ]


def test_bodies_of_undeclared_types_are_4xx_in_the_error_shape(daemon: DaemonProcess) -> None:
    covered = operations_with_bodies()
    assert ("POST", "/login") in covered and ("POST", "/api/grants") in covered
    before = stored(daemon)
    with requests.Session() as session:
        for method, path in covered:
            for content_type, body in UNDECLARED:
                headers = {**AUTH, "Content-Type": content_type}
                resp = session.request(
                    method, daemon.url + path, data=body, headers=headers, timeout=15
                )
                what = f"{method} {path} with {content_type}"
                assert 400 <= resp.status_code < 500, what
                assert resp.headers["Content-Type"].startswith("application/json"), what
                assert set(resp.json()["error"]) == {"code", "message", "details"}, what
    assert nothing_added(before, stored(daemon))


def test_the_daemon_survived_the_fuzzing(daemon: DaemonProcess, tmp_path: Path) -> None:
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    log = daemon.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
