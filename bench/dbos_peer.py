"""The peer for bench.workflows: the same 3-step workload on DBOS Transact (SQLite).

    python -m bench.dbos_peer URL COUNT CONCURRENCY DBFILE [QUEUE_CAPACITY]

Prints one JSON line: steps, seconds, cpu. Runs in its own process so its CPU
is measured apart from the daemon's. With QUEUE_CAPACITY, the contended-resource
workload: every workflow enqueued at once on a DBOS queue with that global
concurrency (DBOS's equivalent of a resource held for the whole process), polled
every 10 ms (its default is 1 s).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from dbos import DBOS


def main() -> None:
    url, count, concurrency, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    capacity = int(sys.argv[5]) if len(sys.argv) > 5 else None
    DBOS(config={"name": "bench", "system_database_url": f"sqlite:///{path}"})

    @DBOS.step()
    def call(step: str, n: int) -> str:
        body = json.dumps({"n": n, "step": step}).encode()
        request = urllib.request.Request(  # noqa: S310 (the bench's own http URL)
            f"{url}/{step}", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.read().decode()

    @DBOS.workflow()
    def three_steps(n: int) -> None:
        call("validate", n)
        call("pay", n)
        call("notify", n)

    DBOS.launch()
    if capacity is not None:
        queue = DBOS.register_queue("lanes", global_concurrency=capacity, polling_interval_sec=0.01)
    started, cpu = time.monotonic(), time.process_time()
    if capacity is not None:
        handles = [queue.enqueue(three_steps, n) for n in range(count)]
        for handle in handles:
            handle.get_result()
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(three_steps, range(count)))
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    print(json.dumps({"steps": 3 * count, "seconds": seconds, "cpu": cpu}))
    DBOS.destroy()


if __name__ == "__main__":
    main()
