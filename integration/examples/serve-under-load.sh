#!/usr/bin/env bash
# Serve a BitStack checkpoint under a memory budget for weights plus KV cache,
# send concurrent streaming requests with long prompts, and show the weights
# giving way to the KV cache and growing back.
#
#   integration/examples/serve-under-load.sh CHECKPOINT [BUDGET] [REQUESTS]
#
# MISTRALRS_BITSTACK names a built binary (else scripts/build-mistralrs-bitstack.sh
# builds one). BUDGET defaults to 250MiB (SmolLM2-135M: about 168 MiB of weights at full
# size, 46 KiB of KV cache per token in f32), REQUESTS to 4.
set -euo pipefail
cd "$(dirname "$0")/../.."
ckpt="${1:?usage: serve-under-load.sh CHECKPOINT [BUDGET] [REQUESTS]}"
budget="${2:-250MiB}"
requests="${3:-4}"
# A built binary, or build one.
bin="${MISTRALRS_BITSTACK:-$(scripts/build-mistralrs-bitstack.sh | tail -1)}"
log=$(mktemp)
"$bin" serve -m "$ckpt" --quant bitstack --memory-budget "$budget" --port 0 >"$log.out" 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$log" "$log.out"' EXIT
until grep -q "listening on" "$log.out" 2>/dev/null; do
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.2
done
addr=$(sed -n 's/^listening on //p' "$log.out")
echo "server at $addr, budget $budget; sending $requests requests"
note=$(printf 'This is a long note about rivers, written to fill the context. %.0s' $(seq 40))
pids=()
for i in $(seq "$requests"); do
  curl -sN "$addr/v1/chat/completions" -H 'Content-Type: application/json' -d "{
    \"model\": \"default\", \"stream\": true, \"max_tokens\": 24, \"temperature\": 0,
    \"messages\": [{\"role\": \"user\", \"content\": \"$note Summarize this in one sentence ($i).\"}]
  }" | grep -c '^data: ' | sed "s/^/request $i: chunks received: /" &
  pids+=($!)
done
wait "${pids[@]}"
sleep 1
echo "--- resizes and the KV room they made:"
sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E "weight arbiter|bitstack resize" | cut -c29-
