"""Schemathesis against the daemon's own /openapi.json: every operation, generated valid and
invalid requests; no 5xx, and every response is what the document says (status, content
type, body schema)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
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


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("openapi")
    with running_daemon(directory, services=SERVICES, workflows=[WORKFLOW]) as process:
        yield process


def document() -> dict[str, Any]:
    """The document the daemon below serves (test_the_document_is_the_daemons checks that):
    built here so the operations are known when pytest collects."""
    config = parse_config(yaml.safe_dump({"services": SERVICES, "workflows": [WORKFLOW]}))
    return openapi_document(config)


# The event stream never ends by design: tests/test_security.py and test_workflows.py read it.
schema = schemathesis.openapi.from_dict(document()).exclude(path="/v1/events", method="GET")


def test_the_document_is_the_daemons(daemon: DaemonProcess) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/openapi.json", timeout=5) as resp:
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
    case.call_and_validate(base_url=daemon.url, checks=CHECKS, timeout=15)


def test_the_daemon_survived_the_fuzzing(daemon: DaemonProcess, tmp_path: Path) -> None:
    import urllib.request

    with urllib.request.urlopen(daemon.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    log = daemon.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
