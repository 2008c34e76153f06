# Sourced by the CUDA build scripts (build-cuda.sh,
# build-mistralrs-bitstack.sh --cuda): installs the pinned CUDA 13.0 toolkit
# wheels once, makes a stub libcuda to link against, and exports CUDA_HOME,
# PATH, CUDA_COMPUTE_CAP and LIBRARY_PATH for cargo. Defines $cuda_home.
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
  || { echo "cuda-env.sh: $cuda_home/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

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
