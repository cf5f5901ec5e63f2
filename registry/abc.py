"""The registry's store interface: what the catalog needs from durable storage.

Narrow on purpose, so a PostgreSQL store can stand beside the SQLite one (DESIGN §8)
without the catalog changing. Implementations live in `registry/stores/`."""

from __future__ import annotations

from typing import Protocol

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
