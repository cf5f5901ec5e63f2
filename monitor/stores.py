"""Which stores the daemon runs on: the SQLite file (`storage.path`, one daemon) or a
PostgreSQL database (`storage.url`, any number of replicas). The one place that names the
implementations; every part takes its store through its package's Protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from monitor.audit.abc import AuditStore
from monitor.cluster.abc import MemberStore
from monitor.health.abc import ResultStore
from monitor.health.states_abc import HealthStateStore
from monitor.notify.abc import OutboxStore
from monitor.slo.abc import SloMinuteStore
from monitor.storage.database import Database
from registry.abc import RegistryStore
from workflows.abc import ResourceStore, ScheduleStore, TaskStore, WorkflowStore

from .config import Storage

if TYPE_CHECKING:  # psycopg (22 MB) is imported only when storage.url is set
    from monitor.storage.postgres import PgDatabase


@dataclass(frozen=True, slots=True)
class Stores:
    database: Database | PgDatabase
    registry: RegistryStore
    results: ResultStore
    slo_minutes: SloMinuteStore
    outbox: OutboxStore
    workflows: WorkflowStore
    tasks: TaskStore
    resources: ResourceStore
    schedules: ScheduleStore
    members: MemberStore
    audit: AuditStore
    # Each instance's health as its prober last saw it, for the other replicas (none on
    # SQLite: one daemon probes everything and keeps it in memory).
    health_states: HealthStateStore | None = None
    # The members' own connection (PostgreSQL): a renewal never queues behind the other
    # stores' writes (a take-over of every process, a prune), which would cost the leader
    # its lease by its own clock while it is busy with the work leading gave it.
    members_database: PgDatabase | None = None


def build_stores(storage: Storage) -> Stores:
    if storage.url is not None:
        return _postgres(storage.url)
    return _sqlite(storage)


def _sqlite(storage: Storage) -> Stores:
    from monitor.audit.stores.sqlite import SqliteAuditStore
    from monitor.cluster.stores.sqlite import SqliteMemberStore
    from monitor.health.stores.sqlite import SqliteResultStore
    from monitor.notify.stores.sqlite import SqliteOutboxStore
    from monitor.slo.stores.sqlite import SqliteSloMinuteStore
    from registry.stores.sqlite import SqliteRegistryStore
    from workflows.stores.sqlite import SqliteWorkflowStore
    from workflows.stores.sqlite_resources import SqliteResourceStore
    from workflows.stores.sqlite_schedules import SqliteScheduleStore
    from workflows.stores.sqlite_tasks import SqliteTaskStore

    db = Database(storage.path)
    return Stores(
        database=db,
        registry=SqliteRegistryStore(db),
        results=SqliteResultStore(db),
        slo_minutes=SqliteSloMinuteStore(db),
        outbox=SqliteOutboxStore(db),
        workflows=SqliteWorkflowStore(db),
        tasks=SqliteTaskStore(db),
        resources=SqliteResourceStore(db),
        schedules=SqliteScheduleStore(db),
        members=SqliteMemberStore(db),
        audit=SqliteAuditStore(db),
    )


def _postgres(url: str) -> Stores:
    from monitor.audit.stores.postgres import PgAuditStore
    from monitor.cluster.stores.postgres import PgMemberStore
    from monitor.health.stores.postgres import PgResultStore
    from monitor.health.stores.states_postgres import PgHealthStateStore
    from monitor.notify.stores.postgres import PgOutboxStore
    from monitor.slo.stores.postgres import PgSloMinuteStore
    from monitor.storage.postgres import SESSION_TAG, PgDatabase
    from registry.stores.postgres import PgRegistryStore
    from workflows.stores.postgres import PgWorkflowStore
    from workflows.stores.postgres_resources import PgResourceStore
    from workflows.stores.postgres_schedules import PgScheduleStore
    from workflows.stores.postgres_tasks import PgTaskStore

    db = PgDatabase(url)
    members_db = PgDatabase(url, application_name=f"{SESSION_TAG} cluster")
    return Stores(
        database=db,
        registry=PgRegistryStore(db),
        results=PgResultStore(db),
        slo_minutes=PgSloMinuteStore(db),
        outbox=PgOutboxStore(db),
        workflows=PgWorkflowStore(db),
        tasks=PgTaskStore(db),
        resources=PgResourceStore(db),
        schedules=PgScheduleStore(db),
        members=PgMemberStore(members_db, session=SESSION_TAG),
        audit=PgAuditStore(db),
        health_states=PgHealthStateStore(db),
        members_database=members_db,
    )
