"""The seeds' grant payment (chapter 2): one blocking call, `process_workflow(request)`.

    hms-mgmt serve --config examples/grant_payment.yaml &
    python -m examples.services applications --port 8101 &
    python -m examples.services ach --port 8102 --fail-rate 0 &
    python -m examples.grant_payment --url http://127.0.0.1:9797   # the default URL

GrantPayment is a YAML workflow (examples/grant_payment.yaml): validate the application,
pay through the ACH service, check the transfer an hour later, announce it. The caller
does not wait an hour: the workflow says `respond_after: pay`, so the answer comes as
soon as the payment is made, `{"status": ..., "payment_id": ...}`, while the process goes
on in the daemon (its status is then `running` or `waiting`, not yet `completed`).
"""

from __future__ import annotations

import argparse
from typing import Any

from hms_mgmt import SyncClient


def process_grant(url: str, request: dict[str, Any]) -> dict[str, Any]:
    """The seeds' `ManagementLayer().process_workflow(request)`, against the daemon."""
    with SyncClient(url) as ml:
        return ml.process_workflow("GrantPayment", request, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9797", help="the daemon")
    args = parser.parse_args()
    request = {
        "application_id": "GR-2023-55",
        "applicant": {"name": "Jane Doe", "bank_account": "12345"},
        "amount": 2500,
    }
    print(process_grant(args.url, request))


if __name__ == "__main__":
    main()
