"""Which replica probes which instance: instances hash into SHARDS fixed shards, and each
shard belongs to the live member with the highest rendezvous score for it. A member
joining or leaving moves only the shards it wins or held (about 1/N of them); every
replica computes the same owners from the same member list, with no coordination."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

SHARDS = 256


def shard_of(service: str, instance_id: str) -> int:
    return zlib.crc32(f"{service}\0{instance_id}".encode()) % SHARDS


def _score(member: str, shard: int) -> int:
    digest = hashlib.blake2b(f"{member}\0{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(members: Iterable[str]) -> list[str | None]:
    """The owner of every shard (index = shard) among `members`; None with no member."""
    alive = sorted(set(members))
    if not alive:
        return [None] * SHARDS
    return [max(alive, key=lambda member: _score(member, shard)) for shard in range(SHARDS)]
