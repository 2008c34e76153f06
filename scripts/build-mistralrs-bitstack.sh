#!/usr/bin/env bash
# Sets up the patched mistral.rs crates (scripts/setup-mistralrs.sh) and
# builds the mistralrs-bitstack binary (release, CPU). Prints the binary's
# path as its last line:
#
#   bin=$(scripts/build-mistralrs-bitstack.sh | tail -1)
#   "$bin" run -m CHECKPOINT --quant bitstack --prompt "Hi" --max-tokens 32
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-mistralrs.sh >&2
target="${CARGO_TARGET_DIR:-$PWD/integration/target}"
CARGO_TARGET_DIR="$target" cargo build --release --manifest-path integration/Cargo.toml --bin mistralrs-bitstack >&2
echo "$target/release/mistralrs-bitstack"
