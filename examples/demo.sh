#!/usr/bin/env bash
# `make demo`: the daemon, the three grant services, and a trickle of grant applications.
# Open http://127.0.0.1:9797/ ; one Ctrl-C stops everything this script started.
# HMS_DEMO_PORT moves the daemon (9797), HMS_DEMO_SERVICES_PORT the first of the three
# services (8101; the others take the next two ports), HMS_DEMO_DB the database
# (var/demo.db, relative to examples/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${HMS_DEMO_BIN:-.venv/bin}  # the tests pass their own interpreter's directory
export HMS_DEMO_PORT=${HMS_DEMO_PORT:-9797}
FIRST_SERVICE_PORT=${HMS_DEMO_SERVICES_PORT:-8101}
REGISTRY=http://127.0.0.1:$HMS_DEMO_PORT
daemon=
services=()

# Background jobs of a script ignore SIGINT, so a Ctrl-C reaches only this shell and its
# foreground child: the trap must stop everything itself, and exit (a trap that returns
# resumes the loop, which then posts to a dead daemon forever).
stop() {
    trap - INT TERM EXIT
    # The services first: they deregister while the daemon still answers.
    stop_pids "${services[@]}"
    stop_pids $daemon
    exit "${1:-0}"
}

# TERM, up to 10 s for a clean shutdown, then KILL what is left.
stop_pids() {
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 100); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
    wait "$@" 2>/dev/null || true
}

trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop $?' EXIT

if curl -s -o /dev/null "$REGISTRY/healthz"; then
    echo "something already listens on $REGISTRY; stop it first (make run?)" >&2
    exit 1
fi
$BIN/hms-mgmt serve --config examples/demo.yaml &
daemon=$!
for _ in $(seq 100); do curl -sf "$REGISTRY/readyz" >/dev/null && break; sleep 0.1; done
port=$FIRST_SERVICE_PORT
for service in applications "ach --fail-rate 0.2" notifier; do
    # shellcheck disable=SC2086  # the service's name, then its own options
    $BIN/python -m examples.services $service --port $port --registry "$REGISTRY" &
    services+=($!)
    port=$((port + 1))
done
# The worker of the code-first examples (examples/worker.py): it deploys ChildSupportPayment
# and BuildingPermit and runs their Python steps.
$BIN/python -m examples.worker --url "$REGISTRY" &
services+=($!)
echo "status page: $REGISTRY/   (grant applications arrive every 3 s; Ctrl-C stops the demo)"
n=0
# Ends when the daemon does, whoever stopped it.
while kill -0 "$daemon" 2>/dev/null; do
    # `wait` on a background sleep, unlike a foreground sleep, lets a signal's trap run at once.
    sleep 3 &
    wait $! || true
    n=$((n + 1))
    amount=$(((RANDOM % 9000) + 500))
    curl -s --max-time 5 -X POST "$REGISTRY/api/grants" -H 'Content-Type: application/json' \
        -d "{\"application\": \"GR-2026-$n\", \"amount\": $amount}" >/dev/null || true
    # A child-support payment every other tick; every tenth is over the payment limit, so
    # it fails and its reserved funds are released (a compensation on the page).
    if [ $((n % 2)) = 0 ]; then
        support=$(((RANDOM % 900) + 100))
        [ $((n % 10)) = 0 ] && support=12000
        curl -s --max-time 5 -X POST "$REGISTRY/v1/workflows/ChildSupportPayment" \
            -H 'Content-Type: application/json' \
            -d "{\"input\": {\"parent_id\": \"P-$n\", \"amount\": $support}}" >/dev/null || true
    fi
done
echo "the daemon stopped; stopping the services" >&2
