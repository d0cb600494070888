"""Shared set-up for the Jupyter tests: the hearth kernelspec on JUPYTER_PATH and a warm kernel.

scripts/test.sh runs these with the release binaries built by `cargo test`; on its own:

    HEARTH_BIN_DIR=target/release tests/.venv/bin/python -m pytest tests/jupyter

installs the kernelspec (with `hearth-kernel install --prefix`) into a temporary prefix, points
HEARTH_HOME at a temporary home and HEARTH_SERVER_BIN at the server binary. The first kernel of a
fresh machine compiles the prelude into evcxr's cache (minutes); `warm_kernel` does that once,
before the timed tests.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.abspath(os.environ.get("HEARTH_BIN_DIR", os.path.join(ROOT, "target", "release")))
PREFIX = tempfile.mkdtemp(prefix="hearth-jupyter-")
HOME = tempfile.mkdtemp(prefix="hearth-home-")

subprocess.run([os.path.join(BIN, "hearth-kernel"), "install", "--prefix", PREFIX], check=True, stdout=subprocess.DEVNULL)
os.environ["JUPYTER_PATH"] = os.path.join(PREFIX, "share", "jupyter")
os.environ["HEARTH_HOME"] = HOME
os.environ["HEARTH_SERVER_BIN"] = os.path.join(BIN, "hearth-server")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

# A Python kernel on the reference virtualenv (ipykernel and the tinker SDK are installed there by
# bench/reference.sh), for the Python notebook that trains through the Tinker SDK.
PYTHON_KERNEL = "hearth-test-python"
_ref_python = os.environ.get("HEARTH_REF_PYTHON") or os.path.join(ROOT, "bench", ".venv", "bin", "python")
os.makedirs(os.path.join(PREFIX, "share", "jupyter", "kernels", PYTHON_KERNEL), exist_ok=True)
with open(os.path.join(PREFIX, "share", "jupyter", "kernels", PYTHON_KERNEL, "kernel.json"), "w") as f:
    json.dump({"argv": [_ref_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "Python (reference venv)", "language": "python"}, f)


def execute(kc, code, timeout=60):
    """Runs code; returns (reply, [iopub messages of this request, up to idle])."""
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    outputs = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        outputs.append(msg)
    return reply, outputs


def pytest_sessionstart(session):
    """One kernel run to fill evcxr's build cache, so later kernels start in seconds."""
    from jupyter_client.manager import start_new_kernel

    t0 = time.time()
    km, kc = start_new_kernel(kernel_name="hearth", startup_timeout=120)
    try:
        reply, outputs = execute(kc, "session.run_name().to_string()", timeout=1200)
        assert reply["content"]["status"] == "ok", (reply, outputs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    print(f"\nwarm-up: first kernel and prelude compile took {time.time() - t0:.0f} s", file=sys.stderr)


def pytest_sessionfinish(session, exitstatus):
    """The kernels started a session server in the temporary home: ask it to save and exit."""
    import json
    import urllib.request

    try:
        with open(os.path.join(HOME, "session.json")) as f:
            s = json.load(f)
        if s.get("state") == "running":
            req = urllib.request.Request(s["url"] + "/v1/shutdown", data=b"{}", method="POST",
                                         headers={"Authorization": "Bearer " + s["token"]})
            urllib.request.urlopen(req, timeout=30).read()
    except OSError:
        pass
