"""The pipe between the daemon and a probe worker: length-prefixed `marshal`ed batches.

A frame is a 4-byte big-endian length and a `marshal`ed list of plain tuples (both
ends are this code, run by the same interpreter). Standard library only, and only its
cheapest modules: the worker process imports this (probing/worker.py).
"""

from __future__ import annotations

import marshal
import struct

TYPE_CHECKING = False  # typing itself is not imported: the worker stays small
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

FRAME = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024
FLUSH_BYTES = 4 * 1024 * 1024  # a batch of answers with bodies this large goes at once
# Jobs and answers wait this long for company before their frame is written: more a
# frame, fewer writes and wake-ups. Timings are taken in the worker: none includes it.
BATCH_DELAY = 0.01


def encode(items: list[tuple[object, ...]]) -> bytes:
    payload = marshal.dumps(items)
    return FRAME.pack(len(payload)) + payload


class Batch:
    """Items waiting to go as one frame; each side times its own flush (BATCH_DELAY after
    the first item: a loop timer in the daemon, the worker's own loop in the worker)."""

    __slots__ = ("bulk", "items")

    def __init__(self) -> None:
        self.items: list[tuple[object, ...]] = []
        self.bulk = 0

    def add(self, item: tuple[object, ...], size: int = 0) -> bool:
        """`item`: a plain tuple (marshal takes no NamedTuple); `size`: its bulk (a
        body). True when the batch must go at once: past FLUSH_BYTES."""
        self.items.append(item)
        self.bulk += size
        return self.bulk > FLUSH_BYTES

    def take(self) -> bytes | None:
        """The batch as a frame, emptied; None when it holds nothing."""
        if not self.items:
            return None
        items, self.items, self.bulk = self.items, [], 0
        return encode(items)


class FrameReader:
    """Splits a byte stream into frames and hands each decoded item to `take`."""

    def __init__(self, take: Callable[[Any], None]) -> None:
        self._take = take
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= FRAME.size:
            (size,) = FRAME.unpack_from(buffer, start)
            if size > MAX_FRAME:
                raise ValueError(f"probe worker frame of {size} bytes")
            end = start + FRAME.size + size
            if len(buffer) < end:
                break
            # Only ever the daemon and its own worker on a pipe between them: not input.
            for item in marshal.loads(bytes(buffer[start + FRAME.size : end])):  # noqa: S302
                self._take(item)
            start = end
        del buffer[:start]
