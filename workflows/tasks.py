"""Task queues: task steps handed to workers that poll for them (DESIGN.md §3).

The runner opens a task (one attempt of a task step) and awaits its outcome;
a poll claims due tasks of a queue, each under a lease; the worker answers by
the delivery id the claim gave it. Nothing here polls the database: a long
poll waits on a future that the opening of a due task resolves, claims are
made only when a task is known due, and each claim's lease is a loop timer
that ends it (a timed-out attempt; the runner's retry policy decides what
follows, so the next attempt is a new task with a new delivery id).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from registry import StoreUnavailable

from .abc import NewTask, Refusal, TaskRecord, TaskStore
from .caller import CallResult
from .records import TaskEnd, TaskOpen
from .states import TaskState

STORAGE_RETRY_MIN, STORAGE_RETRY_MAX = 0.1, 5.0
WORKER_WINDOW = 60.0  # a worker counts for `hms_task_workers` this long after its last poll


class UnknownDelivery(LookupError):
    """No task was ever handed out under this delivery id (HTTP 404)."""


class StaleDelivery(Exception):
    """The delivery is no longer its task's open claim: reassigned after its lease,
    answered already, or its process was cancelled (HTTP 409)."""


@dataclass(slots=True, eq=False)
class _Poll:
    """A long poll waiting: handed a task claimed for it as the task opens, or None (woken
    to claim: a task became due otherwise, e.g. released)."""

    worker: str | None
    answer: asyncio.Future[TaskRecord | None]
    alive: Callable[[], bool] = lambda: True  # the worker is still there to be answered

    def handed(self) -> TaskRecord | None:
        answer = self.answer
        return answer.result() if answer.done() and not answer.cancelled() else None


@dataclass(slots=True)
class Opened:
    """A task the runner waits on: `outcome` resolves when it ends."""

    record: TaskRecord
    outcome: asyncio.Future[TaskRecord]
    end: TaskEnd | None = None  # the answer handed over: the runner's checkpoint writes it
    cancelling: bool = False  # a cancel's write is under way: answers go to the table


class TaskQueues:
    """Open tasks, their leases, and the polls waiting for them, per queue."""

    def __init__(
        self, store: TaskStore, *, clock: Callable[[], float], wake: Callable[[str], None]
    ) -> None:
        self.store, self._clock, self._wake = store, clock, wake
        self.restart()

    def restart(self) -> None:
        """Forget every task (at each engine open): the runner opens its tasks again from
        the store, and the term before (ended by `close`) leaves nothing behind."""
        self._due: dict[str, set[int]] = {}  # queue -> seqs of tasks known due
        self._polls: dict[str, deque[_Poll]] = {}  # long polls waiting, per queue
        self._open: dict[int, Opened] = {}  # seq -> the runner's wait
        self._by_process: dict[str, int] = {}  # process id -> seq of its open task
        self._deliveries: dict[str, int] = {}  # delivery id -> seq, while its task is open
        self._leases: dict[int, asyncio.TimerHandle] = {}
        self._expiring: set[asyncio.Task[None]] = set()
        self._seen: dict[str, dict[str, float]] = {}  # queue -> worker -> last poll
        self._due_at: dict[int, float] = {}  # seq -> when it was committed and known due
        # delivery -> (its task as answered, the commit of the checkpoint that writes it)
        self._handed: dict[str, tuple[TaskRecord, asyncio.Future[TaskRecord]]] = {}
        # process id -> the task its last checkpoint opened (`prepare`), until `open`
        self._prepared: dict[str, tuple[tuple[str, int], TaskRecord, bool, _Poll | None]] = {}
        # process id -> (queue, the poll) a checkpoint being written claims a task for
        self._holding: dict[str, tuple[str, _Poll]] = {}
        self._closed = False

    # -- the runner's side -----------------------------------------------------

    async def open(self, task: NewTask) -> Opened:
        """Open (or find again, after a restart) the task; its outcome resolves when a
        worker answers, its lease passes, or it had ended already.

        When a long poll is waiting on the queue, the task is created claimed for it, in
        the same commit (as Temporal's sync match): it reaches the worker as it becomes
        due, with no second write. A task the step's checkpoint opened (`prepare`) is
        taken as that commit left it."""
        pre = self._prepared.pop(task.process, None)
        if pre is not None and pre[0] == (task.key, task.attempt):
            _, record, new, poll = pre
        else:
            poll = self._waiting(task.queue)
            try:
                record, new = await self.store.open(
                    task, claim_for=poll.worker if poll else None, now=self._now(poll)
                )
            except BaseException:
                if poll is not None:
                    self._requeue(task.queue, poll)
                raise
        if poll is not None:
            if not new:  # found again (a restart): not claimed for this poll
                self._requeue(task.queue, poll)
            elif poll.answer.done() or not poll.alive():  # nobody is there for the claim
                assert record.delivery is not None
                record = await self.store.release(record.delivery) or record
            else:
                poll.answer.set_result(record)
        opened = Opened(record, asyncio.get_running_loop().create_future())
        self._due_at.setdefault(record.seq, self._clock())
        self._open[record.seq] = opened
        self._by_process[task.process] = record.seq
        self._track(record)
        return opened

    def prepare(self, task: NewTask) -> TaskOpen:
        """The task for a checkpoint to open in its commit (the step before it just
        ended); `open` then takes it with no write of its own. A long poll waiting is
        taken now, as `open` takes it, and the task created claimed for it."""
        poll = self._waiting(task.queue)
        if poll is not None:
            self._holding[task.process] = (task.queue, poll)

        def opened(record: TaskRecord, new: bool) -> None:
            self._holding.pop(task.process, None)
            self._prepared[task.process] = ((task.key, task.attempt), record, new, poll)

        return TaskOpen(
            task=task,
            claim_for=poll.worker if poll else None,
            clock=self._clock if poll is not None else None,
            opened=opened,
        )

    def drop(self, process_id: str) -> None:
        """The process will not open the task its checkpoint prepared (the checkpoint is
        not written, or it failed inside the engine and its last checkpoint cancels its
        tasks): a poll held for that task waits on."""
        held = self._holding.pop(process_id, None)
        if held is not None:
            self._requeue(*held)
        pre = self._prepared.pop(process_id, None)
        if pre is not None and pre[3] is not None:
            self._requeue(pre[1].queue, pre[3])

    async def cancel_stored(self, process_id: str, key: str, attempt: int) -> TaskRecord | None:
        """The cancelled process will not run its step's task (key, attempt): the one its
        last checkpoint opened, or one stored before a restart, is cancelled in the table;
        a poll held for it waits on. The task as it ended when a worker's answer reached
        the table first (the step's outcome, not yet in the process row)."""
        self.drop(process_id)  # the claim made for a poll goes with the task
        ended = await self.store.cancel(key, attempt, self._clock())
        if ended is None or ended.state == TaskState.CANCELLED:
            return None
        return ended

    def _now(self, poll: _Poll | None) -> float | None:
        return self._clock() if poll is not None else None

    async def cancel(self, opened: Opened, now: float) -> TaskRecord | None:
        """Cancel the open task (its delivery answers 409 from now on); the task as it
        ended when a worker's answer came first. From here no answer is handed to the
        runner (whose wait ends with this cancel): each goes to the table, where it and
        the cancel are ordered, and is answered as that write ends."""
        record = opened.record
        opened.cancelling = True
        if record.delivery is not None:
            self._deliveries.pop(record.delivery, None)
        ended = await self.store.cancel(record.key, record.attempt, now)
        self._due.get(record.queue, set()).discard(record.seq)
        if ended is not None and ended.state != TaskState.CANCELLED:
            return ended
        return None

    def close_task(self, opened: Opened, kept: TaskEnd | None = None) -> None:
        """The runner is done waiting (an outcome, a cancel, or the daemon stopping);
        `kept`: the answer it keeps for its next checkpoint to write. One handed over and
        not kept is never written: its worker hears so and sends it again (the table
        answers that: 409 once the task is cancelled)."""
        if opened.end is not None and opened.end is not kept:
            lost = StoreUnavailable("the answer was not recorded: send it again")
            self.ended(opened.end.delivery, lost)
        seq = opened.record.seq
        self._open.pop(seq, None)
        self._due_at.pop(seq, None)
        if opened.record.delivery is not None:
            self._deliveries.pop(opened.record.delivery, None)
        # Only a task someone waits on is handed out; a resumed process opens it again.
        self._due.get(opened.record.queue, set()).discard(seq)
        if self._by_process.get(opened.record.process) == seq:
            del self._by_process[opened.record.process]
        self._disarm(seq)

    def lease_end(self, process_id: str) -> float | None:
        """When the open task of the process must be answered; None while it is due."""
        seq = self._by_process.get(process_id)
        opened = self._open.get(seq) if seq is not None else None
        return opened.record.lease_until if opened is not None else None

    # -- the workers' side -----------------------------------------------------

    async def poll(
        self,
        queue: str,
        worker: str | None,
        wait: float,
        limit: int,
        alive: Callable[[], bool] = lambda: True,
    ) -> list[TaskRecord]:
        """Claim up to `limit` due tasks of `queue`; wait up to `wait` seconds for one.

        `alive` tells whether the worker is still there (its connection open): a worker
        gone away mid-wait is handed nothing and claims nothing."""
        if worker is not None:
            self._seen.setdefault(queue, {})[worker] = self._clock()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._closed and alive():
            if self._due.get(queue):
                claimed = await self.store.claim(queue, worker, limit, self._clock())
                if claimed:
                    for record in claimed:
                        self._track(record)
                    return claimed
            left = deadline - loop.time()
            if left <= 0:
                return []
            poll = _Poll(worker, loop.create_future(), alive)
            polls = self._polls.setdefault(queue, deque())
            polls.append(poll)
            try:
                async with asyncio.timeout(left):
                    handed = await poll.answer
            except TimeoutError:  # a task handed over just as the wait ended is still given
                handed = poll.handed()
                if handed is None:
                    return []
            finally:
                with contextlib.suppress(ValueError):
                    polls.remove(poll)
                # A poll may name any queue: none is kept for nothing. Another poll may have
                # replaced this deque meanwhile (it emptied, went, and a new one came): keep it.
                if not polls and self._polls.get(queue) is polls:
                    del self._polls[queue]
            if handed is not None:
                return [handed]
        return []  # the daemon stops, or the worker went away

    async def release(self, claimed: Iterable[TaskRecord]) -> None:
        """Undo claims whose worker never got them (its poll's answer could not be
        written): each task is due again at once, the same attempt, not a timed-out one."""
        for record in claimed:
            if record.delivery is None:
                continue
            try:
                released = await self.store.release(record.delivery)
            except StoreUnavailable:  # its lease stays armed: it comes back when that ends
                continue
            if released is not None:
                self._disarm(record.seq)
                self._track(released)

    def due_at(self, record: TaskRecord) -> float | None:
        """When the task was committed and known due to this queue (epoch seconds): the
        start of its pickup latency, for workers that measure it."""
        return self._due_at.get(record.seq)

    async def complete(self, delivery: str, output: Any) -> TaskRecord:
        await self._settled(delivery)
        now = self._clock()
        end = TaskEnd(delivery=delivery, state=TaskState.DONE, output=output, ended_at=now)
        handed = self._hand(end)
        if handed is not None:
            return await asyncio.shield(handed)
        return self._answered(await self.store.complete(delivery, output, now))

    async def fail(self, delivery: str, error: str, retryable: bool) -> TaskRecord:
        await self._settled(delivery)
        now = self._clock()
        end = TaskEnd(
            delivery=delivery,
            state=TaskState.FAILED,
            error=error,
            retryable=retryable,
            ended_at=now,
        )
        handed = self._hand(end)
        if handed is not None:
            return await asyncio.shield(handed)
        return self._answered(await self.store.fail(delivery, error, retryable, now))

    async def heartbeat(self, delivery: str) -> TaskRecord:
        await self._settled(delivery)
        answer = await self.store.heartbeat(delivery, self._clock())
        if isinstance(answer, TaskRecord) and answer.delivery not in self._deliveries:
            # Answered or cancelled while this write was under way (it committed first),
            # or no runner here waits on it yet (a restart: its open arms the stored
            # lease): no lease of ours to move.
            return answer
        return self._answered(answer)

    def ended(self, delivery: str, error: BaseException | None = None) -> None:
        """The checkpoint that writes the answer to `delivery` committed (or, `error`,
        none will: the answer was not recorded and the worker sends it again)."""
        handed = self._handed.pop(delivery, None)
        if handed is None or handed[1].done():
            return
        if error is None:
            handed[1].set_result(handed[0])
        else:
            handed[1].set_exception(error)

    async def queue_of(self, delivery: str) -> str | None:
        """The queue a delivery's task is on (its scope is `work:<queue>`); None: unknown."""
        opened = self._open.get(self._deliveries.get(delivery, -1))
        if opened is not None and opened.record.delivery == delivery:
            return opened.record.queue
        return await self.store.queue_of(delivery)

    # -- metrics ---------------------------------------------------------------

    def depths(self) -> dict[str, int]:
        """Due tasks per queue (`hms_task_queue_depth`)."""
        return {queue: len(seqs) for queue, seqs in self._due.items()}

    def workers(self) -> dict[str, int]:
        """Workers that polled each queue in the last minute (`hms_task_workers`)."""
        since = self._clock() - WORKER_WINDOW
        counts = {}
        for queue, seen in list(self._seen.items()):
            for worker in [w for w, at in seen.items() if at < since]:
                del seen[worker]
            if seen:
                counts[queue] = len(seen)
            else:
                del self._seen[queue]
        return counts

    async def close(self) -> None:
        """At engine close: timers go; the stored leases are re-armed on the next open.
        Leases expiring now finish their write first: none is written after close."""
        stopping = StoreUnavailable("the daemon stops: the answer is not recorded, send it again")
        for delivery in list(self._handed):
            self.ended(delivery, stopping)
        for handle in self._leases.values():
            handle.cancel()
        self._leases.clear()
        self._closed = True
        for expiring in self._expiring:  # one waiting for storage to return waits no more
            expiring.cancel()
        await asyncio.gather(*self._expiring, return_exceptions=True)
        held = [pre[3] for pre in self._prepared.values() if pre[3] is not None]
        held += [poll for _, poll in self._holding.values()]
        for polls in [*self._polls.values(), held]:
            for poll in polls:
                if not poll.answer.done():
                    poll.answer.set_result(None)  # answered with no tasks

    # -- inside ----------------------------------------------------------------

    def _hand(self, end: TaskEnd) -> asyncio.Future[TaskRecord] | None:
        """Hand a worker's answer to the runner waiting on its task, whose next checkpoint
        writes it with the step's outcome: one commit where there were two. The answer is
        2xx only once that commit is done (the future). None: nobody here waits on that
        claim, or its lease has fired (an expiry may be on its way to the table): the
        answer is written by itself, as the table decides."""
        seq = self._deliveries.get(end.delivery)
        opened = self._open.get(seq) if seq is not None else None
        if (
            seq is None
            or opened is None
            or opened.cancelling
            or opened.outcome.done()
            or opened.record.delivery != end.delivery
            or opened.record.state != TaskState.CLAIMED
            or seq not in self._leases
        ):
            return None
        record = replace(
            opened.record,
            state=TaskState(end.state),
            output=end.output,
            error=end.error,
            retryable=end.retryable,
        )
        committed: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        self._handed[end.delivery] = (record, committed)
        delivery = end.delivery
        end = replace(end, written=lambda: self.ended(delivery))
        del self._deliveries[end.delivery]
        self._disarm(seq)
        opened.record, opened.end = record, end
        opened.outcome.set_result(record)
        self._wake(record.process)
        return committed

    async def _settled(self, delivery: str) -> None:
        """Wait out an answer to `delivery` handed to its runner and not yet committed: a
        second answer meets the table as that commit left it (409 once it is written)."""
        handed = self._handed.get(delivery)
        if handed is not None:
            await asyncio.wait([handed[1]])

    def _answered(self, answer: TaskRecord | Refusal) -> TaskRecord:
        if answer == "unknown":
            raise UnknownDelivery("no task was handed out under this id")
        if answer == "stale":
            raise StaleDelivery(
                "this delivery is no longer current (reassigned, answered, or cancelled)"
            )
        assert isinstance(answer, TaskRecord)
        self._track(answer)
        return answer

    def _track(self, record: TaskRecord) -> None:
        """Bring memory in line with the task as stored: due (wake a poll), claimed (arm
        its lease), or ended (resolve the runner's wait)."""
        opened = self._open.get(record.seq)
        if opened is not None and (opened.outcome.done() or opened.cancelling):
            # Answered (maybe handed over: its checkpoint writes it) or being cancelled:
            # nothing to hand out, no lease to arm, and the runner has its outcome.
            if record.state in (TaskState.DUE, TaskState.CLAIMED):
                return
            opened = None
        if opened is not None:
            opened.record = record
        if record.state == TaskState.DUE:
            self._due.setdefault(record.queue, set()).add(record.seq)
            poll = self._waiting(record.queue)
            if poll is not None:
                poll.answer.set_result(None)  # it claims (with whatever else is due)
            return
        self._due.get(record.queue, set()).discard(record.seq)
        if record.state == TaskState.CLAIMED:
            if opened is not None:
                assert record.delivery is not None
                self._deliveries[record.delivery] = record.seq
            self._arm(record)
            return
        self._disarm(record.seq)
        if opened is not None and not opened.outcome.done():
            opened.outcome.set_result(record)
            self._wake(record.process)

    def _waiting(self, queue: str) -> _Poll | None:
        """The longest-waiting poll of `queue` still waiting, taken off the queue."""
        polls = self._polls.get(queue)
        while polls:
            poll = polls.popleft()
            if poll.answer.done():
                continue
            if not poll.alive():  # its worker went away: it ends, answered with nothing
                poll.answer.set_result(None)
                continue
            return poll
        return None

    def _requeue(self, queue: str, poll: _Poll) -> None:
        if not poll.answer.done():
            self._polls.setdefault(queue, deque()).appendleft(poll)

    def _arm(self, record: TaskRecord) -> None:
        assert record.lease_until is not None and record.delivery is not None
        self._disarm(record.seq)
        delivery, until = record.delivery, record.lease_until
        delay = max(0.0, until - self._clock())

        def fire() -> None:  # the loop keeps only weak references to tasks: hold it
            self._leases.pop(record.seq, None)
            task = asyncio.create_task(self._expire(delivery, until))
            self._expiring.add(task)
            task.add_done_callback(self._expiring.discard)

        self._leases[record.seq] = asyncio.get_running_loop().call_later(delay, fire)

    def _disarm(self, seq: int) -> None:
        handle = self._leases.pop(seq, None)
        if handle is not None:
            handle.cancel()

    async def _expire(self, delivery: str, until: float) -> None:
        """End the claim if its lease still ends at `until` (a heartbeat moved it: not)."""
        pause = STORAGE_RETRY_MIN
        while True:
            try:
                record = await self.store.expire(delivery, until)
                break
            except StoreUnavailable:  # the lease stays passed: end it once storage is back
                await asyncio.sleep(pause)
                pause = min(pause * 2, STORAGE_RETRY_MAX)
        if record is not None:
            self._track(record)


def outcome(record: TaskRecord) -> CallResult:
    """A task's end as the runner's attempts see every outcome."""
    if record.state == TaskState.DONE:
        return CallResult(ok=True, output=record.output, instance=record.worker)
    if record.state == TaskState.FAILED:
        return CallResult(
            ok=False, error=record.error, retryable=record.retryable, instance=record.worker
        )
    return CallResult(
        ok=False,
        error=f"no answer from {record.worker or 'a worker'} within {record.lease:g}s",
        instance=record.worker,
        timed_out=True,
    )


def delivery_json(record: TaskRecord, due_at: float | None = None) -> dict[str, Any]:
    """A claimed task as a poll hands it out (DESIGN.md §3). `lease` (seconds) beside the
    `deadline` paces heartbeats without trusting the worker's clock to match the daemon's;
    `due_at` is when it became due (pickup latency)."""
    payload: dict[str, Any] = orjson.loads(record.payload)
    return {
        "id": record.delivery,
        **payload,
        "deadline": record.lease_until,
        "lease": record.lease,
        "due_at": due_at,
    }
