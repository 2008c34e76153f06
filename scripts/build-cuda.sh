#!/usr/bin/env bash
# Builds the CUDA variant (release, `--features cuda`) on any x86-64 Linux
# machine, with or without a GPU.
#
#   scripts/build-cuda.sh                 # toolkit + build
#   scripts/build-cuda.sh --bundle DIR    # also packs what scripts/device-check.sh runs
#
# 1. Installs the pinned CUDA 13.0 toolkit wheels (nvcc, headers and the
#    libraries candle links) with `pip install --target` into
#    $BITSTACK_CUDA_PREFIX (default ~/.cache/bitstack/cuda-13.0), once.
#    nvcc must be 13.0: newer PTX does not load on a 580 driver, and the
#    12.x wheels ship no nvcc.
# 2. Links against a stub libcuda.so made from the driver entry points
#    cudarc declares (no wheel ships the driver; the real one is loaded at
#    run time on the machine with the GPU).
# 3. Builds the workspace with the `cuda` features into target/cuda (its own
#    folder, so CPU and CUDA builds do not evict each other): the `bitstack`
#    binary, the CUDA tests and the CUDA benchmark (the other tests are the
#    CPU build's; linking them again would only cost time). Our kernels are PTX for
#    compute capability 8.0 and 9.0; candle's for $CUDA_COMPUTE_CAP
#    (default 90: H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="${2:?--bundle needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Steps 1 and 2.
source scripts/cuda-env.sh
export CARGO_TARGET_DIR="${BITSTACK_CUDA_TARGET_DIR:-target/cuda}"

features="bitstack-kernels/cuda,bitstack-quant/cuda,bitstack-cli/cuda"
cargo build --release --workspace --features "$features" --bins --test cuda --bench cuda
echo "built: $CARGO_TARGET_DIR/release/bitstack (needs libcuda.so.1, libcublas.so.13, libcurand.so.10, libcudart.so.13 at run time)" >&2

if [ -n "$bundle" ]; then
  # The CUDA test and bench binaries, stripped and xz-compressed (candle's
  # PTX inside compresses well), and the CUDA runtime they link.
  mkdir -p "$bundle"
  cargo build --release --workspace --features "$features" --test cuda --bench cuda --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        crate = m["target"]["src_path"].split("/")[-3]
        print(m["target"]["kind"][0], crate, m["executable"])
' | sort -u | while read -r kind crate exe; do
    # cuda-test-<crate> (one per crate with CUDA tests), cuda-bench.
    name="cuda-$kind"
    [ "$kind" = test ] && name="cuda-test-$crate"
    strip -o "$bundle/$name" "$exe"
    xz -T0 -9 -f "$bundle/$name"
  done
  cp "$cuda_home/lib/libcudart.so.13" "$bundle/"
  cp scripts/device-check.sh scripts/device-env.sh "$bundle/"
  ls -la "$bundle" >&2
  du -sh "$bundle" >&2
fi
