#!/usr/bin/env bash
# All the tests: the workspace's (end-to-end ones included; they fetch the
# pinned assets), then the mistral.rs integration's, which need the patched
# mistral.rs crates (scripts/setup-mistralrs.sh) and build them once
# (about 20 minutes on 2 cores; later runs reuse integration/target).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace -- --include-ignored
scripts/setup-mistralrs.sh
# The elastic paged KV pool's bookkeeping (mistralrs-core-0003), with
# mistral.rs's own tests of the pool beside it: plain Rust, on the CPU.
cargo test --release --manifest-path integration/Cargo.toml -p mistralrs-core --lib paged_attention::
# One test at a time: the server tests time concurrent requests.
cargo test --release --manifest-path integration/Cargo.toml -- --test-threads 1
