"""Batch-1 decode on the real SmolLM2-135M-Instruct Q4_1 GGUF: hearth-server's `sample` against
llama.cpp (llama-cpp-python) on the same file, the same threads, in the same run.

    source bench/reference.sh     # HEARTH_SMOLLM2_GGUF, llama-cpp-python in bench/.venv
    bench/.venv/bin/python bench/decode.py [--threads 2] [--bin target/release]

A 256-token prompt, then 128 greedy tokens (no stop: every run makes all 128). For each side:
prefill tokens/s (the prompt alone) and decode tokens/s (the 127 tokens after the first), the
median of three runs. hearth runs twice: with the base kept as the file's blocks
(`--quantize q4`) and dequantized to f32 (the default); both sample through a run's LoRA
adapter (rank 16 on every projection), as a user's `sample` does. llama.cpp evaluates the bare
model, taking the argmax of its logits each step.
"""

import argparse
import os
import statistics
import tempfile
import time

from tenants import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [(100 + 7919 * i) % 49000 for i in range(256)]
NEW = 128


def llama(gguf, threads):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          n_gpu_layers=0, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()
    runs = []
    for _ in range(4):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(PROMPT)
        t1 = time.perf_counter()
        for _ in range(NEW - 1):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(np.argmax(logits))])
        t2 = time.perf_counter()
        runs.append((len(PROMPT) / (t1 - t0), (NEW - 1) / (t2 - t1)))
    return runs[1:]


def hearth(bin_dir, gguf, threads, quantize):
    s = Server(bin_dir, tempfile.mkdtemp(prefix="hearth-decode-"), *(["--quantize", quantize] if quantize else []),
               model=gguf, threads=threads)
    try:
        assert s.call("POST", "/v1/runs", {"name": "main"})[0] == 200

        def sample(n):
            t0 = time.perf_counter()
            status, out = s.call("POST", "/v1/runs/main/sample",
                                 {"prompt": PROMPT, "sampling_params": {"max_tokens": n, "temperature": 0.0}})
            assert status == 200 and len(out["sequences"][0]["tokens"]) == n, out
            return time.perf_counter() - t0

        sample(2)  # warm
        runs = []
        for _ in range(3):
            first = sample(1)
            whole = sample(NEW)
            runs.append((len(PROMPT) / first, (NEW - 1) / (whole - first)))
        return runs
    finally:
        s.proc.terminate()
        s.proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    a = ap.parse_args()
    gguf = os.environ["HEARTH_SMOLLM2_GGUF"]
    avx512 = sum("avx512f" in l for l in open("/proc/cpuinfo"))
    print(f"machine: {os.cpu_count()} cores, avx512f lines {avx512}; {a.threads} threads; "
          f"{len(PROMPT)}-token prompt, {NEW} new tokens; {os.path.basename(gguf)}")
    med = lambda runs, i: statistics.median(r[i] for r in runs)
    ref = llama(gguf, a.threads)
    rows = [("llama.cpp", ref)]
    for label, q in (("hearth q4 (file's blocks)", "q4"), ("hearth f32", None)):
        rows.append((label, hearth(a.bin, gguf, a.threads, q)))
    for label, runs in rows:
        print(f"{label:26} prefill {med(runs, 0):7.1f} tok/s | decode {med(runs, 1):6.1f} tok/s "
              f"= {med(runs, 1) / med(ref, 1):.2f}x llama.cpp's decode, prefill {med(runs, 0) / med(ref, 0):.2f}x")


if __name__ == "__main__":
    main()
