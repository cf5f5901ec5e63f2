"""Events relayed across replicas (monitor/relay.py) as clients and the notifier see them:
a stream resumed on a replica whose relay lags, what the notifier's queue holds."""

from __future__ import annotations

import time

from monitor.keys import BUS

from .conftest import AppClient
from .test_sse import next_event

STORES = ("postgres",)  # the relay runs on PostgreSQL alone


async def test_a_stream_resumed_on_a_lagging_replica_skips_the_events_the_client_saw(
    daemon: AppClient,
) -> None:
    """A client saw ids up to N on one replica and reconnects (a load balancer) to another
    whose relay has not read N yet: the relay brings N there later, and the client must
    not get it a second time (Last-Event-ID means the same on every replica)."""
    bus = daemon.app[BUS]
    seen = bus.position + 2  # the client saw two events this replica has not had yet
    headers = {"Last-Event-ID": str(seen)}
    async with daemon.get("/v1/events", params={"topics": "news.*"}, headers=headers) as stream:
        assert await stream.content.readline() == b": connected\n"  # subscribed: live now
        for n in (1, 2, 3):  # what the relay hands the bus as it catches up (EventRelay)
            bus.relay("news.posted", {"n": n}, time.time(), seen - 2 + n)
        first = await next_event(stream)
    assert (int(first["id"]), first["data"]["data"]) == (seen + 1, {"n": 3})
