"""`hms-mgmt audit` against a running daemon process (issue 18, DESIGN §6)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from monitor.commands.audit import AuditFilter, audit_report

from .processes import DaemonProcess, cli, free_port, running_daemon, write_config

ADMIN, PAYMENTS, LEDGER = "audit-admin-token", "audit-payments-token", "audit-ledger-token"
TOKENS = [
    {"name": "admin", "token": ADMIN, "scopes": ["*"]},
    {"name": "payments", "token": PAYMENTS, "scopes": ["register:payments*"]},
    {"name": "ledger", "token": LEDGER, "scopes": ["register:ledger*"]},
]
AUTH = {"tokens": TOKENS}
HEADER = ["TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "COUNT", "CLIENT"]


def audit(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("audit", config, *extra)


def register(daemon: DaemonProcess, token: str, service: str, instance: str) -> None:
    request = urllib.request.Request(
        f"{daemon.url}/v1/services/{service}/instances/{instance}",
        data=json.dumps({"url": "http://127.0.0.1:1"}).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


def rows(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The table's rows under its header, each split into its cells."""
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == HEADER
    return [line.split() for line in lines]


def registered(daemon: DaemonProcess) -> None:
    register(daemon, PAYMENTS, "payments", "p1")
    register(daemon, LEDGER, "ledger", "l1")
    register(daemon, PAYMENTS, "payments", "p2")


def test_audit_prints_the_registrations_oldest_first(tmp_path: Path) -> None:
    with running_daemon(tmp_path, server={"auth": AUTH}) as daemon:
        registered(daemon)
        result = audit(daemon.config)  # the daemon and admin's token come from the config
    table = rows(result)
    assert [row[1:] for row in table] == [
        ["payments", "instance.register", "payments/p1", "201", "1", "127.0.0.1"],
        ["ledger", "instance.register", "ledger/l1", "201", "1", "127.0.0.1"],
        ["payments", "instance.register", "payments/p2", "201", "1", "127.0.0.1"],
    ]
    times = [row[0] for row in table]
    assert times == sorted(times) and all(t.endswith("Z") for t in times)


def test_audit_filters_by_actor_action_and_since(tmp_path: Path) -> None:
    with running_daemon(tmp_path, server={"auth": AUTH}) as daemon:
        registered(daemon)
        by_ledger = audit(daemon.config, "--actor", "ledger")
        by_action = audit(daemon.config, "--action", "instance.*")
        other_action = audit(daemon.config, "--action", "process.*")
        last_day = audit(daemon.config, "--since", "1d")
        future = audit(daemon.config, "--since", "2999-01-01T00:00:00Z")
    assert [row[3] for row in rows(by_ledger)] == ["ledger/l1"]
    assert len(rows(by_action)) == 3
    assert rows(other_action) == []
    assert [row[3] for row in rows(last_day)] == ["payments/p1", "ledger/l1", "payments/p2"]
    assert rows(future) == []


def test_audit_stops_at_the_limit_and_says_more_match(tmp_path: Path) -> None:
    with running_daemon(tmp_path, server={"auth": AUTH}) as daemon:
        registered(daemon)
        result = audit(daemon.config, "--limit", "2")
    assert [row[3] for row in rows(result)] == ["payments/p1", "ledger/l1"]
    assert "more than 2 records match" in result.stderr


def test_audit_follows_the_daemons_pages(tmp_path: Path) -> None:
    with running_daemon(tmp_path, server={"auth": AUTH}) as daemon:
        registered(daemon)
        table, more = audit_report(daemon.url, ADMIN, AuditFilter(), page_size=1)
        limited, more_limited = audit_report(daemon.url, ADMIN, AuditFilter(limit=2), page_size=1)
    assert [line.split()[3] for line in table.splitlines()[1:]] == [
        "payments/p1",
        "ledger/l1",
        "payments/p2",
    ]
    assert not more
    assert len(limited.splitlines()) == 3 and more_limited


def test_audit_needs_a_token_that_reads_the_trail(tmp_path: Path) -> None:
    writers = {"tokens": [t for t in TOKENS if t["name"] != "admin"]}
    result = audit(write_config(tmp_path, free_port(), server={"auth": writers}))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "hms-mgmt audit: no token in server.auth.tokens of the config holds audit:read or *"
    ]


def test_audit_says_so_when_the_daemon_refuses_the_token(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    # The CLI's config believes the payments token reads the trail; the daemon knows better.
    believed: list[dict[str, Any]] = [
        {"name": "payments", "token": PAYMENTS, "scopes": ["audit:read"]}
    ]
    config = write_config(tmp_path, free_port(), server={"auth": {"tokens": believed}})
    with running_daemon(tmp_path / "d", server={"auth": AUTH}) as daemon:
        result = audit(config, "--url", daemon.url)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"hms-mgmt audit: {daemon.url}/v1/audit") and "HTTP 403" in line


def test_audit_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = audit(write_config(tmp_path, free_port()))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("hms-mgmt audit: cannot reach the daemon at http://127.0.0.1:")


def test_audit_refuses_a_since_it_cannot_read(tmp_path: Path) -> None:
    result = audit(write_config(tmp_path, free_port()), "--since", "yesterday")
    assert result.returncode == 1
    assert "--since must be a duration (1d, 2h) or an RFC 3339 time" in result.stderr
