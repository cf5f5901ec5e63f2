"""The `hms-mgmt` command line (DESIGN.md §6)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from monitor.storage.database import DatabaseError

from .config import Config, ConfigError, config_warnings, load_config

log = logging.getLogger("hms-mgmt")
# After answering a request whose body was not read (413, 408), how long the rest of it may
# still trickle in before the connection closes (aiohttp's default is 10 s).
LINGERING_TIME = 1.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # APScheduler logs every run of every job at INFO (the probe tick: ten lines a second).
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, logging.root.level))
    logging.getLogger("aiohttp.server").addFilter(_malformed_requests)
    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    for warning in config_warnings(config):
        log.warning("config: %s", warning)
    command: int = args.run(args, config)
    return command


def _malformed_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs each unparseable request (bad bytes in a path, an overlong header) as an
    ERROR with a traceback: anyone could fill the log. One line at INFO says enough."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError) and (error.code or 400) < 500:
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        first_line = str(error.message).strip().splitlines()[0] if error.message else ""
        # aiohttp quotes the offending bytes (an overlong Authorization header, say): not those.
        first_line = re.split(r":\s*(?:b['\"]|bytearray\()", first_line)[0]
        record.msg, record.args = "malformed request from %s refused: %s", (remote, first_line)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hms-mgmt",
        description="Service registry, health and SLO monitor, workflow orchestrator.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="config.yaml", help="default: ./config.yaml")
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", parents=[common], help="run the daemon")
    serve.set_defaults(run=_serve)
    check = commands.add_parser(
        "check-config", parents=[common], help="validate the config; exit 1 listing every error"
    )
    check.set_defaults(run=_check_config)
    rules = commands.add_parser(
        "rules", parents=[common], help="print the Prometheus rule file built from the config"
    )
    rules.add_argument("-o", "--output", help="write to this file instead of stdout")
    rules.set_defaults(run=_rules)
    dashboard = commands.add_parser(
        "dashboard", parents=[common], help="print the Grafana dashboard (JSON)"
    )
    dashboard.add_argument("-o", "--output", help="write to this file instead of stdout")
    dashboard.add_argument(
        "--datasource", help="a Prometheus datasource uid instead of the ${DS_PROMETHEUS} input"
    )
    dashboard.set_defaults(run=_dashboard)
    status = commands.add_parser(
        "status",
        parents=[common],
        help="services, health, SLO budget and running processes of a running daemon",
    )
    status.add_argument("--url", help="the daemon's address (default: server.listen of --config)")
    status.set_defaults(run=_status)
    audit = commands.add_parser(
        "audit", parents=[common], help="the audit trail of a running daemon, oldest first"
    )
    audit.add_argument("--since", help="a duration ago (1d, 2h) or an RFC 3339 time")
    audit.add_argument("--actor", help="a token's name, anonymous, sighup, config-file")
    audit.add_argument("--action", help="e.g. process.start, or a prefix: process.*")
    audit.add_argument(
        "--limit", type=_positive, default=1000, help="rows shown at most (default: 1000)"
    )
    audit.add_argument("--url", help="the daemon's address (default: server.listen of --config)")
    audit.set_defaults(run=_audit)
    return parser


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, not {text!r}")
    return number


def _status(args: argparse.Namespace, config: Config) -> int:
    from monitor.commands.status import StatusError, daemon_url, first_token, status_report

    try:
        base = daemon_url(config, args.url)
        sys.stdout.write(status_report(base, first_token(config)))
    except StatusError as exc:
        print(f"hms-mgmt status: {exc}", file=sys.stderr)
        return 1
    return 0


def _audit(args: argparse.Namespace, config: Config) -> int:
    from monitor.commands.audit import AuditFilter, audit_report, audit_token, since_time
    from monitor.commands.status import StatusError, daemon_url

    try:
        wanted = AuditFilter(
            since=None if args.since is None else since_time(args.since),
            actor=args.actor,
            action=args.action,
            limit=args.limit,
        )
        report, more = audit_report(daemon_url(config, args.url), audit_token(config), wanted)
    except StatusError as exc:
        print(f"hms-mgmt audit: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report)
    if more:
        print(
            f"hms-mgmt audit: more than {args.limit} records match; "
            "narrow with --since, --actor, --action or raise --limit",
            file=sys.stderr,
        )
    return 0


def _rules(args: argparse.Namespace, config: Config) -> int:
    from monitor.slo.rules import render_rules

    _emit(render_rules(config), args.output)
    return 0


def _dashboard(args: argparse.Namespace, config: Config) -> int:
    from monitor.slo.dashboard import render_dashboard

    _emit(render_dashboard(config, datasource=args.datasource), args.output)
    return 0


def _emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")


def _check_config(args: argparse.Namespace, config: Config) -> int:
    print(
        f"{args.config}: ok ({len(config.services)} service(s), "
        f"{len(config.workflows)} workflow(s))"
    )
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # not on every platform; asyncio's own loop works, only slower
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def raise_open_file_limit() -> None:
    """Every probe, call and client holds a socket: take the hard limit of open files, as
    Go's runtime does for Consul and Prometheus, instead of the 1,024 many systems start with.
    (The tests and their flood generator use it too: they hold 1,000+ sockets at once.)"""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _serve(args: argparse.Namespace, config: Config) -> int:
    from .app import build_app

    raise_open_file_limit()
    app = build_app(config, config_path=Path(args.config), reload_on_sighup=True)
    try:
        web.run_app(
            app,
            loop=_event_loop(),
            host=config.server.host,
            port=config.server.port,
            access_log=None,
            # Idle connections, and requests whose headers are not complete, close after this.
            keepalive_timeout=config.server.read_timeout.total_seconds(),
            lingering_time=LINGERING_TIME,
            print=lambda _: log.info("listening on http://%s", config.server.listen),
            shutdown_timeout=10,
        )
    except DatabaseError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.server.listen, exc)
        return 1
    return 0
