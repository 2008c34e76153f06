#!/usr/bin/env bash
# Two tensor-parallel ranks of mistralrs-bitstack on this machine, over
# mistral.rs's `ring` backend (TCP on loopback): each rank holds half of
# every BitStack linear; rank 0 answers, rank 1 follows it.
#
#   scripts/tp-loopback.sh MODEL [PROMPT]
#
# MODEL is a BitStack checkpoint whose attention heads, key/value heads and
# linear widths split in two (e.g. Qwen2.5-0.5B: 14 heads, 2 key/value
# heads; SmolLM2-135M's 9 heads do not). Builds the binary if needed.
# Serving instead: run `serve` with the same --ring-config files; only rank
# 0 listens. A rank that dies ends the other's request with an error; a
# rank that hangs does after RING_TIMEOUT_SECS (60).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:?usage: scripts/tp-loopback.sh MODEL [PROMPT]}"
prompt="${2:-What is the capital of France?}"

bin=integration/target/release/mistralrs-bitstack
[ -x "$bin" ] || cargo build --release --manifest-path integration/Cargo.toml
work=$(mktemp -d)
trap 'kill "${follower:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
master=$(port); p0=$(port); p1=$(port)
cat > "$work/rank0.json" <<JSON
{"master_port": $master, "port": $p0, "right_ip": "127.0.0.1", "right_port": $p1, "rank": 0, "world_size": 2}
JSON
cat > "$work/rank1.json" <<JSON
{"master_ip": "127.0.0.1", "master_port": $master, "port": $p1, "right_ip": "127.0.0.1", "right_port": $p0, "rank": 1, "world_size": 2}
JSON

"$bin" serve --model "$model" --ring-config "$work/rank1.json" --port 0 2> "$work/rank1.log" &
follower=$!
"$bin" run --model "$model" --ring-config "$work/rank0.json" --prompt "$prompt" --max-tokens 64 --temperature 0
echo "rank 1 log:" >&2
tail -5 "$work/rank1.log" >&2
