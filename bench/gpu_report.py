"""Prints bench/gpu.sh's tables from the JSON lines of both sides, and fails (exit 1) when a
parity check is outside its tolerance, a hearth job failed, or a step of the checklist failed or
was skipped.

    python bench/gpu_report.py WORKDIR PEAK_TFLOPS   (PEAK_TFLOPS 0: no MFU column)
    python bench/gpu_report.py --line WORKDIR PEAK_TFLOPS parity A:B ...   one step's line of figures
    python bench/gpu_report.py --line WORKDIR PEAK_TFLOPS train|decode     (from WORKDIR/step.jsonl)
    python bench/gpu_report.py --line WORKDIR PEAK_TFLOPS ref A:B ...      (PyTorch's side: ref.jsonl)

The --line forms print the figures of one step of bench/gpu.sh's checklist on one line and exit 1
when its verdict is a failure. The report lists the checklist's lines (WORKDIR/steps.tsv) first.

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


def compare(work, a, b):
    """The parity figures of output `a` against output `b`, or None when either is missing."""
    from safetensors.torch import load_file  # torch only where tensors are compared

    pa, pb = os.path.join(work, a), os.path.join(work, b)
    if not (os.path.exists(pa + ".json") and os.path.exists(pb + ".json")):
        return None
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
    return {"got": got, "tol": tol, "same": same, "greedy": len(jb["greedy"]), "good": good}


def parity(work, pairs):
    ok = True
    print("\n## Parity (max relative difference; greedy: equal tokens of 32 before the first difference)\n")
    print(f"| {'a':<22} | {'b':<22} | logits   | loss     | logprobs | grads    | greedy | verdict |")
    print("|" + "|".join(["-" * 24] * 2 + ["-" * 10] * 4 + ["-" * 8, "-" * 9]) + "|")
    for a, b in pairs:
        c = compare(work, a, b)
        if c is None:
            print(f"| {a:<22} | {b:<22} | missing output" + " " * 40 + "| FAIL    |")
            ok = False
            continue
        got, tol = c["got"], c["tol"]
        ok &= c["good"]
        cells = " | ".join(f"{got[k]:.2e}{'*' if got[k] > tol[k] else ' '}" for k in ["logits", "loss", "logprobs", "grads"])
        print(f"| {a:<22} | {b:<22} | {cells} | {c['same']:>2}/{c['greedy']}  | {'pass' if c['good'] else 'FAIL':<7} |")
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


def checklist(work):
    """The checklist's step lines as bench/gpu.sh printed them; False when one failed or was skipped."""
    path = os.path.join(work, "steps.tsv")
    rows = [l.rstrip("\n").split("\t", 1) for l in open(path) if "\t" in l] if os.path.exists(path) else []
    if rows:
        print("## Checklist\n")
        for status, text in rows:
            print(f"- {text}" + ("" if status == "ok" else f"  **{status}**"))
    return all(status == "ok" for status, _ in rows)


def tok(x):
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.1f}"


def pair_figures(work, pairs):
    parts, ok = [], True
    for a, b in pairs:
        c = compare(work, a, b)
        if c is None:
            parts.append(f"{a} vs {b} FAIL (missing output)")
            ok = False
            continue
        got = c["got"]
        ok &= c["good"]
        parts.append(f"{a} vs {b} {'pass' if c['good'] else 'FAIL'} (logits {got['logits']:.1e}, loss {got['loss']:.1e}, "
                     f"grads {got['grads']:.1e}, greedy {c['same']}/{c['greedy']})")
    return parts, ok


def job_name(args):
    """A job's bench_gpu arguments without its folders (--dir, --out), for one line."""
    words = args if isinstance(args, list) else str(args or "").split()
    return " ".join(w for i, w in enumerate(words) if w not in ("--dir", "--out") and (i == 0 or words[i - 1] not in ("--dir", "--out")))


def failures(rows):
    return [f"FAILED {job_name(r.get('args'))}: {r['error']}" for r in rows if "error" in r]


def gb(x):
    return f"{x:.1f} GB" if x >= 1 else f"{x * 1000:.0f} MB"


def train_figures(row, peak_tflops):
    parts = [f"{tok(row['tokens_per_s'])} tok/s"]
    if peak_tflops > 0:
        parts.append(f"MFU {row['tokens_per_s'] * row['flops_per_token'] / 1e12 / peak_tflops:.0%}")
    if row.get("peak_gb") is not None:
        parts.append(f"peak {gb(row['peak_gb'])}")
    step_s = sum(row["step_s"]) / len(row["step_s"])
    parts.append(f"{step_s:.2f} s/step" if step_s >= 0.1 else f"{step_s * 1000:.1f} ms/step")
    if row.get("recompute"):
        parts.append("recompute on")
    parts.append(f"loss/token {row['loss_per_token']:.2f}")
    return parts


def line(work, peak_tflops, kind, args):
    """One step's figures: (text, ok)."""
    step = lines(os.path.join(work, "step.jsonl"))
    if kind == "parity":
        parts, ok = pair_figures(work, [p.split(":") for p in args])
        bad = failures(step)
        return "; ".join(bad + parts), ok and not bad
    if kind == "train":
        bad = failures(step)
        rows = [r for r in step if r.get("what") == "train"]
        return "; ".join(bad + [", ".join(train_figures(r, peak_tflops)) for r in rows]), bool(rows) and not bad
    if kind == "decode":
        bad = failures(step)
        rows = [r for r in step if r.get("what") == "decode"]
        parts = [f"batch {r['batch']}: {tok(r['tokens_per_s'])} tok/s" for r in rows]
        if rows and rows[-1].get("peak_gb") is not None:
            parts.append(f"peak {gb(rows[-1]['peak_gb'])}")
        return "; ".join(bad + ([", ".join(parts)] if parts else [])), bool(rows) and not bad
    if kind == "ref":
        ref = lines(os.path.join(work, "ref.jsonl"))
        parts, ok = pair_figures(work, [p.split(":") for p in args])
        hearth = lines(os.path.join(work, "hearth.jsonl"))
        ht, hd = by_key(hearth, "train"), by_key(hearth, "decode")
        for r in ref:
            if "error" in r:
                job = r.get("job", {})
                what = " ".join(str(job[k]) for k in ("what", "shape", "device", "dtype", "batch") if k in job)
                parts.append(f"PyTorch {what} failed: {r['error'][:120]}")
            elif r.get("what") == "train":
                h = ht.get((r["shape"], r["seq_len"], r.get("batch")), {})
                s = f"train {r['shape']} T={r['seq_len']}: PyTorch {tok(r['tokens_per_s'])} tok/s"
                if h.get("tokens_per_s"):
                    s += f", hearth/PyTorch tok/s {h['tokens_per_s'] / r['tokens_per_s']:.2f}"
                if h.get("peak_gb") and r.get("peak_gb"):
                    s += f", memory {h['peak_gb'] / r['peak_gb']:.2f}"
                parts.append(s)
            elif r.get("what") == "decode":
                h = hd.get((r["shape"], r.get("seq_len"), r["batch"]), {})
                s = f"decode batch {r['batch']}: PyTorch {tok(r['tokens_per_s'])} tok/s"
                if h.get("tokens_per_s"):
                    s += f", hearth/PyTorch {h['tokens_per_s'] / r['tokens_per_s']:.2f}"
                parts.append(s)
        return "; ".join(parts), ok and bool(ref)
    raise SystemExit(f"--line: unknown step kind {kind}")


def main():
    if sys.argv[1] == "--line":
        text, ok = line(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:])
        print(text or "no figures")
        sys.exit(0 if ok else 1)
    work, peak = sys.argv[1], float(sys.argv[2])
    ok = checklist(work)
    pairs = [l.split() for l in open(os.path.join(work, "pairs.txt")) if l.strip()]
    ok &= parity(work, pairs)
    ok &= throughput(work, peak)
    print("\nresult:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
