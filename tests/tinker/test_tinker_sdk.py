"""The official Tinker SDK (tinker 0.38, unmodified) against hearth-server's /api/v1.

scripts/test.sh runs this with the reference virtualenv (the SDK's forward_backward_custom
needs torch, get_tokenizer transformers); on its own:

    source bench/reference.sh
    HEARTH_BIN_DIR=target/release bench/.venv/bin/python -m pytest tests/tinker

A real server on loopback (the `tiny` preset), the SDK as the client: create, forward, every
built-in loss, forward_backward_custom, optim_step, save, sampling clients from a path and from
the training client, create from state with and without the optimizer, the RestClient's reads,
a run shared with the native API, and clear errors for bad protocol input.
"""

import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import pytest
import tinker
from tinker import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.abspath(os.environ.get("HEARTH_BIN_DIR", os.path.join(ROOT, "target", "release")))
TEXT = "reverse: cat>tac"


class Server:
    def __init__(self, *args):
        self.home = tempfile.mkdtemp(prefix="hearth-tinker-")
        env = dict(os.environ, RAYON_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "hearth-server"), "--home", self.home, "--listen", "127.0.0.1:0", "--model", "tiny",
             *(a for a in ("--idle-timeout", "0") if "--idle-timeout" not in args),
             "--autosave-every", "0", "--max-body-bytes", "1000000", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        # keep draining the server's stderr (a full pipe would block it)
        self.log = []
        threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr], daemon=True).start()
        session = json.load(open(os.path.join(self.home, "session.json")))
        self.url, self.token = session["url"], session["token"]

    def http(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def native(self, path, body=None):
        status, out = self.http("POST" if body is not None else "GET", path, body)
        assert status == 200, (path, status, out)
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(server):
    sc = tinker.ServiceClient(base_url=server.url, api_key="tml-" + server.token)
    yield sc


@pytest.fixture(scope="module")
def trained(server, service):
    """A LoRA training client, its tokenizer and a datum."""
    tc = service.create_lora_training_client(base_model="tiny", rank=8, seed=3).result()
    tok = tc.get_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    native_ids = server.native("/v1/tokenize", {"text": TEXT})["tokens"]
    assert ids == native_ids
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    return tc, tok, ids, datum


def run_of(model_id):
    return model_id.replace(":train:", "-train-")


def test_capabilities_and_info(server, service, trained):
    caps = tinker.RestClient(base_url=server.url, api_key="tml-" + server.token).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == ["tiny"]
    tc = trained[0]
    info = tc.get_info()
    assert info.model_id.endswith(":train:0") and info.is_lora and info.lora_rank == 8
    assert info.model_data.model_name == "tiny"
    # the SDK's defaults train attention, MLP and the unembedding (LoRA on lm_head)
    runs = {r["id"]: r for r in server.native("/v1/runs")}
    modules = runs[run_of(tc.model_id)]["training"]["target_modules"]
    assert modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], modules


def test_forward_equals_the_native_api(server, trained):
    tc, _, ids, datum = trained
    out = tc.forward([datum], "cross_entropy").result()
    native = server.native(f"/v1/runs/{run_of(tc.model_id)}/forward", {
        "data": [{"model_input": ids[:-1], "loss_fn_inputs": {"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}}],
        "loss_fn": "cross_entropy"})
    assert math.isclose(out.metrics["loss:sum"], native["metrics"]["loss:sum"], rel_tol=1e-6)
    lp = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(lp) == len(ids) - 1
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(lp, native["loss_fn_outputs"][0]["logprobs"]))
    assert math.isclose(-sum(lp), out.metrics["loss:sum"], rel_tol=1e-5)


def test_every_builtin_loss_and_a_custom_one(trained):
    tc, _, ids, datum = trained
    n = len(ids) - 1
    base = tc.forward([datum], "cross_entropy").result()
    sampler_lp = [x - 0.1 for x in base.loss_fn_outputs[0]["logprobs"].tolist()]
    rl = types.Datum(model_input=datum.model_input,
                     loss_fn_inputs={"target_tokens": ids[1:], "logprobs": sampler_lp, "advantages": [1.0] * n})
    for loss, cfg in [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
                      ("cispo", None), ("dro", {"beta": 0.05})]:
        out = tc.forward_backward([rl], loss, loss_fn_config=cfg).result()
        assert math.isfinite(out.metrics["loss:sum"]), (loss, out.metrics)
        assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == n
    # importance sampling at ratio e^0.1 per token: loss = -sum(ratio * A)
    out = tc.forward([rl], "importance_sampling").result()
    assert math.isclose(out.metrics["loss:sum"], -n * math.exp(0.1), rel_tol=1e-4), out.metrics
    # forward_backward_custom: the SDK sends cross-entropy with weights = -dL/dlogprobs
    # (negative ones too); -sum(logprobs) is cross-entropy itself
    custom = tc.forward_backward_custom([datum], lambda data, lps: (sum(-lp.sum() for lp in lps), {})).result()
    assert math.isclose(custom.metrics["loss:sum"], base.metrics["loss:sum"], rel_tol=1e-5), custom.metrics
    # drop what these accumulated before training
    tc.optim_step(types.AdamParams(learning_rate=0.0)).result()


def test_training_lowers_the_loss_and_shows_in_the_native_metrics(server, trained):
    tc, _, _, datum = trained
    first = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    futures = []
    for _ in range(8):
        futures.append(tc.forward_backward([datum], "cross_entropy"))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=2e-2)))
    for f in futures:
        f.result()
    last = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert last < 0.5 * first, (first, last)
    runs = {r["id"]: r for r in server.native("/v1/runs")}
    assert runs[run_of(tc.model_id)]["step"] == 9
    rows = server.native(f"/v1/runs/{run_of(tc.model_id)}/metrics")["rows"]
    assert len(rows) == 9 and rows[-1]["loss"] < rows[1]["loss"]


def test_sampling_from_the_training_client_and_from_a_path(server, service, trained):
    tc, tok, ids, _ = trained
    prompt = types.ModelInput.from_ints(tok.encode("reverse: cat>", add_special_tokens=False))
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    live = tc.save_weights_and_get_sampling_client().result()
    a = live.sample(prompt, 2, params).result()
    assert len(a.sequences) == 2 and len(a.sequences[0].tokens) == 4
    assert a.sequences[0].tokens == a.sequences[1].tokens
    # the sampled tokens' logprobs are the model's: compute_logprobs on prompt + completion
    full = types.ModelInput.from_ints(prompt.to_ints() + a.sequences[0].tokens)
    lps = live.compute_logprobs(full).result()
    assert lps[0] is None
    for got, want in zip(a.sequences[0].logprobs, lps[-4:]):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5), (a.sequences[0].logprobs, lps)
    path = tc.save_weights_for_sampler("s1").result().path
    assert path == f"tinker://{tc.model_id}/sampler_weights/s1"
    from_path = service.create_sampling_client(model_path=path).result()
    b = from_path.sample(prompt, 1, params).result()
    assert b.sequences[0].tokens == a.sequences[0].tokens
    # a snapshot does not move with later steps of the run
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": [5] * (len(ids) - 1), "weights": [1.0] * (len(ids) - 1)})
    for _ in range(3):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert from_path.sample(prompt, 1, params).result().sequences[0].tokens == b.sequences[0].tokens
    assert live.sample(prompt, 1, params).result().sequences[0].tokens == a.sequences[0].tokens


def test_save_and_create_from_state(service, trained):
    tc, _, _, datum = trained
    path = tc.save_state("ckpt1").result().path
    assert path == f"tinker://{tc.model_id}/weights/ckpt1"
    want = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    with_opt = service.create_training_client_from_state_with_optimizer(path).result()
    without = service.create_training_client_from_state(path).result()
    for c in (with_opt, without):
        got = c.forward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert math.isclose(got, want, rel_tol=1e-6), (got, want)
    # the same step from the same state: equal with the optimizer, different without it
    step = lambda c: (c.forward_backward([datum], "cross_entropy").result(), c.optim_step(types.AdamParams(learning_rate=1e-2)).result(),
                      c.forward([datum], "cross_entropy").result().metrics["loss:sum"])[2]
    a, b, c = step(tc), step(with_opt), step(without)
    assert math.isclose(a, b, rel_tol=1e-6), (a, b)
    assert not math.isclose(a, c, rel_tol=1e-4), (a, c)


def test_rest_client_lists_and_deletes(server, trained):
    tc = trained[0]
    tc.save_state("to-delete").result()
    rc = tinker.RestClient(base_url=server.url, api_key="tml-" + server.token)
    runs = rc.list_training_runs().result()
    ids = [r.training_run_id for r in runs.training_runs]
    assert tc.model_id in ids
    run = rc.get_training_run(tc.model_id).result()
    assert run.is_lora and run.lora_rank == 8
    cks = rc.list_checkpoints(tc.model_id).result().checkpoints
    names = {c.checkpoint_id for c in cks}
    assert {"weights/ckpt1", "weights/to-delete", "sampler_weights/s1"} <= names, names
    rc.delete_checkpoint(tc.model_id, "weights/to-delete").result()
    names = {c.checkpoint_id for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert "weights/to-delete" not in names and "weights/ckpt1" in names
    info = rc.get_weights_info_by_tinker_path(f"tinker://{tc.model_id}/weights/ckpt1").result()
    assert info.is_lora and info.lora_rank == 8 and info.train_unembed and info.train_mlp and info.train_attn


def test_a_native_run_driven_from_python(server, service):
    server.native("/v1/runs", {"name": "main", "training": {"kind": "lora", "rank": 4}})
    tc = service.create_lora_training_client(base_model="tiny", rank=4, user_metadata={"hearth_run": "main"}).result()
    assert tc.model_id == "main"
    ids = server.native("/v1/tokenize", {"text": TEXT})["tokens"]
    d = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    tc.forward_backward([d], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    runs = {r["id"]: r for r in server.native("/v1/runs")}
    assert runs["main"]["step"] == 1


def test_requests_run_in_seq_id_order_whatever_order_they_arrive_in(server, service):
    tc = service.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
    key = {"X-API-Key": "tml-" + server.token}
    retrieve = lambda rid: server.http("POST", "/api/v1/retrieve_future", {"request_id": rid}, headers=key)
    ids = server.native("/v1/tokenize", {"text": TEXT})["tokens"]
    d = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    tc.forward_backward([d], "cross_entropy").result()  # seq 1, through the SDK
    # seq 3 (save) arrives before seq 2 (the step): it must wait, and save the stepped weights
    st, save = server.http("POST", "/api/v1/save_weights", {"model_id": tc.model_id, "seq_id": 3, "path": "after"}, headers=key)
    assert st == 200, save
    st, step = server.http("POST", "/api/v1/optim_step", {"model_id": tc.model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}, headers=key)
    assert st == 200, step
    st, stepped = retrieve(step["request_id"])
    assert st == 200 and "error" not in stepped, stepped
    st, saved = retrieve(save["request_id"])
    assert st == 200 and saved["path"].endswith("/weights/after"), saved
    meta = json.load(open(os.path.join(server.home, "runs", run_of(tc.model_id), "checkpoints", "after", "hearth.json")))
    assert meta["step"] == 1, meta


def test_bad_protocol_input_gets_a_clear_4xx(server, service, trained):
    tc = trained[0]
    key = {"X-API-Key": "tml-" + server.token}
    status, body = server.http("POST", "/api/v1/forward_backward", raw=b"\xff\xff\xff\x01", headers={**key, "Content-Type": "application/x-protobuf"})
    assert status == 400 and "protobuf" in body["detail"], body
    status, body = server.http("POST", "/api/v1/get_info", {"model_id": "nope:train:7"}, headers=key)
    assert status == 404 and "unknown model_id" in body["detail"], body
    tc.forward([trained[3]], "cross_entropy").result()  # seq_id 1 is used, whichever tests ran before
    # out of order: a seq_id already passed (0 is the model's creation), one far ahead, a used
    # seq_id with another body (the SDK's seq_id 1 was a forward; only a retry with the same body
    # gets its first future back, server/tests/tinker_wire.rs)
    status, body = server.http("POST", "/api/v1/optim_step", {"model_id": tc.model_id, "seq_id": 0, "adam_params": {"learning_rate": 1e-3}}, headers=key)
    assert status == 409 and "already run" in body["detail"], body
    status, body = server.http("POST", "/api/v1/optim_step", {"model_id": tc.model_id, "seq_id": 10**9, "adam_params": {"learning_rate": 1e-3}}, headers=key)
    assert status == 400 and "too far ahead" in body["detail"], body
    status, body = server.http("POST", "/api/v1/optim_step", {"model_id": tc.model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}, headers=key)
    assert status == 409 and "seq_id 1 was already used by a different request" in body["detail"], body
    status, body = server.http("POST", "/api/v1/create_session", {}, headers={"X-API-Key": "tml-wrong"})
    assert status == 401 and "X-API-Key" in body["detail"], body
    # a body over --max-body-bytes (1 MB here)
    status, body = server.http("POST", "/api/v1/forward_backward", raw=b"\0" * 1_200_000, headers={**key, "Content-Type": "application/x-protobuf"})
    assert status == 413 and "max-body-bytes" in body["detail"], body
    # the SDK reports them: a wrong key, a bad sampler path, a failed future
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=server.url, api_key="tml-wrong").get_server_capabilities().result()
    with pytest.raises(Exception, match="no checkpoint"):
        service.create_sampling_client(model_path=f"tinker://{tc.model_id}/sampler_weights/missing").result()
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3})
    with pytest.raises(tinker.RequestFailedError):
        tc.forward_backward([bad], "cross_entropy").result()
    # and the server keeps serving, the client too
    assert server.native("/v1/ping") == {"ok": True}
    assert math.isfinite(tc.forward([trained[3]], "cross_entropy").result().metrics["loss:sum"])
