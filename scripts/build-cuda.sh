#!/usr/bin/env bash
# Builds hearth for an NVIDIA GPU on a machine that has none (no CUDA install, no driver needed).
#
#   scripts/build-cuda.sh             # -> ~/.cache/hearth/cuda-target/release/{hearth-server, examples/bench_gpu}
#   scripts/build-cuda.sh --pack DIR  # also writes DIR/hearth-cuda.tar.gz (stripped, for a GPU box)
#   scripts/build-cuda.sh --check     # also runs bench/gpu.sh --cpu with the CUDA build's bench_gpu
#                                     # (its CPU path, loaded against the stub libcuda)
#
# The toolchain comes from NVIDIA's PyPI wheels, pinned to CUDA 13.0 (driver 580 and newer run it):
# nvidia-cuda-nvcc 13.0.88 is the first wheel with an `nvcc` binary (the -cu12 wheels hold only
# ptxas), and nvvm/crt must be 13.0 too (13.5's nvvm writes PTX 9.5, which ptxas 13.0 rejects).
# It lives in a per-user virtualenv ($HEARTH_CUDA_VENV, default ~/.cache/hearth/cuda-venv).
# The build has its own target folder ($HEARTH_CUDA_TARGET, default ~/.cache/hearth/cuda-target)
# so it never invalidates the CPU build's, and a rebuild after a change recompiles only hearth.
# CUDA_COMPUTE_CAP (default 90: H100/H200) picks the GPU generation candle's kernels are built for.
# They are PTX for that one generation: the driver JIT-compiles PTX for its own generation and newer
# ones (built for 90: H100, H200, B200 run it) but never for older ones, so an A100 (80) or an
# L4/RTX 4090 (89) needs its own build, CUDA_COMPUTE_CAP=80 (or 89) scripts/build-cuda.sh. The pack
# records what it was built for in bin/BUILD_INFO (compute_cap, commit, the runtime wheels, the
# newest glibc symbol version it needs), and bench/gpu.sh's preflight reads it there.
#
# libcuda belongs to the driver and has no wheel. cudarc links against it, so the link uses a stub
# made here from the symbols cudarc's library leaves undefined (empty functions, soname
# libcuda.so.1); at run time the GPU machine's real driver library is loaded instead.
set -euo pipefail
cd "$(dirname "$0")/.."
pack=""
check=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pack) pack="${2:?--pack needs a folder}"; shift 2 ;;
    --check) check=1; shift ;;
    *) echo "usage: scripts/build-cuda.sh [--pack DIR] [--check]" >&2; exit 2 ;;
  esac
done
cache="${XDG_CACHE_HOME:-$HOME/.cache}/hearth"
venv="${HEARTH_CUDA_VENV:-$cache/cuda-venv}"
export CARGO_TARGET_DIR="${HEARTH_CUDA_TARGET:-$cache/cuda-target}"
wheels=("nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
        "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.0.2.14"
        "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88")
# the libraries the binaries load at run time (recorded in BUILD_INFO; bench/gpu.sh has the same pins)
runtime_wheels=()
for w in "${wheels[@]}"; do
  case "$w" in nvidia-cuda-runtime==*|nvidia-cublas==*|nvidia-curand==*|nvidia-cuda-nvrtc==*) runtime_wheels+=("$w") ;; esac
done
stamp="$venv/.hearth-wheels"
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
  echo "installing the CUDA 13.0 toolchain wheels into $venv ..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${wheels[@]}"
  echo "${wheels[*]}" >"$stamp"
fi
cu="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
[ -x "$cu/bin/nvcc" ] || { echo "nvcc missing from $cu/bin" >&2; exit 1; }
(cd "$cu/lib" && for f in libcublas libcublasLt libcudart libnvrtc; do ln -sf "$f.so.13" "$f.so"; done \
  && ln -sf "$(ls libcurand.so.* | head -1)" libcurand.so)
export PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$cu/lib:$CARGO_TARGET_DIR/libcuda-stub${LIBRARY_PATH:+:$LIBRARY_PATH}"

# 1. everything up to the link (cudarc's rlib names the driver symbols the stub must define)
cargo build --release --locked -p hearth-engine --features cuda
stub="$CARGO_TARGET_DIR/libcuda-stub"
if [ ! -e "$stub/libcuda.so" ]; then
  mkdir -p "$stub"
  rlib="$(ls -t "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -1)"
  nm -u "$rlib" 2>/dev/null | awk '$2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' | sort -u >"$stub/stub.c"
  [ -s "$stub/stub.c" ] || { echo "no cu* symbols found in $rlib" >&2; exit 1; }
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/stub.c"
  ln -sf libcuda.so "$stub/libcuda.so.1"
fi
# 2. the server and the GPU benchmark
cargo build --release --locked -p hearth-server --features cuda --bin hearth-server
cargo build --release --locked -p hearth-engine --features cuda --example bench_gpu
out="$CARGO_TARGET_DIR/release"
echo "built $out/hearth-server and $out/examples/bench_gpu (CUDA, compute capability $CUDA_COMPUTE_CAP)" >&2
# What the binaries were built for, beside them (bench/gpu.sh's preflight reads it)
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ "$commit" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then commit="$commit+uncommitted"; fi
glibc_min="$( (objdump -T "$out/hearth-server" "$out/examples/bench_gpu" | grep -o 'GLIBC_[0-9.]*' \
  | sed 's/GLIBC_//' | sort -uV | tail -1) 2>/dev/null || true)"
printf '%s\n' "compute_cap=$CUDA_COMPUTE_CAP" "cuda=13.0" "commit=$commit" "glibc_min=${glibc_min:-unknown}" \
  "runtime_wheels=${runtime_wheels[*]}" >"$out/examples/BUILD_INFO"
if [ -n "$pack" ]; then
  mkdir -p "$pack"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/bin"
  strip -o "$tmp/bin/hearth-server" "$out/hearth-server"
  strip -o "$tmp/bin/bench_gpu" "$out/examples/bench_gpu"
  cp "$out/examples/BUILD_INFO" "$tmp/bin/BUILD_INFO"
  tar -C "$tmp" -czf "$pack/hearth-cuda.tar.gz" bin
  ls -l "$pack/hearth-cuda.tar.gz" >&2
fi
if [ -n "$check" ]; then
  # The stub is only ever loaded, never called: the CPU path touches no CUDA function.
  LD_LIBRARY_PATH="$cu/lib:$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" HEARTH_GPU_BIN="$out/examples" \
    HEARTH_GPU_OUT="${HEARTH_GPU_OUT:-$CARGO_TARGET_DIR/gpu-check-cpu}" bench/gpu.sh --cpu
fi
