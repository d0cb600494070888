"""The official `openai` Python client against hearth-server's OpenAI-compatible routes.

scripts/test.sh runs this with the release binaries; on its own:

    HEARTH_BIN_DIR=target/release tests/.venv/bin/python -m pytest tests/protocols

A real server on loopback (the `tiny` preset, its byte tokenizer and ChatML template), a run
trained a few steps through the native API, then the `openai` package as the client: models,
completions, chat completions (plain, n > 1 with a seed, streamed live), logprobs equal to the native
`sample`'s, and clear errors for a wrong model, a wrong key and unsupported fields.
"""

import json
import os
import subprocess
import tempfile
import urllib.request

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.abspath(os.environ.get("HEARTH_BIN_DIR", os.path.join(ROOT, "target", "release")))


class Server:
    def __init__(self):
        self.home = tempfile.mkdtemp(prefix="hearth-openai-")
        env = dict(os.environ, RAYON_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "hearth-server"), "--home", self.home, "--listen", "127.0.0.1:0", "--model", "tiny",
             "--idle-timeout", "0", "--autosave-every", "0"],
            stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        session = json.load(open(os.path.join(self.home, "session.json")))
        self.url, self.token = session["url"], session["token"]

    def native(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server()
    s.native("/v1/runs", {"name": "r"})
    text = "reverse: cat>tac"
    toks = s.native("/v1/tokenize", {"text": text})["tokens"]
    batch = {"data": [{"model_input": toks[:-1], "loss_fn_inputs": {"target_tokens": toks[1:], "weights": [1.0] * (len(toks) - 1)}}],
             "loss_fn": "cross_entropy"}
    for _ in range(5):
        s.native("/v1/runs/r/forward_backward", batch)
        s.native("/v1/runs/r/optim_step", {"learning_rate": 1e-2})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.token, max_retries=0)


def test_models_lists_the_runs(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["r"]


def test_a_completion_and_its_logprobs_equal_the_native_sample(server, client):
    out = client.completions.create(model="r", prompt="reverse: cat>", max_tokens=6, temperature=0, logprobs=1)
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 6
    prompt = server.native("/v1/tokenize", {"text": "reverse: cat>", "add_special_tokens": True})["tokens"]
    native = server.native("/v1/runs/r/sample", {"prompt": prompt, "sampling_params": {"max_tokens": 6, "temperature": 0}})
    seq = native["sequences"][0]
    assert choice.text == server.native("/v1/detokenize", {"tokens": seq["tokens"]})["text"]
    assert choice.logprobs.token_logprobs == pytest.approx(seq["logprobs"], abs=0)


def test_chat_completions_plain_seeded_and_streamed(server, client):
    messages = [{"role": "user", "content": "hi"}]
    a = client.chat.completions.create(model="r", messages=messages, max_tokens=8, n=3, seed=7, temperature=1.0, logprobs=True)
    b = client.chat.completions.create(model="r", messages=messages, max_tokens=8, n=3, seed=7, temperature=1.0, logprobs=True)
    assert len(a.choices) == 3
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices], "a seed gives the same samples"
    assert all(c.message.role == "assistant" for c in a.choices)
    for c in a.choices:
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    # the same prompt through the native API, same seed: same tokens and logprobs
    rendered = server.native("/v1/render_chat", {"messages": messages})
    native = server.native("/v1/runs/r/sample", {"prompt": rendered["tokens"], "num_samples": 3,
                                                 "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 7,
                                                                     "stop": ["<|im_end|>", 256]}})
    for c, seq in zip(a.choices, native["sequences"]):
        assert [t.logprob for t in c.logprobs.content] == pytest.approx(seq["logprobs"], abs=0)
    stream = client.chat.completions.create(model="r", messages=messages, max_tokens=8, seed=7, temperature=1.0, stream=True)
    pieces, reasons = [], []
    for chunk in stream:
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    whole = client.chat.completions.create(model="r", messages=messages, max_tokens=8, seed=7, temperature=1.0)
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]


def test_a_streamed_completion_equals_the_plain_one(client):
    kw = dict(model="r", prompt=["reverse: cat>", "reverse: dog>"], max_tokens=12, n=2, seed=3, temperature=1.0, stop=["a>"])
    plain = client.completions.create(**kw)
    texts, reasons = {}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert [texts[c.index] for c in plain.choices] == [c.text for c in plain.choices]
    assert [reasons[c.index] for c in plain.choices] == [c.finish_reason for c in plain.choices]


def test_streaming_is_live_while_the_sample_runs(server, client):
    # a long sample: its first chunk arrives while it is still running, so cancelling then finds
    # it (a stream sent after the sample ended would find nothing to cancel)
    stream = client.completions.create(model="r", prompt="reverse: cat>", max_tokens=1000 - 20, temperature=1.0, seed=1, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].text or first.choices[0].finish_reason is None
    cancelled = server.native("/v1/cancel", {})["cancelled"]
    assert len(cancelled) == 1, cancelled
    with pytest.raises(openai.APIError, match="nterrupted"):
        for _ in chunks:
            pass
    # and the run is unchanged: the server keeps serving
    assert client.completions.create(model="r", prompt="reverse: dog>", max_tokens=2).choices[0].finish_reason == "length"


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in str(e.value) and "GET /v1/models" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=3)
    assert "top_logprobs" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="r", prompt="x", max_tokens=0)
    assert "max_tokens" in str(e.value)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert client.completions.create(model="r", prompt="reverse: dog>", max_tokens=2).choices[0].finish_reason == "length"


def test_a_users_key_sees_and_samples_only_their_own_runs(server, client):
    def user(name):
        req = urllib.request.Request(server.url + "/v1/users", data=json.dumps({"name": name}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            token = json.load(r)["token"]
        return token, openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)

    (alice_token, alice), (bob_token, bob) = user("alice"), user("bob")
    req = urllib.request.Request(server.url + "/v1/runs", data=json.dumps({"name": "r"}).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {alice_token}", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=120).close()
    # alice's `r` is hers, beside the admin's `r`
    assert [m.id for m in alice.models.list().data] == ["r"]
    assert [m.id for m in bob.models.list().data] == []
    assert sorted(m.id for m in client.models.list().data) == ["alice/r", "r"]
    out = alice.completions.create(model="r", prompt="reverse: cat>", max_tokens=3, temperature=0)
    assert out.model == "r" and out.usage.completion_tokens == 3
    # bob: alice's model by any name is no model, as one that does not exist
    messages = []
    for model in ("r", "alice/r", "zed/r"):
        with pytest.raises(openai.NotFoundError) as e:
            bob.completions.create(model=model, prompt="x", max_tokens=1)
        messages.append(str(e.value).replace(f'"{model}"', '"MODEL"'))
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert messages[0] == messages[1] == messages[2], messages
    # the admin samples alice's run by its full name
    admin_out = client.completions.create(model="alice/r", prompt="reverse: cat>", max_tokens=3, temperature=0)
    assert admin_out.choices[0].text == out.choices[0].text
