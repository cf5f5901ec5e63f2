"""The seeds' grant-payment story as three small services that register themselves.

    python -m examples.services applications --port 8101
    python -m examples.services ach --port 8102 --fail-rate 0.15
    python -m examples.services notifier --port 8103

Each serves /health, registers with the daemon via `hms_mgmt.registration_ctx` while it
runs (heartbeats, deregistration at exit) and answers the GrantPayment steps.
The ach service fails a share of its transfers with 503 (retried) and bounces
some at the follow-up with 422 (compensated), and its health check is now and
then slow, so retries, compensation and burn rates show on the status page.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import secrets

from aiohttp import web

from hms_mgmt import registration_ctx

log = logging.getLogger("examples")


def applications_app() -> web.Application:
    async def validate(request: web.Request) -> web.Response:
        body = await request.json()
        amount = body.get("amount", 0)
        if not isinstance(amount, int | float) or not 0 < amount <= 50_000:
            return web.json_response({"valid": False, "reason": "amount out of range"}, status=422)
        return web.json_response({"valid": True, "application": body.get("application")})

    app = web.Application()
    app.router.add_post("/validate", validate)
    return app


def ach_app(fail_rate: float) -> web.Application:
    transfers: dict[str, dict[str, object]] = {}

    async def create(request: web.Request) -> web.Response:
        if random.random() < fail_rate:
            return web.json_response({"error": "bank link busy"}, status=503)
        body = await request.json()
        payment_id = "pay-" + secrets.token_hex(4)
        transfers[payment_id] = {
            "payment_id": payment_id,
            "amount": body.get("amount"),
            "status": "pending",
        }
        return web.json_response(transfers[payment_id], status=201)

    async def status(request: web.Request) -> web.Response:
        transfer = transfers.get(request.match_info["id"])
        if transfer is None:
            return web.json_response({"error": "no such transfer"}, status=404)
        if random.random() < fail_rate / 2:  # the bank bounced it: no retry, compensate
            transfer["status"] = "rejected"
            return web.json_response({"error": "rejected by the bank", **transfer}, status=422)
        transfer["status"] = "settled"
        return web.json_response(transfer)

    async def cancel(request: web.Request) -> web.Response:
        transfer = transfers.get(request.match_info["id"])
        if transfer is not None:
            transfer["status"] = "cancelled"
        return web.json_response({"cancelled": request.match_info["id"]})

    async def health(request: web.Request) -> web.Response:
        # Now and then slow, so the latency SLO has something to count.
        if random.random() < fail_rate / 3:
            await asyncio.sleep(0.4)
        return web.json_response({"status": "UP"})

    app = web.Application()
    app.router.add_post("/transfers", create)
    app.router.add_get("/transfers/{id}", status)
    app.router.add_post("/transfers/{id}/cancel", cancel)
    app.router.add_get("/health", health)
    return app


def notifier_app() -> web.Application:
    async def notify(request: web.Request) -> web.Response:
        body = await request.json()
        log.info("notice sent to applicant: %s", body)
        return web.json_response({"sent": True})

    app = web.Application()
    app.router.add_post("/notices", notify)
    return app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("service", choices=["applications", "ach", "notifier"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--registry", default="http://127.0.0.1:9797")
    parser.add_argument("--fail-rate", type=float, default=0.15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    builders = {
        "applications": applications_app,
        "ach": lambda: ach_app(args.fail_rate),
        "notifier": notifier_app,
    }
    app = builders[args.service]()
    if not any(r.resource and r.resource.canonical == "/health" for r in app.router.routes()):
        app.router.add_get("/health", health)
    url = f"http://127.0.0.1:{args.port}"
    app.cleanup_ctx.append(
        registration_ctx(
            args.registry,
            args.service,
            f"{args.service}-{args.port}",
            url=url,
            ttl="15s",
            tags=["grants"],
            probe={
                "path": "/health",
                "interval": "5s",
                "conditions": ["[STATUS] == 200", "[BODY].status == UP"],
            },
        )
    )
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
