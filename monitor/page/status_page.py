"""The status page: server-rendered HTML for people, live through the SSE stream.

Every page is built from memory (catalog, health book, SLO ledgers, uptime
rollup) or one query (workflow pages), never a query per row. The HTML stands
on its own without JavaScript; `static/page.js` only applies events as they
come. Assets are served by the daemon; the CSP allows nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from monitor.audit.abc import AuditQuery, AuditRecord
from monitor.cluster.membership import Membership
from monitor.config import Config
from monitor.health.book import HealthBook
from monitor.health.uptime import Uptime, UptimeSummary
from monitor.http.errors import HttpError
from monitor.slo.book import SloBook
from registry import Catalog, HealthState, InstanceStatus
from scheduler import Event, EventBus, Subscription
from workflows.engine import Engine
from workflows.states import STATUSES

if TYPE_CHECKING:
    import jinja2

SERVICES_PER_PAGE = 200
SLICE = 0.002  # seconds of page building or rendering between turns of the loop
INSTANCES_PER_PAGE = 500
RECENT_CHANGES = 20
RECENT_PROCESSES = 50
AUDIT_ROWS = 200
# Worst first: a service shows the worst state among its instances.
SEVERITY = (
    HealthState.CRITICAL,
    HealthState.WARNING,
    HealthState.UNKNOWN,
    HealthState.MAINTENANCE,
    HealthState.PASSING,
)
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
NO_DATA = "\N{EN DASH}"
ASSETS = {"page.css": "text/css", "page.js": "text/javascript"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRow:
    name: str
    state: HealthState
    counts: Mapping[str, int]
    uptime: UptimeSummary
    objective: float  # percent: what a day's bar is measured against
    budget: float | None  # lowest error budget remaining among its SLOs
    sla: float | None  # this month's availability (ratio) of its first SLO


@dataclass(slots=True)
class _Group:
    name: str
    services: list[ServiceRow] = field(default_factory=list)


class StatusPage:
    def __init__(
        self,
        *,
        catalog: Catalog,
        book: HealthBook,
        slos: SloBook,
        uptime: Uptime,
        engine: Engine,
        bus: EventBus,
        config: Callable[[], Config],
        clock: Callable[[], float],
        audit: Callable[[AuditQuery], Awaitable[list[AuditRecord]]],
        membership: Membership | None = None,
    ) -> None:
        self._membership, self._audit = membership, audit
        self._catalog, self._book, self._slos, self._uptime = catalog, book, slos, uptime
        self._engine, self._bus, self._config, self._clock = engine, bus, config, clock
        self._changes: dict[str, deque[Event]] = {}
        self._subscription: Subscription | None = None
        self._assets = {name: _asset(name) for name in ASSETS}

    @functools.cached_property
    def _templates(self) -> jinja2.Environment:
        """Made on the first page: Jinja2 is 1.6 MB of RSS a daemon nobody looks at never needs."""
        import jinja2

        templates = jinja2.Environment(
            loader=jinja2.PackageLoader("monitor.page", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        templates.filters.update(
            when=_when, ago=self._ago, percent=_percent, seconds=_seconds, day=_day
        )
        templates.globals.update(bar_class=_bar_class, sparkline=_sparkline, slo_class=_slo_class)
        return templates

    async def start(self) -> None:
        self._subscription = self._bus.subscribe(
            "health.changed", self._remember, name="status-page"
        )

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()

    def _remember(self, event: Event) -> None:
        service = str(event.data.get("service"))
        self._changes.setdefault(service, deque(maxlen=RECENT_CHANGES)).appendleft(event)

    # -- pages (monitor/http/routes/page.py serves them; `page` is the raw query value;
    # `audit_link`: the reader may open /audit, so the nav links to it) --

    async def overview(self, page_number: str | None, *, audit_link: bool) -> web.Response:
        now = self._clock()
        self._slos.evaluate(now)
        names = self._catalog.service_names()
        page, pages = _page(page_number, len(names), SERVICES_PER_PAGE)
        shown = names[page * SERVICES_PER_PAGE : (page + 1) * SERVICES_PER_PAGE]
        groups: dict[str, _Group] = {}
        slices = _Slices()
        for name in shown:
            statuses = self._catalog.instances(name)
            row = self._service_row(name, statuses, now)
            group = self._group_of(name, statuses)
            groups.setdefault(group, _Group(group)).services.append(row)
            await slices.pause()
        # The banner speaks for every service, not only those on this page.
        states = []
        for name in names:
            states.append(_worst([s.health for s in self._catalog.instances(name)]))
            await slices.pause()
        return await self._render(
            "overview.html",
            title="Status",
            groups=sorted(groups.values(), key=lambda g: (g.name == "Other", g.name)),
            worst=_worst(states),
            state_counts=Counter(state.value for state in states),
            service_count=len(names),
            page=page,
            pages=pages,
            topics="health.changed",
            resources=self._resources(),
            replicas=self._replicas(),
            audit_link=audit_link,
        )

    def _replicas(self) -> list[dict[str, Any]]:
        """The live replicas as this one sees them: which leads, how many probe shards each
        has."""
        membership = self._membership
        if membership is None:
            return []
        owners = Counter(membership.owners())
        return [
            {
                "replica_id": member.replica_id,
                "leader": member.key == membership.leader,
                "shards": owners[member.key],
            }
            for member in membership.members
        ]

    def _resources(self) -> list[dict[str, Any]]:
        """Each configured resource: capacity (per key when steps give one), units in use,
        processes waiting; from the engine's pool in memory."""
        pool = self._engine.resources
        if pool is None:
            return []
        return [
            {
                "name": name,
                "capacity": capacity,
                "in_use": pool.in_use.get(name, 0),
                "waiting": pool.waiting.get(name, 0),
            }
            for name, capacity in sorted(pool.capacities.items())
        ]

    async def service(
        self, name: str, page_number: str | None, *, audit_link: bool
    ) -> web.Response:
        if name not in self._catalog.service_names():
            raise HttpError(404, f"no service named {name!r}")
        now = self._clock()
        statuses = self._catalog.instances(name)
        page, pages = _page(page_number, len(statuses), INSTANCES_PER_PAGE)
        shown = statuses[page * INSTANCES_PER_PAGE : (page + 1) * INSTANCES_PER_PAGE]
        instances = [self._instance(status) for status in shown]
        return await self._render(
            "service.html",
            title=name,
            service=self._service_row(name, statuses, now),
            instances=instances,
            changes=list(self._changes.get(name, ())),
            slos=self._slos.statuses(name, now) or [],
            page=page,
            pages=pages,
            topics="health.changed",
            audit_link=audit_link,
        )

    async def workflows(self, *, audit_link: bool) -> web.Response:
        counts = self._engine.counts
        rows = [
            {"name": name, "counts": {s: counts.get((name, s), 0) for s in STATUSES}}
            for name in sorted(self._engine.definitions)
        ]
        recent = await self._engine.store.page(None, None, RECENT_PROCESSES, None)
        live = self._engine.live
        return await self._render(
            "workflows.html",
            title="Workflows",
            workflows=rows,
            statuses=STATUSES,
            processes=[live.get(p.id, p).summary() for p in recent],
            topics="workflow.*",
            audit_link=audit_link,
        )

    async def process(self, process_id: str, *, audit_link: bool) -> web.Response:
        described = await self._engine.describe(process_id)
        if described is None:
            raise HttpError(404, f"no process {process_id!r}")
        return await self._render(
            "process.html",
            title=f"{described['workflow']} {described['id']}",
            process=described,
            steps=_timeline(described["history"]),
            topics="workflow.*",
            audit_link=audit_link,
        )

    async def audit(self, actor: str, action: str) -> web.Response:
        """The newest AUDIT_ROWS records, filtered by actor and action (a prefix ending in
        `*`, as GET /v1/audit takes it). Only for readers of the trail: the route checks."""
        records = await self._audit(
            AuditQuery(actor=actor or None, action=action or None, limit=AUDIT_ROWS, newest=True)
        )
        return await self._render(
            "audit.html",
            title="Audit",
            records=records,
            actor=actor,
            action=action,
            shown=AUDIT_ROWS,
            topics="",
            audit_link=True,
        )

    async def forbidden(self, message: str, target: str, *, audit_link: bool) -> web.Response:
        """A 403 as a page: what is missing, and a sign-in that could bring it."""
        response = await self._render(
            "forbidden.html",
            title="Not allowed",
            message=message,
            next=target,
            topics="",
            audit_link=audit_link,
        )
        response.set_status(403)
        return response

    async def asset(self, name: str) -> web.Response:
        if name not in self._assets:
            raise HttpError(404, f"no asset {name!r}")
        return web.Response(
            body=self._assets[name],
            content_type=ASSETS[name],
            headers={**HEADERS, "Cache-Control": "public, max-age=300"},
        )

    async def login_page(
        self, target: str, *, audit_link: bool, error: str = "", status: int = 200
    ) -> web.Response:
        """The sign-in form (monitor/http/routes/login.py serves it)."""
        response = await self._render(
            "login.html",
            title="Sign in",
            next=target,
            error=error,
            topics="",
            audit_link=audit_link,
        )
        response.set_status(status)
        return response

    def _service_row(self, name: str, statuses: list[InstanceStatus], now: float) -> ServiceRow:
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status.health.value] = counts.get(status.health.value, 0) + 1
        summaries = self._slos.summaries(name, now)
        budgets = [s.budget for s in summaries if s.budget is not None]
        configured = self._config().service(name)
        objective = configured.slos[0].objective if configured and configured.slos else 99.9
        return ServiceRow(
            name=name,
            state=_worst([HealthState(state) for state in counts]),
            counts=counts,
            uptime=_frozen(self._uptime.summary(name, now)),
            objective=objective,
            budget=min(budgets) if budgets else None,
            sla=summaries[0].sla if summaries else None,
        )

    def _group_of(self, name: str, statuses: list[InstanceStatus]) -> str:
        configured = self._config().service(name)
        if configured is not None and configured.tags:
            return configured.tags[0]
        tags = next((s.instance.tags for s in statuses if s.instance.tags), ())
        return tags[0] if tags else "Other"

    def _instance(self, status: InstanceStatus) -> dict[str, Any]:
        instance = status.instance
        detail = self._book.status((instance.service, instance.id)) or {}
        return {
            "id": instance.id,
            "url": instance.url,
            "state": status.health.value,
            "since": detail.get("since"),
            "reason": detail.get("reason", "lease lapsed" if status.lapsed else ""),
            "suppressed": detail.get("suppressed", False),
            "failing": detail.get("failing", []),
            "last_probe": detail.get("last_probe"),
        }

    async def _render(self, template: str, **context: Any) -> web.Response:
        """Render in slices, giving the loop back every few milliseconds: `/` for 10,000
        instances is ~100 ms of Jinja, which in one piece would hold every heartbeat
        behind it. `context` is a snapshot (fresh rows, dicts and copies), so what the
        loop changes between slices is not read half-updated."""
        parts, slices = [], _Slices()
        chunks = self._templates.get_template(template).generate(now=self._clock(), **context)
        for n, chunk in enumerate(chunks):
            parts.append(chunk)
            if n % 8 == 0:  # a chunk can be a whole macro call (a row of 90 bars)
                await slices.pause()
        return web.Response(text="".join(parts), content_type="text/html", headers=HEADERS)

    def _ago(self, at: float | None) -> str:
        if at is None:
            return "never"
        seconds = max(0.0, self._clock() - at)
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"{int(seconds // size)} {unit} ago"
        return f"{int(seconds)} s ago"


class _Slices:
    """Yields to the loop once SLICE seconds of work have passed since the last yield.

    Slices, not a worker thread: a thread rendering holds the GIL in 5 ms turns, and the
    loop waits for a turn at every wake-up, so heartbeats still queued behind the render
    (p99 122 ms with `/` loaded once a second, bench.page; 546 ms rendering on the loop)."""

    def __init__(self) -> None:
        self._since = time.perf_counter()

    async def pause(self) -> None:
        if time.perf_counter() - self._since >= SLICE:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


def _frozen(summary: UptimeSummary) -> UptimeSummary:
    """The summary with copies of its day tallies (the live ones change as probes land)."""
    days = tuple((day, dataclasses.replace(t) if t else None) for day, t in summary.days)
    return dataclasses.replace(summary, days=days)


def _asset(name: str) -> bytes:
    return resources.files("monitor.page").joinpath("static", name).read_bytes()


def _page(raw: str | None, total: int, size: int) -> tuple[int, int]:
    pages = max(1, math.ceil(total / size))
    try:
        page = int(raw if raw is not None else "1") - 1
    except ValueError:
        raise HttpError(400, "page must be a whole number") from None
    if not 0 <= page < pages:
        raise HttpError(400, f"page must be between 1 and {pages}")
    return page, pages


def _worst(states: list[HealthState]) -> HealthState:
    return min(states, key=SEVERITY.index) if states else HealthState.UNKNOWN


def _timeline(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History grouped by step (in the order steps first ran), attempts in order."""
    steps: dict[tuple[str, bool], dict[str, Any]] = {}
    for attempt in history:
        compensation = attempt["kind"] == "compensate"
        step = steps.setdefault(
            (attempt["step"], compensation),
            {"name": attempt["step"], "compensation": compensation, "attempts": []},
        )
        step["attempts"].append(attempt)
        step["outcome"] = attempt["outcome"]
    return list(steps.values())


def _bar_class(tally: Any, objective: float) -> str:
    if tally is None or tally.ratio is None:
        return "none"
    if tally.ratio * 100 >= objective:
        return "up"
    return "partial" if tally.ratio >= 0.9 else "down"


def _slo_class(slo: Mapping[str, Any]) -> str:
    """An SLO line's colour: `down` (red) once the period's budget is spent, `partial`
    (amber) while the last hour burns it faster than the period allows (over 1x), else
    `up`; `none` without data."""
    budget = slo.get("error_budget_remaining")
    if budget is None:
        return "none"
    if budget <= 0:
        return "down"
    burn = (slo.get("burn_rates") or {}).get("1h")
    return "partial" if burn is not None and burn > 1 else "up"


def _sparkline(values: tuple[float | None, ...], width: int = 96, height: int = 24) -> str:
    """SVG polyline points for hourly latencies (gaps skipped), scaled to the maximum."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    top = max(known) or 1.0
    step = width / max(1, len(values) - 1)
    points = [
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}"
        for i, v in enumerate(values)
        if v is not None
    ]
    if len(points) == 1:  # a service's first hour: one point draws nothing, so a short dash
        x, y = (float(c) for c in points[0].split(","))
        points.insert(0, f"{max(0.0, x - 4):.1f},{y:.1f}")
    return " ".join(points)


def _when(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=512)  # the same 90 days under every service's bars
def _day(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


def _percent(ratio: float | None, digits: int = 2) -> str:
    return NO_DATA if ratio is None else f"{ratio * 100:.{digits}f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return NO_DATA
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
