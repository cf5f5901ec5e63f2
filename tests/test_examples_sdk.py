"""The seeds' examples (examples/) run end to end against a real daemon process, as a user
runs them: the SDK's worker and client, real HTTP services, the daemon's own answers.

The examples import the SDK, so each test imports its example itself: the module is
collected (and skipped) before the daemon side of issue 15 is there.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .processes import ROOT, free_port, running_daemon, running_server


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=40) as resp:
        return json.load(resp)


def eventually(read: Any, holds: Any, limit: float = 20) -> Any:
    """`read()` once `holds` of it is true; fails with the last value after `limit` s."""
    deadline = time.monotonic() + limit
    while not holds(value := read()):
        assert time.monotonic() < deadline, value
        time.sleep(0.05)
    return value


def states(process: dict[str, Any]) -> dict[str, str]:
    return {step["name"]: step["state"] for step in process["steps"]}


def test_child_support_pays_then_compensates_a_refused_payment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples import child_support

    treasury = child_support.Treasury(balance=50_000)
    monkeypatch.setattr(child_support, "TREASURY", treasury)
    requests = [
        {"parent_id": "P-1", "amount": 450, "parent_email": "ana@example.org"},
        {"parent_id": "P-2", "amount": 12_000, "parent_email": "ben@example.org"},
    ]
    with running_daemon(tmp_path) as daemon:
        paid, refused = asyncio.run(child_support.pay_child_support(daemon.url, requests))

    assert paid["status"] == "completed"
    assert paid["outputs"]["pay"]["transaction_id"] == f"tx-{paid['id']}-pay"
    assert paid["outputs"]["notify"] == {"sent_to": "ana@example.org"}

    assert refused["status"] == "compensated"
    assert refused["error"]["step"] == "pay"
    assert "over the 10000 limit" in refused["error"]["message"]
    assert states(refused) == {
        "validate": "completed",
        "reserve": "compensated",
        "pay": "failed",
        "notify": "pending",
    }
    # NonRetryable: one attempt of pay, then reserve's compensation, run by the worker.
    lines = [(a["step"], a["kind"], a["outcome"]) for a in refused["history"]]
    assert lines[-2:] == [("pay", "task", "error"), ("reserve", "compensate", "ok")]
    assert all(a["instance"] for a in refused["history"])  # the worker that ran each one
    # The refused payment's funds came back; the paid one's stay paid.
    assert treasury.balance == 50_000 - 450
    assert treasury.holds == {}


def test_release_funds_gives_back_only_what_is_still_held() -> None:
    from examples.child_support import Treasury

    treasury = Treasury(balance=1_000)
    assert treasury.reserve("p1", 300) == 300
    assert treasury.reserve("p1", 300) == 300  # a step run twice holds once
    assert treasury.release("p1") == 300
    assert treasury.release("p1") == 0  # a compensation run twice releases once
    assert treasury.release("never-reserved") == 0
    treasury.reserve("p2", 200)
    treasury.settle("p2")
    assert treasury.release("p2") == 0  # paid out: nothing to give back
    assert treasury.balance == 800


def test_building_permit_waits_for_docs_validated_then_completes(tmp_path: Path) -> None:
    from examples import building_permit

    with running_daemon(tmp_path) as daemon:
        waiting, ended = asyncio.run(
            building_permit.apply_for_permit(daemon.url, {"applicant_id": "A-1"})
        )

    assert waiting["status"] == "waiting"
    assert waiting["waiting_for"]["kind"] == "signal"
    assert "docsValidated" in waiting["waiting_for"]["detail"]
    assert states(waiting)["docs"] == "waiting"
    assert ended["status"] == "completed"
    assert ended["outputs"]["docs"] == {"valid": True, "checked_by": "docs-1"}  # the signal
    assert ended["output"] == {"receipt": "fee-" + ended["id"][:8], "inspector": "Dana"}


def test_grant_payment_answers_once_paid_while_the_follow_up_waits(tmp_path: Path) -> None:
    from examples import grant_payment

    spec = yaml.safe_load((ROOT / "examples" / "grant_payment.yaml").read_text())
    request = {"application_id": "GR-2023-55", "applicant": {"name": "Jane Doe"}, "amount": 2500}
    with running_daemon(tmp_path, services=spec["services"], workflows=spec["workflows"]) as d:
        services = [("applications", free_port()), ("ach", free_port())]
        with (
            running_service(services[0], d.url, tmp_path),
            running_service(services[1], d.url, tmp_path),
        ):
            for name, _ in services:  # registered; calls may go to them before a probe
                eventually(
                    lambda n=name: get_json(f"{d.url}/v1/services/{n}"),
                    lambda s: s["instances"],
                )
            answer = grant_payment.process_grant(d.url, request)
            [listed] = get_json(f"{d.url}/v1/processes?workflow=GrantPayment")["processes"]
            process = eventually(
                lambda: get_json(f"{d.url}/v1/processes/{listed['id']}"),
                lambda p: p["status"] == "waiting",
            )

    assert answer["status"] in {"running", "waiting"}  # answered at pay, not at the end
    assert answer["payment_id"].startswith("pay-")
    assert answer["application"] == "GR-2023-55"
    assert process["outputs"]["pay"]["payment_id"] == answer["payment_id"]
    assert process["waiting_for"]["kind"] == "delay"  # the follow-up, an hour away
    assert process["waiting_for"]["until"] > time.time() + 3000
    assert states(process)["follow_up"] == "waiting"


def running_service(service: tuple[str, int], registry: str, directory: Path) -> Any:
    name, port = service
    argv = [sys.executable, "-m", "examples.services", name, "--port", str(port)]
    argv += ["--registry", registry, "--fail-rate", "0"]
    return running_server(argv, directory / f"{name}.log")


def run_example(name: str, url: str) -> str:
    """`python -m examples.<name> --url URL` as a user types it; its output."""
    run = subprocess.run(
        [sys.executable, "-m", f"examples.{name}", "--url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_examples_run_from_the_command_line(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        child_support = run_example("child_support", daemon.url)
        permit = run_example("building_permit", daemon.url)
    assert ": paid, tx-" in child_support
    assert ": compensated, pay failed: " in child_support
    assert "reserve   compensate ok" in child_support
    assert "treasury: balance 999550, held 0" in child_support
    assert "waiting: " in permit
    assert "  completed: {" in permit
    assert "'receipt': 'fee-" in permit


def test_the_demo_worker_serves_child_support_payments_until_sigterm(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        argv = [sys.executable, "-m", "examples.worker", "--url", daemon.url]
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            for name in ("ChildSupportPayment", "BuildingPermit"):  # deployed by the worker
                eventually(lambda n=name: deployed(daemon.url, n), bool)
            process = post_json(
                f"{daemon.url}/v1/workflows/ChildSupportPayment?wait=30s",
                {"input": {"parent_id": "P-9", "amount": 75}},
            )
            assert process["status"] == "completed", process
            assert process["output"]["notify"] == {"sent_to": "parent@example.org"}
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(20)
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]


def deployed(url: str, name: str) -> bool:
    try:
        return bool(get_json(f"{url}/v1/workflows/{name}")["version"])
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise
