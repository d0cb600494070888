"""Real JupyterLab in headless Chromium: 01-quickstart.ipynb runs with the hearth kernel, its plots render in the
page, and Kernel → Interrupt during a long cell ends it with the Interrupted error while the next cell still has
`session`.

Needs `jupyter lab` in this Python, /usr/bin/chromium (or CHROMIUM) and `npm ci` in tests/browser
(scripts/test.sh installs all three). On its own:

    HEARTH_BIN_DIR=target/release tests/.venv/bin/python -m pytest tests/browser -q -p no:cacheprovider

Screenshots go to tests/browser/out/ (ignored).
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import nbformat
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.abspath(os.environ.get("HEARTH_BIN_DIR", os.path.join(ROOT, "target", "release")))
OUT = os.path.join(HERE, "out")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

INTERRUPT_CELLS = [
    "let keep = 41;",
    'println!("sampling");\n'
    "let out = session.sample(&SampleInput { prompt: session.tokenize(\"Once\")?, num_samples: 64,\n"
    "    sampling_params: SamplingParams { max_tokens: 1000, ..Default::default() }, ..Default::default() })?;",
    'println!("AFTER keep={} run={}", keep + 1, session.run_name());',
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


@pytest.fixture
def lab(tmp_path):
    """jupyter lab on a free loopback port, serving a copy of notebooks/ plus the interrupt notebook."""
    missing = [p for p in [CHROMIUM, os.path.join(HERE, "node_modules", "playwright-core")] if not os.path.exists(p)]
    assert not missing, f"missing {missing}: run scripts/test.sh (it installs chromium and playwright-core)"
    root = tmp_path / "root"
    shutil.copytree(os.path.join(ROOT, "notebooks"), root)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "hearth", "display_name": "Rust (hearth)", "language": "rust"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in INTERRUPT_CELLS]
    nbformat.write(nb, root / "interrupt.ipynb")

    prefix, home = tmp_path / "prefix", tmp_path / "home"
    subprocess.run([os.path.join(BIN, "hearth-kernel"), "install", "--prefix", str(prefix)], check=True, stdout=subprocess.DEVNULL)
    # The news and update toasts would cover the page.
    settings = os.path.join(sys.prefix, "share", "jupyter", "lab", "settings")
    os.makedirs(settings, exist_ok=True)
    with open(os.path.join(settings, "overrides.json"), "w") as f:
        json.dump({"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
                   # every cell in the DOM (JupyterLab 4 leaves cells out of view unrendered by default)
                   "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"}}, f)
    env = dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"), HEARTH_HOME=str(home),
               HEARTH_SERVER_BIN=os.path.join(BIN, "hearth-server"), RAYON_NUM_THREADS="1",
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"))
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, open(tmp_path / "jupyter.log").read()
            try:
                get(f"{url}/api/status?token={token}")
                break
            except OSError:
                time.sleep(0.1)
        yield url, token, home
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        stop_server(home)


def stop_server(home):
    try:
        with open(home / "session.json") as f:
            s = json.load(f)
    except OSError:
        return
    if s.get("state") == "running":
        req = urllib.request.Request(s["url"] + "/v1/shutdown", data=b"{}", method="POST", headers={"Authorization": "Bearer " + s["token"]})
        try:
            urllib.request.urlopen(req, timeout=30).read()
        except OSError:
            pass


def test_quickstart_runs_in_jupyterlab_and_an_interrupt_keeps_the_session(lab):
    url, token, _ = lab
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    run = subprocess.run(["node", os.path.join(HERE, "jupyterlab.mjs")], capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, LAB_URL=url, LAB_TOKEN=token, NOTEBOOK="01-quickstart.ipynb",
                                  INTERRUPT_NOTEBOOK="interrupt.ipynb", OUT_DIR=OUT, CHROMIUM=CHROMIUM))
    print(f"\nbrowser run: {time.time() - t0:.1f} s", file=sys.stderr)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in found.items() if k != "text"}, indent=1)[:3000], file=sys.stderr)
    assert "failure" not in found, found["failure"]

    # Every code cell ran, the loss plots are rendered images, the trained model answers.
    assert found["prompts"] and all(p.strip("[]: ").isdigit() for p in found["prompts"]), found["prompts"]
    svg_images = [b for b in found["plot_boxes"] if b["svg"] and b["w"] > 100 and b["h"] > 100]
    assert len(svg_images) >= 2, f"the live and the final loss plot should render as SVG images: {found['plot_boxes']}"
    assert "CORRECT" in found["text"] and "LOSS first" in found["text"], found["text"][-2000:]
    assert os.path.getsize(found["screenshot"]) > 10_000

    # Kernel → Interrupt: the long cell ends with the Interrupted error, and the next cell still has `session`.
    assert "Interrupted" in found["interrupt_error"], found["interrupt_error"]
    assert found["interrupt_s"] < 30, found["interrupt_s"]
    assert "AFTER keep=42 run=main" in found["after_interrupt"], found["after_interrupt"]
