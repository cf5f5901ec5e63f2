"""The worker of `make demo`: runs the function steps of the examples' workflows.

    python -m examples.worker --url http://127.0.0.1:9797   # the default URL

Deploys ChildSupportPayment and BuildingPermit to the daemon and serves their steps
until Ctrl-C or SIGTERM, finishing the steps it has started. It registers itself, so it
shows on the status page as an instance of each queue it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from hms_mgmt import Worker

from .building_permit import permit
from .child_support import payment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9797", help="the daemon")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # run() serves until Ctrl-C or SIGTERM, then lets the steps in flight finish.
    asyncio.run(Worker(args.url, workflows=[payment, permit]).run())


if __name__ == "__main__":
    main()
