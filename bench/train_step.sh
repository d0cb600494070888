#!/usr/bin/env bash
# Training-step benchmark: hearth vs PyTorch + PEFT on the same machine, in the same run.
# smollm2-135m-shape, T=256, LoRA r=16 on all seven projections, f32, 2 threads (override with
# THREADS=N). Installs the reference into bench/.venv on first use (about 5 GB from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
source bench/reference.sh
cargo build --release -q -p hearth-engine --example bench_train
hearth=$(RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS ./target/release/examples/bench_train "$@")
echo "$hearth"
ref=$(OMP_NUM_THREADS=$THREADS bench/.venv/bin/python bench/ref_train_step.py --threads "$THREADS" "$@")
echo "$ref"
python3 - "$hearth" "$ref" <<'PY'
import json, sys
h, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"hearth {h['tokens_per_s']:.1f} tok/s, peak {h['peak_rss_gb']:.2f} GB | "
      f"pytorch+peft {r['tokens_per_s']:.1f} tok/s, peak {r['peak_rss_gb']:.2f} GB | "
      f"ratio (hearth/pytorch) tokens/s {h['tokens_per_s']/r['tokens_per_s']:.2f}, memory {h['peak_rss_gb']/r['peak_rss_gb']:.2f}")
PY
