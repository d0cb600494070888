#!/usr/bin/env bash
# Makes sure the reference (PyTorch + transformers + PEFT, about 5 GB from PyPI) is installed in
# bench/.venv. Sourced by the benchmarks and scripts/test.sh from the repository root.
if ! bench/.venv/bin/python -c "import torch, transformers, peft, safetensors" >/dev/null 2>&1; then
  echo "installing the reference (torch, transformers, peft) into bench/.venv ..." >&2
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q --disable-pip-version-check torch transformers peft safetensors
fi
