"""Reference sampling benchmark: transformers generate() on a SmolLM2-135M-shaped Llama.

Random-init model (float32, eager attention, no LoRA). A prompt of --prompt-len random tokens,
then generate(max_new_tokens=min_new_tokens=--new-tokens, use_cache=True). Greedy for
--num-samples 1; for --num-samples > 1 the prompt is repeated into a batch and sampled
(do_sample=True, seeded), and the reported tokens/s is the aggregate over the batch.
prefill_s is a separate timed forward of the prompt batch alone;
decode_tokens_per_s = generated tokens / (total generate time - prefill_s).
Prints ONE line of JSON to stdout.

    python bench/ref_sample.py [--threads 2] [--prompt-len 256] [--new-tokens 64] [--num-samples 1]
"""

import argparse
import json
import time

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM


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
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = smollm2_135m_config()
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()

    n = args.num_samples
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
    input_ids = prompt.repeat(n, 1)
    attention_mask = torch.ones_like(input_ids)

    gen_cfg = GenerationConfig(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=n > 1,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
        **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if n > 1 else {}),
    )

    with torch.inference_mode():
        # warm-up (untimed): one short generate so one-time allocations are not measured
        model.generate(input_ids=input_ids[:, :8], attention_mask=attention_mask[:, :8],
                       generation_config=GenerationConfig(max_new_tokens=2, min_new_tokens=2,
                                                          do_sample=False, eos_token_id=None,
                                                          pad_token_id=0))
        t0 = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        prefill_s = time.perf_counter() - t0

        torch.manual_seed(args.seed + 2)
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg)
        total = time.perf_counter() - t0

    new = out.shape[1] - args.prompt_len
    assert new == args.new_tokens, (new, args.new_tokens)
    gen_tokens = new * n
    print(json.dumps({
        "impl": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "num_samples": n,
        "total_s": total,
        "tokens_per_s": gen_tokens / total,
        "prefill_s": prefill_s,
        "decode_tokens_per_s": gen_tokens / (total - prefill_s),
    }))


if __name__ == "__main__":
    main()
