"""One Server-Sent Events stream: stored events after `Last-Event-ID`, then live ones.

Memory never grows with a slow reader. Live events wait in the stream's own
queue as encoded frames shared by every stream (publish offers an event to
all streams in a row, so it is encoded once); a stream whose queue would pass
`limit` bytes is cut off: its connection is aborted, which frees what the
transport held for it, and the client reconnects with `Last-Event-ID`. Writes
go out a slice at a time and wait until the kernel has taken them (transport
high-water mark 0), so a reader that stops reading pins one slice, not every
frame written to it.

Replay then live, without gap or duplicate: the stream subscribes first and
notes the bus position in the same tick. Stored events up to that position
come from the store; every event delivered after it comes live (the bus
delivers stored events in id order).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from scheduler import Event, matches

log = logging.getLogger(__name__)

KEEPALIVE = 15.0
BATCH = 0.1  # seconds an event may wait for others to share its write
WRITE_SLICE = 16 * 1024  # bytes handed to the transport at once
REPLAY_BYTES = 1024 * 1024  # aimed size of one page of stored events read for a replay
REPLAY_ROWS = 1000
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
TRIM_DELAY = 1.0  # seconds after a cut-off before freed memory goes back to the system

# (id, topic, JSON data, published_at, actor) of the stored events in (after, upto], at
# most `limit`.
StoredPage = Callable[[int, int, int], Awaitable[list[tuple[int, str, bytes, float, str | None]]]]


def frame(event_id: int, topic: str, data: bytes, at: float, actor: str | None = None) -> bytes:
    """An event as SSE bytes; `data` is its JSON. The same bytes live and replayed. `actor`
    (who published it) goes beside `data`, which stays the object as published; the
    daemon's own news has none and no key."""
    by = b"" if actor is None else b',"actor":%s' % orjson.dumps(actor)
    body = b'{"id":%d,"topic":%s,"time":%s%s,"data":%s}' % (
        event_id,
        orjson.dumps(topic),
        orjson.dumps(at),
        by,
        data,
    )
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, topic.encode(), body)


class Frames:
    """The frame of the event being offered, encoded once for every stream it goes to."""

    def __init__(self) -> None:
        self._event: Event | None = None
        self._frame = b""

    def of(self, event: Event) -> bytes:
        if self._event is not event:
            data = orjson.dumps(dict(event.data))
            self._event = event
            self._frame = frame(event.id, event.topic, data, event.time, event.actor)
        return self._frame


class MemoryTrim:
    """Gives the heap freed by cut-off streams back to the system (glibc `malloc_trim`).

    Big frames are freed into glibc's arenas, which keep them: measured with 200
    readers cut off from 200 KiB events, RSS stayed 13 MiB higher without a trim.
    One trim (a few ms) a second at most, and only after a cut-off. No-op off glibc.
    """

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None)

    def soon(self) -> None:
        if self._trim is not None and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(TRIM_DELAY, self._run)

    def _run(self) -> None:
        self._handle = None
        assert self._trim is not None
        started = time.perf_counter()
        self._trim(0)
        log.debug("malloc_trim took %.1f ms", (time.perf_counter() - started) * 1000)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class EventStream:
    """The bus sink and writer of one SSE response."""

    def __init__(
        self,
        response: web.StreamResponse,
        writer: AbstractStreamWriter,
        *,
        limit: int,
        frames: Frames,
        allowed: Callable[[str], bool],
        after: int = 0,
    ) -> None:
        self._response, self._writer, self._limit = response, writer, limit
        self._frames, self._allowed = frames, allowed
        # Last-Event-ID: a client resuming on a replica whose relay lags saw up to it
        # elsewhere, and the relay brings those stored events here live (monitor/relay.py).
        self.after = after
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes
        self._ready = asyncio.Event()
        self.cut_off = False

    def offer(self, event: Event) -> None:
        """The bus sink: queue the event's frame, or cut the stream off when it is too far
        behind. Never blocks."""
        if self.cut_off or not self._allowed(event.topic):
            return
        if event.stored and event.id <= self.after:
            return
        data = self._frames.of(event)
        # An empty queue takes any frame: a reader that is not behind keeps its stream even
        # when one event is bigger than the limit (events are at most 1 MiB).
        if self._queue and self._queued + len(data) > self._limit:
            self._cut_off()
            return
        self._queue.append(data)
        self._queued += len(data)
        self._ready.set()

    def _cut_off(self) -> None:
        self.cut_off = True
        self._queue.clear()
        self._queued = 0
        self._ready.set()
        transport = self._writer.transport
        if transport is None:
            return
        # A reset, not a close: a close would leave the kernel sending what it holds for
        # this reader (megabytes) at the reader's pace; abort() drops the transport's now.
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()

    async def replay(
        self, patterns: Sequence[str], after: int, upto: int, page: StoredPage
    ) -> None:
        """Send the stored events in (after, upto] that match and that the caller may see."""
        rows = 64
        while after < upto and not self.cut_off:
            events = await page(after, upto, rows)
            if not events:
                return
            size = 0
            for event_id, topic, data, at, actor in events:
                after, size = event_id, size + len(data)
                if matches(patterns, topic) and self._allowed(topic):
                    await self.send(frame(event_id, topic, data, at, actor))
            # Aim at REPLAY_BYTES a page: big events come a few at a time, small ones in bulk.
            rows = max(1, min(REPLAY_ROWS, REPLAY_BYTES * len(events) // max(size, 1)))

    async def run(self) -> None:
        """Send live events until the client leaves, the stream is cut off or cancelled."""
        while not self.cut_off:
            if not self._queue:
                self._ready.clear()
                try:
                    async with asyncio.timeout(KEEPALIVE):
                        await self._ready.wait()
                except TimeoutError:
                    await self.send(b": keepalive\n\n")
                    continue
                # Coalesce: what arrives within BATCH goes out in one write. With 100
                # browsers that is ten writes a second each instead of one per event.
                await asyncio.sleep(BATCH)
                if not self._queue:  # cut off meanwhile
                    continue
            await self.send(self._take())

    def _take(self) -> bytes:
        """Queued frames, joined up to one slice (a bigger frame alone)."""
        first = self._queue.popleft()
        taken = [first]
        size = len(first)
        while self._queue and size + len(self._queue[0]) <= WRITE_SLICE:
            size += len(self._queue[0])
            taken.append(self._queue.popleft())
        self._queued -= size
        return first if len(taken) == 1 else b"".join(taken)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SLICE):
            await self._response.write(view[start : start + WRITE_SLICE])
            await self._writer.drain()  # until the kernel has it (high-water mark 0)
