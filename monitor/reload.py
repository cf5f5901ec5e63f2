"""Config hot reload: SIGHUP or a changed file; invalid configs are refused, the old one runs on.

A reload parses the whole file first; any error leaves everything as it was
(the errors are logged with their lines, and hms_config_last_reload_successful
goes to 0). A valid config is then applied part by part: tokens and their
scopes, allowed targets, static services and their probes, dependencies,
maintenance windows, SLOs, workflows and notifications. A config that changes
a setting bound at start (the listen address, timeouts, turning auth or load
shedding on or off, storage, lease defaults, histogram buckets) is refused
whole, naming each such key: half a config in force is worse than the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel

from monitor.health.checker import latency_buckets

from .config import Config, ConfigError, load_config, needs_restart
from .convert import (
    bus_topic_label,
    definitions_from_config,
    dependencies,
    protect_reads,
    resources_from_config,
    service_probes,
    static_instances,
    tokens,
)
from .parts import LiveConfig, Parts

log = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0
Apply = Callable[[Config, Config], Awaitable[None]]


class Reloader:
    def __init__(
        self,
        path: Path,
        live: LiveConfig,
        apply: Apply,
        *,
        metrics: CollectorRegistry,
        watch_interval: float = WATCH_INTERVAL,
        audit: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        """`audit(by, applied)` hears each reload tried: by `sighup` or `config-file`."""
        self.path, self.live, self._apply = path, live, apply
        self._audit = audit
        self._interval = watch_interval
        self._lock = asyncio.Lock()
        self._digest = _digest(path)
        self._watcher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()
        self._signals = False
        self._reloads = Counter(
            "hms_config_reloads", "Config reloads by result", ["result"], registry=metrics
        )
        self._last = Gauge(
            "hms_config_last_reload_successful",
            "1 when the last reload was applied (or none was tried), 0 when it was refused",
            registry=metrics,
        )
        self._last.set(1)
        for result in ("success", "failure"):
            self._reloads.labels(result)

    def start(self, *, signals: bool) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="config-watch")
        if signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._signals = True

    async def close(self) -> None:
        if self._signals:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        tasks = [t for t in (self._watcher, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.path)
        task = asyncio.get_running_loop().create_task(self.reload(by="sighup"))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def reload(self, by: str = "sighup") -> bool:
        """Load, validate and apply the file; False (and the old config kept) when invalid.
        `by`: what asked (`sighup`, `config-file`), the actor of its audit record."""
        applied = await self._reload()
        if self._audit is not None:
            await self._audit(by, applied)
        return applied

    async def _reload(self) -> bool:
        async with self._lock:
            loop = asyncio.get_running_loop()
            self._digest = await loop.run_in_executor(None, _digest, self.path)
            try:
                new = await loop.run_in_executor(None, load_config, self.path)
            except ConfigError as exc:
                self._refused(f"{len(exc.errors)} error(s)", exc.errors)
                return False
            except OSError as exc:
                self._refused(str(exc), [])
                return False
            old = self.live.current
            fixed = restart_only_changes(old, new)
            if fixed:
                self._refused(
                    "these settings cannot change while the daemon runs; restart it to apply "
                    "them, or undo them to reload the rest",
                    [f"{key} changed" for key in fixed],
                )
                return False
            try:
                await self._apply(old, new)
            except Exception as exc:  # half applied is worse than refused: say so loudly
                log.exception("config reload: applying %s failed", self.path)
                self._refused(f"applying failed: {exc}", [])
                return False
            self.live.current = new
            self._reloads.labels("success").inc()
            self._last.set(1)
            log.info(
                "config reloaded from %s: %d service(s), %d workflow(s), %d notification(s)",
                self.path,
                len(new.services),
                len(new.workflows),
                len(new.notifications),
            )
            return True

    def _refused(self, why: str, errors: list[str]) -> None:
        self._reloads.labels("failure").inc()
        self._last.set(0)
        log.error("config reload refused, the running config stays (%s): %s", self.path, why)
        for error in errors:
            log.error("  %s", error)

    async def _watch(self) -> None:
        """Poll the file's content: works for editors that replace files and for mounted
        config maps that swap symlinks, where inotify on the path misses changes."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            digest = await loop.run_in_executor(None, _digest, self.path)
            if digest is not None and digest != self._digest:
                log.info("%s changed: reloading", self.path)
                await self.reload(by="config-file")


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-replace or removed: keep what runs, look again later


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys that changed and are bound at start (sockets, middleware, the database):
    the fields marked RESTART in monitor/config.py, and the switches below."""
    changed = list(_marked_changes(old, new))
    if (old.server.auth is None) != (new.server.auth is None):
        changed.append("server.auth (turning auth on or off)")
    if (old.server.overload_lag.total_seconds() == 0) != (
        new.server.overload_lag.total_seconds() == 0
    ):
        changed.append("server.overload_lag (turning load shedding on or off)")
    # Histogram boundaries are fixed once series exist; a boundary no longer needed is harmless.
    if not set(probe_latency_buckets(new)) <= set(probe_latency_buckets(old)):
        changed.append("defaults.latency_buckets or an SLO latency_threshold (histogram buckets)")
    return changed


def _marked_changes(old: BaseModel, new: BaseModel, path: str = "") -> Iterator[str]:
    for name, info in type(old).model_fields.items():
        key = f"{path}{name}"
        before, after = getattr(old, name), getattr(new, name)
        if needs_restart(info):
            if before != after:
                yield key
        elif isinstance(before, BaseModel) and isinstance(after, BaseModel):
            yield from _marked_changes(before, after, key + ".")


def probe_latency_buckets(config: Config) -> tuple[float, ...]:
    """The boundaries of hms_probe_duration_seconds that `config` asks for."""
    thresholds = [
        slo.latency_threshold.total_seconds()
        for service in config.services
        for slo in service.slos
        if slo.latency_threshold is not None
    ]
    return latency_buckets(config.defaults.latency_buckets, thresholds)


async def apply_config(parts: Parts, old: Config, new: Config) -> None:
    """Apply a validated config to the running parts (the module docstring has the rules)."""
    clock = parts.catalog.now()
    parts.calendar.replace(new.maintenance)
    parts.book.configure(dependencies(new))
    parts.checker.configure(new.defaults.probe, service_probes(new))
    parts.catalog.replace_static(static_instances(new), (s.name for s in new.services))
    parts.registry_routes.targets = new.server.targets
    parts.auth.replace(tokens(new), protect_reads=protect_reads(new))
    if new.server.auth != old.server.auth:  # open streams keep the grant they opened with
        parts.workflow_routes.end_streams()
    parts.workflow_routes.sse_buffer = new.server.sse_buffer
    parts.shedder.max_lag = new.server.overload_lag.total_seconds()
    await parts.slos.configure(new.services, clock)
    parts.slo_routes.services = {s.name for s in new.services}
    await parts.engine.configure_resources(resources_from_config(new))  # before definitions
    definitions = definitions_from_config(new)
    await parts.engine.configure(definitions)
    await parts.workflow_slos.configure(  # the API's definitions stay, with their SLOs
        {d.name: d.objective for d in parts.engine.definitions.values()},
        parts.processes.outcomes,
        clock,
    )
    await parts.notifier.configure(new.notifications)
    parts.bus.label = bus_topic_label(definitions, new)
    parts.slo_metrics.invalidate()
    parts.live.current = new  # in force: what readers of the live config see from now on
