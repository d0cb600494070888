#!/usr/bin/env bash
# Runs every test of the workspace. On a fresh machine it needs a Rust toolchain (rustup) and
# Python 3 with venv; it installs the rest itself: the reference (PyTorch + transformers + PEFT,
# about 5 GB from PyPI, once) into bench/.venv, used by tests that load hearth's checkpoints with
# Hugging Face tools. Golden fixtures are committed; model presets are generated.
# One profile (release) for everything: candle is unusably slow unoptimised, and building the
# workspace twice in two profiles doubles the time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) and run this again" >&2
  exit 1
fi
source bench/reference.sh
export HEARTH_REF_PYTHON="$PWD/bench/.venv/bin/python"
cargo test --release --workspace --locked "$@"
