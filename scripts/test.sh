#!/usr/bin/env bash
# Runs every test of the workspace. On a fresh machine it needs only a Rust toolchain (rustup);
# everything else the tests use is committed (golden fixtures) or generated (model presets).
# One profile (release) for everything: candle is unusably slow unoptimised, and building the
# workspace twice in two profiles doubles the time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) and run this again" >&2
  exit 1
fi
cargo test --release --workspace --locked "$@"
