"""tinker-cookbook's own training loops against hearth-server's Tinker-compatible API, offline.

Runs the cookbook's supervised loop (``tinker_cookbook.supervised.train.main``) and RL loop
(``tinker_cookbook.rl.train.main``) for a few steps each against a freshly started
``hearth-server --model tiny`` and checks, through hearth's native API (``GET /v1/runs``,
``GET /v1/runs/{run}/metrics``), that the server ran exactly the optimizer steps the loops
asked for. Nothing is downloaded: data is written locally, the tokenizer is the model's local
folder, and the RL environments are the cookbook's own classes (``ArithmeticEnv`` via
``ArithmeticDatasetBuilder``, a small ``ProblemEnv`` subclass defined here, and the
guess_number recipe's multi-turn env). Also: the DPO loop (``preference/train_dpo.py``), the SFT
loop on the real SmolLM2-135M GGUF, and strict-xfail tests pinning the server gaps listed in
FINDINGS.md.

scripts/test.sh runs it in the cookbook's virtualenv (tests/cookbook/venv.sh: tinker-cookbook
0.5.8 over the reference virtualenv, whose transformers it would otherwise downgrade); on its own:

    source bench/reference.sh && source tests/cookbook/venv.sh
    HEARTH_BIN_DIR=target/release "$HEARTH_COOKBOOK_PYTHON" -m pytest tests/cookbook

Environment: HEARTH_BIN_DIR (the server binary's folder, default target/release),
HEARTH_SMOLLM2_GGUF (the real model, exported by bench/reference.sh; without it the GGUF test is
skipped), HEARTH_COOKBOOK_GGUF=0 skips that (slower, ~20 s) test too.

Findings (client-side, none needs a server change): the cookbook's supervised checkpoint already
includes the step it is labelled with, so a resume trains that batch again (accepted below);
guess_number outgrows `tiny`'s 1024-token context after 3 turns (the server rightly refuses the
sample; MAX_TURNS is capped); with several substeps the cookbook logs the last one's grad norm.
Recipes that download datasets, need a second model or a sandbox cannot run offline: see
README's "From Python" section.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from functools import cache, partial
from pathlib import Path

import pytest

# Offline: never reach the Hugging Face hub (the only network here is PyPI anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import chz  # noqa: E402
import numpy as np  # noqa: E402

from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder  # noqa: E402
from tinker_cookbook.rl import train as rl_train  # noqa: E402
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder  # noqa: E402
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder  # noqa: E402
from tinker_cookbook.supervised import train as sl_train  # noqa: E402
from tinker_cookbook.supervised.data import FromConversationFileBuilder  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig  # noqa: E402
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SERVER_BIN = str(Path(os.environ.get("HEARTH_BIN_DIR", ROOT / "target" / "release")).resolve() / "hearth-server")
GGUF = Path(os.environ.get("HEARTH_SMOLLM2_GGUF", "/nonexistent/SmolLM2-135M-Instruct.Q4_1.gguf"))
# "role_colon" ("User: ...\n\nAssistant: ...") only needs encode/decode: it works with any tokenizer.
RENDERER = "role_colon"
LOOP_TIMEOUT_S = 150


# ---------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------


class Hearth:
    """A hearth-server this module started, and how to reach it."""

    def __init__(self, home: Path, model: str):
        self.home = home
        self.log = open(home / "server.log", "w+")
        self.proc = subprocess.Popen(
            [SERVER_BIN, "--home", str(home), "--listen", "127.0.0.1:0", "--model", model,
             "--idle-timeout", "0", "--autosave-every", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.time() + 120
        self.url = None
        while time.time() < deadline and self.url is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hearth-server exited {self.proc.returncode}: {self._log_text()}")
            m = re.search(r"listening on (http://\S+)", self._log_text())
            if m:
                self.url = m.group(1)
            else:
                time.sleep(0.2)
        if self.url is None:
            self.stop()
            raise RuntimeError(f"hearth-server did not start: {self._log_text()}")
        self.token = json.loads((home / "session.json").read_text())["token"]
        self.api_key = "tml-" + self.token

    def _log_text(self) -> str:
        self.log.flush()
        return (self.home / "server.log").read_text()

    def get(self, path: str):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def runs(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.get("/v1/runs")}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _start(tmp_path_factory, model: str) -> Hearth:
    if not os.access(SERVER_BIN, os.X_OK):
        pytest.skip(f"no hearth-server binary at {SERVER_BIN}")
    return Hearth(tmp_path_factory.mktemp("hearth_home"), model)


@pytest.fixture(scope="module")
def hearth(tmp_path_factory):
    h = _start(tmp_path_factory, "tiny")
    # The cookbook's ServiceClient is built without api_key/base_url arguments (only base_url is a
    # Config field), so the SDK reads the key from the environment.
    old = {k: os.environ.get(k) for k in ("TINKER_API_KEY", "TINKER_BASE_URL")}
    os.environ["TINKER_API_KEY"] = h.api_key
    os.environ["TINKER_BASE_URL"] = h.url
    # `--model tiny` materialises the model (config, safetensors, tokenizer.json) here; get_info
    # returns this folder as tokenizer_id.
    h.model_dir = str(h.home / "models" / "tiny")
    assert os.path.isdir(h.model_dir)
    yield h
    h.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def run_loop(coro):
    return asyncio.run(asyncio.wait_for(coro, LOOP_TIMEOUT_S))


def metrics_rows(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(log_path: Path) -> list[dict]:
    p = log_path / "checkpoints.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def hearth_run_of(log_path: Path) -> str:
    """hearth's run id for the Tinker model a loop trained, from its last checkpoint record.

    Tinker model ``S:train:N`` is hearth run ``S-train-N`` (see server/src/tinker/mod.rs)."""
    state_path = checkpoints(log_path)[-1]["state_path"]  # tinker://S:train:N/weights/final
    model_id = state_path.removeprefix("tinker://").split("/")[0]
    return model_id.replace(":", "-")


def write_conversations(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}."},
            ]}) + "\n")
    return path


def sl_config(log_path: Path, model_name: str, data: Path, **kw) -> sl_train.Config:
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model_name, renderer_name=RENDERER, max_length=128, batch_size=2,
    )
    builder = FromConversationFileBuilder(common_config=common, file_path=str(data), test_size=kw.pop("test_size", 0))
    args = dict(
        log_path=str(log_path), model_name=model_name, recipe_name="hearth_cookbook_test",
        renderer_name=RENDERER, dataset_builder=builder, learning_rate=1e-3, lora_rank=8,
        save_every=0, eval_every=0, infrequent_eval_every=0, base_url=os.environ["TINKER_BASE_URL"],
    )
    args.update(kw)
    return sl_train.Config(**args)


# ---------------------------------------------------------------------------------------------
# a tiny local RL environment, built from the cookbook's own ProblemEnv / ProblemGroupBuilder
# ---------------------------------------------------------------------------------------------


class DigitEnv(ProblemEnv):
    """Reward 1 when the sampled reply contains a digit. With a random-weight byte-level model
    about a quarter of 8-token replies do, so groups get mixed rewards and non-zero advantages
    (the arithmetic env is never solved by the tiny model: all-equal rewards, zero gradient)."""

    def __init__(self, n: int, renderer: renderers.Renderer):
        super().__init__(renderer, convo_prefix=None, format_coef=0.0)
        self.n = n

    def get_question(self) -> str:
        return f"Say a number bigger than {self.n}."

    def check_answer(self, sample_str: str) -> bool:
        return any(c.isdigit() for c in sample_str)

    def check_format(self, sample_str: str) -> bool:
        return True

    def get_reference_answer(self) -> str:
        return str(self.n + 1)


class DigitDataset(RLDataset):
    def __init__(self, renderer: renderers.Renderer, batch_size: int, group_size: int, n_batches: int, seed: int):
        self.renderer, self.batch_size, self.group_size, self.n_batches, self.seed = (
            renderer, batch_size, group_size, n_batches, seed)

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        rng = np.random.RandomState(self.seed + index)
        return [
            ProblemGroupBuilder(env_thunk=partial(DigitEnv, int(rng.randint(0, 100)), self.renderer),
                                num_envs=self.group_size, dataset_name="digits")
            for _ in range(self.batch_size)
        ]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class DigitDatasetBuilder(RLDatasetBuilder):
    model_name_for_tokenizer: str
    renderer_name: str
    batch_size: int = 2
    group_size: int = 4
    n_batches: int = 4
    with_test_set: bool = False

    async def __call__(self) -> tuple[DigitDataset, DigitDataset | None]:
        renderer = renderers.get_renderer(self.renderer_name, tokenizer=get_tokenizer(self.model_name_for_tokenizer))
        train = DigitDataset(renderer, self.batch_size, self.group_size, self.n_batches, seed=0)
        test = DigitDataset(renderer, 1, 2, 1, seed=1000) if self.with_test_set else None
        return train, test


def rl_config(log_path: Path, model_name: str, dataset_builder, **kw) -> rl_train.Config:
    args = dict(
        learning_rate=1e-3, dataset_builder=dataset_builder, model_name=model_name,
        recipe_name="hearth_cookbook_test", max_tokens=8, log_path=str(log_path), renderer_name=RENDERER,
        eval_every=0, save_every=0, lora_rank=8, max_steps=2, base_url=os.environ["TINKER_BASE_URL"],
    )
    args.update(kw)
    return rl_train.Config(**args)


# ---------------------------------------------------------------------------------------------
# supervised loop
# ---------------------------------------------------------------------------------------------


def test_supervised_loop(hearth, tmp_path):
    """3 steps of the cookbook SFT loop on a local JSONL, with its held-out NLL evaluator
    (save_weights_and_get_sampling_client + compute_logprobs) and a periodic checkpoint."""
    data = write_conversations(tmp_path / "convs.jsonl", 8)  # 2 held out, 6 train = 3 batches of 2
    log = tmp_path / "sl"
    cfg = sl_config(log, hearth.model_dir, data, test_size=2, eval_every=1, save_every=2, max_steps=3)
    run_loop(sl_train.main(cfg))

    rows = metrics_rows(log)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("train_mean_nll" in r and np.isfinite(r["train_mean_nll"]) for r in rows)
    assert all("test/nll" in r and np.isfinite(r["test/nll"]) for r in rows), rows
    assert rows[-1]["train_mean_nll"] < rows[0]["train_mean_nll"]  # lr 1e-3 on 3 tiny batches
    names = [c["name"] for c in checkpoints(log)]
    assert names[0] == "000002" and names[-1] == "final"

    run = hearth_run_of(log)
    assert hearth.runs()[run]["step"] == 3
    server_rows = hearth.get(f"/v1/runs/{run}/metrics")["rows"]
    assert [r["step"] for r in server_rows] == [1, 2, 3]
    # the cookbook's linear LR schedule reached the server unchanged
    assert [round(r["learning_rate"], 8) for r in server_rows] == [round(r["learning_rate"], 8) for r in rows]
    # grad norms the server computed are the ones the cookbook logged (optim_step metrics)
    assert np.allclose([r["grad_norm"] for r in server_rows], [r["grad_norm:mean"] for r in rows], rtol=1e-5)


def test_supervised_loop_with_server_model_name(hearth, tmp_path):
    """model_name="tiny" (the name the server serves) works once the cookbook's own
    register_tokenizer hook maps it to the local folder; without it, get_tokenizer("tiny")
    goes to the Hugging Face hub and fails offline."""

    @cache
    def tiny_tokenizer():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(hearth.model_dir)

    register_tokenizer("tiny", tiny_tokenizer)
    data = write_conversations(tmp_path / "convs.jsonl", 4)
    log = tmp_path / "sl_tiny"
    run_loop(sl_train.main(sl_config(log, "tiny", data, max_steps=2)))
    assert [r["step"] for r in metrics_rows(log)] == [0, 1]
    assert hearth.runs()[hearth_run_of(log)]["step"] == 2


def test_supervised_resume_and_load_checkpoint(hearth, tmp_path):
    """The cookbook's resume path (create_training_client_from_state_with_optimizer, after a
    simulated crash) and its load_checkpoint_path path (create_training_client_from_state)."""
    data = write_conversations(tmp_path / "convs.jsonl", 8)  # 4 batches
    log = tmp_path / "sl_resume"
    run_loop(sl_train.main(sl_config(log, hearth.model_dir, data, save_every=1, max_steps=2, submit_ahead=0)))
    first = checkpoints(log)
    first_run = hearth_run_of(log)
    assert hearth.runs()[first_run]["step"] == 2
    # simulate a crash after the first periodic checkpoint: keep only that record
    periodic = first[0]
    assert periodic["name"] == "000001" and periodic["batch"] == 1
    (log / "checkpoints.jsonl").write_text(json.dumps(periodic) + "\n")
    run_loop(sl_train.main(sl_config(log, hearth.model_dir, data, save_every=0, max_steps=4, submit_ahead=0)))
    resumed_run = hearth_run_of(log)
    assert resumed_run != first_run
    # Resuming loads the optimizer state too, so the run's step continues from the checkpoint's:
    # batches 1..3 are trained again (3 steps) on top of what checkpoint 000001 holds. The SL loop
    # saves "000001" (loop_state batch=1, i.e. "batch 1 is next") in finish_batch(step 1), after
    # step 1's optim_step was already submitted, so the state holds 2 steps, not 1: 2 + 3 = 5.
    # (A cookbook-side off-by-one, see FINDINGS.md; 4 would be the no-off-by-one answer.)
    assert hearth.runs()[resumed_run]["step"] in (1 + 3, 2 + 3)

    # fresh optimizer from a checkpoint's weights (load_checkpoint_path): step restarts at 0
    log2 = tmp_path / "sl_load"
    run_loop(sl_train.main(sl_config(log2, hearth.model_dir, data, max_steps=2,
                                     load_checkpoint_path=periodic["state_path"])))
    assert hearth.runs()[hearth_run_of(log2)]["step"] == 2


# ---------------------------------------------------------------------------------------------
# RL loop
# ---------------------------------------------------------------------------------------------


def test_rl_loop_arithmetic(hearth, tmp_path):
    """2 iterations of the cookbook RL loop on its own toy arithmetic environment
    (recipes/math_rl/arithmetic_env.py), default loss (importance_sampling)."""
    log = tmp_path / "rl_arith"
    builder = ArithmeticDatasetBuilder(batch_size=2, model_name_for_tokenizer=hearth.model_dir,
                                       renderer_name=RENDERER, n_batches=2, group_size=2)
    run_loop(rl_train.main(rl_config(log, hearth.model_dir, builder)))
    rows = metrics_rows(log)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["env/all/total_episodes"] == 4 for r in rows)
    # sampler logprobs (asample) agree with the trainer's (forward_backward) on the same weights
    assert all(abs(r["optim/kl_sample_train_v1"]) < 1e-3 for r in rows), rows
    assert hearth.runs()[hearth_run_of(log)]["step"] == 2


RL_VARIANTS = {
    # sync loop + test-set evaluator + periodic checkpoints + post-update KL
    "is_eval_save_postkl": dict(loss_fn="importance_sampling", eval_every=1, save_every=1, compute_post_kl=True),
    # PPO with explicit clip config + KL penalty against the base model (compute_logprobs)
    "ppo_kl": dict(loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
                   kl_penalty_coef=0.05),
    # CISPO, streaming minibatches (2 forward_backward per optim_step)
    "cispo_stream": dict(loss_fn="cispo", stream_minibatch_config=rl_train.StreamMinibatchConfig(
        groups_per_batch=2, num_minibatches=2)),
    # DRO with beta, async off-policy loop, 2 optimizer substeps per iteration
    "dro_async": dict(loss_fn="dro", loss_fn_config={"beta": 0.05},
                      async_config=rl_train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2)),
    "substeps": dict(num_substeps=2),
}


@pytest.mark.parametrize("variant", list(RL_VARIANTS))
def test_rl_loop_variants(hearth, tmp_path, variant):
    """The cookbook RL loop on a local ProblemEnv (mixed rewards), across its loss functions
    and execution modes."""
    kw = dict(RL_VARIANTS[variant])
    if kw.get("kl_penalty_coef"):
        kw["kl_reference_config"] = rl_train.KLReferenceConfig(base_model=hearth.model_dir)
    builder = DigitDatasetBuilder(model_name_for_tokenizer=hearth.model_dir, renderer_name=RENDERER,
                                  with_test_set=bool(kw.get("eval_every")))
    log = tmp_path / f"rl_{variant}"
    run_loop(rl_train.main(rl_config(log, hearth.model_dir, builder, **kw)))
    rows = metrics_rows(log)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["env/all/reward/total"]) for r in rows)
    substeps = kw.get("num_substeps", 1)
    assert hearth.runs()[hearth_run_of(log)]["step"] == 2 * substeps
    if kw.get("eval_every"):
        assert any(k.startswith("test/") for k in rows[0]), sorted(rows[0])
    if kw.get("compute_post_kl"):
        assert all("kl_pre_post_v1" in r for r in rows)
    if kw.get("kl_penalty_coef"):
        assert all("kl_policy_base" in r for r in rows)


def test_rl_recipe_guess_number_multiturn(hearth, tmp_path, monkeypatch):
    """A whole recipe's own config builder (recipes/multiplayer_rl/guess_number/train.py:
    build_config), multi-turn RL with a locally generated dataset, with only offline-friendly
    overrides: the model's local folder, the model-agnostic renderer, and small sizes.

    The tiny model has a 1024-token context and a byte-level tokenizer: 10 turns of
    "Failed to parse..." feedback outgrow it (the server then rightly refuses the sample:
    "tokens = 1120 tokens: longer than the model's context"), so the episode is capped at 3 turns."""
    from tinker_cookbook.recipes.multiplayer_rl.guess_number import env as gn_env
    from tinker_cookbook.recipes.multiplayer_rl.guess_number import train as gn_train

    monkeypatch.setattr(gn_env, "MAX_TURNS", 3)

    cli = gn_train.CLIConfig(model_name=hearth.model_dir, renderer_name=RENDERER, group_size=2, batch_size=1,
                             learning_rate=1e-3, max_tokens=8, eval_every=0, save_every=0,
                             log_path=str(tmp_path / "guess_number"), max_steps=2)
    cfg = chz.replace(gn_train.build_config(cli), base_url=os.environ["TINKER_BASE_URL"], lora_rank=8)
    run_loop(rl_train.main(cfg))
    log = Path(cfg.log_path)
    rows = metrics_rows(log)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["env/all/turns_per_episode"] > 1 for r in rows), rows  # really multi-turn
    assert hearth.runs()[hearth_run_of(log)]["step"] == 2


# ---------------------------------------------------------------------------------------------
# DPO loop (bonus: forward_backward_custom = forward + a linear-loss forward_backward)
# ---------------------------------------------------------------------------------------------


def test_dpo_loop(hearth, tmp_path):
    """The cookbook's DPO loop (preference/train_dpo.py) on local comparisons
    (ComparisonBuilderFromJsonl): reference logprobs via compute_logprobs, the DPO loss via
    forward_backward_custom."""
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl

    path = tmp_path / "comparisons.jsonl"
    with path.open("w") as f:
        for i in range(4):
            f.write(json.dumps({"label": "A", "comparison": {
                "prompt_conversation": [{"role": "user", "content": f"What is {i} + {i}?"}],
                "completion_A": [{"role": "assistant", "content": str(2 * i)}],
                "completion_B": [{"role": "assistant", "content": "no idea"}]}}) + "\n")
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=hearth.model_dir, renderer_name=RENDERER,
                                            max_length=128, batch_size=2)
    log = tmp_path / "dpo"
    cfg = train_dpo.Config(
        log_path=str(log), model_name=hearth.model_dir, recipe_name="hearth_cookbook_test", renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(common_config=common,
                                                         comparison_builder=ComparisonBuilderFromJsonl(train_path=str(path))),
        learning_rate=1e-3, lora_rank=8, save_every=0, eval_every=0, infrequent_eval_every=0, max_steps=2,
        base_url=os.environ["TINKER_BASE_URL"],
    )
    train_dpo.main(cfg)  # synchronous entry point
    rows = metrics_rows(log)
    assert [r["step"] for r in rows] == [0, 1]
    assert abs(rows[0]["dpo_loss"] - np.log(2)) < 1e-3  # policy == reference at step 0
    assert rows[1]["dpo_loss"] < rows[0]["dpo_loss"]
    assert hearth.runs()[hearth_run_of(log)]["step"] == 2


# ---------------------------------------------------------------------------------------------
# a real model (SmolLM2-135M-Instruct, GGUF), supervised loop
# ---------------------------------------------------------------------------------------------


needs_gguf = [
    pytest.mark.skipif(os.environ.get("HEARTH_COOKBOOK_GGUF", "1") == "0", reason="HEARTH_COOKBOOK_GGUF=0"),
    pytest.mark.skipif(not GGUF.exists(), reason=f"no {GGUF}"),
]


@pytest.fixture(scope="module")
def hearth_gguf(tmp_path_factory):
    h = _start(tmp_path_factory, str(GGUF))
    yield h
    h.stop()


@needs_gguf[0]
@needs_gguf[1]
def test_supervised_loop_gguf(hearth_gguf, tmp_path, monkeypatch):
    """The real model from its .gguf file: get_info's tokenizer_id is a folder the server writes
    from the file's metadata, which the cookbook's get_tokenizer (AutoTokenizer) reads offline;
    its tokens equal the server's own tokenizer's."""
    h = hearth_gguf
    monkeypatch.setenv("TINKER_API_KEY", h.api_key)
    monkeypatch.setenv("TINKER_BASE_URL", h.url)
    import tinker

    sc = tinker.ServiceClient(base_url=h.url, api_key=h.api_key)
    tok = sc.create_lora_training_client(base_model=str(GGUF), rank=8).result().get_tokenizer()
    text = "The capital of France is Paris."
    req = urllib.request.Request(h.url + "/v1/tokenize", data=json.dumps({"text": text}).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {h.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert tok.encode(text, add_special_tokens=False) == json.loads(r.read())["tokens"]
    register_tokenizer(str(GGUF), lambda: tok)  # the loop's name for it is the .gguf path
    data = write_conversations(tmp_path / "convs.jsonl", 4)
    log = tmp_path / "sl_gguf"
    run_loop(sl_train.main(sl_config(log, str(GGUF), data, max_steps=2)))
    rows = metrics_rows(log)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["train_mean_nll"] < rows[0]["train_mean_nll"]
    assert h.runs()[hearth_run_of(log)]["step"] == 2


# ---------------------------------------------------------------------------------------------
# what the cookbook reads back from the server
# ---------------------------------------------------------------------------------------------


def test_training_runs_keep_user_metadata(hearth, tmp_path):
    """The cookbook stores renderer_name in create_model's user_metadata and reads it back on
    resume / load_checkpoint_path (checkpoint_utils.get_renderer_name_from_checkpoint_async)."""
    import tinker
    from tinker_cookbook import checkpoint_utils

    data = write_conversations(tmp_path / "convs.jsonl", 2)
    log = tmp_path / "sl_meta"
    run_loop(sl_train.main(sl_config(log, hearth.model_dir, data, max_steps=1)))
    state_path = checkpoints(log)[-1]["state_path"]
    sc = tinker.ServiceClient(base_url=hearth.url, api_key=hearth.api_key)
    got = asyncio.run(checkpoint_utils.get_renderer_name_from_checkpoint_async(sc, state_path))
    assert got == RENDERER


def test_lora_defaults_include_unembed(hearth):
    """The cookbook's loops call create_lora_training_client_async(base_model, rank, user_metadata),
    i.e. with the SDK defaults train_attn/train_mlp/train_unembed=True (supervised/train.py,
    rl/train.py): the run's adapter covers lm_head too."""
    import tinker

    sc = tinker.ServiceClient(base_url=hearth.url, api_key=hearth.api_key)
    tc = sc.create_lora_training_client(base_model=hearth.model_dir, rank=8).result()
    run = tc.model_id.replace(":", "-")
    modules = set(hearth.runs()[run]["training"]["target_modules"])
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}, modules


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
