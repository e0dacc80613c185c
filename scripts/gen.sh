#!/usr/bin/env bash
# Regenerates every checked-in generated file (a test fails when one is stale).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p crds --bin crdgen > crds/whatsappsession.yaml
cp crds/whatsappsession.yaml charts/whatsapp-gateway/crds/whatsappsession.yaml
# The chart's rendered manifests (tests/snapshots/chart-*.yaml), through the test that checks them.
WA_UPDATE_SNAPSHOTS=1 cargo test -q -p tests --test chart chart_renderings_match_the_checked_in_snapshots
