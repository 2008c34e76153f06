#!/usr/bin/env bash
# The CUDA checks, on a machine with an NVIDIA GPU (compute capability 8.0 or
# newer, driver for CUDA 13) and no toolchain: the binaries come from
# `scripts/build-cuda.sh --bundle DIR` on any other machine.
#
#   scripts/device-check.sh [DIR]     # DIR: the bundle (default .devrun/cuda)
#
# Runs, writing everything to $OUT (default ./device-check-out):
#   tests.log       the CUDA tests: every kernel and dtype against the f64 CPU
#                   reference on fresh random stacks of awkward shapes, with
#                   freed device memory poisoned (NaN) before each call; then
#                   device-resident stacks (models on the GPU against the CPU,
#                   weights rebuilt on the device, a shrink freeing memory)
#   bench-k4.md     decode (1 row, 1–8 blocks) and prefill (2048 rows, 4
#   bench-k16.md    blocks) on Llama-3-8B shapes, against the copy bandwidth,
#                   cuBLAS f16 GEMV and GEMM measured in the same run
#   *.json          the same numbers, one object per row
#   summary.md      GPU, test verdict and both tables
# BENCH_KS="4" times k = 4 only, BENCH_KS="" no k (default "4 16").
# The exit status is the tests' (0 = all passed).
set -uo pipefail
source "$(dirname "$0")/device-env.sh"
cd "$(dirname "$0")/.."
bundle="${1:-.devrun/cuda}"
out="${OUT:-device-check-out}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

binaries="cuda-test-bitstack-kernels cuda-test-bitstack-quant cuda-bench"
for f in $binaries; do
  [ -f "$bundle/$f.xz" ] || { echo "device-check: $bundle/$f.xz is missing (run scripts/build-cuda.sh --bundle $bundle)" >&2; exit 2; }
  unpack_xz "$bundle/$f.xz" "$work/$f"
done

# The driver and cuBLAS/cuRAND come from this machine (too big to carry);
# the CUDA runtime from the bundle when this machine has none.
export LD_LIBRARY_PATH="$(gpu_library_path "$out/libs.txt"):$(cd "$bundle" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cat "$out/libs.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# The kernels against the f64 reference, then device-resident stacks
# (whole models on the GPU: logits, rebuilt weights, memory given back).
tests=0
for crate in bitstack-kernels bitstack-quant; do
  echo "== $crate" >> "$out/tests.log"
  "$work/cuda-test-$crate" --test-threads 1 --nocapture >> "$out/tests.log" 2>&1 || tests=1
done
grep -E '^test result' "$out/tests.log"

for k in ${BENCH_KS-4 16}; do
  timeout 240 "$work/cuda-bench" --k "$k" --json "$out/bench-k$k.json" > "$out/bench-k$k.md" 2> "$out/bench-k$k.err"
  echo "bench k=$k: exit $?"
done

{
  echo "# CUDA device check"
  echo
  echo '```'
  cat "$out/gpu.txt"
  echo '```'
  echo
  echo "tests (kernels, then resident stacks):"
  grep -E '^test result' "$out/tests.log" | sed 's/^/- /'
  echo "(exit $tests)"
  for k in ${BENCH_KS-4 16}; do echo; echo "## k = $k"; echo; cat "$out/bench-k$k.md"; done
} > "$out/summary.md"
cat "$out/summary.md"
exit $tests
