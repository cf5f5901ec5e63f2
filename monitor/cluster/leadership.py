"""Which replica leads, as the workflow engine and request forwarding see it.

Until processes are claimed one by one, the workflow engine runs on the leader only (as
Kubernetes' controller-manager and Vault's active/standby do) and followers forward
workflow requests to it. The membership (the leader lease) implements `Leadership`; a
single daemon on SQLite is always its own leader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Leadership(Protocol):
    """This replica's view of the leader. `is_leader` turns False on the replica's own
    monotonic clock before its lease can pass to another; `on_leadership` callbacks run on
    the event loop after either attribute changed (never from another thread)."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader_address(self) -> str | None:
        """The leader's base URL (`http://host:port`), None while no leader is known."""

    def on_leadership(self, callback: Callable[[], None]) -> None: ...


class AlwaysLeader:
    """One daemon (SQLite): it leads for its whole life, and never forwards."""

    is_leader = True
    leader_address = None

    def on_leadership(self, callback: Callable[[], None]) -> None:
        """Nothing ever changes."""
