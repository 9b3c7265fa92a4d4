#!/usr/bin/env bash
# Quickstart: build the three binaries, then `loadgen quickstart` with the configs beside this
# file: a private CA and certificates (core-ingest certs), core-ingest and edge-agent in listen
# mode (devices publish to the agent itself: no broker), simulated devices for about 30 s with
# a progress bar, everything read back from the core and verified (lost = 0, duplicated = 0),
# then how to look at the data. Everything lives in target/quickstart/ (wiped first); no
# external service is needed. Extra arguments go to `loadgen quickstart` (e.g. --seconds 60).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --locked -p edge-agent -p core-ingest -p loadgen
exec target/release/loadgen quickstart \
  --core-config deploy/quickstart/core-ingest.toml \
  --agent-config deploy/quickstart/edge-agent.toml "$@"
