"""The seeds' building permit (chapter 6): start a case, let it wait for the document
service's answer, advance it with a signal, then read its status and result.

    python -m examples.building_permit --url http://127.0.0.1:9797   # the default URL

Needs only a running daemon (`make run`). The workflow waits at its `docs` step for a
`docsValidated` signal, as the seed's process waited for the DocumentService's event.
While it waits nothing runs anywhere: the daemon keeps the process on disk (for up to
2 days here), so a restart of the daemon or of this worker loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from hms_mgmt import Client, NonRetryable, ProcessHandle, StepContext, Worker, Workflow, wait_for


def submit_application(context: StepContext) -> dict[str, Any]:
    """Registers the application; its number is the process id (what the citizen sees)."""
    return {"application": context.process_id, "applicant": context.input["applicant_id"]}


def charge_fee(context: StepContext) -> dict[str, Any]:
    # The docs step's output is the signal's JSON: what the document service found.
    if not context.steps["docs"].get("valid"):
        raise NonRetryable(f"documents rejected: {context.steps['docs'].get('reason')}")
    return {"receipt": "fee-" + context.process_id[:8], "amount": 120}


def assign_inspector(context: StepContext) -> dict[str, Any]:
    inspectors = ["Dana", "Sami", "Lee"]
    return {"inspector": inspectors[len(context.input["applicant_id"]) % len(inspectors)]}


def notify_applicant(context: StepContext) -> dict[str, Any]:
    return {"notice": f"inspection by {context.steps['inspect']['inspector']}"}


permit = (
    Workflow(
        "BuildingPermit",
        deadline="30d",
        # The result a caller gets: picked from the steps' outputs.
        output={
            "receipt": "{steps.fee.receipt}",
            "inspector": "{steps.inspect.inspector}",
        },
    )
    .step("submit", submit_application)
    .step("docs", wait_for(signal="docsValidated", timeout="2d"))
    .step("fee", charge_fee)
    .step("inspect", assign_inspector)
    .step("notify", notify_applicant)
)


async def waiting_for_signal(handle: ProcessHandle, limit: float = 30) -> dict[str, Any]:
    """The process once it waits at its `docs` step (a signal sent earlier is kept too;
    waiting here only lets the example show the waiting state)."""
    deadline = time.monotonic() + limit
    while True:
        process = await handle.status()
        waiting = process.get("waiting_for") or {}
        if waiting.get("kind") == "signal" or time.monotonic() > deadline:
            return process
        await asyncio.sleep(0.05)


async def apply_for_permit(
    url: str, application: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start, wait for the signal, signal: the process while it waited, and once ended."""
    async with Worker(url, workflows=[permit]), Client(url) as hms:
        handle = await hms.start("BuildingPermit", application)
        print(f"application {handle.id} started")

        waiting = await waiting_for_signal(handle)
        print(f"  {waiting['status']}: {waiting['waiting_for']}")

        # The document service has checked the documents: it answers with a signal.
        await hms.signal(handle.id, "docsValidated", {"valid": True, "checked_by": "docs-1"})

        report = await handle.result(timeout=30)
        print(f"  {report.status}: {report.output}")
        return waiting, await handle.status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9797", help="the daemon")
    args = parser.parse_args()
    asyncio.run(apply_for_permit(args.url, {"applicant_id": "A-1", "parcel": "12-345"}))


if __name__ == "__main__":
    main()
