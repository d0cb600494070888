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
