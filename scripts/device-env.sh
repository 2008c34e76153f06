# What the scripts that run on the GPU machine share (sourced by
# device-check.sh and device-ladder.sh; build-cuda.sh --bundle packs it).

# unpack_xz FILE.xz DEST: an executable from a bundle; Python's lzma where
# the machine has no xz.
unpack_xz() {
  xz -dc "$1" > "$2" 2>/dev/null \
    || python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$1" > "$2"
  chmod +x "$2"
}

# gpu_library_path [LOG]: the folders of the driver, cuBLAS, cuRAND and the
# CUDA runtime on this machine (too big to carry), colon-separated; each
# library's path, or "not found", goes to LOG when given.
gpu_library_path() {
  local libs="libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13"
  local dirs="" lib p found names=()
  for lib in $libs; do names+=(-o -name "$lib"); done
  # One walk of the filesystem for all of them.
  found=$(find / \( -path /proc -o -path /sys \) -prune -o \( "${names[@]:1}" \) -print 2>/dev/null)
  for lib in $libs; do
    p=$(grep -m1 "/$lib\$" <<< "$found")
    [ -n "${1:-}" ] && echo "$lib: ${p:-not found}" >> "$1"
    [ -n "$p" ] && dirs="$dirs:$(dirname "$p")"
  done
  echo "${dirs#:}"
}
