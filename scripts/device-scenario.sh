#!/usr/bin/env bash
# The GPU scenario: a mistral.rs server with BitStack weights under a memory
# budget lends weight memory to its paged KV pool under load and takes it
# back when idle; the same load on mistral.rs unquantized (bf16) and with
# ISQ Q4K under the same budget. Runs on a machine with an NVIDIA GPU, from
# the folder that scripts/build-mistralrs-bitstack.sh --cuda --bundle made:
#
#   device-scenario.sh --bundle DIR --gguf MODEL.gguf [--out DIR] [--clients N]
#                      [--max-tokens N] [--budget-mib N] [--work DIR]
#
# A GGUF over what one transfer takes can come in parts (`split -b 48M`),
# each given with its own --gguf, in order: they are joined first.
#
# 1. Makes the models on the machine (so only a GGUF travels): imports the
#    GGUF as a bf16 model (the dense baselines) and compresses it into a
#    BitStack checkpoint (4 blocks of rank 4 per linear, a quick recipe),
#    with the bundle's CPU `bitstack` binary and calibration text.
# 2. Checks logits: the bundle's cuda-test-mistralrs, when there, compares
#    mistral.rs's logits on CUDA with our runner's at three levels.
# 3. Serves each of bitstack (--memory-budget), unquantized bf16 and ISQ Q4K
#    (their paged pools sized to what the budget leaves beside their
#    linears), sends --clients concurrent streaming chats of --max-tokens,
#    then leaves the server idle for 10 s. Every resize of the weights and
#    of the pool, and every preemption, is in the server's log.
# 4. Times decode at full size, at 4 bpw and for both baselines
#    (mistralrs-bitstack bench).
#
# The budget counts linear weights and KV cache (the embeddings, norms and
# lm_head are the same for all three and held outside it). By default the
# load's KV cache is half the size of the bf16 linears, and the budget lies
# halfway between BitStack's floor and its full size beside that load: its
# weights must shrink and can, while the unquantized model does not fit.
# --out (default ./device-scenario-out) gets two files: summary.md (also
# printed last) and logs.tar.xz (one log per server, the requests as JSON
# lines, the bench and the logits test). Models and binaries are made in
# --work (default /tmp/device-scenario-work).
set -euo pipefail

bundle=""
gguf=()
out="$PWD/device-scenario-out"
work=/tmp/device-scenario-work
clients=16
max_tokens=""
budget_mib=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --gguf) gguf+=("$2"); shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --clients) clients="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --budget-mib) budget_mib="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device-scenario.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -d "$bundle" ] || { echo "device-scenario.sh: --bundle DIR is required" >&2; exit 2; }
[ ${#gguf[@]} -gt 0 ] || { echo "device-scenario.sh: --gguf FILE is required" >&2; exit 2; }
for part in "${gguf[@]}"; do
  [ -f "$part" ] || { echo "device-scenario.sh: $part does not exist" >&2; exit 2; }
done
bundle=$(cd "$bundle" && pwd)
mkdir -p "$out" "$work/bin"
final="$out"
out="$work/logs"
mkdir -p "$out"
if [ ${#gguf[@]} -gt 1 ]; then
  cat "${gguf[@]}" > "$work/model.gguf"
  gguf=("$work/model.gguf")
fi

# Binaries (xz in the bundle) and the CUDA libraries: the bundle's cudart,
# the machine's cuBLAS and cuRAND (driver or Python wheels).
for f in "$bundle"/*.xz; do
  [ -e "$f" ] || continue
  name=$(basename "$f" .xz)
  [ -x "$work/bin/$name" ] || { xz -dc "$f" > "$work/bin/$name"; chmod +x "$work/bin/$name"; }
done
libs="$bundle"
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  found=$(find / -xdev -name "$lib" -not -path '*/proc/*' 2>/dev/null | head -1 || true)
  [ -n "$found" ] && libs="$libs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
bin="$work/bin/mistralrs-bitstack"
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
echo "GPU: $gpu" | tee "$out/gpu.txt"

# 1. Models.
dense="$work/dense"
ckpt="$work/bitstack"
if [ ! -f "$dense/config.json" ]; then
  "$work/bin/bitstack" import-gguf --dtype bf16 "${gguf[0]}" "$dense"
fi
if [ ! -f "$ckpt/config.json" ]; then
  "$work/bin/bitstack" compress "$dense" "$ckpt" --layout blocks --k 4 --niter 4 --calib "$bundle/wiki-calib.txt" \
    --calib-windows 8 --seq-len 256 --dense-dtype bf16 2>&1 | tail -3
fi

# 2. Logits on CUDA.
if [ -x "$work/bin/cuda-test-mistralrs" ]; then
  BITSTACK_CUDA_CHECKPOINT="$ckpt" "$work/bin/cuda-test-mistralrs" --test-threads 1 --nocapture \
    2>&1 | tee "$out/logits.log" | grep -E "level|test result" || true
fi

# The sizes the budget is split by, from the model's config.
read -r lin_bf16 lin_q4k kv_per_token < <(python3 - "$dense/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
h, n, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
heads = c["num_attention_heads"]
kv_heads = c.get("num_key_value_heads", heads)
head_dim = c.get("head_dim", h // heads)
linears = n * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * inter)
print(linears * 2, linears * 9 // 16, 2 * n * kv_heads * head_dim * 2)
EOF
)
mib=1048576
if [ -z "$max_tokens" ]; then
  # A load whose KV cache is half the bf16 linears.
  max_tokens=$(( lin_bf16 / 2 / kv_per_token / clients - 64 ))
  [ "$max_tokens" -ge 64 ] || max_tokens=64
fi
need=$(( clients * (max_tokens + 64) * kv_per_token ))
# BitStack's linears at full size and at the floor, from `bitstack inspect`.
read -r full_lin floor_lin < <("$work/bin/bitstack" inspect "$ckpt" | python3 -c '
import re, sys
text = sys.stdin.read()
full = int(re.search(r"total: (\d+) bytes of linear weights", text).group(1))
dense = int(re.search(r"dense parts: (\d+) bytes", text).group(1))
floor = int(re.search(r"floor \(one block in every linear plus the dense parts\): (\d+) bytes", text).group(1))
print(full, floor - dense)
')
headroom=$(( clients * 64 * kv_per_token ))
# Halfway between BitStack's floor and its full size beside the load (so
# its weights must shrink, and can): the unquantized model does not fit.
[ -n "$budget_mib" ] || budget_mib=$(( (floor_lin + need + headroom + (full_lin - floor_lin) / 2) / mib + 1 ))
budget=$(( budget_mib * mib ))
kv_tokens() { local t=$(( (budget - $1) / kv_per_token )); [ "$t" -ge 16 ] && echo "$t" || echo 16; }
cat > "$out/setup.txt" <<EOF
GPU: $gpu
clients: $clients, max_tokens: $max_tokens, KV per token: $kv_per_token bytes
load KV need: $(( need / mib )) MiB (+ $(( headroom / mib )) MiB headroom); budget (linears + KV): $budget_mib MiB
BitStack linears: $(( full_lin / mib )) MiB at full size, $(( floor_lin / mib )) MiB at the floor
unquantized bf16 linears: $(( lin_bf16 / mib )) MiB -> pool of $(kv_tokens "$lin_bf16") tokens
ISQ Q4K linears: ~$(( lin_q4k / mib )) MiB -> pool of $(kv_tokens "$lin_q4k") tokens
EOF
cat "$out/setup.txt"

# 3. The load.
serve() { # name, then the server's arguments
  local name="$1"; shift
  local log="$out/$name.log"
  RUST_LOG="${RUST_LOG:-info,mistralrs_core=warn,mistralrs_core::weight_arbiter=info,mistralrs_core::paged_attention=info}" \
    "$bin" serve --device cuda --port 0 --max-seqs "$clients" "$@" > "$out/$name.stdout" 2> "$log" &
  local pid=$!
  local addr=""
  for _ in $(seq 600); do
    addr=$(grep -o 'http://[0-9.:]*' "$out/$name.stdout" 2>/dev/null | head -1 || true)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ -z "$addr" ]; then
    echo "$name: the server did not start; see $log" | tee -a "$out/summary.md"
    tail -5 "$log"
    kill "$pid" 2>/dev/null || true
    return 0
  fi
  python3 - "$addr" "$clients" "$max_tokens" "$out/$name-requests.jsonl" <<'EOF'
import http.client, json, sys, threading, time
addr, clients, max_tokens, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host, port = addr.removeprefix("http://").split(":")
topics = ["a lighthouse keeper", "a city under the sea", "the first train across a desert",
          "a library that never closes", "a robot learning to paint", "two rival bakers"]
results = [None] * clients
def one(i):
    body = json.dumps({"model": "default", "stream": True, "max_tokens": max_tokens,
        "temperature": 0.8, "seed": i,
        "messages": [{"role": "user", "content": f"Write a long, detailed story about {topics[i % len(topics)]}. Chapter {i + 1}."}]})
    start = time.time(); first = None; chunks = 0; error = None
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=900)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
        else:
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                msg = json.loads(line[5:])
                if "error" in msg:
                    error = str(msg["error"])[:200]
                for c in msg.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        chunks += 1
                        first = first or time.time()
    except Exception as e:
        error = repr(e)[:200]
    end = time.time()
    results[i] = {"client": i, "ok": error is None and chunks > 0, "error": error, "chunks": chunks,
        "ttft_s": (first - start) if first else None, "seconds": end - start,
        "decode_tok_s": (chunks - 1) / (end - first) if first and end > first and chunks > 1 else None}
threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
with open(path, "w") as f:
    for r in results: f.write(json.dumps(r) + "\n")
EOF
  sleep 10 # idle: the weights take their memory back
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

serve bitstack -m "$ckpt" --quant bitstack --memory-budget "${budget_mib}MiB" --paged-kv-tokens 256
serve unquantized-bf16 -m "$dense" --quant none --dtype bf16 --paged-kv-tokens "$(kv_tokens "$lin_bf16")"
serve isq-q4k -m "$dense" --quant none --dtype bf16 --isq q4k --paged-kv-tokens "$(kv_tokens "$lin_q4k")"

# 4. Decode speed, one stream.
"$bin" bench -m "$ckpt" --quant bitstack --device cuda --weight-budget 4bpw,100% --dense "$dense" \
  --gen-tokens 128 --repeats 3 > "$out/bench.md" 2> "$out/bench.log" || echo "bench failed: see bench.log"

python3 - "$out" <<'EOF' | tee "$out/summary.md"
import json, os, re, sys, statistics
out = sys.argv[1]
print(open(os.path.join(out, "setup.txt")).read())
print("| server | requests ok | preemptions | weight resizes | levels visited | back to full | pool resizes | median decode tok/s per stream |")
print("|---|---|---|---|---|---|---|---|")
for name in ["bitstack", "unquantized-bf16", "isq-q4k"]:
    log_path = os.path.join(out, name + ".log")
    req_path = os.path.join(out, name + "-requests.jsonl")
    if not os.path.exists(req_path):
        print(f"| {name} | did not run | | | | | | |"); continue
    reqs = [json.loads(l) for l in open(req_path)]
    log = open(log_path, errors="replace").read()
    pre = log.count("PagedAttention: preempted")
    moves = re.findall(r"bitstack resize: level (\d+) \S+ (\d+)", log)
    levels = sorted({int(a) for a, _ in moves} | {int(b) for _, b in moves})
    start = re.search(r"bitstack: level (\d+)/(\d+)", log)
    full = "-"
    if start:
        top = int(start.group(1))
        full = "yes" if (not moves or int(moves[-1][1]) == top) else f"no (ends at {moves[-1][1]} of {top})"
    pool = log.count("paged KV pool:")
    speeds = [r["decode_tok_s"] for r in reqs if r["decode_tok_s"]]
    med = f"{statistics.median(speeds):.1f}" if speeds else "-"
    ok = sum(r["ok"] for r in reqs)
    print(f"| {name} | {ok}/{len(reqs)} | {pre} | {len(moves)} | {levels if levels else '-'} | {full} | {pool} | {med} |")
print()
bench = os.path.join(out, "bench.md")
if os.path.exists(bench):
    print(open(bench).read())
logits = os.path.join(out, "logits.log")
if os.path.exists(logits):
    print("\n".join(l for l in open(logits) if "max |" in l or "test result" in l))
EOF
cp "$out/summary.md" "$final/summary.md"
tar -cJf "$final/logs.tar.xz" -C "$work" logs
