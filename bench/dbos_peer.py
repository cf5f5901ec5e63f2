"""The peer for bench.workflows: the same 3-step workload on DBOS Transact (SQLite).

    python -m bench.dbos_peer URL COUNT CONCURRENCY DBFILE

Prints one JSON line: steps, seconds, cpu. Runs in its own process so its CPU
is measured apart from the daemon's.
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
    started, cpu = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(three_steps, range(count)))
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    print(json.dumps({"steps": 3 * count, "seconds": seconds, "cpu": cpu}))
    DBOS.destroy()


if __name__ == "__main__":
    main()
