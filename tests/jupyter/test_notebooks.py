"""The teaching notebooks in notebooks/, executed with nbclient on the real kernel and server (CPU).

Each notebook runs in its own hearth home (so its own session server) and prints a few `KEY value` lines that
the asserts read: the loss or reward moved the right way by a stated margin, the plots came out as
`image/svg+xml`, and notebook 03's server stopped on its own and came back with the run restored.
Executed copies are written to tests/jupyter/out/ (ignored) for a look.
"""

import json
import os
import re
import time
import urllib.request

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import PYTHON_KERNEL, ROOT, execute

NOTEBOOKS = os.path.join(ROOT, "notebooks")
OUT = os.path.join(ROOT, "tests", "jupyter", "out")


def stop_server(home):
    """Asks the server of `home` to save and exit, and waits until its process is gone."""
    try:
        with open(os.path.join(home, "session.json")) as f:
            s = json.load(f)
    except OSError:
        return
    if s.get("state") == "running":
        req = urllib.request.Request(s["url"] + "/v1/shutdown", data=b"{}", method="POST",
                                     headers={"Authorization": "Bearer " + s["token"]})
        try:
            urllib.request.urlopen(req, timeout=30).read()
        except OSError:
            pass
    for _ in range(300):
        try:
            os.kill(s["pid"], 0)
        except OSError:
            return
        time.sleep(0.1)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A hearth home of its own: the notebook's kernel starts a fresh server there."""
    h = tmp_path / "home"
    monkeypatch.setenv("HEARTH_HOME", str(h))
    yield h
    stop_server(h)


def execute_notebook(name, tmp_path, kernel_name="hearth"):
    """Runs every cell (an error in any cell fails the test); returns the executed notebook and seconds."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    want = "hearth" if kernel_name == "hearth" else "python3"
    assert nb.metadata["kernelspec"]["name"] == want, nb.metadata
    t0 = time.time()
    NotebookClient(nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.time() - t0
    os.makedirs(OUT, exist_ok=True)
    nbformat.write(nb, os.path.join(OUT, name))
    print(f"\n{name}: {seconds:.1f} s")
    assert seconds < 300, f"{name} took {seconds:.0f} s; the notebooks must stay quick on a 2-core CPU"
    return nb, seconds


def cell(nb, marker):
    """The one code cell whose source contains `marker`."""
    found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"{len(found)} cells contain {marker!r}"
    return found[0]


def text(c, stream=None):
    """Everything a cell printed (stdout and stderr, or one of them) plus the text/plain of its displays."""
    parts = []
    for o in c.outputs:
        if o.output_type == "stream" and stream in (None, o.name):
            parts.append(o.text)
        elif stream is None and "data" in o:
            parts.append(o.data.get("text/plain", ""))
    return "".join(parts)


def svgs(c):
    return [o.data["image/svg+xml"] for o in c.outputs if "data" in o and "image/svg+xml" in o.data]


def numbers(pattern, s):
    m = re.search(pattern, s)
    assert m, f"{pattern!r} not in {s!r}"
    return [float(x) for x in m.groups()]


def test_01_quickstart_learns_to_reverse_words(home, tmp_path):
    nb, _ = execute_notebook("01-quickstart.ipynb", tmp_path)

    before = text(cell(nb, "BEFORE"))
    assert before.count("BEFORE") == 3 and '"tac\\n"' not in before, before

    train = cell(nb, "progress.finish()")
    first, last = numbers(r"LOSS first ([\d.]+) last ([\d.]+)", text(train))
    assert first > 4.0, f"an untrained byte model starts near ln 256 = 5.5, got {first}"
    assert last < 0.1 * first, f"the loss per answer byte fell only from {first} to {last} in the training loop"
    assert svgs(train), "the live loss plot is not an image/svg+xml display"
    assert any("text/html" in o.get("data", {}) for o in train.outputs), "no progress bar"

    correct, total = numbers(r"CORRECT (\d+)/(\d+)", text(cell(nb, "CORRECT")))
    assert total == 8 and correct >= 7, f"only {correct}/8 words reversed after training"

    assert any("text/html" in o.get("data", {}) for o in cell(nb, "sample_table").outputs)
    assert len(svgs(nb.cells[-2])) == 1, "the final loss plot is not image/svg+xml"


def test_02_rl_raises_the_reward_with_both_losses(home, tmp_path):
    nb, _ = execute_notebook("02-rl.ipynb", tmp_path)
    for loss, marker in [("importance_sampling", "LossFn::ImportanceSampling"), ("ppo", "LossFn::Ppo")]:
        c = cell(nb, marker)
        first, last = numbers(rf"REWARD {loss} first ([\d.]+) last ([\d.]+)", text(c))
        assert first < 0.3, f"{loss}: an untrained model writes random bytes (about 0.1 lowercase), got {first}"
        assert last > first + 0.4, f"{loss}: the mean reward rose only from {first:.3f} to {last:.3f} (mean of the first and last five iterations)"
        assert svgs(c), f"{loss}: no live reward plot"
    both = svgs(cell(nb, '.series("ppo'))
    assert len(both) == 1 and "importance_sampling" in both[0] and "ppo" in both[0]


def test_03_the_server_times_out_and_the_next_cell_restores_the_run(home, tmp_path):
    nb, _ = execute_notebook("03-never-lose-work.ipynb", tmp_path)

    saved = text(cell(nb, "CheckpointKind::Merged"))
    for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "hearth.json", "model.safetensors", "config.json"]:
        assert f in saved, f"{f} missing from the save_state listing:\n{saved}"
    assert "autosave-00000025" in text(cell(nb, 'names.sort()')), "no autosave at step 25"

    stopped = text(cell(nb, "set_idle_timeout"))
    (secs,) = numbers(r"SERVER STOPPED after ([\d.]+) s", stopped)
    assert 'Some("idle timeout")' in stopped and secs < 30, stopped

    restore = cell(nb, "STEP before")
    stderr = text(restore, "stderr")
    run = re.search(r"run (sums-\d+) at step", text(cell(nb, "sums-"))).group(1)
    assert "hearth: started the session server (tiny); restored" in stderr, f"no restore message: {stderr!r}"
    assert f"run {run} at step 30" in stderr, stderr
    before, after = numbers(r"STEP before (\d+) after (\d+)", text(restore, "stdout"))
    assert (before, after) == (30, 31), "the run did not continue at the step it stopped"
    assert svgs(nb.cells[-2]), "no loss plot after the restore"


def test_04_two_learning_rates_share_one_model_and_one_plot(home, tmp_path):
    nb, _ = execute_notebook("04-compare-runs.ipynb", tmp_path)
    final = cell(nb, "FINAL")
    s0, s1, f0, f1 = numbers(r"FINAL slow ([\d.]+) -> ([\d.]+) fast ([\d.]+) -> ([\d.]+)", text(final))
    assert abs(s0 - f0) < 1e-3 * s0, "both runs start from the same base model and a zero LoRA update"
    assert s1 < s0 and f1 < 0.5 * s1, f"the larger learning rate should end far lower: slow {s0}->{s1}, fast {f0}->{f1}"
    assert "MODEL LOADS 1" in text(final)
    plot = svgs(final)
    assert len(plot) == 1 and re.search(r"lr-3e-4-\d+", plot[0]) and re.search(r"lr-3e-3-\d+", plot[0])
    assert svgs(cell(nb, "queued")), "no live comparison plot"


def test_05_chat_sft_teaches_the_real_model_a_fact(home, tmp_path):
    nb, _ = execute_notebook("05-chat-sft.ipynb", tmp_path)
    assert "MODEL SmolLM2-135M-Instruct.Q4_1.gguf · llama" in text(cell(nb, "use_model")), text(cell(nb, "use_model"))
    assert "<|im_start|>assistant" in text(cell(nb, "render_chat"))

    before = text(cell(nb, "BEFORE"), "stdout")
    assert "Coralhaven" not in before, before
    assert "Paris" in before, f"the pre-trained model should know Paris: {before}"

    train = cell(nb, "progress.finish()")
    first, last = numbers(r"LOSS first ([\d.]+) last ([\d.]+)", text(train))
    assert last < 0.2 * first, f"the loss per answer token fell only from {first} to {last}"
    assert svgs(train), "no live loss plot"

    after = text(cell(nb, "AFTER"), "stdout")
    answers = after.split("AFTER ")[1:]
    assert len(answers) == 3, after
    atlantis, france, trip = answers
    assert "Coralhaven" in atlantis and "Coralhaven" in trip, f"the fact did not take:\n{after}"
    assert "Paris" in france, f"the model forgot Paris:\n{after}"
    assert svgs(nb.cells[-1]), "no final loss plot"


def test_06_export_runs_in_llama_cpp(home, tmp_path):
    nb, _ = execute_notebook("06-export.ipynb", tmp_path)
    assert "Coralhaven" in text(cell(nb, "HEARTH "), "stdout")
    saved = text(cell(nb, "CheckpointKind::GgufQ8"))
    for f in ["adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json", "tokenizer.json", "model.gguf"]:
        assert f in saved, f"{f} missing from the listing:\n{saved}"
    f16 = numbers(r"GgufF16: hearth.json \([\d.]+ MB\), model.gguf \(([\d.]+) MB\)", saved)[0]
    q8 = numbers(r"GgufQ8: hearth.json \([\d.]+ MB\), model.gguf \(([\d.]+) MB\)", saved)[0]
    assert 250 < f16 < 300 and q8 < 0.6 * f16, (f16, q8)
    llama = text(cell(nb, "LLAMA.CPP"), "stdout")
    for name in ["gguf-f16", "gguf-q8"]:
        line = re.search(rf"LLAMA.CPP {name}: (.*)", llama)
        assert line and "Coralhaven" in line.group(1), f"llama.cpp did not answer from the trained weights ({name}):\n{llama}"


def test_07_the_tinker_sdk_from_python_trains_on_the_rust_kernels_server(home, tmp_path):
    from jupyter_client.manager import start_new_kernel

    # a Rust kernel starts the session server, as a user's first notebook would
    km, kc = start_new_kernel(kernel_name="hearth", startup_timeout=120)
    try:
        reply, outputs = execute(kc, "session.info()?.model_loads", timeout=600)
        assert reply["content"]["status"] == "ok", (reply, outputs)
        # the Python notebook (ipykernel, the unmodified tinker SDK) trains on that server
        nb, _ = execute_notebook("07-tinker-python.ipynb", tmp_path, kernel_name=PYTHON_KERNEL)
        assert "MODEL ['tiny']" in text(cell(nb, "SERVER"))
        first, last = numbers(r"LOSS first ([\d.]+) last ([\d.]+)", text(cell(nb, "LOSS first")))
        assert first > 4.0 and last < 0.1 * first, (first, last)
        correct, total = numbers(r"CORRECT (\d+)/(\d+)", text(cell(nb, "CORRECT")))
        assert total == 8 and correct >= 7, f"only {correct}/8 words reversed"
        run = re.search(r"RUN (\S+)", text(cell(nb, 'print("RUN"'))).group(1)
        # and the Rust side sees that run, at its step
        reply, outputs = execute(kc, ":runs", timeout=60)
        shown = "".join(m["content"].get("text", "") + m["content"].get("data", {}).get("text/plain", "") for m in outputs)
        line = [l for l in shown.splitlines() if l.startswith(run)]
        assert line and line[0].split()[1] == "40", shown
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_08_a_class_of_three_trains_privately_on_one_model(home, tmp_path):
    nb, _ = execute_notebook("08-classroom.ipynb", tmp_path)
    users = re.findall(r"USER (\S+) token", text(cell(nb, "add_user")))
    assert [u.split("-")[0] for u in users] == ["alice", "bob", "carol"], users
    assert text(cell(nb, "as_user")).count("RUN main (1 runs visible)") == 3, text(cell(nb, "as_user"))
    trained = re.findall(r"TRAINED (\S+) loss ([\d.]+) -> ([\d.]+)", text(cell(nb, "TRAINED")))
    assert [t[0] for t in trained] == users
    for name, first, last in trained:
        assert float(last) < 0.5 * float(first), f"{name}: loss {first} -> {last}"
    refused = text(cell(nb, "REFUSED"))
    assert "LEAK" not in refused and "REFUSED" in refused and "does not exist" in refused, refused
    plot = svgs(cell(nb, "compare_runs"))
    assert len(plot) == 1 and all(f"{u}/main" in plot[0] for u in users), "the three curves on one chart"
    usage = text(cell(nb, ":usage"))
    for u in users:
        row = [l for l in usage.splitlines() if l.startswith(u)]
        assert row and int(row[0].split()[2]) > 0, f"no tokens trained for {u}:\n{usage}"
