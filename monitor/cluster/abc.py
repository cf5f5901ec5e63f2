"""What the cluster's membership keeps in storage: the members and their heartbeats, and
the leader lease (DESIGN §8). Times are the database's clock, the one every replica reads
the same; SQLite has one daemon, itself the only member and the leader at epoch 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Member:
    key: str  # "<replica_id>/<incarnation>": a restart is a new member
    replica_id: str
    heartbeat_at: float  # epoch seconds, the database's clock
    address: str = ""  # its base URL (http://host:port): followers forward workflow requests


@dataclass(frozen=True, slots=True)
class View:
    """What one renewal saw: the live members (key order), the leader's member key (None:
    no live leader) and its epoch, which grows at every change of holder (fencing)."""

    members: tuple[Member, ...]
    leader: str | None
    epoch: int


class MemberStore(Protocol):
    # False: only this daemon uses the storage (SQLite), so it leads with no lease to lose.
    shared: bool

    async def create_tables(self) -> None: ...

    async def join(self, key: str, replica_id: str, address: str = "") -> None:
        """Make `key` a live member (a new incarnation: its key was never used), reachable
        at `address`."""
        ...

    async def renew(self, key: str, lease: float) -> View | None:
        """Heartbeat `key`, take or keep the leader lease for `lease` seconds when it is
        free (no holder, the holder's lease over, or the holder dead), reap the dead
        members if `key` leads, and say what is live. None when `key` is no longer a
        member (reaped, or seen dead: its heartbeat older than `lease` or its database
        session gone): the caller joins again under a new key, never reusing this one."""
        ...

    async def leave(self, key: str) -> None:
        """Drop `key` and the leader lease it holds, at once (a clean stop)."""
        ...
