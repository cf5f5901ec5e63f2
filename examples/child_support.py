"""The seeds' child-support payment (chapter 7): steps that are Python functions, and a
compensation that gives back reserved funds when the payment fails.

    python -m examples.child_support --url http://127.0.0.1:9797   # the default URL

Needs only a running daemon (`make run`). This script is the worker and the client at
once: the `Worker` deploys the workflow to the daemon and runs its steps; the daemon keeps
every process durable, retries and compensates. Two payments are run: one goes through,
the other is refused by the payment service, so the funds reserved for it are released.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from typing import Any

from hms_mgmt import Client, NonRetryable, StepContext, Worker, Workflow

log = logging.getLogger("examples.child_support")

PAYMENT_LIMIT = 10_000  # the payment service refuses larger transfers


class Treasury:
    """Stands in for the Treasury service: funds held per process.

    A hold is keyed by the process id, so a step that runs twice (a worker died before it
    reported) finds its hold again instead of reserving twice, and a release gives back
    exactly what that process still holds, once, however often it is called.
    """

    def __init__(self, balance: int) -> None:
        self.balance = balance
        self.holds: dict[str, int] = {}
        self._lock = threading.Lock()  # sync step functions run in the worker's threads

    def reserve(self, key: str, amount: int) -> int:
        with self._lock:
            if key not in self.holds:
                if amount > self.balance:
                    raise NonRetryable(f"treasury: {amount} asked, {self.balance} available")
                self.balance -= amount
                self.holds[key] = amount
            return self.holds[key]

    def settle(self, key: str) -> int:
        """The held funds have been paid out: the hold ends, nothing comes back."""
        with self._lock:
            return self.holds.pop(key, 0)

    def release(self, key: str) -> int:
        """Give back what `key` still holds (0 when nothing: never reserved, paid, or
        released already)."""
        with self._lock:
            amount = self.holds.pop(key, 0)
            self.balance += amount
            return amount


TREASURY = Treasury(balance=1_000_000)


# Each step function takes a StepContext (input, steps so far, process_id, attempt, ...)
# and returns JSON: that becomes the step's output, `steps.<name>` for the next ones.
def validate(context: StepContext) -> dict[str, Any]:
    """The governance check: a wrong request fails at once (NonRetryable), no retries."""
    amount = context.input.get("amount")
    if not isinstance(amount, int) or amount <= 0 or not context.input.get("parent_id"):
        raise NonRetryable("a payment needs a parent_id and a positive whole amount")
    return {"eligible": True}


def reserve_funds(context: StepContext) -> dict[str, Any]:
    held = TREASURY.reserve(context.process_id, context.input["amount"])
    return {"reserved": held}


def release_funds(context: StepContext) -> dict[str, Any]:
    """reserve_funds' compensation: run by the daemon when a later step fails."""
    released = TREASURY.release(context.process_id)
    log.info("released %d held for %s", released, context.process_id)
    return {"released": released}


def pay(context: StepContext) -> dict[str, Any]:
    amount = context.input["amount"]
    if amount > PAYMENT_LIMIT:  # the payment service says no: retrying will not help
        raise NonRetryable(f"payment service: {amount} is over the {PAYMENT_LIMIT} limit")
    TREASURY.settle(context.process_id)
    # The idempotency key is the same on every attempt of this step: a real payment
    # service would take it as its own, so a retried payment is never paid twice.
    return {"transaction_id": "tx-" + context.idempotency_key.replace("/", "-")}


def notify(context: StepContext) -> dict[str, Any]:
    email = context.input.get("parent_email", "parent@example.org")
    log.info("email to %s: payment of %d complete", email, context.input["amount"])
    return {"sent_to": email}


payment = (
    Workflow("ChildSupportPayment", deadline="2d")
    .step("validate", validate)
    .step("reserve", reserve_funds, compensate=release_funds)
    .step("pay", pay)
    .step("notify", notify)
)


async def pay_child_support(url: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each request to its end; the process of each, as the daemon shows it."""
    processes = []
    async with Worker(url, workflows=[payment]), Client(url) as hms:
        for request in requests:
            handle = await hms.start("ChildSupportPayment", request)
            report = await handle.result(timeout=30)
            if report.success:
                print(f"{handle.id}: paid, {report.output['pay']['transaction_id']}")
            elif report.error is not None:  # {"step", "message", "status", "body"}
                error = report.error
                print(f"{handle.id}: {report.status}, {error['step']} failed: {error['message']}")
            processes.append(await handle.status())
    return processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9797", help="the daemon")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    requests = [
        {"parent_id": "P-1", "amount": 450, "parent_email": "ana@example.org"},
        {"parent_id": "P-2", "amount": 12_000, "parent_email": "ben@example.org"},
    ]
    processes = asyncio.run(pay_child_support(args.url, requests))
    # The history of the refused payment: the failed `pay`, then `reserve` compensated.
    print(f"history of {processes[-1]['id']}:")
    for attempt in processes[-1]["history"]:
        print(
            f"  {attempt['step']:9} {attempt['kind']:10} {attempt['outcome']:7} "
            f"{attempt['error'] or ''}"
        )
    print(f"treasury: balance {TREASURY.balance}, held {sum(TREASURY.holds.values())}")


if __name__ == "__main__":
    main()
