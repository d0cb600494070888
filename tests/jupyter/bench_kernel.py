"""Kernel figures (median of 20 each), printed as one JSON line:

- magic_reply_ms: `:status` from execute_request to execute_reply (no compile);
- trivial_cell_ms: a Rust cell that calls `session` (`session.run_name().len()`), warm kernel;
- start_to_first_result_s: kernel start to the first cell's result, prelude cached.

    HEARTH_BIN_DIR=target/release tests/.venv/bin/python tests/jupyter/bench_kernel.py
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402  (installs the kernelspec, sets HEARTH_HOME)
from conftest import execute  # noqa: E402
from jupyter_client.manager import start_new_kernel  # noqa: E402


def timed(kc, code):
    t = time.perf_counter()
    reply, _ = execute(kc, code, timeout=600)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.perf_counter() - t


def main():
    conftest.pytest_sessionstart(None)  # warm evcxr's cache once
    km, kc = start_new_kernel(kernel_name="hearth", startup_timeout=120)
    timed(kc, "session.run_name().len()")
    magic = [timed(kc, ":status") * 1e3 for _ in range(20)]
    cell = [timed(kc, "session.run_name().len()") * 1e3 for _ in range(20)]
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    starts = []
    for _ in range(20):
        t = time.perf_counter()
        km, kc = start_new_kernel(kernel_name="hearth", startup_timeout=120)
        reply, outputs = execute(kc, "session.run_name().len()", timeout=600)
        starts.append(time.perf_counter() - t)
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    conftest.pytest_sessionfinish(None, 0)
    print(json.dumps({
        "magic_reply_ms_median": statistics.median(magic),
        "trivial_cell_ms_median": statistics.median(cell),
        "start_to_first_result_s_median": statistics.median(starts),
        "n": 20,
    }))


if __name__ == "__main__":
    main()
