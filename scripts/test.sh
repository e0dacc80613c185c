#!/usr/bin/env bash
# Sets up the test ground (idempotent, cached) and runs every check and test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
eval "$(bash scripts/provision.sh)"
t1=$(date +%s)
echo "provisioning took $((t1 - t0)) s"
echo "kube-apiserver under test: $("$WA_KUBE_APISERVER" --version)"
# Keep heavy builds out of the clone so a fresh clone on a warm machine builds incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wa-gateway/target}"
# One-shot builds gain nothing from incremental artifacts, which cost many GiB of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
t2=$(date +%s)
echo "checks and tests took $((t2 - t1)) s"
