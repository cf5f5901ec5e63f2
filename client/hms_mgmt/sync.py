"""`SyncClient`: the Client's verbs, blocking, for scripts and code without an event loop.

    report = SyncClient("http://127.0.0.1:9797").run("GrantPayment", {"amount": 100})

Each SyncClient runs one private event loop in a daemon thread and hands every call
to it (`asyncio.run_coroutine_threadsafe`): one connection pool for all its calls,
and it works from code that already runs an event loop elsewhere (where `asyncio.run`
would refuse). `close()` (or `with`) ends the loop; otherwise it ends when the
SyncClient is garbage-collected or at interpreter exit.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from .client import REQUEST_TIMEOUT, Client, Event, Report
from .durations import Duration
from .workflow import Workflow

T = TypeVar("T")


class SyncProcessHandle:
    """A started process: `status()` reads it, `result(timeout)` waits for its end."""

    def __init__(self, client: SyncClient, process_id: str, workflow: str | None = None) -> None:
        self._client = client
        self.id = process_id
        self.workflow = workflow

    def __repr__(self) -> str:
        return f"SyncProcessHandle(id={self.id!r}, workflow={self.workflow!r})"

    def status(self) -> dict[str, Any]:
        return self._client.process(self.id)

    def result(self, timeout: Duration = 30) -> Report:
        """The Report once the process has ended; TimeoutError when `timeout` passes first."""
        return self._client._call(self._client._async.handle(self.id).result(timeout))

    def signal(self, name: str, data: Any = None) -> None:
        self._client.signal(self.id, name, data)

    def cancel(self) -> dict[str, Any]:
        return self._client.cancel(self.id)


class SyncClient:
    """The blocking client; the same verbs as Client (see its docstrings)."""

    def __init__(
        self, url: str, token: str | None = None, *, request_timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="hms-mgmt-client", daemon=True
        )
        self._thread.start()
        self._async = Client(url, token, request_timeout=request_timeout)
        self._finalizer = weakref.finalize(self, _shut_down, self._loop, self._thread, self._async)

    @property
    def url(self) -> str:
        return self._async.url

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    def start(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> SyncProcessHandle:
        handle = self._call(self._async.start(workflow, input, idempotency_key=idempotency_key))
        return SyncProcessHandle(self, handle.id, workflow)

    def handle(self, process_id: str) -> SyncProcessHandle:
        return SyncProcessHandle(self, process_id)

    def run(
        self,
        workflow: str,
        input: Mapping[str, Any] | None = None,
        *,
        timeout: Duration = 30,
        idempotency_key: str | None = None,
    ) -> Report:
        return self._call(
            self._async.run(workflow, input, timeout=timeout, idempotency_key=idempotency_key)
        )

    def process_workflow(
        self, workflow: str, input: Mapping[str, Any] | None = None, timeout: Duration = 30
    ) -> dict[str, Any]:
        return self._call(self._async.process_workflow(workflow, input, timeout))

    def process(self, process_id: str) -> dict[str, Any]:
        return self._call(self._async.process(process_id))

    def signal(self, process_id: str, name: str, data: Any = None) -> None:
        self._call(self._async.signal(process_id, name, data))

    def cancel(self, process_id: str) -> dict[str, Any]:
        return self._call(self._async.cancel(process_id))

    def deploy(self, definition: Workflow | Mapping[str, Any]) -> dict[str, Any]:
        return self._call(self._async.deploy(definition))

    def workflow(self, name: str) -> dict[str, Any]:
        return self._call(self._async.workflow(name))

    def lookup(self, service: str) -> list[str]:
        return self._call(self._async.lookup(service))

    def publish(
        self,
        topic: str,
        data: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int | None:
        return self._call(self._async.publish(topic, data, idempotency_key=idempotency_key))

    def subscribe(self, *topics: str, last_event_id: int | None = None) -> Iterator[Event]:
        """Events as they come, forever (resumed after a dropped stream); break to stop."""
        events = self._async.subscribe(*topics, last_event_id=last_event_id)
        try:
            while True:
                yield self._call(events.__anext__())
        finally:
            self._call(events.aclose())

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError("this SyncClient is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: Client) -> None:
    """Close the session on the loop, then stop the loop and its thread (once)."""
    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    loop.close()
