"""This replica among the others: it joins at start, renews every lease/3 (at most every
half second, so a replica whose database session died is seen gone within about a second),
and knows the live members, the leader and its epoch (DESIGN §8).

Leadership is judged twice. The database grants the lease (monitor/cluster/abc.py); this
replica trusts it only until (when its last successful renewal was SENT + lease - margin)
on its own monotonic clock. The database lets another take the lease only after `lease`
past the renewal's arrival, so a replica that was paused, or cut from the database, stops
its leader work before anyone else can start it. A replica that could not renew for a whole
lease considers itself alone and leads nothing; once it reaches the database again it is
told it was seen dead and joins as a new member (new incarnation)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from .abc import Member, MemberStore, View
from .shards import owners

log = logging.getLogger(__name__)

ChangeListener = Callable[[tuple[str, ...]], None]


class Connection(Protocol):
    """A database handle of the membership's own (opened at start, closed at stop)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Membership:
    def __init__(
        self,
        store: MemberStore,
        *,
        replica_id: str = "",
        lease: float,
        address: str = "",
        monotonic: Callable[[], float] = time.monotonic,
        connection: Connection | None = None,
    ) -> None:
        self._store, self._connection = store, connection
        self.address = address
        self.replica_id = replica_id or default_replica_id()
        self.lease = lease
        self.interval = min(lease / 3, 0.5)
        # Stop leading this long before the database could hand the lease to another.
        self.margin = lease / 5
        self._monotonic = monotonic
        self.key = self._new_key()
        self._members: tuple[Member, ...] = ()
        self.leader: str | None = None  # the leader's member key
        self.epoch = 0
        self._leads_until = -math.inf  # monotonic
        self._renewed_at = -math.inf  # monotonic, when the last good renewal was sent
        self._listeners: list[ChangeListener] = []
        self._leadership_listeners: list[Callable[[], None]] = []
        self._leadership_seen: tuple[bool, str | None] = (False, None)
        self._lapse: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    def _new_key(self) -> str:
        return f"{self.replica_id}/{secrets.token_hex(4)}"

    @property
    def is_leader(self) -> bool:
        """Whether to do the singleton jobs now (False as soon as in doubt; always True for
        a daemon alone on its SQLite file, even before it started)."""
        if not self._store.shared:
            return True
        return self.leader == self.key and self._monotonic() < self._leads_until

    @property
    def members(self) -> tuple[Member, ...]:
        """The live members, in key order (only this replica while cut from the others)."""
        return self._members

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(member.key for member in self._members)

    def owners(self) -> list[str | None]:
        """The member key owning each shard (monitor/cluster/shards.py)."""
        return owners(self.keys)

    @property
    def leader_address(self) -> str | None:
        """The leader's base URL; None while no live leader is known (Leadership)."""
        return next((m.address or None for m in self._members if m.key == self.leader), None)

    def on_leadership(self, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever `is_leader` or the leader changes, also when this
        replica's own lease lapses on its clock with no renewal to say so."""
        self._leadership_listeners.append(callback)

    def _leadership_changed(self) -> None:
        seen = (self.is_leader, self.leader)
        if seen == self._leadership_seen:
            return
        self._leadership_seen = seen
        for callback in self._leadership_listeners:
            try:
                callback()
            except Exception:
                log.exception("cluster: a listener of leadership changes failed")

    def _arm_lapse(self) -> None:
        """A timer at the end of this replica's trust in its lease: leadership can end by
        the clock alone (a renewal stuck, or the process paused: the timer is overdue the
        moment it runs again, and fires before work waiting behind it)."""
        if self._lapse is not None:
            self._lapse.cancel()
            self._lapse = None
        if self._leads_until > -math.inf:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._leads_until - self._monotonic())
            self._lapse = loop.call_later(delay, self._leadership_changed)

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(live member keys)` every time they change (also when this
        replica rejoins under a new key)."""
        self._listeners.append(listener)

    async def join(self) -> None:
        await self._store.join(self.key, self.replica_id, self.address)

    async def start(self) -> None:
        """Join and learn the cluster before the daemon does any sharded work, then renew
        in the background."""
        if self._connection is not None:
            await self._connection.open()
        await self._store.create_tables()
        await self.join()
        await self.renew()
        self._task = asyncio.create_task(self._run(), name="cluster-membership")

    async def stop(self) -> None:
        """Leave at once, so the others take this replica's share without waiting out the
        lease (a failure to reach the database leaves that to the lease)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._leads_until = -math.inf
        self._arm_lapse()
        self._leadership_changed()
        try:
            await self._store.leave(self.key)
        except Exception as exc:
            log.warning("cluster: could not leave (%s); the others wait out the lease", exc)
        if self._connection is not None:
            await self._connection.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.renew()

    async def renew(self) -> None:
        """One renewal: heartbeat, leader lease, the live members."""
        sent = self._monotonic()
        try:
            view = await self._store.renew(self.key, self.lease)
            if view is None:
                log.warning(
                    "cluster: %s was seen dead by the others; joining as a new member", self.key
                )
                self.key = self._new_key()
                await self.join()
                view = await self._store.renew(self.key, self.lease)
        except Exception as exc:
            self._renewal_failed(exc)
            return
        if view is None:  # reaped between our join and renewal: try again next round
            self._renewal_failed(RuntimeError("membership lost right after joining"))
            return
        if self._failed:
            log.warning("cluster: renewing again as %s", self.key)
            self._failed = False
        self._renewed_at = sent
        self._apply(view, sent)

    def _renewal_failed(self, exc: Exception) -> None:
        # In doubt, lead nothing: the failure may be this replica's database session dying,
        # which hands the lease to another at once.
        if self.is_leader:
            log.warning("cluster: %s no longer leads", self.key)
        self._leads_until = -math.inf
        self._arm_lapse()
        self._leadership_changed()
        if not self._failed:
            log.error("cluster: cannot renew membership of %s: %s", self.key, exc)
            self._failed = True
        if self._monotonic() >= self._renewed_at + self.lease:
            # Seen dead by the others by now: alone, leading nothing, until it rejoins.
            alone = Member(key=self.key, replica_id=self.replica_id, heartbeat_at=0.0)
            self._apply(View(members=(alone,), leader=None, epoch=self.epoch), None)

    def _apply(self, view: View, sent: float | None) -> None:
        was_leader = self.is_leader
        self.leader, self.epoch = view.leader, view.epoch
        self._leads_until = -math.inf
        if view.leader == self.key and sent is not None:
            self._leads_until = sent + self.lease - self.margin
        leads = self._leads_until > -math.inf
        if leads and not was_leader:
            log.warning("cluster: %s leads (epoch %d)", self.key, self.epoch)
        elif was_leader and not leads:
            log.warning("cluster: %s no longer leads", self.key)
        before = self.keys
        self._members = view.members
        self._arm_lapse()
        self._leadership_changed()
        if self.keys != before:
            self._changed(self.keys)

    def _changed(self, keys: Sequence[str]) -> None:
        for listener in self._listeners:
            try:
                listener(tuple(keys))
            except Exception:
                log.exception("cluster: a listener of member changes failed")

    def replica_of(self, key: str | None) -> str | None:
        """The replica id of a member key (the part before its incarnation)."""
        return None if key is None else key.rpartition("/")[0]
