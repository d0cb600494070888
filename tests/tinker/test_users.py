"""Two users of one server through the official Tinker SDK: each trains, saves and samples under
their own token, and nothing of alice's is within bob's reach.

    source bench/reference.sh
    HEARTH_BIN_DIR=target/release bench/.venv/bin/python -m pytest tests/tinker/test_users.py

Bob's client, and bob's key on the raw routes the SDK speaks, against alice's model id,
checkpoints (`tinker://` paths), sampler, future and session: each answers as one that does not
exist (the same answer as for an id nobody has), and afterwards alice's checkpoint files are
byte-identical and her metrics unchanged.
"""

import hashlib
import os

import pytest
import tinker
from tinker import types

from test_tinker_sdk import TEXT, Server


def add_user(server, name):
    status, out = server.http("POST", "/v1/users", {"name": name})
    assert status == 201, out
    return out["token"]


def as_user(server, token, method, path, body=None):
    return server.http(method, path, body, headers={"Authorization": f"Bearer {token}", "X-API-Key": f"tml-{token}"})


def folder_digest(path):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            digest.update(f.encode())
            digest.update(open(os.path.join(root, f), "rb").read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def test_nothing_of_alices_is_within_bobs_reach(server):
    alice_token, bob_token = add_user(server, "alice"), add_user(server, "bob")
    alice = tinker.ServiceClient(base_url=server.url, api_key="tml-" + alice_token)
    bob = tinker.ServiceClient(base_url=server.url, api_key="tml-" + bob_token)

    tc = alice.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
    tok = tc.get_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    for _ in range(2):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state_path = tc.save_state("ck").result().path
    sampler_path = tc.save_weights_for_sampler("s1").result().path
    live = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(ids[:4])
    live.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=0.0)).result()
    sampler_id = live._sampling_session_id
    run = tc.model_id.replace(":train:", "-train-")
    ck_dir = os.path.join(server.home, "users", "alice", "runs", run, "checkpoints", "ck")
    assert os.path.isdir(ck_dir)
    before = folder_digest(ck_dir)
    status, metrics_before = as_user(server, alice_token, "GET", f"/v1/runs/{run}/metrics")
    assert status == 200 and len(metrics_before["rows"]) == 2, metrics_before

    # the admin's list holds both users' runs; bob's holds none of alice's
    bob_tc = bob.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
    rc_bob = tinker.RestClient(base_url=server.url, api_key="tml-" + bob_token)
    bob_runs = [r.training_run_id for r in rc_bob.list_training_runs().result().training_runs]
    assert bob_runs == [bob_tc.model_id]
    rc_admin = tinker.RestClient(base_url=server.url, api_key="tml-" + server.token)
    admin_runs = {r.training_run_id for r in rc_admin.list_training_runs().result().training_runs}
    assert {f"alice/{tc.model_id}", f"bob/{bob_tc.model_id}"} <= admin_runs, admin_runs

    # through bob's SDK clients: each of alice's things is not found
    def refused(call):
        with pytest.raises(tinker.NotFoundError):
            call()
    refused(lambda: bob.create_training_client_from_state(state_path).result())
    refused(lambda: bob.create_sampling_client(model_path=sampler_path).result())
    refused(lambda: rc_bob.get_training_run(tc.model_id).result())
    refused(lambda: rc_bob.get_weights_info_by_tinker_path(state_path).result())
    refused(lambda: rc_bob.delete_checkpoint(tc.model_id, "weights/ck").result())
    assert rc_bob.list_checkpoints(tc.model_id).result().checkpoints == []
    # alice's path spelled with her name, as the admin would: a path a user cannot give, the same
    # answer as with a user that does not exist
    errors = []
    for who in ("alice", "zed"):
        with pytest.raises(tinker.BadRequestError) as e:
            bob.create_training_client_from_state(state_path.replace("tinker://", f"tinker://{who}/")).result()
        errors.append(str(e.value).replace(who, "USER"))
    assert errors[0] == errors[1], errors

    # the raw routes, with bob's key: the same answer as for an id that nobody has
    def same_as_missing(path, body, missing_body):
        got = as_user(server, bob_token, "POST" if body is not None else "GET", path, body)
        missing = as_user(server, bob_token, "POST" if body is not None else "GET", path, missing_body)
        assert got[0] == 404, (path, got)
        assert got[0] == missing[0], (path, got, missing)
        return got
    nobody_model = "s00000000:train:0"
    adam = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    same_as_missing("/api/v1/optim_step", {"model_id": tc.model_id, "seq_id": 99, "adam_params": adam},
                    {"model_id": nobody_model, "seq_id": 99, "adam_params": adam})
    same_as_missing("/api/v1/get_info", {"model_id": tc.model_id}, {"model_id": nobody_model})
    same_as_missing("/api/v1/asample", {"sampling_session_id": sampler_id, "prompt": {"chunks": []}},
                    {"sampling_session_id": "s00000000:sample:0", "prompt": {"chunks": []}})
    status, _ = as_user(server, bob_token, "GET", f"/api/v1/samplers/{sampler_id}")
    assert status == 404
    for future in ("req-1", "req-2", "req-5"):
        same_as_missing("/api/v1/retrieve_future", {"request_id": future}, {"request_id": "req-999999"})
    alice_session = tc.model_id.split(":train:")[0]
    status, out = as_user(server, bob_token, "POST", "/api/v1/session_heartbeat", {"session_id": alice_session})
    assert status == 404, out
    status, out = as_user(server, bob_token, "POST", "/api/v1/create_model",
                          {"session_id": alice_session, "model_seq_id": 7, "base_model": "tiny"})
    assert status == 404, out

    # bob's own work goes on beside hers
    bob_tc.forward_backward([datum], "cross_entropy").result()
    bob_tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    bob_tc.save_state("ck").result()

    assert folder_digest(ck_dir) == before, "alice's checkpoint is byte-identical"
    assert as_user(server, alice_token, "GET", f"/v1/runs/{run}/metrics")[1] == metrics_before
    # and alice's own clients still reach all of it
    assert alice.create_training_client_from_state(state_path).result().forward([datum], "cross_entropy").result()
    assert tinker.RestClient(base_url=server.url, api_key="tml-" + alice_token).get_training_run(tc.model_id).result()


def test_the_sdk_waits_and_retries_when_its_line_is_full():
    """With room for two queued requests per user, a client that pipelines many samples and
    training steps gets every answer: the server refuses past the bound with 429 + Retry-After,
    and the SDK backs off and sends the same request (the same seq_id) again."""
    os.environ["HEARTH_LOG"] = "debug"
    try:
        s = Server("--max-queued-per-user", "2")
    finally:
        del os.environ["HEARTH_LOG"]
    try:
        token = add_user(s, "carol")
        sc = tinker.ServiceClient(base_url=s.url, api_key="tml-" + token)
        tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
        ids = tc.get_tokenizer().encode(TEXT, add_special_tokens=False)
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(ids[:4])
        params = types.SamplingParams(max_tokens=32, temperature=1.0)
        samples = [sampler.sample(prompt, 4, params) for _ in range(12)]
        steps = []
        for _ in range(4):
            steps.append(tc.forward_backward([datum], "cross_entropy"))
            steps.append(tc.optim_step(types.AdamParams(learning_rate=1e-2)))
        assert all(len(f.result().sequences) == 4 for f in samples)
        results = [f.result() for f in steps]
        assert results[-1].metrics["step:max"] == 4
        refusals = sum("answered 429" in line for line in s.log)
        assert refusals > 0, "the line was full at times: the SDK was refused and retried"
    finally:
        s.stop()


def test_sampler_snapshots_are_evicted_past_the_cap_and_freed_when_the_session_ends():
    """An RL loop makes a sampler every step: past --max-samplers the oldest are evicted (a
    snapshot is dropped and says so; one from a checkpoint comes back when used), and closing
    the session frees its samplers."""
    s = Server("--max-samplers", "3")
    try:
        sc = tinker.ServiceClient(base_url=s.url, api_key="tml-" + s.token)
        tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
        ids = tc.get_tokenizer().encode(TEXT, add_special_tokens=False)
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        prompt = types.ModelInput.from_ints(ids[:4])
        greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
        path = tc.save_weights_for_sampler("first").result().path
        from_path = sc.create_sampling_client(model_path=path).result()
        first_tokens = from_path.sample(prompt, 1, greedy).result().sequences[0].tokens
        snapshots = []
        for _ in range(12):
            tc.forward_backward([datum], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            sampler = tc.save_weights_and_get_sampling_client().result()
            sampler.sample(prompt, 1, greedy).result()
            snapshots.append(sampler)
            assert s.native("/v1/info")["samplers"] <= 3
        # the oldest snapshot was dropped, and says so
        with pytest.raises(Exception) as e:
            snapshots[0].sample(prompt, 1, greedy).result()
        assert "evicted" in str(e.value), e.value
        # the newest still samples; the sampler from a checkpoint comes back, the same weights
        snapshots[-1].sample(prompt, 1, greedy).result()
        assert from_path.sample(prompt, 1, greedy).result().sequences[0].tokens == first_tokens
        assert s.native("/v1/info")["samplers"] >= 1
        sc.close("success").result()
        assert s.native("/v1/info")["samplers"] == 0, "the session's samplers were freed"
    finally:
        s.stop()


def test_an_sdk_that_only_heartbeats_does_not_keep_the_server_up():
    """The SDK heartbeats every 10 s while it is open. Heartbeats are not work: with a 15 s idle
    timeout the server saves every run and exits although they keep coming, and the next start
    resumes the run at its step."""
    import time
    s = Server("--idle-timeout", "15")
    sc = tinker.ServiceClient(base_url=s.url, api_key="tml-" + s.token)
    tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
    ids = tc.get_tokenizer().encode(TEXT, add_special_tokens=False)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    t0 = time.monotonic()
    try:
        code = s.proc.wait(timeout=120)
    finally:
        waited = time.monotonic() - t0
    assert code == 0, "".join(s.log)
    assert waited > 10, f"the server stopped after {waited:.0f} s: at least one heartbeat came while it idled"
    session = __import__("json").load(open(os.path.join(s.home, "session.json")))
    assert session["state"] == "stopped", session
    # the next start resumes the run at its step
    again = Server.__new__(Server)
    home = s.home
    import subprocess
    from test_tinker_sdk import BIN
    proc = subprocess.Popen([os.path.join(BIN, "hearth-server"), "--home", home, "--listen", "127.0.0.1:0", "--model", "tiny",
                             "--idle-timeout", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read()
        again.proc, again.home = proc, home
        info = __import__("json").load(open(os.path.join(home, "session.json")))
        again.url, again.token = info["url"], info["token"]
        runs = {r["id"]: r["step"] for r in again.native("/v1/runs")}
        assert runs == {tc.model_id.replace(":train:", "-train-"): 1}, runs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
