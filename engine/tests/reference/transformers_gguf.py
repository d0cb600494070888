"""Runs a GGUF model in transformers (float32, eager), optionally with a PEFT LoRA adapter: logits,
a summed cross-entropy loss, its LoRA gradients and one AdamW step, as the reference for hearth.

Called by engine/tests/gguf.rs (not by hand) as

    python transformers_gguf.py IN.json OUT.safetensors

IN.json: {"gguf": PATH, "tokens": [int, ...], "targets": [int, ...], "weights": [float, ...],
          "adapter": DIR (optional), "adam": {"lr", "beta1", "beta2", "eps", "weight_decay"} (optional)}

The model is `AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME, dtype=torch.float32,
attn_implementation="eager")`, DIR being an empty temporary folder where NAME links to PATH.
transformers (with the `gguf` package) dequantizes every tensor to float32, un-permutes the q/k
rows that llama.cpp's converter interleaved for its rope, and ties lm_head to the embedding when
the file has no output.weight.

OUT.safetensors, all float32:
* "logits" (T, V): the base model alone on `tokens`.
With "adapter" (a folder written by PEFT's save_pretrained or by hearth):
* the adapter is loaded with `PeftModel.from_pretrained(model, DIR, is_trainable=True)`; the model
  stays in eval mode (no LoRA dropout);
* "logits_adapter" (T, V): the logits with the adapter (before any optimizer step);
* "loss" (shape [1]): -sum_t weights[t] * log_softmax(logits_adapter[t])[targets[t]], a SUM over
  the T positions (targets[t] is the token predicted at position t; no shift is applied here);
  the log_softmax and the sum are taken in float64 (then the loss is stored as float32);
* "grad.KEY" for each LoRA parameter: d loss / d parameter, where KEY is the parameter's name as
  PEFT saves it in adapter_model.safetensors
  (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`: the in-memory name without
  the adapter name ".default");
With "adam" as well:
* one `torch.optim.AdamW(lora_params, lr, betas=(beta1, beta2), eps, weight_decay)` step on the
  gradients above, then "param.KEY" for each LoRA parameter after the step.
Threads: 2.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization progress bar

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def main():
    case = json.load(open(sys.argv[1], encoding="utf-8"))
    torch.set_num_threads(2)
    # The file is linked alone into an empty folder: transformers would also pick up whatever else
    # sits beside it (an adapter_config.json makes it load that adapter on its own).
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(os.path.abspath(case["gguf"]), os.path.join(tmp, "model.gguf"))
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    ids = torch.tensor([case["tokens"]], dtype=torch.long)
    out = {}
    with torch.no_grad():
        out["logits"] = model(input_ids=ids).logits[0].float().contiguous()

    if case.get("adapter"):
        from peft import PeftModel

        adapter = case["adapter"]
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        peft_model.eval()
        name = peft_model.active_adapter
        lora = {}
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                assert "lora_" in n, f"unexpected trainable parameter {n}"
                lora[n.replace(f".{name}.", ".")] = p
        saved = set(load_file(os.path.join(adapter, "adapter_model.safetensors")).keys())
        assert set(lora) == saved, (
            f"PEFT names {sorted(set(lora) - saved)[:3]} vs saved {sorted(saved - set(lora))[:3]}"
        )

        targets = torch.tensor(case["targets"], dtype=torch.long)
        weights = torch.tensor(case["weights"], dtype=torch.float32)
        assert len(targets) == len(weights) == ids.shape[1]
        logits = peft_model(input_ids=ids).logits[0].float()
        # log_softmax over 49k entries in float32 is off by ~1e-5 of the loss: take it in float64.
        logp = torch.log_softmax(logits.double(), dim=-1)
        loss = -(weights.double() * logp[torch.arange(len(targets)), targets]).sum()
        loss.backward()
        out["logits_adapter"] = logits.detach().contiguous()
        out["loss"] = loss.detach().float().reshape(1)
        for k, p in lora.items():
            out["grad." + k] = p.grad.detach().float().contiguous()

        adam = case.get("adam")
        if adam:
            opt = torch.optim.AdamW(
                list(lora.values()),
                lr=adam["lr"],
                betas=(adam["beta1"], adam["beta2"]),
                eps=adam["eps"],
                weight_decay=adam["weight_decay"],
            )
            opt.step()
            for k, p in lora.items():
                out["param." + k] = p.detach().float().clone().contiguous()

    save_file(out, sys.argv[2])


if __name__ == "__main__":
    main()
