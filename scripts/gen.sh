#!/usr/bin/env bash
# Regenerates every checked-in generated file (a test fails when one is stale).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p crds --bin crdgen > crds/whatsappsession.yaml
cp crds/whatsappsession.yaml charts/whatsapp-gateway/crds/whatsappsession.yaml
