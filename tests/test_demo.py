"""`make demo` starts the grant story and one Ctrl-C stops all of it."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .demo import Demo, get_json, running_demo


def wait_until_gone(demo: Demo, bound: float) -> list[int]:
    deadline = time.monotonic() + bound
    while (left := demo.group()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_one_ctrl_c_stops_every_process_and_port_of_the_demo(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        # The loop is running: grant applications have started processes.
        deadline = time.monotonic() + 20
        while not get_json(f"{demo.url}/v1/processes?workflow=GrantPayment")["processes"]:
            assert time.monotonic() < deadline, demo.log.read_text()[-3000:]
            time.sleep(0.2)
        assert len(demo.group()) >= 5  # the script, the daemon, three services

        os.killpg(demo.process.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C

        # Services get 10 s to deregister, the daemon 10 s to stop: 30 s is a generous bound.
        left = wait_until_gone(demo, 30)
        assert left == [], f"still running: {left}\n{demo.log.read_text()[-3000:]}"
        assert demo.listening() == []
        assert demo.process.wait(timeout=5) is not None  # the script itself ended (reaped)


def test_ach_s_failed_transfers_show_in_its_calls_slo(tmp_path: Path) -> None:
    """The demo's ach fails a fifth of its transfers with 503 while its probes pass: its
    `source: calls` SLO (examples/demo.yaml) counts them, in the API and on the page."""
    with running_demo(tmp_path) as demo:
        for n in range(40):  # beside the demo's own trickle: enough calls for a 503 or more
            body = json.dumps({"application": f"T-{n}", "amount": 100 + n}).encode()
            request = urllib.request.Request(
                f"{demo.url}/api/grants", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status in (200, 202)
        deadline = time.monotonic() + 150  # SLIs come from closed minutes: up to 2 of them
        while True:
            slos = {s["name"]: s for s in get_json(f"{demo.url}/v1/services/ach/slos")["slos"]}
            calls = slos["calls"]
            if calls["sli"] is not None and calls["sli"] < 1:
                break
            assert time.monotonic() < deadline, (calls, demo.log.read_text()[-3000:])
            time.sleep(1)
        assert calls["source"] == "calls" and slos["availability"]["source"] == "probes"
        assert calls["error_budget_remaining"] < 1
        with urllib.request.urlopen(f"{demo.url}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        failures = [
            sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "hms_service_calls_total"
            and sample.labels == {"service": "ach", "result": "failure"}
        ]
        assert failures and failures[0] >= 1, failures
        with urllib.request.urlopen(f"{demo.url}/services/ach", timeout=5) as response:
            page = response.read().decode()
        line = page.split('data-slo="calls"')[0].rsplit("<tr", 1)[1]
        assert "slo-down" in line or "slo-partial" in line, line
