"""`hms-mgmt status` against a running daemon process."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from .processes import DaemonProcess, cli, free_port, running_daemon, write_config

ADMIN = "status-admin-token"
AUTH = {"tokens": [{"name": "admin", "token": ADMIN, "scopes": ["*"]}], "protect_reads": True}
SERVICES = [
    {"name": "payments", "slos": [{"name": "availability", "objective": 99.9}]},
    {"name": "ledger"},
]
WORKFLOWS = [{"name": "Announce", "steps": [{"name": "announce", "publish": "grant.paid"}]}]


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("status", config, *extra)


def call(url: str, method: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status < 300


def test_status_prints_services_health_budget_and_processes(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        server={"listen": f"127.0.0.1:{port}", "auth": AUTH},
        services=SERVICES,
        workflows=WORKFLOWS,
    )
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    daemon.start()
    try:
        call(
            f"{daemon.url}/v1/services/payments/instances/p1", "PUT", {"url": "http://127.0.0.1:1"}
        )
        call(f"{daemon.url}/v1/workflows/Announce?wait=5s", "POST", {"input": {}})
        result = status(config)  # the daemon's address and first token come from the config
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "HEALTH", "INSTANCES", "SLO", "BUDGET", "LEFT"]
    payments = next(line for line in lines if line.startswith("payments"))
    assert payments.split()[1] == "unknown"  # not probed: defaults.probe.type is none
    assert "availability no data" in payments
    assert next(line for line in lines if line.startswith("ledger")).split()[1:3] == [
        "unknown",
        "none",
    ]
    announce = next(line for line in lines if line.startswith("Announce")).split()
    assert announce[1:] == ["0", "0", "0", "0", "1", "0"]


def test_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    result = status(config)
    assert result.returncode == 1
    assert "cannot reach the daemon at http://127.0.0.1:" in result.stderr


def test_status_takes_an_explicit_url(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d", services=SERVICES) as daemon:
        result = status(write_config(tmp_path, free_port()), "--url", daemon.url)
    assert result.returncode == 0, result.stderr
    assert "payments" in result.stdout
    assert status(write_config(tmp_path, 1), "--url", "file:///etc/passwd").returncode == 1
