"""The workflow engine: durable processes that call services step by step.

Each process in memory is one asyncio task that loops: do the next unit of
work (a delay, an attempt, a wait, a compensation), checkpoint its outcome,
go on. Everything a restart needs is in the process row (workflows/records.py).
Only processes running or due soon are in memory (workflows/residency.py):
one waiting beyond the horizon leaves it at its wait and comes back when due,
or when a cancel, a signal or an event it waits for arrives. On start the
processes due resume from their last checkpoint, and their timers (delay,
retry backoff, wait timeout, deadline) are re-armed from the stored due
times, firing at once when they passed during downtime. A step
runs a second time only when the daemon died between the call and its
checkpoint, and then with the same `Idempotency-Key`.

Failure: a step that fails for good (non-retryable, or out of attempts)
starts compensation: the `compensate` calls of the done steps, in reverse
order, each retried. The process ends `compensated`, or `failed` when a
compensation fails for good or there was nothing to compensate. Cancel does
the same and ends `cancelled`. A passed deadline marks the process, publishes
`workflow.deadline_missed` and counts against the workflow's SLO; the process
keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import orjson

from registry import StoreUnavailable
from scheduler import EventBus

from .abc import ResourceStore, ScheduleMark, ScheduleStore, TaskStore, WorkflowStore
from .caller import ServiceCaller
from .definition import Definition, Parallel, Resource
from .describe import describe_process
from .errors import (
    DefinitionConflict,
    Fenced,
    InvalidDefinition,
    ProcessFinished,
    UnknownProcess,
    UnknownWorkflow,
)
from .metrics import WorkflowMetrics
from .records import Attempt, NewEvent, Process, StoredDefinition, StoredEvent, projection
from .residency import HORIZON, Residency
from .resources import ResourcePool
from .runner import Outcome, Parked, ProcessRunner
from .schedules import RECHECK, Schedules
from .states import BranchState, ProcessStatus, WaitKind
from .tasks import TaskQueues
from .waits import EventWaits, SignalWaits, Wakeups

__all__ = ["Engine", "Outcome", "Parse"]

log = logging.getLogger("workflows.engine")
# A branch that ended so: a `respond_after` naming it has answered (its step did for the main line).
_GONE_PAST = frozenset({BranchState.DONE, BranchState.SKIPPED})

READS = 3  # of a process's history, while checkpoints commit under the read
WAKE_LIMIT = 100_000  # processes waiting as rows one event brings back at once


class Parse(Protocol):
    """A stored definition's JSON back into a Definition (the root's: workflows/ cannot
    know config.yaml's schema). Raises ValueError when it no longer validates. `source`
    is the version's ("config": stored as config.yaml wrote it, `${VAR}` unexpanded);
    `capacities` the running resources a new definition's `acquire`s must fit."""

    def __call__(
        self,
        spec: Mapping[str, Any],
        /,
        *,
        source: str = "api",
        capacities: Mapping[str, int] | None = None,
    ) -> Definition: ...


class Engine:
    """The facade: starts, publishes, cancels and describes; owns each process's task.

    The loop itself is workflows/runner.py, what processes wait on workflows/waits.py,
    the view of a process workflows/describe.py.
    """

    def __init__(
        self,
        definitions: Iterable[Definition],
        *,
        store: WorkflowStore,
        caller: ServiceCaller,
        bus: EventBus,
        metrics: WorkflowMetrics,
        clock: Callable[[], float] = time.time,
        outcome: Outcome | None = None,
        jitter: Callable[[], float] = random.random,
        tasks: TaskStore | None = None,
        parse: Parse | None = None,
        declare: Callable[[Definition], None] = lambda definition: None,
        resources: Iterable[Resource] = (),
        resource_store: ResourceStore | None = None,
        schedules: ScheduleStore | None = None,
        owner: Callable[[], str | None] = lambda: None,
        acting: Callable[[], bool] = lambda: True,
        horizon: float = HORIZON,
    ) -> None:
        self.store, self.caller, self._bus, self._metrics = store, caller, bus, metrics
        self._clock, self._parse = clock, parse
        # Replicas: the member key this engine's processes are written under (read at each
        # open: a replica that rejoined has a new one); checkpoints of processes another
        # replica's engine took over are fenced. None: one daemon, no owner.
        self._owner, self._me = owner, owner()
        # Whether this replica still leads, asked before each call, publish or task
        # (runner.py); the root sets it once it knows the leadership.
        self.acting = acting
        self._declare = declare  # told of each definition in force (its SLO ledger)
        self._versions: dict[tuple[str, int], Definition] = {}  # every one processes may run
        self._latest: dict[str, Definition] = {}  # the newest stored version, by name
        self._newest: dict[str, int] = {}  # the highest stored version, parsed or not
        self._api: dict[str, Definition] = {}  # the newest API definition, by name
        # Versioned with the store at open; none is in _versions before: a process of a
        # stored version that no longer parses must fail, not run today's definition.
        self._config = {d.name: d for d in definitions}
        # Definitions change one at a time (define, configure): each compares against and
        # installs what the one before left, and route uniqueness holds across names.
        self._defining = asyncio.Lock()
        self._schedule_store = schedules  # None: `trigger: {schedule}` workflows never fire
        # Task steps' queues (workflows/tasks.py); None: a task step fails, not served. The
        # queues and the pool are one object each for the engine's life (routes and metric
        # collectors hold them); each open rebuilds their state from the store.
        self.tasks = TaskQueues(tasks, clock=clock, wake=self._wake) if tasks is not None else None
        # Resources steps `acquire` (workflows/resources.py); None: such a step fails.
        self.resources = (
            ResourcePool(resource_store, resources, wake=self._wake, clock=clock)
            if resource_store is not None
            else None
        )
        self._outcome, self._jitter = outcome, jitter
        # Processes due later than this wait as rows (workflows/residency.py); read at open.
        self.horizon = horizon
        self.serving = False  # between open and close: processes run here
        self._term = 0  # counts opens: a start that straddled a close+open knows it
        self._new_term()
        self._install()

    def _new_term(self) -> None:
        """Fresh runtime state: each open starts from the store alone, so nothing of the
        last term (a replica that lost leadership and won it back) carries over."""
        clock = self._clock
        self._term += 1
        self._resumed: set[str] = set()  # the processes this term's open read and runs
        self.live: dict[str, Process] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._awaited: Counter[str] = Counter()  # `?wait=`s on each process, in memory or not
        self.counts: Counter[tuple[str, str]] = Counter()  # (workflow, status)
        self._stopping = False
        # Event keys (workflows/records.py match_key) main lines wait on, by topic: a
        # publish on one makes the rows it matches due in its own write, then reads them
        # in. Known from the store at open, and as waits begin (a superset: never removed
        # until the next open).
        self._waited_keys: dict[str, set[str]] = {}
        # New processes between their row's commit and their spawn: the residency loop
        # must not read one in meanwhile (its creator spawns it; two copies would run).
        self._creating: set[str] = set()
        self._residency = Residency(
            self.store,
            clock=clock,
            live=self.live,
            creating=self._creating,
            spawn=self._resume,
            owner=lambda: self._me,
            horizon=self.horizon,
        )
        self._wakeups = Wakeups(clock)
        self._waits = EventWaits(self._bus, self._wakeups.wake)
        self._signals = SignalWaits(self._wakeups.wake)
        self._schedules = (
            Schedules(self._schedule_store, self._start_scheduled, clock, RECHECK)
            if self._schedule_store is not None
            else None
        )
        self._runner = ProcessRunner(
            definition=self.definition_of,
            store=self.store,
            caller=self.caller,
            bus=self._bus,
            metrics=self._metrics,
            publish=self.publish,
            counts=self.counts,
            wakeups=self._wakeups,
            waits=self._waits,
            clock=clock,
            outcome=self._outcome,
            jitter=self._jitter,
            signals=self._signals,
            respond=self._respond,
            tasks=self.tasks,
            resources=self.resources,
            acting=lambda: self.serving and self.acting(),
            horizon=self.horizon,
            waiting_on=self._waiting_on,
        )

    def _waiting_on(self, topic: str, keys: str) -> None:
        """Main lines wait on `topic` with matches on `keys` (stored ones, or one beginning)."""
        self._waited_keys.setdefault(topic, set()).add(keys)

    def _wake(self, process_id: str) -> None:
        """Wake a process of the current term (the queues and the pool outlive terms)."""
        self._wakeups.wake(process_id)

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Create tables, load counts and resume every unfinished process. Again after
        `close` (leadership regained): everything is read from the store anew."""
        self._new_term()
        await self.store.create_tables()
        if self.tasks is not None:
            await self.tasks.store.create_tables()
            self.tasks.restart()
        # Another replica may have defined versions while this one was not serving.
        self._versions, self._latest, self._newest, self._api = {}, {}, {}, {}
        self._unloadable: list[tuple[str, int]] = []  # versions whose processes fail at open
        for stored in await self.store.definitions():
            self._restore(stored)
        await self._configure(self._config.values())
        self._bus.start_after(await self.store.last_event_seq())
        self.counts.update(await self.store.counts())
        for signal in await self.store.pending_signals():
            self._signals.keep(signal)
        self._me = self._owner()
        if self._me is not None:  # a new leader: what its predecessor may hold is its own now,
            # its predecessor fenced; the rest becomes its own as it reads them (residency.py)
            now, margin = self._clock(), 2 * self.horizon  # the predecessor's horizon, and more
            await self.store.take_over(self._me, now + margin, now - margin)
        for topic, keys in await self.store.waiting_keys():
            self._waiting_on(topic, keys)
        if self.resources is not None:  # holds and queues back before any process runs
            await self.resources.open(self.store.unfinished_of)
        if self._schedules is not None:  # before the processes run
            await self._schedules.open()
        self.serving = True
        # The first page of those due; the loop reads the rest once the daemon answers.
        await self._residency.open()
        for name, version in self._unloadable:  # they fail now, not when next due
            await self._residency.load(await self.store.unfinished_of_version(name, version))
        self._residency.start()
        if self._schedules is not None:  # last: a missed tick's process starts after these
            self._schedules.start()

    @property
    def owner_current(self) -> bool:
        """Whether processes are still written under this replica's member key (False
        once it rejoined under a new one: the engine must open again to take them over)."""
        return self._me == self._owner()

    async def close(self) -> None:
        """Stop every task; their state is what the last checkpoint says. When this
        returns nothing of this term writes any more (another replica may take over)."""
        self.serving = False
        self._stopping = True
        if self._schedules is not None:
            await self._schedules.close()
        await self._residency.close()
        await self._runner.deadlines.close()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tasks is not None:
            await self.tasks.close()
        for done in self._done.values():  # a `?wait=` answers now, from the store
            done.set()
        self.live, self.counts = {}, Counter()  # the leader's to show now

    async def prune(self, retention: float, event_retention: float | None = None) -> None:
        """Forget processes that finished more than `retention` seconds ago and events
        published more than `event_retention` ago (default: the same); a scheduler job."""
        if not self.serving:  # the replica running the engine prunes
            return
        now = self._clock()
        events = retention if event_retention is None else event_retention
        self.counts.subtract(await self.store.prune(now - retention, now - events))
        if self.tasks is not None:  # a finished process's tasks ended no later than it
            await self.tasks.store.prune(now - retention)

    # -- starting ----------------------------------------------------------------

    async def start(
        self,
        name: str,
        input_: Mapping[str, Any],
        idempotency_key: str | None = None,
        *,
        by: str,
    ) -> tuple[Process, bool]:
        """Start a process (durable when this returns); the same key gives the same one.
        `by`: who starts it (its `started_by`)."""
        self._check_serving()
        definition = self.definitions.get(name)
        if definition is None:
            raise UnknownWorkflow(f"no workflow named {name!r}")
        if idempotency_key is not None:  # a retried start writes nothing (and is no change)
            known = await self.store.by_key(name, idempotency_key)
            if known is not None:
                return self.live.get(known.id, known), False
        term, fresh = self._term, self._new(definition, input_, idempotency_key, by)
        with self._being_created([fresh]):
            [(process, new)], _ = await self.store.create([fresh], None)
            if new:
                await self._run_created([process], term)
        return self.live.get(process.id, process), new

    async def publish(
        self, topic: str, data: Mapping[str, Any], key: str | None = None, *, by: str
    ) -> int | None:
        """Store an event and the processes it triggers in one transaction, then deliver it.
        `by`: who publishes it, kept with it and delivered beside its data.

        Returns the event's sequence number (None when `key` was published before).
        """
        self._check_serving()
        key = key or secrets.token_hex(12)
        now = self._clock()
        # One encoding: the stored row, and (decoded again) the event every subscriber and
        # waiting process gets, a snapshot nobody shares with whoever published it.
        encoded = orjson.dumps(data)
        snapshot: dict[str, Any] = orjson.loads(encoded)
        triggered = self._triggers.get(topic, ())
        processes = [self._new(d, snapshot, f"event:{key}", f"event:{topic}") for d in triggered]
        reserved, term = self._bus.reserve(), self._term
        # Read right after the reservation: a wait that begins later takes only later ids.
        wakes = tuple(projection(keys, snapshot) for keys in self._waited_keys.get(topic, ()))
        event = NewEvent(
            seq=reserved,
            topic=topic,
            data=encoded,
            key=key,
            published_at=now,
            actor=by,
            wakes=wakes,
        )
        if wakes:  # the rows it makes due are behind the loop's cursor: it reads from now
            self._residency.rewind(now)
        seq = None
        with self._being_created(processes):
            try:
                created, seq = await self.store.create(processes, event)
            finally:
                if seq is None:  # a duplicate key, or the write failed
                    self._bus.release(reserved)
                    self._waits.deliver()  # the release may let later events through
            await self._run_created([p for p, new in created if new], term)
        if seq is not None:
            self._bus.publish(topic, snapshot, reserved=seq, actor=by)
            stored = StoredEvent(seq=seq, topic=topic, data=snapshot, published_at=now, actor=by)
            self._waits.deliver(stored)
            try:  # the rows are due already (the write): this only brings them in sooner
                for match in wakes:
                    await self._wake_parked(topic, match)
            except StoreUnavailable as exc:  # the event is stored: the loop reads them
                log.warning("waiters of %s event %d are read in by the loop: %s", topic, seq, exc)
        return seq

    async def _wake_parked(self, topic: str, match: str) -> None:
        """Bring back the processes waiting as rows that this event matches (the event's
        write made them due): each finds it as a restart would (`events_since` its wait
        began). One that parks meanwhile wrote its row first, so the read finds it."""
        ids = await self.store.waiters(topic, match, WAKE_LIMIT)
        if len(ids) == WAKE_LIMIT:  # the rest are due now: the loop reads them, as room allows
            log.info("event %s wakes over %d processes waiting as rows", topic, WAKE_LIMIT)
        await self._residency.load(ids)

    async def _start_scheduled(self, mark: ScheduleMark, scheduled_at: str) -> None:
        """A schedule's tick: its process and the schedule's new mark in one transaction;
        the key makes a tick that started its process before start none again."""
        definition = self.definitions.get(mark.workflow)
        if definition is None:  # removed since the loop's last look: nothing is owed
            return
        key = f"schedule:{mark.workflow}:{int(mark.tick)}"
        input_ = {"scheduled_at": scheduled_at}
        process, term = self._new(definition, input_, key, "schedule"), self._term
        with self._being_created([process]):
            [(process, new)], _ = await self.store.create([process], None, schedule=mark)
            if new:
                await self._run_created([process], term)

    def _new(
        self, definition: Definition, input_: Mapping[str, Any], key: str | None, by: str
    ) -> Process:
        now = self._clock()
        deadline = now + definition.deadline if definition.deadline is not None else None
        process_id = f"{int(now * 1000):012x}{secrets.token_hex(6)}"  # sorts by start time
        return Process(
            id=process_id,
            workflow=definition.name,
            workflow_version=definition.version,
            status=ProcessStatus.STARTED,
            input=dict(input_),
            outputs={},
            idempotency_key=key,
            created_at=now,
            updated_at=now,
            deadline_at=deadline,
            owner=self._me,
            due_at=now,  # running: in memory until it waits
            started_by=by,
        )

    async def _run_created(self, processes: list[Process], term: int) -> None:
        """Run processes just stored by a call that began in `term`. When the engine
        closed meanwhile they wait in the store for the next open; when it also opened
        again, that open may not have read them (the write committed after its read):
        those it did not read run now, as the store has them."""
        if term == self._term and self.serving:  # no await: publish delivers after this
            for process in processes:
                self._started(process)
            return
        for process in processes:
            if process.id in self._resumed or not self.serving:
                continue
            stored = await self.store.get(process.id)
            current = stored[0] if stored is not None else None
            if current is None or current.finished or not self.serving:
                continue
            if process.id not in self._resumed and process.id not in self.live:
                self._resume(current)

    @contextlib.contextmanager
    def _being_created(self, processes: list[Process]) -> Iterator[None]:
        """While new processes' rows are written and until they run: not the residency
        loop's to read in."""
        creating = self._creating  # this term's: a close and open meanwhile makes another
        ids = [p.id for p in processes]
        creating.update(ids)
        try:
            yield
        finally:
            creating.difference_update(ids)

    def _resume(self, process: Process) -> None:
        """A stored process back in memory (at open, when due, or for a request). It runs
        under this engine's member key, whatever its row says: a deposed leader that
        reads a row after its successor took them over is fenced by it."""
        process.owner = self._me
        self._resumed.add(process.id)
        self._spawn(process)

    def _started(self, process: Process) -> None:
        self.counts[(process.workflow, process.status)] += 1
        self._metrics.started(process.workflow)
        self._runner.emit("workflow.started", process)
        self._spawn(process)

    def _spawn(self, process: Process) -> None:
        self.live[process.id] = process
        self._wakeups.add(process.id)
        answered = self._done.setdefault(process.id, asyncio.Event())
        if self._past_response(process):  # resumed past its `respond_after`: answer at once
            answered.set()
        self._runner.deadlines.arm(process)
        task = asyncio.create_task(self._run(process), name=f"process:{process.id}")
        self._tasks[process.id] = task

    # -- requests on running processes -------------------------------------------

    async def cancel(self, process_id: str, *, by: str) -> Process:
        """Ask a process to stop and compensate (durable when this returns); `by`: who asks
        (its `cancelled_by`: the first to ask, as a second ask changes nothing)."""
        process = await self._running(process_id)
        if not process.cancel_requested:
            due = process.due_at
            process.cancel_requested, process.cancelled_by = True, by
            process.updated_at = process.due_at = self._clock()  # due now, even after a crash
            try:
                await self.store.checkpoint(process)  # durable before the 202
            except StoreUnavailable:
                process.cancel_requested, process.due_at = False, due  # the 503: not made
                process.cancelled_by = None
                raise
            self._wakeups.wake(process.id)
        return process

    async def signal(
        self, process_id: str, name: str, data: Mapping[str, Any], *, by: str
    ) -> Process:
        """Keep a signal for a running process (durable when this returns) and wake it when
        a step waits for that name; a step takes each signal once, its history row naming
        `by` (who sent it)."""
        process = await self._running(process_id)
        if process.finished:  # its last checkpoint is being written
            raise ProcessFinished(f"process {process_id} is {process.status}")
        encoded = orjson.dumps(data)
        at = self._clock()
        self._residency.rewind(at)  # add_signal makes it due now: behind the loop's cursor
        signal = await self.store.add_signal(process_id, name, encoded, at, by)
        if process.finished:
            # It finished meanwhile: nothing will take it (the row goes with the process).
            raise ProcessFinished(f"process {process_id} is {process.status}")
        self._signals.keep(signal)
        if process_id not in self.live:  # it parked meanwhile: back, to take it
            await self._residency.load([process_id])
            if process_id not in self.live:  # finished meanwhile (another copy of it did)
                stored = await self.store.get(process_id)
                status = stored[0].status if stored is not None else "gone"
                raise ProcessFinished(f"process {process_id} is {status}")
        return process

    def _check_serving(self) -> None:
        """Only the replica running the engine starts or changes processes: a request that
        reached another (leadership just moved) is refused, to be sent again."""
        if not self.serving or not self.acting():  # acting: this replica's own clock
            raise StoreUnavailable("the workflow engine is not running on this replica")

    async def _running(self, process_id: str) -> Process:
        """The live process (brought into memory when it waits as a row), else
        UnknownProcess (404) or ProcessFinished (409)."""
        self._check_serving()
        if process_id not in self.live:
            await self._residency.load([process_id])
        process = self.live.get(process_id)
        if process is None:
            stored = await self.store.get(process_id)
            if stored is None:
                raise UnknownProcess(f"no process {process_id!r}")
            raise ProcessFinished(f"process {process_id} is {stored[0].status}")
        return process

    async def wait(self, process_id: str, seconds: float) -> bool:
        """True when the process has finished within `seconds`, or done its workflow's
        `respond_after` step."""
        done = self._done.get(process_id)
        if done is None:  # not in memory: finished already (or unknown), or waiting as a row
            began = time.monotonic()
            stored = await self.store.get(process_id)
            if stored is None or stored[0].finished or self._past_response(stored[0]):
                return True
            if process_id in self.live or self._residency.left_after(process_id, began):
                return await self.wait(process_id, seconds)  # it moved while it was read
            done = self._done.setdefault(process_id, asyncio.Event())  # set when it ends
        self._awaited[process_id] += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await done.wait()
        finally:
            self._awaited[process_id] -= 1
            if not self._awaited[process_id]:
                del self._awaited[process_id]
                if process_id not in self.live:  # a row again: its answer waits for nobody
                    self._done.pop(process_id, None)
        return done.is_set()

    # -- the process task --------------------------------------------------------

    async def _run(self, process: Process) -> None:
        parked = False
        try:
            await self._runner.run(process)
        except Parked:  # waits beyond the horizon: a row until due (or woken)
            parked = True
        except Fenced:  # another replica's engine took it over: it is theirs to run
            log.warning("process %s: taken over by another replica; stops here", process.id)
        finally:
            if process.finished or not self._stopping:
                self._forget(process, parked=parked)

    # -- definitions -------------------------------------------------------------

    async def configure(self, definitions: Iterable[Definition]) -> None:
        """Take config.yaml's definitions (at open, and on a reload): one that changed since
        the last stored version of its name becomes a new version. A running process keeps
        the version it started with; new starts and triggers use the new ones. API
        definitions stay, but config.yaml wins a name both define. All or nothing: the
        new versions are stored in one transaction, and nothing changes when it fails.
        While the engine is closed they are only kept: the next open stores them."""
        if not self.serving:
            self._config = {d.name: d for d in definitions}
            return
        await self._configure(definitions)

    async def _configure(self, definitions: Iterable[Definition]) -> None:
        async with self._defining:
            config, changed = {}, []
            for definition in definitions:
                latest = self._current(definition.name)
                if (
                    latest is not None
                    and latest.source == "config"
                    and _same_entry(latest, definition)
                ):
                    # The same entry as written: the same version, with today's values of
                    # its ${VAR}s (a rotated secret is no new version).
                    definition = replace(
                        definition, version=latest.version, source="config", spec=latest.spec
                    )
                else:
                    definition = replace(definition, source="config")
                    changed.append(definition)
                config[definition.name] = definition
            stored = await self._store_versions(changed)
            config.update((d.name, d) for d in stored)
            for definition in config.values():
                self._keep(definition)
            self._config = config
            self._install()

    async def define(
        self, definition: Definition, *, on_write: Callable[[bool], None] | None = None
    ) -> tuple[Definition, bool]:
        """Define or replace a workflow from the API (durable when this returns): the same
        definition again changes nothing, a changed one is the next version. True when
        the name was not defined before (`on_write(created)` runs just before the write).
        InvalidDefinition when its route starts another workflow (checked here, under the
        lock, so two deploys cannot both take it)."""
        name = definition.name
        self._check_serving()
        async with self._defining:
            if name in self._config:
                raise DefinitionConflict(f"config.yaml defines {name!r}; change it there")
            others = {d.route for d in self.definitions.values() if d.name != name}
            if definition.route is not None and definition.route in others:
                problem = f"{definition.route} starts another workflow"
                raise InvalidDefinition([("route", problem)])
            current = self._api.get(name)
            if current is not None and definition.same_as(current):
                return current, False
            created = name not in self.definitions
            if on_write is not None:
                on_write(created)
            [definition] = await self._store_versions([replace(definition, source="api")])
            self._keep(definition)
            self._api[name] = definition
            self._install()
            return definition, created

    def parse(self, spec: Mapping[str, Any]) -> Definition:
        """A definition from its JSON (a config.yaml entry), checked as config.yaml is."""
        if self._parse is None:
            raise InvalidDefinition([("(top level)", "this engine takes no JSON definitions")])
        capacities = self.resources.capacities if self.resources is not None else {}
        return self._parse(spec, capacities=capacities)  # the running config's resources

    async def configure_resources(self, resources: Iterable[Resource]) -> None:
        """config.yaml's resources (at a reload): new capacities apply to grants from now."""
        if self.resources is None:
            return
        if self.serving:
            await self.resources.configure(resources)
        else:  # no grants from a closed engine: the next open grants what fits
            self.resources.set_capacities(resources)

    def definition_of(self, process: Process) -> Definition | None:
        """The version the process started with (None: it can no longer be built)."""
        return self._versions.get((process.workflow, process.workflow_version))

    def _current(self, name: str) -> Definition | None:
        """The newest stored version of `name`, None when there is none or it no longer
        parses (then a definition is always a new version)."""
        latest = self._latest.get(name)
        return latest if latest is not None and latest.version == self._newest[name] else None

    async def _store_versions(self, definitions: list[Definition]) -> list[Definition]:
        """Store new versions in one transaction; the store numbers them."""
        if not definitions:
            return []
        now = self._clock()
        rows = [
            StoredDefinition(
                name=d.name,
                version=0,  # allocated by the store, in the write
                source=d.source,
                spec=dict(d.spec or {"name": d.name}),
                defined_at=now,
            )
            for d in definitions
        ]
        versions = await self.store.add_definitions(rows)
        return [replace(d, version=v) for d, v in zip(definitions, versions, strict=True)]

    def _keep(self, definition: Definition) -> None:
        """A stored version: processes of it find it, and it is the newest of its name."""
        self._versions[(definition.name, definition.version)] = definition
        if definition.version >= self._newest.get(definition.name, 0):
            self._newest[definition.name] = definition.version
            self._latest[definition.name] = definition

    def _restore(self, stored: StoredDefinition) -> None:
        """A stored version, parsed again, for the processes that run it."""
        newest = self._newest.get(stored.name, 0)
        self._newest[stored.name] = max(newest, stored.version)  # counts, parsed or not
        if self._parse is None:
            return
        try:
            parsed = self._parse(stored.spec, source=stored.source)
        except ValueError as exc:  # the schema moved on: its processes fail, others run
            log.warning("workflow %s v%d no longer loads: %s", stored.name, stored.version, exc)
            self._unloadable.append((stored.name, stored.version))
            return
        definition = replace(parsed, version=stored.version, source=stored.source)
        self._versions[(stored.name, stored.version)] = definition
        latest = self._latest.get(stored.name)
        if latest is None or stored.version > latest.version:
            self._latest[stored.name] = definition
        current = self._api.get(stored.name)
        if stored.source == "api" and (current is None or stored.version > current.version):
            self._api[stored.name] = definition

    def _install(self) -> None:
        """What starts and triggers use: the API's definitions and config.yaml's over them."""
        self.definitions = {**self._api, **self._config}
        self._triggers: dict[str, list[Definition]] = {}
        for definition in self.definitions.values():
            self._metrics.declare(definition.name)
            self._declare(definition)
            if definition.trigger is not None:
                self._triggers.setdefault(definition.trigger, []).append(definition)
        if self._schedules is not None:
            self._schedules.update(self.definitions.values())

    async def describe(self, process_id: str) -> dict[str, Any] | None:
        """A process as the API and the status page show it: status, data, full history."""
        stored = await self.store.get(process_id)
        if stored is None:
            return None
        process, history = stored
        live = self.live.get(process_id)
        if live is not None:  # history being or not yet checkpointed is shown too
            process, history = live, await self._live_history(live, history)
        definition = self.definition_of(process)
        queued = self._queued(process, definition) if live is not None else {}
        view = describe_process(process, history, definition, queued)
        waiting = view["waiting_for"]
        if waiting is not None and waiting["kind"] == WaitKind.TASK and self.tasks is not None:
            waiting["until"] = self.tasks.lease_end(process_id)  # the lease, once claimed
        return view

    def _queued(self, process: Process, definition: Definition | None) -> dict[str, Any]:
        """The live process's current step and branches queued behind other holders of a
        resource, by name: what each waits for (a checkpoint says only that it waits)."""
        if self.resources is None or definition is None:
            return {}
        if not 0 <= process.position < len(definition.steps):
            return {}
        step = definition.steps[process.position]
        names = [step.name]
        if isinstance(step.action, Parallel):
            names += [branch.name for branch in step.action.branches]
        waits = {name: self.resources.waiting_for(process.id, name) for name in names}
        return {name: wait for name, wait in waits.items() if wait is not None}

    async def _live_history(self, live: Process, stored: list[Attempt]) -> list[Attempt]:
        """The rows stored, then those a checkpoint is writing, then those not yet handed
        to one: the history of the live process's state. A read that ran before a commit
        whose rows are no longer in flight (committed since) is read again."""
        for _ in range(READS):
            committed = live.history_count - len(live.writing)
            if len(stored) >= committed:  # a read after a commit may hold rows in flight
                return stored + live.writing[len(stored) - committed :] + live.pending
            again = await self.store.get(live.id)
            if again is None:
                break
            stored = again[1]
        return stored + live.writing + live.pending

    def _past_response(self, process: Process) -> bool:
        """Whether the process has done its workflow's `respond_after` step."""
        definition = self.definition_of(process)
        if definition is None or definition.respond_after is None:
            return False
        names = [step.name for step in definition.steps[: process.position]]
        ended = {n for n, b in process.branches.items() if b.state in _GONE_PAST}
        return definition.respond_after in {*names, *ended}

    def _respond(self, process_id: str) -> None:
        answered = self._done.get(process_id)
        if answered is not None:
            answered.set()

    def _forget(self, process: Process, *, parked: bool = False) -> None:
        """The process leaves memory: it finished, or it parked (then its signals stay
        kept, and a `?wait=` on it goes on waiting for its end)."""
        self.live.pop(process.id, None)
        self._tasks.pop(process.id, None)
        self._wakeups.remove(process.id)
        self._residency.left(process.id)
        if parked:
            self._runner.deadlines.cancel(process.id)  # due by it: back before it passes
            if process.id not in self._awaited:  # else kept: it answers them when it ends
                self._done.pop(process.id, None)
            return
        done = self._done.pop(process.id, None)
        self._signals.forget(process.id)
        if done is not None:
            done.set()


def _same_entry(stored: Definition, definition: Definition) -> bool:
    """Whether a config entry is the stored version again: the same steps and settings, or
    the same entry as written (its `${VAR}`s may give other values today)."""
    return definition.same_as(stored) or (
        stored.spec is not None and stored.spec == definition.spec
    )
