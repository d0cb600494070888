#!/usr/bin/env bash
# A class on one server (issue: users, fair share, limits): fairness under a user pipelining 200
# samples, thirty clients (native and the real tinker SDK) for five minutes, SIGTERM and resume;
# with --batching K, K concurrent sampling and training clients on SmolLM2 against one alone.
# Prints figures; see bench/tenants.py. Extra arguments go to it (--minutes 1 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/reference.sh
cargo build --release -q -p hearth-server
exec bench/.venv/bin/python bench/tenants.py "$@"
