"""config.yaml: the full schema, env expansion, and errors that name key and line."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor import build_app
from monitor.config import ConfigError, config_warnings, load_config, parse_config

from .conftest import AppClient, missing
from .processes import ROOT, env_without_ci, free_port
from .test_reload import reloaded

DESIGN = ROOT.parent / "shared" / "DESIGN.md"
DESIGN_ENV = {
    "HMS_ADMIN_TOKEN": "admin-secret-1",
    "PAYMENTS_TOKEN": "pay-secret-1",
    "HOOK_SECRET": "s",
}


EXAMPLE = Path(__file__).parent / "data" / "design-example.yaml"


def errors_of(text: str, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=env)
    return caught.value.errors


def test_the_design_example_loads() -> None:
    config = parse_config(EXAMPLE.read_text(), env=DESIGN_ENV)
    assert config.server.auth is not None
    assert config.server.auth.tokens[0].token.get_secret_value() == "admin-secret-1"
    payments = config.service("payments")
    assert payments is not None
    assert payments.probe is not None and payments.probe.path == "/health"
    assert config.defaults.probe.down_interval == timedelta(seconds=2)
    assert config.workflows[0].steps[2].delay == timedelta(hours=1)
    assert config.maintenance[0].every == ("sunday",)


# DESIGN.md's examples show the contract once every open issue has landed; until then the
# keys of an issue still open are refused as unknown. Each entry names its issue: when one
# lands, its keys leave this table, and the test fails until they do.
PENDING: dict[str, int] = {}


def design_examples() -> list[str]:
    """The YAML examples of ../shared/DESIGN.md, which CI and every session have beside the
    checkout; a bare clone elsewhere skips (fails under CI)."""
    if not DESIGN.exists():
        missing(f"{DESIGN} is not beside the checkout")
    return re.findall(r"```yaml\n(.*?)```", DESIGN.read_text(), re.S)


def test_design_md_examples_load_but_for_the_keys_of_open_issues() -> None:
    refused: set[str] = set()
    for example in design_examples():
        try:
            parse_config(example, env=DESIGN_ENV)
        except ConfigError as exc:
            refused |= {error.split(": ")[1] for error in exc.errors}
    assert refused == set(PENDING)


def test_the_shipped_config_runs_as_is() -> None:
    config = load_config(ROOT / "config.yaml", env={})
    assert config.server.listen == "127.0.0.1:9797"
    assert config.storage.path == ROOT / "var" / "hms-mgmt.db"


def test_the_replica_config_takes_its_settings_from_the_environment() -> None:
    env = {
        "HMS_ADMIN_TOKEN": "t" * 32,
        "HMS_DATABASE_URL": "postgresql://hms@db.internal:5432/hms",
        "HMS_REPLICA_ID": "hms-7f9c",
    }
    config = load_config(ROOT / "deploy" / "replica.yaml", env=env)
    assert config.storage.url == env["HMS_DATABASE_URL"]
    assert (config.cluster.replica_id, config.cluster.lease) == ("hms-7f9c", timedelta(seconds=10))
    assert config.server.listen == "0.0.0.0:9797"
    assert load_config(ROOT / "deploy" / "replica.yaml", env={**env, "HMS_REPLICA_ID": ""})


def test_an_empty_file_is_all_defaults() -> None:
    config = parse_config("")
    assert config.defaults.lease.ttl == timedelta(seconds=30)
    assert config.storage.retention == timedelta(days=400)


def test_every_error_is_reported_with_path_and_line() -> None:
    text = """\
server:
  listen: 127.0.0.1:9797
defaults:
  probe: {interval: 10 seconds}
services:
  - name: payments
    colour: red
    slos:
      - {name: availability, objective: 120}
"""
    assert errors_of(text) == [
        "config.yaml:4: defaults.probe.interval: invalid duration '10 seconds' "
        "(expected e.g. 500ms, 10s, 5m, 1h30m, 2d)",
        "config.yaml:7: services[0].colour: unknown key",
        "config.yaml:9: services[0].slos[0].objective: Input should be less than 100",
    ]


def test_env_variables_expand_with_defaults() -> None:
    text = "server:\n  listen: ${HOST:-127.0.0.1}:${PORT}\n"
    config = parse_config(text, env={"PORT": "9898"})
    assert config.server.listen == "127.0.0.1:9898"


def test_dollar_dollar_is_a_literal_dollar() -> None:
    text = "services:\n  - name: a\n    meta: {price: '$${X}'}\n"
    assert parse_config(text, env={}).services[0].meta == {"price": "${X}"}


def test_an_unset_env_variable_is_an_error_naming_it() -> None:
    text = (
        "server:\n  auth:\n    tokens:\n      - name: admin\n        token: ${ADMIN_TOKEN}\n"
        "        scopes: ['*']\n"
    )
    assert errors_of(text) == [
        "config.yaml:5: server.auth.tokens[0].token: environment variable ADMIN_TOKEN is not set"
    ]


def test_invalid_yaml_names_the_line() -> None:
    assert errors_of("server:\n  listen: [oops\nstorage: {}\n")[0].startswith(
        "config.yaml:3: invalid YAML"
    )


def test_duplicate_keys_are_errors() -> None:
    assert errors_of("storage:\n  path: a.db\n  path: b.db\n") == [
        "config.yaml:3: storage.path: duplicate key"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("services:\n  - name: a\n  - name: a\n", "services[1]: duplicate name 'a'"),
        ("services:\n  - name: a\n    depends_on: [a]\n", "a service cannot depend on itself"),
        ("services:\n  - name: a b\n", "services[0].name: must be 1 to 128 characters"),
        (
            "services:\n  - name: a\n    instances: [{id: x, url: 'ftp://h'}]\n",
            "http:// or https://",
        ),
        ("server:\n  listen: nowhere\n", "server.listen: expected host:port"),
        (
            "server:\n  auth:\n    tokens: [{name: a, token: abcdefghij, scopes: ['delete:*']}]\n",
            "scope must be '*' or <verb>:<glob>",
        ),
        (
            "server:\n  auth:\n    tokens:\n      - {token: abcdefghij, scopes: ['*']}\n",
            "config.yaml:4: server.auth.tokens[0].name: Field required",
        ),
        (
            "server:\n  auth:\n    tokens:\n      - {name: ops, token: abcdefghij, scopes: ['*']}\n"
            "      - {name: ops, token: klmnopqrst, scopes: ['*']}\n",
            "config.yaml:5: server.auth.tokens[1]: duplicate name 'ops'",
        ),
        (
            "maintenance:\n  - {services: [a], duration: 1h, timezone: Mars/Base}\n",
            "unknown timezone 'Mars/Base'",
        ),
        (
            "maintenance:\n  - {services: [a], duration: 1h}\n",
            "set either start (recurring) or at (one-off)",
        ),
        (
            "services:\n  - name: a\n    slos: [{name: l, objective: 99, latency_threshold: 1s, "
            "sli: {error_query: e, total_query: t}}]\n",
            "set latency_threshold or sli, not both",
        ),
        (
            "workflows:\n  - name: W\n    steps: [{name: s}]\n",
            "a step needs exactly one of call, publish, wait_for",
        ),
        (
            "workflows:\n  - name: W\n    route: /v1/start\n    steps: [{name: s, publish: x}]\n",
            "route must start with / and not be under /v1",
        ),
        (
            "workflows:\n  - name: W\n    steps: [{name: s, publish: x}, {name: s, publish: y}]\n",
            "duplicate name 's'",
        ),
        ("notifications:\n  - {name: n, url: 'http://h/x', events: [], format: xml}\n", "format"),
    ],
)
def test_bad_values_are_named(text: str, expected: str) -> None:
    assert any(expected in error for error in errors_of(text)), errors_of(text)


def test_unknown_dependencies_are_warnings_not_errors() -> None:
    config = parse_config("services:\n  - name: a\n    depends_on: [ledger]\n")
    assert config_warnings(config) == [
        "services[0].depends_on: 'ledger' is not a configured service (it may register later)"
    ]


def test_storage_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("storage: {path: data/x.db}\n")
    assert load_config(tmp_path / "c.yaml").storage.path == tmp_path / "data" / "x.db"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_without_ci(),
        timeout=60,
        check=False,
    )


BAD = "services:\n  - name: a\n    colour: red\n  - name: a\ndefaults: {lease: {ttl: forever}}\n"


def test_check_config_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    result = run_cli("check-config", "--config", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    assert "3 error(s)" in result.stderr
    assert "bad.yaml:3: services[0].colour: unknown key" in result.stderr
    assert "bad.yaml:5: defaults.lease.ttl: invalid duration 'forever'" in result.stderr
    assert "bad.yaml:4: services[1]: duplicate name 'a'" in result.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(ROOT / "config.yaml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_serve_refuses_a_bad_config_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    result = run_cli("serve", "--config", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    assert "bad.yaml:3: services[0].colour: unknown key" in result.stderr


def test_serve_refuses_a_foreign_database(tmp_path: Path) -> None:
    import sqlite3

    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER)")
    before = foreign.read_bytes()
    listen = f"127.0.0.1:{free_port()}"
    (tmp_path / "c.yaml").write_text(
        f"server: {{listen: '{listen}'}}\nstorage: {{path: {foreign}}}\n"
    )
    result = run_cli("serve", "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 1
    assert "database of another application" in result.stderr
    assert foreign.read_bytes() == before


def test_a_bad_probe_condition_is_a_config_error_with_its_path() -> None:
    text = (
        "services:\n"
        "  - name: payments\n"
        "    probe:\n"
        "      conditions:\n"
        "        - '[STATUS] == 200'\n"
        "        - '[STAUTS] == 200'\n"
    )
    [error] = errors_of(text)
    assert error.startswith("config.yaml:6: services[0].probe.conditions[1]: '[STAUTS] == 200'")


SECRET = "s3cr3t-Admin-T0ken"
LEAKY = """\
server:
  listen: ${ADMIN_TOKEN}
  allowed_targets: ["${ADMIN_TOKEN}"]
defaults:
  probe: {timeout: "${ADMIN_TOKEN}", interval: "1${ADMIN_TOKEN}", headers: {X-A: "${EMOJI}"}}
  lease: {ttl: "${FIVE}"}
services:
  - name: ${ADMIN_TOKEN}
    probe: {conditions: ["[STATUS] == ${ADMIN_TOKEN}", "${ADMIN_TOKEN}"], path: "${CRLF}"}
    slos: [{name: a, objective: "${ADMIN_TOKEN}"}]
  - name: ${SHORT}
  - name: ${SHORT}
maintenance:
  - {services: [x], start: "${ADMIN_TOKEN}", duration: 1h, timezone: "${ADMIN_TOKEN}"}
notifications:
  - {name: ops, url: "http://${ADMIN_TOKEN}:x/", events: [a], format: "${ADMIN_TOKEN}"}
  - {name: port, url: "http://127.0.0.1:${PORT_TOKEN}", events: [a]}
workflows:
  - name: W
    route: "${ADMIN_TOKEN}"
    steps: [{name: s, call: {service: a, path: "/{${ADMIN_TOKEN}}"}, timeout: "${ADMIN_TOKEN}"}]
  - name: V
    steps: [{name: s, call: {service: a, path: "/x/{${BRACED}}"}}]
"""
LEAKY_ENV = {
    "ADMIN_TOKEN": SECRET,
    "SHORT": "zq",
    "FIVE": "5",
    "EMOJI": "😀",
    "CRLF": "/a\r\nB: c",
    # Checks that quote a piece: urlsplit cuts a port at "/", templates split at { and }.
    "PORT_TOKEN": "AbCdEfGh/IjKlMnOp+QrSt=",
    "BRACED": "Zq9}Xy8{Wv7",
}


def test_config_errors_show_variables_as_written_never_their_values() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(LEAKY, source="c.yaml", env=LEAKY_ENV)
    errors = caught.value.errors
    assert len(errors) >= 14, errors  # every kind of check above reported
    text = "\n".join(errors)
    for value in (v for k, v in LEAKY_ENV.items() if k != "FIVE"):
        assert value not in text and repr(value)[1:-1] not in text, value
    assert "c.yaml:5: defaults.probe.timeout: invalid duration '${ADMIN_TOKEN}'" in text
    assert "defaults.probe.interval: invalid duration '1${ADMIN_TOKEN}'" in text
    assert "c.yaml:12: services[2]: duplicate name '${SHORT}'" in text
    # A short value is replaced where quoted only: the rest of the message stays readable.
    assert "c.yaml:6: defaults.lease.ttl: invalid duration '${FIVE}' (expected e.g. 500ms," in text
    assert "unknown timezone '${ADMIN_TOKEN}'" in text
    for piece in ("AbCdEfGh", "Zq9", "Wv7"):
        assert piece not in text, piece
    assert "c.yaml:17: notifications[1].url: url port must be a number from 1 to 65535" in text
    braced = (
        "c.yaml:23: workflows[1].steps[0].call.path: invalid value '/x/{${BRACED}}'"
        " (the reason would show part of ${BRACED})"
    )
    assert errors.count(braced) == 1, errors  # once, though both fields quoted a piece


def test_check_config_prints_variables_as_written(tmp_path: Path) -> None:
    (tmp_path / "leaky.yaml").write_text(LEAKY)
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "check-config", "--config", str(tmp_path / "leaky.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env_without_ci(), **LEAKY_ENV},
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "${ADMIN_TOKEN}" in result.stderr
    assert SECRET not in result.stdout + result.stderr


async def test_a_refused_reload_logs_variables_as_written(
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", SECRET)
    path = tmp_path / "config.yaml"
    good = f"storage: {{path: {tmp_path / 'hms.db'}}}\ndefaults: {{probe: {{type: none}}}}\n"
    path.write_text(good)
    app = build_app(
        load_config(path), metrics=CollectorRegistry(), config_path=path, watch_interval=0.05
    )
    client = await aiohttp_client(app)
    caplog.set_level(logging.ERROR)
    path.write_text(good + "services: [{name: a, probe: {timeout: '${ADMIN_TOKEN}'}}]\n")
    await reloaded(client, "failure")
    assert "services[0].probe.timeout: invalid duration '${ADMIN_TOKEN}'" in caplog.text
    assert SECRET not in caplog.text
