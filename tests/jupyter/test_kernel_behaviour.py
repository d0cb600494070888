"""Scripted jupyter_client checks of what hearth adds to a kernel: interrupts that keep the
cell's variables, restarts that keep the model warm, HMAC rejection, displays updated in place,
and a notebook executed with nbclient."""

import json
import os
import time
import urllib.request

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from conftest import execute


def server_info():
    with open(os.path.join(os.environ["HEARTH_HOME"], "session.json")) as f:
        s = json.load(f)
    req = urllib.request.Request(s["url"] + "/v1/info", headers={"Authorization": "Bearer " + s["token"]})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r), s["pid"]


@pytest.fixture
def kernel():
    km, kc = start_new_kernel(kernel_name="hearth", startup_timeout=120)
    yield km, kc
    kc.stop_channels()
    if km.has_kernel and km.is_alive():
        km.shutdown_kernel(now=False)


def test_interrupt_during_a_long_sample_ends_the_cell_and_keeps_variables(kernel):
    km, kc = kernel
    reply, _ = execute(kc, "let keep = 41;", timeout=300)
    assert reply["content"]["status"] == "ok"
    code = (
        'println!("sampling");\n'
        "let out = session.sample(&SampleInput { prompt: vec![104, 105], num_samples: 8, "
        "sampling_params: SamplingParams { max_tokens: 1000, ..Default::default() }, ..Default::default() })?;"
    )
    msg_id = kc.execute(code)
    t0 = time.time()
    while True:  # wait until the cell runs (it prints before sampling)
        msg = kc.get_iopub_msg(timeout=300)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream" and "sampling" in msg["content"]["text"]:
            break
    time.sleep(0.3)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "error", reply["content"]
    assert reply["content"]["ename"] == "Interrupted"
    assert time.time() - t0 < 60
    reply, outputs = execute(kc, "keep + 1", timeout=120)
    results = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
    assert results == ["42"], outputs


def test_a_second_interrupt_restarts_the_cell_process_and_session_comes_back():
    """A cell the cancel cannot stop (a loop that never asks the server): the second interrupt kills
    the cell process at once, well before the grace period (set to 2 minutes here) would."""
    env = {**os.environ, "HEARTH_INTERRUPT_GRACE_MS": "120000"}
    km, kc = start_new_kernel(kernel_name="hearth", startup_timeout=120, env=env)
    try:
        reply, _ = execute(kc, "let keep = 41;", timeout=300)
        assert reply["content"]["status"] == "ok"
        msg_id = kc.execute('println!("spinning");\nloop { std::thread::sleep(std::time::Duration::from_millis(50)); }')
        while True:  # wait until the cell runs
            msg = kc.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream" and "spinning" in msg["content"]["text"]:
                break
        km.interrupt_kernel()
        time.sleep(0.5)
        t0 = time.time()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=60)
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "Interrupted", reply["content"]
        assert time.time() - t0 < 30
        reply, outputs = execute(kc, "session.run_name().to_string()", timeout=300)
        assert reply["content"]["status"] == "ok", outputs
        reply, _ = execute(kc, "keep", timeout=120)
        assert reply["content"]["status"] == "error", "the variables went with the cell process"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_restart_keeps_the_server_warm_and_the_next_cell_has_session(kernel):
    km, kc = kernel
    execute(kc, "session.run_name().to_string()", timeout=300)
    before, pid = server_info()
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=120)
    reply, outputs = execute(kc, "session.run_name().to_string()", timeout=300)
    assert reply["content"]["status"] == "ok", outputs
    assert any(m["msg_type"] == "execute_result" and '"main"' in m["content"]["data"]["text/plain"] for m in outputs)
    after, pid_after = server_info()
    assert pid_after == pid, "the same server process"
    assert after["model_loads"] == before["model_loads"] == 1, "the model was not loaded again"


def test_a_message_with_a_bad_signature_is_rejected_and_the_kernel_keeps_serving(kernel):
    _, kc = kernel
    key = kc.session.key
    kc.session.key = b"not-the-key"
    kc.kernel_info()
    with pytest.raises(Exception):
        kc.get_shell_msg(timeout=2)
    kc.session.key = key
    msg_id = kc.kernel_info()
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["language_info"]["name"] == "rust"


def test_progress_updates_reach_the_client_with_their_display_id(kernel):
    _, kc = kernel
    code = (
        'let mut p = hearth::Progress::new("train", 3);\n'
        "for i in 1..=3 { std::thread::sleep(std::time::Duration::from_millis(150)); p.set(i, format!(\"step {i}\")); }\n"
        "p.finish();"
    )
    reply, outputs = execute(kc, code, timeout=300)
    assert reply["content"]["status"] == "ok", outputs
    shown = [m for m in outputs if m["msg_type"] == "display_data"]
    updates = [m for m in outputs if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1 and len(updates) >= 3, [m["msg_type"] for m in outputs]
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert all(u["content"]["transient"]["display_id"] == display_id for u in updates)
    assert "3/3" in updates[-1]["content"]["data"]["text/plain"]


def test_a_dependency_compiling_shows_one_status_that_goes_away(kernel, tmp_path):
    """cargo's `Compiling x` lines (evcxr writes them to the kernel's stderr) become one display
    in the cell, emptied when the cell ends; a crate new to the build slot always compiles."""
    _, kc = kernel
    crate = tmp_path / "hearth_status_probe"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text('[package]\nname = "hearth_status_probe"\nversion = "0.1.0"\nedition = "2021"\n')
    (crate / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 42 }\n")
    reply, outputs = execute(kc, f':dep hearth_status_probe = {{ path = "{crate}" }}\nhearth_status_probe::answer()', timeout=300)
    assert reply["content"]["status"] == "ok", outputs
    shown = [m for m in outputs if m["msg_type"] == "display_data"]
    updates = [m for m in outputs if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1, [m["msg_type"] for m in outputs]
    assert shown[0]["content"]["data"]["text/plain"].startswith("compiling hearth_status_probe"), shown
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert updates and all(u["content"]["transient"]["display_id"] == display_id for u in updates), updates
    assert updates[-1]["content"]["data"]["text/plain"] == "", "the status stayed: " + repr(updates[-1])
    results = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
    assert results == ["42"], outputs
    # no raw cargo line reached the notebook
    streams = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert "Compiling" not in streams, streams


def test_a_notebook_trains_tiny_for_30_steps_with_nbclient(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "hearth", "display_name": "Rust (hearth)", "language": "rust"}
    nb.cells = [
        nbformat.v4.new_code_cell('let train = session.new_run("nb", TrainingConfig::default())?;\n'
                                  'let datum = train.supervised("The capital of France is", " Paris.")?;'),
        nbformat.v4.new_code_cell("let mut losses = Vec::new();\n"
                                  "for _ in 0..30 {\n"
                                  "    let out = train.forward_backward(std::slice::from_ref(&datum))?;\n"
                                  "    losses.push(out.metrics[\"loss:sum\"]);\n"
                                  "    train.optim_step(&AdamParams { learning_rate: 3e-3, ..Default::default() })?;\n"
                                  "}\n"
                                  'println!("LOSSES {:?}", losses);'),
        nbformat.v4.new_code_cell("train.loss_plot()?"),
    ]
    client = NotebookClient(nb, timeout=900, kernel_name="hearth", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    nbformat.write(nb, tmp_path / "trained.ipynb")
    saved = nbformat.read(tmp_path / "trained.ipynb", as_version=4)
    text = "".join(o.get("text", "") for o in saved.cells[1].outputs)
    losses = json.loads(text.split("LOSSES ", 1)[1].strip())
    assert losses[-1] < 0.5 * losses[0], losses
    assert any("image/svg+xml" in o.get("data", {}) for o in saved.cells[2].outputs), saved.cells[2].outputs


def test_quit_is_refused_and_the_kernel_lives_on(kernel):
    _, kc = kernel
    reply, outputs = execute(kc, ":quit", timeout=300)
    assert reply["content"]["status"] == "error"
    assert "Shut Down" in reply["content"]["evalue"]
    reply, outputs = execute(kc, "1 + 1", timeout=300)
    assert [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"] == ["2"]


def test_an_error_aborts_the_requests_queued_behind_it(kernel):
    _, kc = kernel
    execute(kc, "1", timeout=300)
    first = kc.execute('let n: u32 = "not a number";')
    second = kc.execute("2 + 2")
    replies = {}
    while len(replies) < 2:
        r = kc.get_shell_msg(timeout=120)
        replies[r["parent_header"]["msg_id"]] = r["content"]["status"]
    assert replies == {first: "error", second: "aborted"}
    reply, outputs = execute(kc, "2 + 2", timeout=120)
    assert reply["content"]["status"] == "ok", "requests sent after the error run again"


def test_a_question_mark_error_is_the_cells_error(kernel):
    """evcxr only prints a `?` error; hearth makes it the cell's error (status, ename), so
    stop_on_error and nbclient stop there."""
    _, kc = kernel
    code = 'println!("before");\nlet r: Result<u32, String> = Err("boom".into());\nlet x = r?;\nprintln!("after");'
    reply, outputs = execute(kc, code, timeout=300)
    assert reply["content"]["status"] == "error", reply["content"]
    assert reply["content"]["ename"] == "Error" and "`?`" in reply["content"]["evalue"]
    streams = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert "before" in streams and "boom" in streams and "after" not in streams, streams
    reply, _ = execute(kc, 'let y: Result<u32, String> = Ok(3);\nlet z = y?;\nz', timeout=300)
    assert reply["content"]["status"] == "ok", "a `?` on Ok goes on as before"


def test_shutting_the_kernel_down_makes_the_server_save(kernel):
    km, kc = kernel
    code = ('let d = session.supervised("ab", "cd")?;\n'
            "session.forward_backward(std::slice::from_ref(&d))?;\n"
            "session.optim_step(&AdamParams::default())?.step")
    reply, outputs = execute(kc, code, timeout=300)
    step = int([m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"][0])
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    info, _ = server_info()
    main = [r for r in info["runs"] if r["id"] == "main"][0]
    assert main["step"] == step and main["last_checkpoint_step"] == step, main
