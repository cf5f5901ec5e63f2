#!/usr/bin/env bash
# `make demo`: the daemon, the three grant services, and a trickle of grant applications.
# Open http://127.0.0.1:9797/ ; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
REGISTRY=http://127.0.0.1:9797
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT INT TERM

if curl -s -o /dev/null $REGISTRY/healthz; then
    echo "something already listens on $REGISTRY; stop it first (make run?)" >&2
    exit 1
fi
mkdir -p var
$BIN/hms-mgmt serve --config examples/demo.yaml & pids+=($!)
for _ in $(seq 100); do curl -sf $REGISTRY/readyz >/dev/null && break; sleep 0.1; done
$BIN/python -m examples.services applications --port 8101 & pids+=($!)
$BIN/python -m examples.services ach --port 8102 --fail-rate 0.2 & pids+=($!)
$BIN/python -m examples.services notifier --port 8103 & pids+=($!)
echo "status page: $REGISTRY/   (grant applications arrive every 3 s)"
n=0
while true; do
    sleep 3
    n=$((n + 1))
    amount=$(( (RANDOM % 9000) + 500 ))
    curl -s -X POST $REGISTRY/api/grants -H 'Content-Type: application/json' \
        -d "{\"application\": \"GR-2026-$n\", \"amount\": $amount}" >/dev/null || true
done
