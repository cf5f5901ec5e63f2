"""The registry's store interface: what the catalog needs from durable storage.

Narrow on purpose, so a PostgreSQL store can stand beside the SQLite one (DESIGN §8)
without the catalog changing. Implementations live in `registry/stores/`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from registry.model import Instance


class RegistryStore(Protocol):
    """Registered instances and the registry's modify index (static ones come from config
    and are never stored). Every method raises StoreUnavailable when storage refuses."""

    async def load(self) -> tuple[list[Instance], int]:
        """Every stored instance and the highest index saved; creates the tables first,
        so a fresh store loads `([], 0)` and a second load reads the same back."""
        ...

    async def save(self, instance: Instance, index: int) -> None:
        """Insert or replace the instance (by service and id), and raise the index to
        `index` (it never goes down)."""
        ...

    async def delete(self, service: str, instance_id: str, index: int) -> None:
        """Remove the instance, if stored, and raise the index to `index`."""
        ...


Key = tuple[str, str]  # (service, instance id)


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredRow:
    """An instance as the shared store holds it now, for a replica to apply."""

    key: Key
    instance: Instance | None  # None: not registered (deregistered, expired or never)
    index: int  # the modify index it was written at (0 when never stored)
    # Seconds since its last heartbeat on any replica (by the database's clock); None when
    # not registered, or when the last heartbeat was this replica's own.
    heartbeat_age: float | None


@runtime_checkable
class SharedRegistryStore(RegistryStore, Protocol):
    """A store several replicas share (PostgreSQL): each replica's Catalog follows the
    others' writes and heartbeats through these. Every write also tells the other replicas
    (`notified` decodes what they hear)."""

    def notified(self, payload: str) -> list[Key]:
        """The keys a notification names; none for this store's own writes."""
        ...

    async def read_rows(self, keys: Iterable[Key]) -> list[StoredRow]:
        """The current rows of `keys`, in that order."""
        ...

    async def keys(self) -> list[Key]:
        """Every registered key (for a full re-read)."""
        ...

    async def poll(self) -> tuple[list[Key], list[tuple[Key, float]]]:
        """Since the previous poll (or the load): the keys written, and the keys renewed
        with the age of their last heartbeat. May repeat some; never misses one."""
        ...

    async def save_heartbeats(self, keys: Iterable[Key]) -> None:
        """Renew the leases of `keys` as of the database's clock now (one write)."""
        ...

    async def expire(self, service: str, instance_id: str, index: int) -> StoredRow | None:
        """Remove a lapsed instance unless a heartbeat reached any replica within its ttl
        and deregister_after; None once removed, else its current row."""
        ...
