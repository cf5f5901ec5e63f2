"""`hms-mgmt status`: services, health, SLO budget, running processes and the replicas, as
terminal tables."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from monitor.config import Config
from workflows.states import ACTIVE as ACTIVE_STATES
from workflows.states import ProcessStatus

# The columns, in a process's order: started, running, waiting, compensating.
ACTIVE = tuple(status for status in ProcessStatus if status in ACTIVE_STATES)
SEVERITY = ("critical", "warning", "unknown", "maintenance", "passing")
TIMEOUT = 10.0


class StatusError(Exception):
    """The daemon could not be asked (down, refused, or answered with an error)."""


def daemon_url(config: Config, url: str | None) -> str:
    if url is not None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise StatusError(f"--url must be an http:// or https:// address, not {url!r}")
        return url.rstrip("/")
    host = config.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # a listen-all address
    host = "[::1]" if host == "::" else host
    return f"http://{host}:{config.server.port}"


def first_token(config: Config) -> str | None:
    auth = config.server.auth
    return auth.tokens[0].token.get_secret_value() if auth and auth.tokens else None


def fetch(base: str, path: str, token: str | None) -> Any:
    # http(s) only: daemon_url() checked the scheme.
    request = urllib.request.Request(base + path, headers={"Accept": "application/json"})  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise StatusError(f"{base}{path}: HTTP {exc.code} {_message(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach the daemon at {base}: {reason}") from None


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return exc.reason or ""


def status_report(base: str, token: str | None) -> str:
    services = fetch(base, "/v1/services", token)["services"]
    rows = [["SERVICE", "HEALTH", "INSTANCES", "SLO BUDGET LEFT"]]
    for service in services:
        health = service["health"]
        worst = next((s for s in SEVERITY if health.get(s)), "unknown")
        counts = ", ".join(f"{n} {s}" for s, n in health.items() if n) or "none"
        path = f"/v1/services/{urllib.parse.quote(service['name'])}/slos"
        slos = (fetch(base, path, token) or {}).get("slos", [])
        budget = ", ".join(
            f"{slo['name']} {_percent(slo['error_budget_remaining'])}" for slo in slos
        )
        rows.append([service["name"], worst, counts, budget or "-"])
    lines = table(rows)
    workflows = fetch(base, "/v1/workflows", token)["workflows"]
    if workflows:
        lines.append("")
        header = ["WORKFLOW", *(s.upper() for s in ACTIVE), "COMPLETED", "FAILED"]
        workflow_rows = [header]
        for workflow in workflows:
            counts = workflow["counts"]
            workflow_rows.append(
                [
                    workflow["name"],
                    *(str(counts.get(s, 0)) for s in ACTIVE),
                    str(counts.get("completed", 0)),
                    str(counts.get("failed", 0)),
                ]
            )
        lines += table(workflow_rows)
    cluster = fetch(base, "/v1/cluster", token)  # None: a daemon from before replicas
    if cluster is not None:
        lines.append("")
        lines += table(_members(cluster))
    return "\n".join(lines) + "\n"


def _members(cluster: dict[str, Any]) -> list[list[str]]:
    """One row per live replica: which leads, how many probe shards each has, which one
    answered (the others are seen through its eyes)."""
    rows = [["REPLICA", "ROLE", "SHARDS"]]
    for member in cluster["members"]:
        replica = member["replica_id"]
        role = "leader" if replica == cluster["leader"] else "member"
        answered = " (answered)" if replica == cluster["self"] else ""
        rows.append([replica + answered, role, str(len(member["shards"]))])
    return rows


def _percent(ratio: float | None) -> str:
    return "no data" if ratio is None else f"{ratio * 100:.1f}%"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart (the first row: the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
