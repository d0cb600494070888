#!/usr/bin/env bash
# Batch-1 decode against llama.cpp on the real SmolLM2 Q4_1 GGUF (bench/decode.py): hearth-server's
# `sample` with the base kept as the file's blocks and as f32, llama-cpp-python on the same file,
# same threads (THREADS, default 2), same run. Prints prefill and decode tokens/s and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/reference.sh
cargo build --release -q -p hearth-server
exec bench/.venv/bin/python bench/decode.py --threads "${THREADS:-2}" "$@"
