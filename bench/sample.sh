#!/usr/bin/env bash
# Sampling benchmark: hearth's sample vs transformers' generate on the same machine, in the same
# run. smollm2-135m-shape, 256-token prompt, 64 new tokens; batch 1 greedy, and num_samples=8
# (temperature 1) aggregate throughput. f32, 2 threads (override with THREADS=N). Installs the
# reference into bench/.venv on first use (about 5 GB from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
source bench/reference.sh
cargo build --release -q -p hearth-engine --example bench_sample
hearth=$(RAYON_NUM_THREADS=$THREADS ./target/release/examples/bench_sample)
echo "$hearth"
ref1=$(OMP_NUM_THREADS=$THREADS bench/.venv/bin/python bench/ref_sample.py --threads "$THREADS")
echo "$ref1"
ref8=$(OMP_NUM_THREADS=$THREADS bench/.venv/bin/python bench/ref_sample.py --threads "$THREADS" --num-samples 8)
echo "$ref8"
python3 - "$hearth" "$ref1" "$ref8" <<'PY'
import json, sys
h, r1, r8 = (json.loads(a) for a in sys.argv[1:4])
print(f"batch 1: hearth {h['tokens_per_s']:.1f} tok/s incl. prefill (prefill {h['prefill_s']:.2f} s, decode {h['decode_tokens_per_s']:.1f} tok/s) | "
      f"transformers {r1['tokens_per_s']:.1f} tok/s (prefill {r1['prefill_s']:.2f} s, decode {r1['decode_tokens_per_s']:.1f} tok/s) | "
      f"ratio {h['tokens_per_s']/r1['tokens_per_s']:.2f}")
print(f"num_samples=8: hearth {h['num_samples_8_tokens_per_s']:.1f} tok/s | transformers {r8['tokens_per_s']:.1f} tok/s | "
      f"ratio {h['num_samples_8_tokens_per_s']/r8['tokens_per_s']:.2f}")
PY
