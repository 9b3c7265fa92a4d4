#!/usr/bin/env bash
# Quickstart: build edge-agent and core-ingest, make a private CA and certificates, start a
# core node, a local Mosquitto (Debian package, installed if missing) with
# deploy/mosquitto/backhaul.conf on 127.0.0.1:18830 and the agent; publish sample CDRs and
# sensor readings; show what the agent logged and forwarded and what the core stored.
# Ctrl-C (or the end) stops everything. Everything lives in target/quickstart/ (wiped first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH="$PATH:/usr/sbin"

if ! command -v mosquitto >/dev/null 2>&1; then
  echo "installing mosquitto (Debian)…"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

cargo build --release --locked -p edge-agent -p core-ingest
work=target/quickstart
rm -rf "$work"
mkdir -p "$work/mosquitto"
core=target/release/core-ingest
"$core" certs init --dir "$work/certs" --name localhost --name 127.0.0.1 >/dev/null
"$core" certs issue --dir "$work/certs" --edge-id edge-quickstart >/dev/null
sed -e 's|^listener 1883 127.0.0.1|listener 18830 127.0.0.1|' \
    -e "s|^persistence_location .*|persistence_location $PWD/$work/mosquitto/|" \
    deploy/mosquitto/backhaul.conf > "$work/mosquitto.conf"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
"$core" validate --config deploy/quickstart/core-ingest.toml
RUST_LOG=info "$core" run --config deploy/quickstart/core-ingest.toml 2>"$work/core.log" &
pids+=($!)
agent=target/release/edge-agent
"$agent" validate --config deploy/quickstart/edge-agent.toml
RUST_LOG=info "$agent" run --config deploy/quickstart/edge-agent.toml 2>"$work/agent.log" &
pids+=($!)

for _ in $(seq 50); do
  "$agent" status --config deploy/quickstart/edge-agent.toml 2>/dev/null | grep -q ': ready' && break
  sleep 0.2
done

echo "publishing 100 CDRs and 100 sensor readings at QoS 1…"
for i in $(seq 100); do
  mosquitto_pub -p 18830 -q 1 -t "cdr/site-1/probe-$((i % 4))" \
    -m "{\"imsi\":\"20801$(printf %010d "$i")\",\"cell\":\"lyon-$((i % 7))\",\"duration_s\":$((i * 3 % 600)),\"bytes_up\":$((i * 977))}"
  mosquitto_pub -p 18830 -q 1 -t "sensors/site-1/temp-$((i % 3))" \
    -m "[{\"bn\":\"urn:dev:temp-$((i % 3)):\",\"n\":\"temp\",\"u\":\"Cel\",\"v\":$((200 + i % 50))}]"
done
sleep 0.5

"$agent" status --config deploy/quickstart/edge-agent.toml
echo
echo "forwarded to the core:"
curl -s http://127.0.0.1:19464/metrics | grep -E '^backhaul_edge_forward_(connected|batches_sent_total|batches_acked_total)' || true
echo "stored at the core:"
curl -s http://127.0.0.1:19465/metrics | grep -E '^backhaul_core_(batches_stored_total|duplicate_batches_total|connections) '
echo
echo "first records of stream cdr:"
"$agent" log dump --data-dir "$work/data" --stream cdr --limit 3
echo
if [ -t 0 ] && [ -z "${CI:-}" ]; then
  echo "Running (agent: http://127.0.0.1:19464/metrics, core: http://127.0.0.1:19465/metrics). Ctrl-C stops it."
  wait "${pids[2]}"
fi
