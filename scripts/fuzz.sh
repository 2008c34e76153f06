#!/usr/bin/env bash
# Runs the fuzz tests long: every target of the three fuzz test binaries
# (bitstack-quant: store, config, order, shards, budget; bitstack-assets:
# gguf; bitstack-kernels: kernels) for SECONDS each, with a seed from the
# clock, then prints each target's case count.
#
#   scripts/fuzz.sh SECONDS
#
# Without BITSTACK_FUZZ_SECONDS (as `cargo test` runs them in CI) the same
# tests run a fixed seed and a few cases. A failing case prints its seed
# and index; BITSTACK_FUZZ_SEED=S BITSTACK_FUZZ_CASE=I replays it (see
# tests/fuzz_harness/mod.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/fuzz.sh SECONDS   (seconds per fuzz target)" >&2; }
if [ $# -ne 1 ] || ! [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  usage
  exit 2
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export BITSTACK_FUZZ_SECONDS="$1"
failed=()
for crate in bitstack-quant bitstack-assets bitstack-kernels; do
  echo "== $crate: fuzz targets, $1 s each" >&2
  # The harness runs the targets of one binary one at a time.
  if ! cargo test --release -p "$crate" --test fuzz -- --include-ignored --nocapture 2>&1 | tee -a "$log"; then
    failed+=("$crate")
  fi
done

echo
echo "== cases per target ($1 s each)"
grep -E '^fuzz [a-z]+: ' "$log" || true
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failures in ${failed[*]} (the output above names the seed and case to replay)" >&2
  exit 1
fi
