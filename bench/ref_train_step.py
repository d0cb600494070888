"""Reference training-step benchmark: PyTorch + PEFT LoRA on a SmolLM2-135M-shaped Llama.

Random-init model (float32, eager attention), LoRA r=16, alpha=32, dropout 0 on all seven
projections. One step = forward on a batch of 1 x T random tokens, cross-entropy summed over the
tokens, backward, AdamW(lr=1e-4, betas=(0.9, 0.95), eps=1e-12) step, zero_grad.
Runs --warmup untimed steps, then --steps timed steps, and prints ONE line of JSON to stdout.

    python bench/ref_train_step.py [--threads 2] [--seq-len 256] [--warmup 2] [--steps 5]
"""

import argparse
import json
import resource
import statistics
import time

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def smollm2_135m_config():
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = smollm2_135m_config()
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            bias="none",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12)

    T = args.seq_len
    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (T,), generator=g)

    def step():
        logits = model(input_ids=input_ids, use_cache=False).logits[0]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    total = sum(times)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    print(json.dumps({
        "impl": "pytorch+peft",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": args.threads,
        "seq_len": T,
        "steps": args.steps,
        "tokens_per_s": T * args.steps / total,
        "step_s_median": statistics.median(times),
        "peak_rss_gb": peak_rss_gb,
    }))


if __name__ == "__main__":
    main()
