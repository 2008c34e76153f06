#!/usr/bin/env bash
# Sets up the patched mistral.rs crates (scripts/setup-mistralrs.sh) and
# builds the mistralrs-bitstack binary (release). Prints the binary's path as
# its last line:
#
#   bin=$(scripts/build-mistralrs-bitstack.sh | tail -1)
#   "$bin" run -m CHECKPOINT --quant bitstack --prompt "Hi" --max-tokens 32
#
#   scripts/build-mistralrs-bitstack.sh --cuda               # the GPU build
#   scripts/build-mistralrs-bitstack.sh --cuda --bundle DIR  # and pack it
#
# --cuda builds with the `cuda` feature (mistral.rs's CUDA build, its paged
# attention, our CUDA kernels) on any x86-64 Linux machine, with or without
# a GPU: the pinned CUDA 13.0 toolkit wheels and a stub libcuda come from
# scripts/cuda-env.sh, as for scripts/build-cuda.sh. Kernels are built for
# $CUDA_COMPUTE_CAP (default 90: H100/H200), into
# integration/target/cuda (its own folder, so the CPU build stays).
#
# --bundle DIR packs what scripts/device-scenario.sh needs on a GPU
# machine: the binary and the CUDA logits test (cuda-test-mistralrs),
# stripped and xz-compressed, the CPU `bitstack` binary (to make the models
# there), the calibration text, the CUDA runtime they link, and the
# scenario script. The bundle must stay under 64 MiB; the script fails
# when it does not. The model travels as its GGUF, beside the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."

cuda=""
bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1; shift ;;
    --bundle) bundle="${2:?--bundle needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-mistralrs-bitstack.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$bundle" ] && [ -z "$cuda" ]; then
  echo "build-mistralrs-bitstack.sh: --bundle packs the GPU build; add --cuda" >&2
  exit 2
fi

scripts/setup-mistralrs.sh >&2
if [ -z "$cuda" ]; then
  target="${CARGO_TARGET_DIR:-$PWD/integration/target}"
  CARGO_TARGET_DIR="$target" cargo build --release --manifest-path integration/Cargo.toml --bin mistralrs-bitstack >&2
  echo "$target/release/mistralrs-bitstack"
  exit 0
fi

source scripts/cuda-env.sh
target="${BITSTACK_CUDA_TARGET_DIR:-$PWD/integration/target/cuda}"
CARGO_TARGET_DIR="$target" cargo build --release --manifest-path integration/Cargo.toml \
  --features cuda --bin mistralrs-bitstack >&2
if [ -n "$bundle" ]; then
  test_bin=$(CARGO_TARGET_DIR="$target" cargo test --release --manifest-path integration/Cargo.toml \
    --features cuda --test cuda --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])
' | tail -1)
fi
bin="$target/release/mistralrs-bitstack"
echo "built: $bin (needs libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13 at run time)" >&2

if [ -n "$bundle" ]; then
  mkdir -p "$bundle"
  cargo build --release -p bitstack-cli >&2
  assets="${BITSTACK_HOME:-$HOME/.cache/bitstack}"
  [ -f "$assets/wiki-calib.txt" ] || target/release/bitstack fetch-assets >&2
  strip -o "$bundle/mistralrs-bitstack" "$bin"
  strip -o "$bundle/cuda-test-mistralrs" "$test_bin"
  strip -o "$bundle/bitstack" target/release/bitstack
  xz -T0 -9 -f "$bundle/mistralrs-bitstack" "$bundle/cuda-test-mistralrs" "$bundle/bitstack"
  cp "$assets/wiki-calib.txt" "$bundle/"
  cp "$cuda_home/lib/libcudart.so.13" "$bundle/"
  cp scripts/device-scenario.sh "$bundle/"
  du -sh "$bundle" >&2
  size=$(du -sm "$bundle" | cut -f1)
  if [ "$size" -ge 64 ]; then
    echo "build-mistralrs-bitstack.sh: the bundle is $size MiB, over the 64 MiB a GPU machine takes" >&2
    exit 1
  fi
fi
echo "$bin"
