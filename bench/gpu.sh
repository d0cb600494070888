#!/usr/bin/env bash
# The one GPU check: hearth on a GPU against CPU f32 and against PyTorch + PEFT on the same GPU.
#
#   bench/gpu.sh              on a machine with an NVIDIA GPU, Python with torch, transformers, peft
#   bench/gpu.sh --cpu        the same script on tiny shapes, CPU only (the test suite runs this)
#   bench/gpu.sh --preflight  step 1 alone (with --cpu, CPU mode's)
#
# First-device checklist, in the order it runs. Each step prints one line of figures to stderr as
# it ends; the report (stdout and $HEARTH_GPU_OUT/report.md) repeats them above its tables.
#   1. preflight, one line per check: the GPU and its compute capability (or "no GPU" in CPU
#      mode), driver >= 580 (CUDA 13.0), glibc >= what the build needs, the CUDA 13 runtime
#      libraries (libcudart, libcublas, libcublasLt, libnvrtc .so.13, libcurand.so.10) and the
#      driver's libcuda.so.1, `ldd bench_gpu`, the kernels' PTX target against the GPU, bench_gpu
#      starting, the Python packages. A problem stops the run here, exit 2, with what to do.
#   2. parity, f32 and bf16: hearth on the GPU against hearth on the CPU in f32 (logits, loss,
#      logprobs, LoRA gradients, greedy tokens). Good: "pass" on every pair, f32 greedy 32/32.
#   3. LoRA training, llama-3.2-1b shape, T=2048: tokens/s, MFU, peak memory, seconds per step.
#      Step 5 gives PyTorch + PEFT's figures on the same GPU to hold them against.
#   4. decode, llama-3.2-1b shape, batch 1 (greedy) and 64 (sampled): tokens/s. Good: batch 64
#      well above batch 1 (one sequence is bound by reading the weights once per token).
#   5. PyTorch + PEFT on the jobs of steps 2-4, in one process: parity against PyTorch in f32 and
#      bf16 ("pass"), and hearth's tokens/s and peak memory as multiples of PyTorch's.
#   6. LoRA training, llama-3.1-8b shape, T=32768 (activation recompute), last, so that an
#      out-of-memory or a hang here costs the others nothing: tokens/s, MFU, peak memory. Good: it
#      finishes, below the card's memory. No PyTorch reference here: PEFT with gradient
#      checkpointing at 32k would take much of the budget by itself.
# MFU is against the card's dense bf16 peak (989 TFLOP/s on an H100 or H200 SXM).
#
# In --cpu mode the same steps run on tiny shapes, step 6 being tiny T=512 with recompute on.
#
# Time: steps 2-6 share $HEARTH_GPU_BUDGET seconds (default 540) from the end of the preflight, so
# the whole stays under ten minutes whatever the speed (the preflight and the report take seconds,
# a library install more): every hearth job runs under a timeout of $JOB_TIMEOUT (default 300) s
# and PyTorch's step under $REF_TIMEOUT (default 300) s, neither past the budget, and a step that
# would start with under 20 s left is reported as skipped. Candle's kernels are PTX, compiled by
# the driver at first use (and cached by it), so the first CUDA job of step 2 carries that.
#
# Binaries: on a GPU machine, built beforehand on any x86-64 Linux machine with
# `scripts/build-cuda.sh --pack bench-out` (no GPU needed) and found here as
# bench-out/hearth-cuda.tar.gz, or in $HEARTH_GPU_BIN (a folder holding bench_gpu and, from the
# build, BUILD_INFO). In --cpu mode the CPU build's target/release/examples/bench_gpu (built here
# when cargo is around). Python: $HEARTH_REF_PYTHON, else bench/.venv/bin/python (CPU mode) or
# python3.
#
# CUDA 13 libraries (the pack cannot carry them: cuBLASLt alone is over 500 MB). Each is looked for
# in $HEARTH_CUDA_LIBS (a colon list), LD_LIBRARY_PATH, $HEARTH_GPU_LIBS (default
# ~/.cache/hearth/gpu-libs, where this script installs), the nvidia/*/lib folders of the
# site-packages and user site of $HEARTH_REF_PYTHON, python3 and python, /usr/local/cuda*,
# $CONDA_PREFIX/lib, the driver's folders and ldconfig's cache; the folders found go on
# LD_LIBRARY_PATH. Those bench_gpu links (ldd names them) must be found; libnvrtc, which it does
# not link today, is only reported. When one is missing, the script installs the pinned runtime
# wheels (scripts/build-cuda.sh's, from BUILD_INFO) into $HEARTH_GPU_LIBS with `pip install
# --target`, by itself (HEARTH_GPU_INSTALL=0: never): a folder rather than a virtualenv needs no
# venv module and leaves the Python's own packages (PyTorch's CUDA libraries) alone. Where no
# package index answers, it names each missing library and the one pip command that fixes it,
# and exits 2.
#
# Writes everything to $HEARTH_GPU_OUT (default: a temporary folder). Exit status: 0 when every
# step passed, 1 when a step failed or was skipped or a parity check is outside its tolerance
# (bench/gpu_report.py), 2 when the preflight stopped the run.
set -uo pipefail # not -e: every step goes through `step`, which records a failure and goes on
cd "$(dirname "$0")/.." || exit 2
mode=gpu
preflight_only=""
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu ;;
    --preflight) preflight_only=1 ;;
    *) echo "usage: bench/gpu.sh [--cpu] [--preflight]" >&2; exit 2 ;;
  esac
done
work="${HEARTH_GPU_OUT:-$(mktemp -d)}"
mkdir -p "$work" || exit 2
for f in hearth.jsonl ref.jsonl jobs.jsonl pairs.txt steps.tsv step.jsonl preflight.txt report.err; do
  : >"$work/$f" || exit 2
done
rm -f "$work"/[hr]-*.json "$work"/[hr]-*.safetensors "$work"/job*.err # a reused folder's old outputs
budget="${HEARTH_GPU_BUDGET:-540}"
job_timeout="${JOB_TIMEOUT:-300}"
ref_timeout="${REF_TIMEOUT:-300}"
libs_dir="${HEARTH_GPU_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth/gpu-libs}"
nsteps=6
echo "bench/gpu.sh, $mode mode; output in $work" >&2

# ---- step 1: preflight ----------------------------------------------------------------------
t_pre=$SECONDS
problems=0
pf() { echo "preflight: $*" | tee -a "$work/preflight.txt" >&2; }
stop() { pf "$@"; problems=$((problems + 1)); }

if [ -n "${HEARTH_GPU_BIN:-}" ]; then
  bin="$HEARTH_GPU_BIN"
elif [ "$mode" = gpu ]; then
  pack=bench-out/hearth-cuda.tar.gz
  bin="$work/bin"
  if [ ! -f "$pack" ]; then
    pf "binaries: no $pack: make it on any x86-64 Linux machine with scripts/build-cuda.sh --pack bench-out (or set HEARTH_GPU_BIN)"
    exit 2
  fi
  if ! tar -C "$work" -xzf "$pack" 2>"$work/tar.err"; then
    pf "binaries: cannot unpack $pack: $(head -c 300 "$work/tar.err" | tr '\n' ' ')"
    exit 2
  fi
else
  bin=target/release/examples
  if command -v cargo >/dev/null 2>&1 && ! cargo build --release --locked -q -p hearth-engine --example bench_gpu; then
    pf "binaries: cargo build of bench_gpu failed (above)"
    exit 2
  fi
fi
if [ ! -x "$bin/bench_gpu" ]; then
  pf "binaries: no bench_gpu in $bin"
  exit 2
fi
info() { sed -n "s/^$1=//p" "$bin/BUILD_INFO" 2>/dev/null | head -1; }
if [ -f "$bin/BUILD_INFO" ]; then
  pf "binaries: $bin/bench_gpu, commit $(info commit), built for compute capability $(info compute_cap)"
else
  pf "binaries: $bin/bench_gpu (no BUILD_INFO beside it)"
fi
if [ -z "${HEARTH_REF_PYTHON:-}" ]; then
  if [ "$mode" = cpu ]; then
    source bench/reference.sh
    HEARTH_REF_PYTHON=bench/.venv/bin/python
  else
    HEARTH_REF_PYTHON=python3
  fi
fi
py="$HEARTH_REF_PYTHON"

# the GPU and its driver
peak=0
gpu_name="" gpu_cap="" driver=""
if [ "$mode" = cpu ]; then
  pf "GPU: no GPU (CPU mode): the CPU path only; driver and compute capability not checked"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  stop "GPU: no GPU: nvidia-smi not found, so no NVIDIA driver here (bench/gpu.sh --cpu needs none)"
elif ! q="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.used --format=csv,noheader 2>&1)"; then
  stop "GPU: nvidia-smi failed: $(head -1 <<<"$q")"
else
  IFS=, read -r gpu_name gpu_cap driver mem_total mem_used <<<"$(head -1 <<<"$q" | sed 's/ *, */,/g; s/^ *//; s/ *$//')"
  busy=""
  [ "${mem_used%% *}" -gt 1024 ] 2>/dev/null && busy="; another process holds GPU memory, figures may suffer"
  pf "GPU: $gpu_name, compute capability $gpu_cap, ${mem_total:-?} (${mem_used:-?} in use$busy)"
  if [[ "${driver%%.*}" =~ ^[0-9]+$ ]] && [ "${driver%%.*}" -ge 580 ]; then
    pf "driver $driver: ok (CUDA 13.0 needs >= 580)"
  else
    stop "driver ${driver:-unknown}: too old, CUDA 13.0 needs >= 580: update the NVIDIA driver"
  fi
  case "$gpu_name" in
    *H200*|*H100*) peak=989 ;; # dense bf16 TFLOP/s (SXM)
    *A100*) peak=312 ;;
  esac
fi

# glibc
glibc="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
[ -n "$glibc" ] || glibc="$(ldd --version 2>&1 | head -1 | awk '{print $NF}')"
need="$(info glibc_min)"
if [ -z "$need" ] || [ "$need" = unknown ]; then
  need="$( (objdump -T "$bin/bench_gpu" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1) 2>/dev/null)"
fi
if [ -z "$need" ]; then
  pf "glibc ${glibc:-unknown} (what bench_gpu needs is unknown: no BUILD_INFO and no objdump; the start check below tells)"
elif [ -z "$glibc" ]; then
  stop "glibc: none found (bench_gpu needs glibc >= $need)"
elif [ "$(printf '%s\n' "$need" "$glibc" | sort -V | head -1)" = "$need" ]; then
  pf "glibc $glibc: ok (bench_gpu needs >= $need)"
else
  stop "glibc $glibc: bench_gpu needs >= $need: run it on a newer system or container (Ubuntu 22.04, Debian 12 and newer)"
fi

# the CUDA libraries: which bench_gpu links (ldd names them, found or not), where each is
linked="$(ldd "$bin/bench_gpu" 2>/dev/null | awk '{print $1}')"
cuda_build=""
if [ "$mode" = gpu ] || grep -qE '^lib(cuda|cudart|cublas)\.so' <<<"$linked"; then cuda_build=1; fi
cuda_libs=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13)
# the same pins as scripts/build-cuda.sh's runtime wheels (its BUILD_INFO's list when there is one)
wheels="$(info runtime_wheels)"
[ -n "$wheels" ] || wheels="nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88"
wheel_of() {
  local pkg="" w
  case "$1" in
    libcudart*) pkg=nvidia-cuda-runtime ;;
    libcublas*) pkg=nvidia-cublas ;;
    libcurand*) pkg=nvidia-curand ;;
    libnvrtc*) pkg=nvidia-cuda-nvrtc ;;
  esac
  for w in $wheels; do [ "${w%%==*}" = "$pkg" ] && echo "$w"; done
}
needs() { # a library bench_gpu loads (libcublasLt through libcublas); all of them when ldd is absent
  [ -z "$linked" ] || grep -qx "$1" <<<"$linked" || { [ "$1" = libcublasLt.so.13 ] && grep -qx libcublas.so.13 <<<"$linked"; }
}
declare -A found
search_libs() { # found[LIB]=the first folder that holds LIB, in the order of the header
  local dirs=() parts=() d lib p sp cache
  IFS=: read -ra parts <<<"${HEARTH_CUDA_LIBS:-}"
  dirs+=("${parts[@]}")
  IFS=: read -ra parts <<<"${LD_LIBRARY_PATH:-}"
  dirs+=("${parts[@]}")
  shopt -s nullglob
  dirs+=("$libs_dir"/nvidia/*/lib)
  for p in "$py" python3 python; do
    command -v "$p" >/dev/null 2>&1 || continue
    while IFS= read -r sp; do
      [ -n "$sp" ] && dirs+=("$sp"/nvidia/*/lib)
    done < <(timeout 30 "$p" -c 'import site
try: d = list(site.getsitepackages())
except Exception: d = []
try: d.append(site.getusersitepackages())
except Exception: pass
print("\n".join(d))' 2>/dev/null)
  done
  dirs+=(/usr/local/cuda*/lib64 /usr/local/cuda*/targets/"$(uname -m)"-linux/lib)
  [ -n "${CONDA_PREFIX:-}" ] && dirs+=("$CONDA_PREFIX/lib")
  dirs+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/"$(uname -m)"-linux-gnu /usr/lib64 /usr/lib/wsl/lib)
  shopt -u nullglob
  cache="$( (ldconfig -p || /sbin/ldconfig -p) 2>/dev/null)"
  for lib in "${cuda_libs[@]}" libcuda.so.1; do
    found[$lib]=""
    for d in "${dirs[@]}"; do
      if [ -n "$d" ] && [ -e "$d/$lib" ]; then found[$lib]="$d"; break; fi
    done
    if [ -z "${found[$lib]}" ]; then
      p="$(awk -v l="$lib" '$1 == l && $2 ~ /64/ {print $NF; exit}' <<<"$cache")"
      [ -n "$p" ] && found[$lib]="$(dirname "$p")"
    fi
  done
}
missing_wheels() { # the wheels of the needed libraries not found, once each
  local lib
  for lib in "${cuda_libs[@]}"; do
    if [ -z "${found[$lib]:-}" ] && needs "$lib"; then wheel_of "$lib"; fi
  done | sort -u | tr '\n' ' ' | sed 's/ $//'
}
if [ -z "$cuda_build" ]; then
  pf "CUDA: this bench_gpu links no CUDA library (a CPU build): the library, ldd and kernel checks do not apply"
else
  search_libs
  fix="$(missing_wheels)"
  if [ -n "$fix" ] && [ "${HEARTH_GPU_INSTALL:-1}" != 0 ]; then
    pf "installing $fix into $libs_dir (pip, from the package index; HEARTH_GPU_INSTALL=0 never does) ..."
    read -ra fix_list <<<"$fix"
    if timeout 900 python3 -m pip install -q --disable-pip-version-check --timeout 15 --retries 1 --upgrade \
      --target "$libs_dir" "${fix_list[@]}" >"$work/pip.log" 2>&1; then
      search_libs
      fix="$(missing_wheels)"
    else
      pf "pip could not install them (no package index here?): $(grep -v '^ *$' "$work/pip.log" | tail -1)"
    fi
  fi
  for lib in "${cuda_libs[@]}"; do
    if [ -n "${found[$lib]}" ]; then
      pf "$lib: ${found[$lib]}"
    elif needs "$lib"; then
      stop "$lib: MISSING (in the wheel $(wheel_of "$lib"))"
    else
      pf "$lib: not found, and this bench_gpu does not load it: not needed"
    fi
  done
  if [ -n "${found[libcuda.so.1]}" ]; then
    pf "libcuda.so.1 ($([ "$mode" = gpu ] && echo "the driver's" || echo "on the CPU a stub will do")): ${found[libcuda.so.1]}"
  elif [ "$mode" = gpu ]; then
    stop "libcuda.so.1: MISSING: it comes with the NVIDIA driver, no wheel has it: put the driver's library folder on LD_LIBRARY_PATH"
  else
    stop "libcuda.so.1: MISSING: the CUDA build loads it even on the CPU: put scripts/build-cuda.sh's stub (libcuda-stub in its target folder) on LD_LIBRARY_PATH, or use the CPU build"
  fi
  if [ -n "$fix" ]; then
    pf "fix: python3 -m pip install --target $libs_dir $fix   (then run bench/gpu.sh again; or set HEARTH_CUDA_LIBS to a folder that holds the libraries)"
  fi
  ld=""
  for lib in "${cuda_libs[@]}" libcuda.so.1; do
    d="${found[$lib]}"
    if [ -n "$d" ]; then case ":$ld:" in *":$d:"*) ;; *) ld="${ld:+$ld:}$d" ;; esac; fi
  done
  export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  bins=(bench_gpu)
  [ -x "$bin/hearth-server" ] && bins+=(hearth-server) # in the pack beside it
  if ! command -v ldd >/dev/null 2>&1; then
    pf "ldd ${bins[*]}: no ldd here; the start check below stands in"
  else
    nf="$(cd "$bin" && ldd "${bins[@]}" 2>&1 | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ' | sed 's/ $//')"
    if [ -n "$nf" ]; then stop "ldd ${bins[*]}: not found: $nf"; else pf "ldd ${bins[*]}: every library found"; fi
  fi
  # the kernels: PTX for one compute capability, which the driver compiles for that one and newer
  cap_build="$(info compute_cap)" assumed=""
  if ! [[ "$cap_build" =~ ^[0-9]+$ ]]; then cap_build=90 assumed=" (no BUILD_INFO: scripts/build-cuda.sh's default assumed)"; fi
  cc_build="${cap_build:0:${#cap_build}-1}.${cap_build: -1}"
  gpu_num="${gpu_cap/./}"
  if [ "$mode" = cpu ]; then
    pf "kernels: PTX for compute capability $cc_build$assumed; no GPU, not checked"
  elif ! [[ "$gpu_num" =~ ^[0-9]+$ ]]; then
    pf "kernels: PTX for compute capability $cc_build$assumed; the GPU's is unknown, not checked"
  elif [ "$gpu_num" -lt "$cap_build" ]; then
    stop "kernels: PTX for compute capability $cc_build$assumed, which the driver compiles for $cc_build and newer only; this GPU is $gpu_cap: build for it with CUDA_COMPUTE_CAP=$gpu_num scripts/build-cuda.sh --pack bench-out"
  else
    pf "kernels: PTX for compute capability $cc_build$assumed, compiled by the driver for this $gpu_cap GPU at first use: ok"
  fi
fi
if start_err="$(timeout 60 "$bin/bench_gpu" config --shape tiny 2>&1 >/dev/null)"; then
  pf "bench_gpu starts: ok"
else
  stop "bench_gpu does not start: $(head -c 300 <<<"$start_err" | tr '\n' ' ')"
fi
pyv="$("$py" - 2>&1 <<'PY'
import sys
from importlib import metadata
have, miss = [], []
for p in ("torch", "transformers", "peft", "safetensors"):
    try:
        have.append(f"{p} {metadata.version(p)}")
    except metadata.PackageNotFoundError:
        miss.append(p)
print(f"Python {sys.version.split()[0]}: " + "; ".join(x for x in (", ".join(have), "MISSING " + ", ".join(miss) if miss else "") if x))
PY
)"
case "$pyv" in
  Python*MISSING*) pf "python $py: $pyv: WARNING: the parity figures, step 5 and the report need them" ;;
  Python*) pf "python $py: $pyv" ;;
  *) pf "python $py: does not run: $(tail -1 <<<"$pyv"): WARNING: the parity figures, step 5 and the report need it" ;;
esac

record() { # status line: print a step's line and keep it for the report
  local mark=""
  [ "$1" = ok ] || mark="  [$1]"
  echo "$2$mark" >&2
  printf '%s\t%s\n' "$1" "$2" >>"$work/steps.tsv"
}
if [ "$mode" = cpu ]; then
  what="no GPU (CPU mode)"
elif [ -z "$gpu_name" ]; then
  what="no GPU"
else
  what="$gpu_name ($gpu_cap), driver $driver"
fi
if [ "$problems" -gt 0 ]; then
  record FAIL "step 1/$nsteps preflight: $what: $problems problem(s) above, stopping, $((SECONDS - t_pre)) s"
  exit 2
fi
record ok "step 1/$nsteps preflight: $what, glibc ${glibc:-?}, $([ -n "$cuda_build" ] && echo "CUDA libraries found" || echo "CPU build"), $((SECONDS - t_pre)) s"
[ -z "$preflight_only" ] || exit 0

# ---- steps 2-6 ------------------------------------------------------------------------------
t0=$SECONDS
left() { echo $((budget - (SECONDS - t0))); }
n=1
status=ok figures=""
step() { # title function args...: one step of the checklist, its line printed and recorded
  n=$((n + 1))
  local title="$1" t=$SECONDS
  shift
  if [ "$(left)" -lt 20 ]; then
    record skipped "step $n/$nsteps $title: skipped, the budget of $budget s is spent (HEARTH_GPU_BUDGET)"
    return
  fi
  status=ok figures=""
  : >"$work/step.jsonl"
  "$@"
  record "$status" "step $n/$nsteps $title: ${figures:-no figures}, $((SECONDS - t)) s"
}
njobs=0
hearth() { # bench_gpu args: one JSON line; a crash, a timeout or an error line fails the step
  local t err out rc msg args start
  t=$(left)
  [ "$t" -gt "$job_timeout" ] && t=$job_timeout
  [ "$t" -ge 1 ] || t=1
  njobs=$((njobs + 1))
  err="$work/job$njobs.err"
  start=$SECONDS
  out="$(timeout -k 10 "$t" "$bin/bench_gpu" "$@" 2>"$err" | tail -1)"
  rc=$?
  if [ "$rc" -ne 0 ] || [ "${out:0:1}" != "{" ]; then
    if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ $((SECONDS - start)) -ge "$t" ]; }; then
      msg="timed out after $t s"
    elif [ "$rc" -gt 128 ]; then
      msg="killed by signal $((rc - 128))$(tail -c 300 "$err" | sed '1s/^/: /')"
    else
      msg="exit $rc$(tail -c 300 "$err" | sed '1s/^/: /')"
    fi
    msg="$(printf '%s (stderr in %s)' "$msg" "$err" | tr '\n\r\t' '   ' | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
    args="$(printf '%s' "$*" | sed 's/\\/\\\\/g; s/"/\\"/g')"
    out="{\"impl\": \"hearth\", \"error\": \"$msg\", \"args\": \"$args\"}"
  fi
  echo "$out" >>"$work/hearth.jsonl"
  echo "$out" >>"$work/step.jsonl"
  case "$out" in *'"error"'*) status=FAIL; return 1 ;; esac
}
figs() { # kind [a:b ...]: the step's figures from bench/gpu_report.py, which also judges them
  local out
  out="$("$py" bench/gpu_report.py --line "$work" "$peak" "$@" 2>>"$work/report.err")" || status=FAIL
  figures="${figures}${out:-no figures: bench/gpu_report.py failed ($(tail -1 "$work/report.err"))}"
}
job() { echo "$1" >>"$work/jobs.jsonl"; } # for PyTorch, step 5
pair() { echo "$1 $2" >>"$work/pairs.txt"; }
config() { "$bin/bench_gpu" config --shape "$1" >"$work/$1.json" 2>>"$work/config.err" || status=FAIL; }

if [ "$mode" = gpu ]; then dev=cuda dtype=bf16 threads=16; else dev=cpu dtype=f32 threads=2; fi
parity_step() {
  local t
  hearth parity-model --out "$work/parity"
  # CPU f32 is the reference; then the device in f32 (GPU mode) and bf16
  for t in cpu:f32 $([ "$dev" = cuda ] && echo cuda:f32) "$dev:bf16"; do
    hearth parity --dir "$work/parity" --device "${t%:*}" --dtype "${t#*:}" --out "$work/h-${t%:*}-${t#*:}"
  done
  for t in f32 bf16; do
    job "{\"what\": \"parity\", \"dir\": \"$work/parity\", \"device\": \"$dev\", \"dtype\": \"$t\", \"out\": \"$work/r-$dev-$t\"}"
  done
  if [ "$mode" = gpu ]; then
    pair h-cuda-bf16 r-cuda-bf16; pair h-cuda-bf16 h-cpu-f32; pair h-cuda-f32 h-cpu-f32; pair h-cuda-f32 r-cuda-f32
    pair r-cuda-bf16 r-cuda-f32
    figs parity h-cuda-f32:h-cpu-f32 h-cuda-bf16:h-cpu-f32
  else
    pair h-cpu-f32 r-cpu-f32; pair h-cpu-bf16 r-cpu-bf16; pair h-cpu-bf16 h-cpu-f32
    figs parity h-cpu-bf16:h-cpu-f32
  fi
}
train_step() { # shape seq_len steps warmup ref|noref [bench_gpu options]
  local shape=$1 t=$2 steps=$3 warmup=$4 ref=$5
  shift 5
  hearth train --shape "$shape" --seq-len "$t" --steps "$steps" --warmup "$warmup" --device "$dev" --dtype "$dtype" "$@"
  if [ "$ref" = ref ]; then
    config "$shape"
    job "{\"what\": \"train\", \"config\": \"$work/$shape.json\", \"shape\": \"$shape\", \"seq_len\": $t, \"steps\": $steps, \"warmup\": $warmup, \"device\": \"$dev\", \"dtype\": \"$dtype\"}"
  fi
  figs train
}
decode_step() { # shape new_tokens prompt_len batch...
  local shape=$1 new=$2 prompt=$3 b
  shift 3
  config "$shape"
  for b in "$@"; do
    hearth decode --shape "$shape" --batch "$b" --new-tokens "$new" --prompt-len "$prompt" --device "$dev" --dtype "$dtype"
    job "{\"what\": \"decode\", \"config\": \"$work/$shape.json\", \"shape\": \"$shape\", \"batch\": $b, \"new_tokens\": $new, \"prompt_len\": $prompt, \"device\": \"$dev\", \"dtype\": \"$dtype\"}"
  done
  figs decode
}
ref_step() { # PyTorch + PEFT on the jobs queued so far, one JSON line each
  local t rc
  t=$(left)
  [ "$t" -gt "$ref_timeout" ] && t=$ref_timeout
  PYTHONUNBUFFERED=1 timeout -k 10 "$t" "$py" bench/ref_gpu.py "$work/jobs.jsonl" "$threads" >"$work/ref.jsonl" 2>"$work/ref.err"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=FAIL figures="PyTorch timed out after $t s; "
  elif [ "$rc" -ne 0 ]; then
    status=FAIL figures="PyTorch exited $rc ($(tail -1 "$work/ref.err")); "
  fi
  if [ "$mode" = gpu ]; then
    figs ref h-cuda-f32:r-cuda-f32 h-cuda-bf16:r-cuda-bf16 r-cuda-bf16:r-cuda-f32
  else
    figs ref h-cpu-f32:r-cpu-f32 h-cpu-bf16:r-cpu-bf16
  fi
}

if [ "$mode" = gpu ]; then
  step "parity f32 and bf16 (hearth cuda against hearth cpu f32)" parity_step
  step "train llama-3.2-1b T=2048" train_step llama-3.2-1b 2048 3 1 ref
  step "decode llama-3.2-1b batch 1 and 64" decode_step llama-3.2-1b 128 128 1 64
  step "PyTorch + PEFT on steps 2-4" ref_step
  step "train llama-3.1-8b T=32768" train_step llama-3.1-8b 32768 1 1 noref
else
  step "parity f32 and bf16 (hearth cpu bf16 against cpu f32)" parity_step
  step "train tiny T=128" train_step tiny 128 2 1 ref
  step "decode tiny batch 1 and 8" decode_step tiny 16 16 1 8
  step "PyTorch + PEFT on steps 2-4" ref_step
  step "train tiny T=512 with recompute (in llama-3.1-8b T=32768's place)" train_step tiny 512 1 1 noref --recompute on
fi

"$py" bench/gpu_report.py "$work" "$peak" 2>>"$work/report.err" | tee "$work/report.md"
rc=${PIPESTATUS[0]}
if [ "$rc" -gt 1 ]; then
  echo "bench/gpu.sh: the report failed (exit $rc): $(tail -1 "$work/report.err")" >&2
fi
echo "bench/gpu.sh: everything is in $work" >&2
if [ "$rc" -ne 0 ] || grep -qv '^ok' "$work/steps.tsv"; then exit 1; fi
