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

prefix="${BITSTACK_CUDA_PREFIX:-$HOME/.cache/bitstack/cuda-13.0}"
cuda_home="$prefix/nvidia/cu13"
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35)

if [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 toolkit wheels into $prefix (about 1.2 GB)" >&2
  tmp="$prefix.partial"
  rm -rf "$tmp"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" "${wheels[@]}"
  rm -rf "$prefix"
  mv "$tmp" "$prefix"
fi
"$cuda_home/bin/nvcc" --version | grep -q "release 13.0" \
  || { echo "build-cuda.sh: $cuda_home/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

# The wheels ship versioned libraries only; the linker wants the plain names.
for lib in cublas:13 cublasLt:13 curand:10 nvrtc:13 cudart:13; do
  ln -sf "lib${lib%%:*}.so.${lib##*:}" "$cuda_home/lib/lib${lib%%:*}.so"
done

# A stub libcuda with every driver entry point cudarc declares.
cargo fetch --quiet
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
mkdir -p "$cuda_home/lib/stubs"
grep -ohP '^pub unsafe fn \Kcu\w+(?=\()' "$cudarc_src/src/driver/sys/mod.rs" | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' > "$prefix/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda_home/lib/stubs/libcuda.so" "$prefix/stub.c"

export CUDA_HOME="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$cuda_home/lib:$cuda_home/lib/stubs:${LIBRARY_PATH:-}"
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
  cp scripts/device-check.sh "$bundle/"
  ls -la "$bundle" >&2
  du -sh "$bundle" >&2
fi
