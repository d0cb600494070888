"""Greedy generation with llama.cpp (llama-cpp-python) on the CPU, from token ids.

Called by engine/tests/gguf.rs (not by hand) as

    python llamacpp_generate.py IN.json OUT.json

IN.json:  {"gguf": PATH, "prompts": [[int, ...], ...], "max_tokens": N}
OUT.json: {"tokens": [[int, ...] per prompt], "margins": [[float, ...] per prompt]}

`tokens` holds only the generated ids, exactly N per prompt: generation stops at max_tokens, never
at an end-of-sequence token. Each step takes the argmax of the raw logits that llama.cpp returns
for the last position (`llama_get_logits_ith(ctx, -1)`), read here rather than through
llama-cpp-python's sampler chain, so no repetition penalty, temperature, top-k/top-p/min-p or seed
takes part; ties go to the lowest id (numpy's argmax). `margins` (extra, for diagnosing a
mismatch) is the gap between the largest and second-largest logit at each step: where it is tiny,
two implementations may legitimately pick different tokens.

Each prompt starts from an empty KV cache; the prompt is evaluated as given (no BOS added).
Threads: 2. n_ctx: the longest prompt plus N, rounded up.
"""

import json
import sys

import llama_cpp
import numpy as np


def main():
    case = json.load(open(sys.argv[1], encoding="utf-8"))
    prompts = [[int(t) for t in p] for p in case["prompts"]]
    max_tokens = int(case["max_tokens"])
    need = max([len(p) for p in prompts] + [1]) + max_tokens
    n_ctx = max(512, -(-need // 256) * 256)
    llm = llama_cpp.Llama(
        model_path=case["gguf"],
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=2,
        n_threads_batch=2,
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    tokens, margins = [], []
    for prompt in prompts:
        assert prompt, "an empty prompt has no logits to start from"
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        llm.eval(prompt)
        out, gaps = [], []
        for step in range(max_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
            tok = int(np.argmax(logits))
            top2 = np.partition(logits, -2)[-2:]
            out.append(tok)
            gaps.append(float(top2[1] - top2[0]))
            if step + 1 < max_tokens:
                llm.eval([tok])
        tokens.append(out)
        margins.append(gaps)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump({"tokens": tokens, "margins": margins}, f)


if __name__ == "__main__":
    main()
