"""Prints bench/gpu.sh's tables from the JSON lines of both sides, and fails (exit 1) when a
parity check is outside its tolerance or a hearth job failed.

    python bench/gpu_report.py WORKDIR PEAK_TFLOPS   (PEAK_TFLOPS 0: no MFU column)

Parity tolerances (max |a - b| / max |b|, b the second of the pair):
  f32 against f32      logits, loss, logprobs, gradients 1e-3; greedy tokens all equal
  bf16 against bf16    logits 3e-2, loss and logprobs 5e-2, gradients 6e-2 (engine/tests/golden.rs)
  bf16 against f32     logits 5e-2, loss and logprobs 5e-2, gradients 1e-1 (PyTorch's own bf16
                       differs from its f32 by up to 7.6e-2 in gradients on the golden models)
Greedy decoding in bf16 is reported (tokens equal before the first difference), not judged: two
correct bf16 implementations part at the first near-tie.
"""

import json
import os
import sys

from safetensors.torch import load_file

TOL = {
    ("f32", "f32"): {"logits": 1e-3, "loss": 1e-3, "logprobs": 1e-3, "grads": 1e-3},
    ("bf16", "bf16"): {"logits": 3e-2, "loss": 5e-2, "logprobs": 5e-2, "grads": 6e-2},
    ("bf16", "f32"): {"logits": 5e-2, "loss": 5e-2, "logprobs": 5e-2, "grads": 1e-1},
}


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def lines(path):
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]


def parity(work, pairs):
    ok = True
    print("\n## Parity (max relative difference; greedy: equal tokens of 32 before the first difference)\n")
    print(f"| {'a':<22} | {'b':<22} | logits   | loss     | logprobs | grads    | greedy | verdict |")
    print("|" + "|".join(["-" * 24] * 2 + ["-" * 10] * 4 + ["-" * 8, "-" * 9]) + "|")
    for a, b in pairs:
        pa, pb = os.path.join(work, a), os.path.join(work, b)
        if not (os.path.exists(pa + ".json") and os.path.exists(pb + ".json")):
            print(f"| {a:<22} | {b:<22} | missing output" + " " * 40 + "| FAIL    |")
            ok = False
            continue
        ja, jb = json.load(open(pa + ".json")), json.load(open(pb + ".json"))
        ta, tb = load_file(pa + ".safetensors"), load_file(pb + ".safetensors")
        tol = TOL[(ja["dtype"], jb["dtype"])]
        got = {
            "logits": rel(ta["logits.0"], tb["logits.0"]),
            "loss": abs(ja["loss"] - jb["loss"]) / abs(jb["loss"]),
            "logprobs": max(rel(ta[k], tb[k]) for k in tb if k.startswith("logprobs.")),
            "grads": max(rel(ta[k], tb[k]) for k in tb if k.startswith("grad.")),
        }
        missing = [k for k in tb if k.startswith("grad.") and k not in ta]
        same = next((i for i, (x, y) in enumerate(zip(ja["greedy"], jb["greedy"])) if x != y), len(jb["greedy"]))
        good = not missing and all(got[k] <= tol[k] for k in got)
        if ja["dtype"] == "f32" and jb["dtype"] == "f32":
            good = good and ja["greedy"] == jb["greedy"]
        ok &= good
        cells = " | ".join(f"{got[k]:.2e}{'*' if got[k] > tol[k] else ' '}" for k in ["logits", "loss", "logprobs", "grads"])
        print(f"| {a:<22} | {b:<22} | {cells} | {same:>2}/{len(jb['greedy'])}  | {'pass' if good else 'FAIL':<7} |")
    print("\n(* over tolerance; tolerances in bench/gpu_report.py)")
    return ok


def by_key(rows, what):
    out = {}
    for r in rows:
        if r.get("what") == what:
            key = (r["shape"], r.get("seq_len"), r.get("batch"))
            out[key] = r
    return out


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def throughput(work, peak_tflops):
    hearth = lines(os.path.join(work, "hearth.jsonl"))
    ref = lines(os.path.join(work, "ref.jsonl"))
    failed = [r for r in hearth if "error" in r]
    for r in failed + [r for r in ref if "error" in r]:
        print(f"\n{r['impl']} failed: {r['error']} ({json.dumps(r.get('args') or r.get('job'))})")
    ht, rt = by_key(hearth, "train"), by_key(ref, "train")
    if ht:
        print("\n## LoRA training (r=16, all seven projections, batch 1; tokens/s of forward + backward + AdamW)\n")
        mfu = peak_tflops > 0
        head = "| shape | T | hearth tok/s | PyTorch tok/s | ratio | hearth peak GB | PyTorch peak GB | memory ratio |"
        head += " hearth MFU | PyTorch MFU |" if mfu else ""
        print(head)
        print("|" + "---|" * (10 if mfu else 8))
        for key, h in ht.items():
            r = rt.get(key, {})
            ratio = h["tokens_per_s"] / r["tokens_per_s"] if r.get("tokens_per_s") else None
            mem = h["peak_gb"] / r["peak_gb"] if h.get("peak_gb") and r.get("peak_gb") else None
            row = (f"| {key[0]} | {key[1]} | {fmt(h['tokens_per_s'], '.1f')} | {fmt(r.get('tokens_per_s'), '.1f')} | {fmt(ratio, '.2f')} "
                   f"| {fmt(h.get('peak_gb'), '.2f')} | {fmt(r.get('peak_gb'), '.2f')} | {fmt(mem, '.2f')} |")
            if mfu:
                f = h["flops_per_token"]
                row += f" {h['tokens_per_s'] * f / 1e12 / peak_tflops:.1%} | " + (
                    f"{r['tokens_per_s'] * f / 1e12 / peak_tflops:.1%} |" if r.get("tokens_per_s") else "- |")
            print(row)
        if mfu:
            print(f"\nMFU: model FLOPs per token (4·N over projections and head, plus causal attention; recompute not "
                  f"counted) × tokens/s ÷ {peak_tflops:.0f} TFLOP/s.")
    hd, rd = by_key(hearth, "decode"), by_key(ref, "decode")
    if hd:
        print("\n## Decode (tokens/s over all sequences; greedy at batch 1, temperature 1 at larger batches)\n")
        print("| shape | batch | hearth tok/s | transformers generate tok/s | ratio |")
        print("|---|---|---|---|---|")
        for key, h in hd.items():
            r = rd.get(key, {})
            ratio = h["tokens_per_s"] / r["tokens_per_s"] if r.get("tokens_per_s") else None
            print(f"| {key[0]} | {key[2]} | {fmt(h['tokens_per_s'], '.1f')} | {fmt(r.get('tokens_per_s'), '.1f')} | {fmt(ratio, '.2f')} |")
    return not failed


def main():
    work, peak = sys.argv[1], float(sys.argv[2])
    pairs = [l.split() for l in open(os.path.join(work, "pairs.txt")) if l.strip()]
    ok = parity(work, pairs)
    ok &= throughput(work, peak)
    print("\nresult:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
