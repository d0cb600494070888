"""Loads checkpoints written by hearth with Hugging Face tools and compares logits.

Called by engine/tests/checkpoint.rs (not by hand) as

    python check_hf_load.py CASE.json

CASE.json: {"base": DIR, "adapter": DIR, "merged": DIR, "tokens": [...], "logits": [[...], ...]}
where `logits` are hearth's (T, V) logits for `tokens` with the trained adapter. The script

* loads the base model with transformers (float32, eager) from a copy of `base` holding only
  config.json and model.safetensors (transformers >= 5 would otherwise pick up an adapter file
  sitting in the folder), wraps it with `PeftModel.from_pretrained(model, adapter)`, and
* loads `merged` alone with `AutoModelForCausalLM.from_pretrained`,

runs both on `tokens` and prints one JSON line {"peft_max_abs": ..., "merged_max_abs": ...,
"scale": max |logit|}. It exits 1 when either differs from hearth's by more than 1e-4 · scale + 1e-5.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def load_plain(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0]


def main():
    case = json.load(open(sys.argv[1]))
    torch.set_num_threads(1)
    want = torch.tensor(case["logits"], dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(case["base"], f), tmp)
        peft_model = PeftModel.from_pretrained(load_plain(tmp), case["adapter"])
        peft_model.eval()
        got_peft = logits(peft_model, case["tokens"])
    got_merged = logits(load_plain(case["merged"]), case["tokens"])
    scale = float(want.abs().max())
    out = {
        "peft_max_abs": float((got_peft - want).abs().max()),
        "merged_max_abs": float((got_merged - want).abs().max()),
        "scale": scale,
    }
    print(json.dumps(out))
    tol = 1e-4 * scale + 1e-5
    sys.exit(0 if out["peft_max_abs"] <= tol and out["merged_max_abs"] <= tol else 1)


if __name__ == "__main__":
    main()
