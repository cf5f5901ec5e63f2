"""One asyncio lock per key, so the store and memory apply writes to a key in one order."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any


class KeyLocks:
    """Locks by key, held only while someone holds or waits for one: a fleet of 10,000
    instances keeps no 10,000 locks."""

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        self._locks: dict[Hashable, list[Any]] = {}  # key -> [lock, holders and waiters]

    def hold(self, key: Hashable) -> _KeyLock:
        """`async with locks.hold(key):` serializes the block with every other on `key`."""
        return _KeyLock(self._locks, key)

    def __len__(self) -> int:
        return len(self._locks)


class _KeyLock:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it (a refcount:
    right after a release the woken waiter has not re-acquired yet, so `locked()` lies)."""

    __slots__ = ("entry", "key", "locks")

    def __init__(self, locks: dict[Hashable, list[Any]], key: Hashable) -> None:
        self.locks, self.key = locks, key
        self.entry = locks.setdefault(key, [asyncio.Lock(), 0])
        self.entry[1] += 1

    async def __aenter__(self) -> None:
        try:
            await self.entry[0].acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.entry[0].release()
        self._leave()

    def _leave(self) -> None:
        self.entry[1] -= 1
        if self.entry[1] == 0:
            del self.locks[self.key]
