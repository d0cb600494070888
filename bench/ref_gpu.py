"""PyTorch + transformers + PEFT side of bench/gpu.sh: the same jobs as hearth's bench_gpu, one
JSON line each, in one process (one torch import).

    python bench/ref_gpu.py JOBS.jsonl > ref.jsonl

Each line of JOBS.jsonl is one job:
  {"what": "parity", "dir": D, "device": "cuda"|"cpu", "dtype": "bf16"|"f32", "out": PREFIX}
  {"what": "train", "config": CONFIG_JSON_PATH, "shape": S, "seq_len": T, "steps": K, "warmup": W, "device": ..., "dtype": ...}
  {"what": "decode", "config": ..., "shape": S, "batch": B, "new_tokens": N, "prompt_len": P, "device": ..., "dtype": ...}

Parity: eager attention, the PEFT adapter hearth wrote (LoRA weights stay float32 on a bf16 base),
cross-entropy summed over tokens with log_softmax in float32, greedy generation of a fixed length.
Training: random init, LoRA r=16 alpha=32 on all seven projections, SDPA attention, AdamW; above 4096
tokens gradient checkpointing (use_reentrant=False), as a PEFT user would run long context.
Decode: generate() with the adapter, greedy at batch 1, temperature 1 with 64 return sequences.
"""

import json
import resource
import sys
import time

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def parity(job):
    dev, dtype = job["device"], DTYPES[job["dtype"]]
    base = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=dtype, attn_implementation="eager").to(dev)
    model = PeftModel.from_pretrained(base, job["dir"] + "/adapter", is_trainable=True, autocast_adapter_dtype=True)
    model.eval()
    data = json.load(open(job["dir"] + "/data.json"))
    tensors, loss = {}, torch.zeros((), device=dev)
    for i, seq in enumerate(data["sequences"]):
        ids = torch.tensor([seq[:-1]], device=dev)
        targets = torch.tensor(seq[1:], device=dev)
        logits = model(input_ids=ids).logits[0].float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        loss = loss + (-logp).sum()
        tensors[f"logprobs.{i}"] = logp.detach().cpu().contiguous()
        if i == 0:
            tensors["logits.0"] = logits.detach().cpu().contiguous()
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            tensors["grad." + name.replace(".default.", ".")] = p.grad.detach().float().cpu().contiguous()
    prompt = torch.tensor([data["greedy_prompt"]], device=dev)
    n = data["greedy_tokens"]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(prompt))
    greedy = out[0, prompt.shape[1]:].tolist()
    save_file(tensors, job["out"] + ".safetensors")
    summary = {"impl": "pytorch", "what": "parity", "device": dev, "dtype": job["dtype"], "loss": loss.item(), "greedy": greedy}
    json.dump(summary, open(job["out"] + ".json", "w"))
    return summary


def peft_model(job, attn):
    cfg = LlamaConfig(**json.load(open(job["config"])))
    dev, dtype = job["device"], DTYPES[job["dtype"]]
    with torch.device(dev):
        base = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    return cfg, model


def train(job):
    dev, t, b = job["device"], job["seq_len"], job.get("batch", 1)
    start = time.time()
    cfg, model = peft_model(job, "sdpa")
    checkpointing = t > 4096
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    load_s = time.time() - start
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g).to(dev)
    reset_peak(dev)
    times, loss_val = [], float("nan")
    for i in range(job["warmup"] + job["steps"]):
        s = time.time()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1), reduction="sum")
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        loss_val = loss.item() / (b * t)
        if i >= job["warmup"]:
            times.append(time.time() - s)
    return {"impl": "pytorch", "what": "train", "shape": job["shape"], "device": dev, "dtype": job["dtype"], "seq_len": t,
            "batch": b, "steps": job["steps"], "gradient_checkpointing": checkpointing, "load_s": load_s,
            "tokens_per_s": b * t * job["steps"] / sum(times), "step_s": times, "peak_gb": peak_gb(dev),
            "loss_per_token": loss_val}


def decode(job):
    dev, n, new = job["device"], job["batch"], job["new_tokens"]
    cfg, model = peft_model(job, "sdpa")
    model.eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (1, job["prompt_len"]), generator=g).to(dev)
    kw = dict(do_sample=False) if n == 1 else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(dev)
        reset_peak(dev)
        s = time.time()
        out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
        sync(dev)
        secs = time.time() - s
    generated = (out.shape[1] - prompt.shape[1]) * out.shape[0]
    return {"impl": "pytorch", "what": "decode", "shape": job["shape"], "device": dev, "dtype": job["dtype"], "batch": n,
            "prompt_len": job["prompt_len"], "new_tokens": new, "seconds": secs, "tokens_per_s": generated / secs,
            "generated": generated, "peak_gb": peak_gb(dev)}


def main():
    torch.manual_seed(0)
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    for line in open(sys.argv[1]):
        job = json.loads(line)
        try:
            out = {"parity": parity, "train": train, "decode": decode}[job["what"]](job)
        except torch.cuda.OutOfMemoryError as e:
            out = {"impl": "pytorch", "error": "out of memory: " + str(e).splitlines()[0], "job": job}
        except Exception as e:  # one failed job is reported, the others still run
            out = {"impl": "pytorch", "error": f"{type(e).__name__}: {e}", "job": job}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
