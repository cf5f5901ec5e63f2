"""One daemon on one SQLite file: it is the only member and always the leader, at epoch 0.
Nothing is stored: a second daemon cannot share the file (the file lock refuses it)."""

from __future__ import annotations

import time

from registry import Transactor

from ..abc import Member, View


class SqliteMemberStore:
    """A `MemberStore` (monitor/cluster/abc.py) for one daemon."""

    shared = False

    def __init__(self, db: Transactor | None = None) -> None:
        # `db` only for the stores' common shape: one daemon needs no row to know it leads.
        self._members: dict[str, Member] = {}

    async def create_tables(self) -> None:
        pass  # no table: the daemon's own memory is the whole cluster

    async def join(self, key: str, replica_id: str, address: str = "") -> None:
        self._members = {
            key: Member(key=key, replica_id=replica_id, heartbeat_at=time.time(), address=address)
        }

    async def renew(self, key: str, lease: float) -> View | None:
        member = self._members.get(key)
        if member is None:
            return None
        self._members[key] = Member(
            key=key, replica_id=member.replica_id, heartbeat_at=time.time(), address=member.address
        )
        return View(members=(self._members[key],), leader=key, epoch=0)

    async def leave(self, key: str) -> None:
        self._members.pop(key, None)
