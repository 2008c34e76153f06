#!/usr/bin/env bash
# Block orders compared on a GPU: `sort --method exact` (the reference's
# 'average' algorithm: a minute on a GPU, hours on 2 CPU cores) against
# `--method fast` and the order the checkpoint came with, and each order's
# perplexity ladder on one or more texts. Runs where scripts/device-check.sh
# runs, with the CUDA build of `bitstack` (scripts/build-cuda.sh; strip and
# xz it to carry it).
#
#   scripts/device-ladder.sh --bitstack BIN[.xz] --model DIR --calib FILE \
#       --text NAME=FILE:WINDOWS [--text ...] [--budgets "2.5 3.0 4.0"] \
#       [--methods "exact fast given"] [--device cuda]
#
# Each method sorts its own copy of DIR (`given` keeps DIR's order). Writes
# to $OUT (default ./device-ladder-out):
#   order-METHOD.json  each sort's block order (copy it into the checkpoint
#                      as bitstack_order.json to use it)
#   sort-METHOD.log    the sort's output, with its time
#   ladder.jsonl       one `eval --json` object per line, tagged with text,
#                      budget and method
#   ladder.md          the PPL table, one row per text and budget (printed last)
set -uo pipefail
source "$(dirname "$0")/device-env.sh"

bin=""
model=""
calib=""
texts=()
budgets="2.0 2.5 3.0 3.5 4.0 4.5 5.0 6.0"
methods="exact fast given"
device=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --bitstack) bin="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --calib) calib="$2"; shift 2 ;;
    --text) texts+=("$2"); shift 2 ;;
    --budgets) budgets="$2"; shift 2 ;;
    --methods) methods="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device-ladder.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for need in bin model calib; do
  [ -n "${!need}" ] || { echo "device-ladder.sh: --${need/bin/bitstack} is required (see --help)" >&2; exit 2; }
done
[ -f "$model/config.json" ] || { echo "device-ladder.sh: $model is not a checkpoint dir (no config.json)" >&2; exit 2; }
[ ${#texts[@]} -gt 0 ] || { echo "device-ladder.sh: at least one --text NAME=FILE:WINDOWS is required" >&2; exit 2; }

out="${OUT:-device-ladder-out}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "${bin%.xz}" != "$bin" ]; then
  unpack_xz "$bin" "$work/bitstack"
  bin="$work/bitstack"
fi
export LD_LIBRARY_PATH="$(gpu_library_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1

# One copy of the checkpoint per method (hard links: only the order differs).
for m in $methods; do
  mkdir -p "$work/$m"
  cp -l "$model"/* "$work/$m/" 2>/dev/null || cp "$model"/* "$work/$m/"
  if [ "$m" != given ]; then
    rm -f "$work/$m/bitstack_order.json"
    start=$(date +%s)
    "$bin" sort "$work/$m" --method "$m" --calib "$calib" --device "$device" > "$out/sort-$m.log" 2>&1
    status=$?
    echo "sort --method $m: exit $status, $(( $(date +%s) - start )) s" | tee -a "$out/sort-$m.log"
  fi
  cp "$work/$m/bitstack_order.json" "$out/order-$m.json" 2>/dev/null
done

{
  printf '| text | budget (bpw) |'
  for m in $methods; do printf ' %s |' "$m"; done
  printf '\n|---|---|'
  for m in $methods; do printf -- '---|'; done
  printf '\n'
} > "$out/ladder.md"
for spec in "${texts[@]}"; do
  name="${spec%%=*}"
  rest="${spec#*=}"
  file="${rest%:*}"
  windows="${rest##*:}"
  for b in $budgets; do
    row="| $name | $b |"
    for m in $methods; do
      json=$("$bin" eval "$work/$m" --budget "${b}bpw" --text "$file" --windows "$windows" \
        --device "$device" --json 2>>"$out/eval.err" | tail -1)
      echo "{\"text\":\"$name\",\"budget\":$b,\"method\":\"$m\",\"eval\":${json:-null}}" >> "$out/ladder.jsonl"
      ppl=$(printf '%s' "$json" | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["ppl"])' 2>/dev/null)
      row="$row ${ppl:-error} |"
    done
    echo "$row" >> "$out/ladder.md"
  done
done
cat "$out/gpu.txt" "$out/ladder.md"
grep -h 'exit' "$out"/sort-*.log
