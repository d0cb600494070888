#!/usr/bin/env bash
# Training-step benchmark: hearth vs PyTorch + PEFT on the same machine, in the same run.
# smollm2-135m-shape, T=256, LoRA r=16 on all seven projections, f32, 2 threads (override with
# THREADS=N). Installs the reference into bench/.venv on first use (about 5 GB from PyPI).
# Extra arguments go to both sides (--seq-len N, --steps N, --warmup N) or to hearth only
# (--recompute auto|on|off, --fused on|off). ROUNDS=N repeats the pair N times and prints the
# median ratios.
#
#   bench/train_step.sh --bases    QLoRA: hearth alone with an f32, 8-bit and 4-bit base at
#                                  T=1024 (SEQ_LEN=N to change) with recompute on (so the base's
#                                  weights are what differs): tokens/s, peak memory and the base
#                                  weights' bytes; then a 50-step loss curve (T=128, AdamW's
#                                  default lr 1e-4, the same data) per base and the final losses'
#                                  distance to f32's. Extra arguments go to every run (--lr 1e-3).
#   bench/train_step.sh --scaling  hearth alone, 1 thread against THREADS: each run alternates
#                                  its steps between a 1-thread and a THREADS-thread pool
#                                  (bench_train --pools), 10 steps each, ROUNDS runs (default 3);
#                                  prints tokens/s per pool and the median ratio of neighbouring
#                                  steps (a shared machine's speed drifts within minutes). Each
#                                  round also measures what the machine allows: THREADS separate
#                                  1-thread processes at once against one alone, right after (their
#                                  summed tokens/s over the lone one's: no shared data, no
#                                  synchronisation, only the cores' shared cache, memory and
#                                  clocks). Extra arguments go to every run (--seq-len 512).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
cargo build --release -q -p hearth-engine --example bench_train
bench=./target/release/examples/bench_train
if [ "${1:-}" = "--bases" ]; then
  shift
  seq=${SEQ_LEN:-1024}
  for base in f32 q8 q4; do
    RAYON_NUM_THREADS=$THREADS $bench --seq-len "$seq" --warmup 1 --steps 3 --recompute on --base $base "$@" > "target/bench-base-$base.json"
  done
  for base in f32 q8 q4; do
    RAYON_NUM_THREADS=$THREADS $bench --seq-len 128 --warmup 0 --steps 50 --base $base "$@" > "target/bench-curve-$base.json"
  done
  python3 - <<'PY'
import json
speed = {b: json.load(open(f"target/bench-base-{b}.json")) for b in ("f32", "q8", "q4")}
curve = {b: json.load(open(f"target/bench-curve-{b}.json")) for b in ("f32", "q8", "q4")}
f32 = speed["f32"]
for b, d in speed.items():
    print(f"{b:>3} base, T={d['seq_len']}, recompute {'on' if d['recompute'] else 'off'}: {d['tokens_per_s']:.1f} tok/s, "
          f"peak {d['peak_rss_gb']:.2f} GB, weights {d['weight_gb']:.3f} GB ({d['weight_gb'] / f32['weight_gb']:.3f} of f32)")
ref = curve["f32"]["losses"]
for b, d in curve.items():
    l = d["losses"]
    print(f"{b:>3} base, 50 steps at T=128: loss {l[0]:.2f} -> {l[-1]:.2f}, final vs f32 {100 * (l[-1] - ref[-1]) / ref[-1]:+.2f}%")
PY
  exit 0
fi
if [ "${1:-}" = "--scaling" ]; then
  shift
  runs=()
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for r in $(seq "${ROUNDS:-3}"); do
    runs+=("$($bench "$@" --pools "1,$THREADS" --steps 10 --warmup 1)")
    RAYON_NUM_THREADS=1 $bench "$@" --steps 10 --warmup 1 > "$tmp/alone-$r.json"
    for i in $(seq "$THREADS"); do
      RAYON_NUM_THREADS=1 $bench "$@" --steps 10 --warmup 1 > "$tmp/at-once-$r-$i.json" &
    done
    wait
  done
  python3 - "$tmp" "${runs[@]}" <<'PY'
import glob, json, statistics, sys
tmp, runs = sys.argv[1], [json.loads(a)["pools"] for a in sys.argv[2:]]
tps = lambda f: json.load(open(f))["tokens_per_s"]
n = runs[0][1]["threads"]
ours, machine = [], []
for i, (one, many) in enumerate(runs):
    alone = tps(f"{tmp}/alone-{i + 1}.json")
    at_once = [tps(f) for f in sorted(glob.glob(f"{tmp}/at-once-{i + 1}-*.json"))]
    ours.append(many["speedup_over_first_median"])
    machine.append(sum(at_once) / alone)
    print(f"round {i + 1}: 1 thread {one['tokens_per_s']:.1f} tok/s, {n} threads {many['tokens_per_s']:.1f} tok/s, "
          f"1 -> {n} threads {ours[-1]:.2f}x (median of the step pairs); "
          f"{n} 1-thread processes at once {' + '.join(f'{t:.1f}' for t in at_once)} tok/s against {alone:.1f} alone: {machine[-1]:.2f}x")
print(f"median of {len(runs)} rounds: 1 -> {n} threads {statistics.median(ours):.2f}x; "
      f"{n} separate processes {statistics.median(machine):.2f}x (what the machine allows)")
PY
  exit 0
fi
source bench/reference.sh
# hearth-only flags do not go to the reference
ref_args=()
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --recompute|--fused|--base|--model|--lr) shift 2 ;;
    *) ref_args+=("$1"); shift ;;
  esac
done
# ROUNDS=N runs the pair N times, alternating, and adds the median ratios (a shared machine's
# speed drifts within minutes; the ratio of neighbouring runs drifts less)
rounds=${ROUNDS:-1}
results=()
for _ in $(seq "$rounds"); do
  hearth=$(RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS $bench "${args[@]}")
  ref=$(OMP_NUM_THREADS=$THREADS bench/.venv/bin/python bench/ref_train_step.py --threads "$THREADS" "${ref_args[@]}")
  [ "$rounds" = 1 ] && { echo "$hearth"; echo "$ref"; }
  results+=("$hearth" "$ref")
done
python3 - "${results[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
speed, mem = [], []
for h, r in zip(runs[0::2], runs[1::2]):
    speed.append(h['tokens_per_s'] / r['tokens_per_s'])
    mem.append(h['peak_rss_gb'] / r['peak_rss_gb'])
    print(f"hearth {h['tokens_per_s']:.1f} tok/s, peak {h['peak_rss_gb']:.2f} GB (recompute {'on' if h['recompute'] else 'off'}) | "
          f"pytorch+peft {r['tokens_per_s']:.1f} tok/s, peak {r['peak_rss_gb']:.2f} GB | "
          f"ratio (hearth/pytorch) tokens/s {speed[-1]:.2f}, memory {mem[-1]:.2f}")
if len(speed) > 1:
    print(f"median of {len(speed)} rounds (threads {runs[0]['threads']}): ratio tokens/s {statistics.median(speed):.2f}, memory {statistics.median(mem):.2f}")
PY
