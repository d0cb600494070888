#!/usr/bin/env bash
# The one GPU check: hearth on a GPU against CPU f32 and against PyTorch + PEFT on the same GPU.
#
#   bench/gpu.sh            on a machine with an NVIDIA GPU, Python with torch, transformers, peft
#   bench/gpu.sh --cpu      the same script on tiny shapes, CPU only (the test suite runs this)
#
# Binaries: on a GPU machine, built beforehand on any x86-64 Linux machine with
# `scripts/build-cuda.sh --pack bench-out` (no GPU needed) and found here as
# bench-out/hearth-cuda.tar.gz, or in $HEARTH_GPU_BIN (a folder holding bench_gpu). In --cpu mode
# the CPU build's target/release/examples/bench_gpu (built here when cargo is around).
# Python: $HEARTH_REF_PYTHON, else bench/.venv/bin/python (CPU mode) or python3.
#
# It prints three tables (parity, LoRA training tokens/s + MFU + peak memory, decode tokens/s),
# writes everything to $HEARTH_GPU_OUT (default: a temporary folder), and exits 1 when a parity
# check is outside its tolerance or a hearth job fails. About 5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[ "${1:-}" = "--cpu" ] && mode=cpu
work="${HEARTH_GPU_OUT:-$(mktemp -d)}"
mkdir -p "$work"
: >"$work/hearth.jsonl"
: >"$work/ref.jsonl"
: >"$work/jobs.jsonl"
: >"$work/pairs.txt"

if [ -n "${HEARTH_GPU_BIN:-}" ]; then
  bin="$HEARTH_GPU_BIN"
elif [ "$mode" = gpu ]; then
  [ -f bench-out/hearth-cuda.tar.gz ] || { echo "no bench-out/hearth-cuda.tar.gz: run scripts/build-cuda.sh --pack bench-out first" >&2; exit 2; }
  tar -C "$work" -xzf bench-out/hearth-cuda.tar.gz
  bin="$work/bin"
else
  if command -v cargo >/dev/null 2>&1; then
    cargo build --release --locked -q -p hearth-engine --example bench_gpu
  fi
  bin=target/release/examples
fi
if [ -z "${HEARTH_REF_PYTHON:-}" ]; then
  if [ "$mode" = cpu ]; then source bench/reference.sh; HEARTH_REF_PYTHON=bench/.venv/bin/python; else HEARTH_REF_PYTHON=python3; fi
fi
py="$HEARTH_REF_PYTHON"

if [ "$mode" = gpu ]; then
  # CUDA 13 runtime libraries (cuBLAS, cuRAND, cudart, NVRTC) from the Python nvidia packages, the
  # driver's libcuda from its usual places
  libs="$("$py" - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for lib in ("libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13", "libcublasLt.so.13"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", lib), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  dev=cuda
  gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"
  case "$gpu_name" in
    *H200*|*H100*) peak=989 ;;   # dense bf16 TFLOP/s (SXM)
    *A100*) peak=312 ;;
    *) peak=0 ;;
  esac
  echo "GPU: ${gpu_name:-unknown}; MFU against ${peak} TFLOP/s bf16" >&2
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
else
  dev=cpu
  peak=0
fi

hearth() { # one hearth job, one JSON line; a crash is recorded as a failed job
  local out
  if out="$(timeout "${JOB_TIMEOUT:-300}" "$bin/bench_gpu" "$@" 2>"$work/last.err")"; then
    echo "$out" | tail -1 | tee -a "$work/hearth.jsonl" >&2
  else
    local rc=$?
    echo "{\"impl\": \"hearth\", \"error\": \"exit $rc: $(tail -c 300 "$work/last.err" | tr '\n"' ' ' )\", \"args\": \"$*\"}" | tee -a "$work/hearth.jsonl" >&2
  fi
}
job() { echo "$1" >>"$work/jobs.jsonl"; }
pair() { echo "$1 $2" >>"$work/pairs.txt"; }

echo "== parity" >&2
"$bin/bench_gpu" parity-model --out "$work/parity" >/dev/null
parity() { # impl device dtype
  if [ "$1" = hearth ]; then
    hearth parity --dir "$work/parity" --device "$2" --dtype "$3" --out "$work/h-$2-$3"
  else
    job "{\"what\": \"parity\", \"dir\": \"$work/parity\", \"device\": \"$2\", \"dtype\": \"$3\", \"out\": \"$work/r-$2-$3\"}"
  fi
}
parity hearth cpu f32
if [ "$mode" = gpu ]; then
  parity hearth cuda f32; parity hearth cuda bf16; parity ref cuda f32; parity ref cuda bf16
  pair h-cuda-bf16 r-cuda-bf16; pair h-cuda-bf16 h-cpu-f32; pair h-cuda-f32 h-cpu-f32; pair h-cuda-f32 r-cuda-f32
  pair r-cuda-bf16 r-cuda-f32
else
  parity hearth cpu bf16; parity ref cpu f32; parity ref cpu bf16
  pair h-cpu-f32 r-cpu-f32; pair h-cpu-bf16 r-cpu-bf16; pair h-cpu-bf16 h-cpu-f32
fi

echo "== training and decode" >&2
dtype=$([ "$mode" = gpu ] && echo bf16 || echo f32)
train() { # shape seq_len steps warmup [hearth options]
  local shape=$1 t=$2 steps=$3 warmup=$4; shift 4
  "$bin/bench_gpu" config --shape "$shape" >"$work/$shape.json"
  hearth train --shape "$shape" --seq-len "$t" --steps "$steps" --warmup "$warmup" --device "$dev" --dtype "$dtype" "$@"
  job "{\"what\": \"train\", \"config\": \"$work/$shape.json\", \"shape\": \"$shape\", \"seq_len\": $t, \"steps\": $steps, \"warmup\": $warmup, \"device\": \"$dev\", \"dtype\": \"$dtype\"}"
}
decode() { # shape batch new_tokens prompt_len
  "$bin/bench_gpu" config --shape "$1" >"$work/$1.json"
  hearth decode --shape "$1" --batch "$2" --new-tokens "$3" --prompt-len "$4" --device "$dev" --dtype "$dtype"
  job "{\"what\": \"decode\", \"config\": \"$work/$1.json\", \"shape\": \"$1\", \"batch\": $2, \"new_tokens\": $3, \"prompt_len\": $4, \"device\": \"$dev\", \"dtype\": \"$dtype\"}"
}
if [ "$mode" = gpu ]; then
  train llama-3.2-1b 2048 3 1
  train llama-3.2-1b 32768 1 1
  train llama-3.1-8b 2048 2 1
  train llama-3.1-8b 32768 1 1
  decode llama-3.2-1b 1 128 128
  decode llama-3.2-1b 64 128 128
else
  train tiny 128 2 1
  train tiny 512 1 1 --recompute on
  decode tiny 1 16 16
  decode tiny 8 16 16
fi

echo "== PyTorch + PEFT" >&2
threads=$([ "$mode" = cpu ] && echo 2 || echo 16)
PYTHONUNBUFFERED=1 timeout "${REF_TIMEOUT:-900}" "$py" bench/ref_gpu.py "$work/jobs.jsonl" "$threads" | tee "$work/ref.jsonl" >&2 || true
"$py" bench/gpu_report.py "$work" "$peak" | tee "$work/report.md"
