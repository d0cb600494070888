"""A class on one server: fairness under a pipelining user, thirty clients at once, and SIGTERM.

    source bench/reference.sh   # the Tinker SDK is in the reference virtualenv
    bench/.venv/bin/python bench/tenants.py [--minutes 5] [--bin target/release]

1. Fairness: one user pipelines 200 samples (`?wait=false`) while four users each loop
   forward_backward + optim_step. Printed: each trainer's solo step time (measured alone first),
   its longest gap between steps under load, and the ratio.
2. Thirty clients (twenty native clients and ten threads of the real `tinker` SDK, each its own
   user) train and sample on the tiny model for `--minutes`. Printed: operations, errors, 429s
   answered (retried), the server's peak resident memory.
3. SIGTERM: every run is saved; the next start resumes each at its step (checked, printed).
4. `--batching K` (needs HEARTH_SMOLLM2_GGUF): K concurrent sampling requests (one sample,
   64-token prompt, 32 new tokens, each from its own run) and K runs each looping
   forward_backward + optim_step on 128 tokens, each against one client alone: aggregate
   tokens/s, the ratio and p95 latency (`--only-batching` for this part alone).
5. `--leak N` (needs HEARTH_SMOLLM2_GGUF, as bench/reference.sh sets it): N iterations of the
   SDK's `save_weights_and_get_sampling_client` + a sample on SmolLM2 (rank 32), the server's
   resident memory printed along the way: flat once `--max-samplers` (64) samplers are held.

Figures go to stdout; nothing is asserted except what would make the figures meaningless.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """hearth-server on loopback with `model` (the tiny preset unless a path is given), no idle
    timeout, no autosaves; `threads` sets its RAYON_NUM_THREADS."""

    def __init__(self, bin_dir, home, *args, model="tiny", threads=None):
        self.home = home
        env = dict(os.environ, **({"RAYON_NUM_THREADS": str(threads)} if threads else {}))
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "hearth-server"), "--home", home, "--listen", "127.0.0.1:0", "--model", model,
             "--idle-timeout", "0", "--autosave-every", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert "listening on" in self.proc.stdout.readline()
        s = json.load(open(os.path.join(home, "session.json")))
        self.url, self.token = s["url"], s["token"]

    def call(self, method, path, body=None, token=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token or self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def user(self, name):
        status, out = self.call("POST", "/v1/users", {"name": name})
        assert status == 201, out
        return out["token"]

    def rss_mb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def batch(text):
    t = list(text.encode())
    return {"data": [{"model_input": t[:-1], "loss_fn_inputs": {"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)}}],
            "loss_fn": "cross_entropy"}


def step(s, token, run, text):
    a, _ = s.call("POST", f"/v1/runs/{run}/forward_backward", batch(text), token)
    b, _ = s.call("POST", f"/v1/runs/{run}/optim_step", {"learning_rate": 1e-3}, token)
    return a == 200 and b == 200


def fairness(bin_dir):
    s = Server(bin_dir, tempfile.mkdtemp(prefix="hearth-tenants-"))
    try:
        sampler = s.user("sampler")
        trainers = [s.user(f"trainer{i}") for i in range(4)]
        for t in [sampler, *trainers]:
            s.call("POST", "/v1/runs", {"name": "main"}, t)
        text = "a class shares one warm model " * 4
        solo = []
        for t in trainers:
            step(s, t, "main", text)  # warm
            t0 = time.perf_counter()
            for _ in range(5):
                step(s, t, "main", text)
            solo.append((time.perf_counter() - t0) / 5)
        body = {"prompt": list(range(1, 9)), "sampling_params": {"max_tokens": 64}}
        ids = [s.call("POST", "/v1/runs/main/sample?wait=false", body, sampler)[1]["request_id"] for _ in range(200)]
        gaps = [[] for _ in trainers]
        done = threading.Event()

        def train(i):
            last = time.perf_counter()
            while not done.is_set():
                assert step(s, trainers[i], "main", text)
                now = time.perf_counter()
                gaps[i].append(now - last)
                last = now

        threads = [threading.Thread(target=train, args=(i,)) for i in range(len(trainers))]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for rid in ids:
            s.call("GET", f"/v1/requests/{rid}?timeout_s=300", token=sampler)
        sampled_s = time.perf_counter() - t0
        done.set()
        for th in threads:
            th.join()
        print(f"fairness: 200 samples of 64 tokens pipelined by one user took {sampled_s:.1f} s beside 4 trainers")
        for i, (alone, g) in enumerate(zip(solo, gaps)):
            worst = max(g) if g else float("inf")
            print(f"  trainer{i}: solo step {alone * 1e3:.0f} ms; under load {len(g)} steps, "
                  f"median gap {sorted(g)[len(g) // 2] * 1e3:.0f} ms, longest {worst * 1e3:.0f} ms = {worst / alone:.1f}x solo")
    finally:
        s.proc.terminate()
        s.proc.wait(timeout=60)


def thirty(bin_dir, minutes):
    import tinker
    from tinker import types

    home = tempfile.mkdtemp(prefix="hearth-tenants-30-")
    s = Server(bin_dir, home, "--max-queued-per-user", "8")
    tokens = {f"student{i:02d}": s.user(f"student{i:02d}") for i in range(30)}
    ops, errors, peak = [0], [], [s.rss_mb()]
    stop_at = time.monotonic() + minutes * 60
    lock = threading.Lock()

    def native(name, token):
        s.call("POST", "/v1/runs", {"name": "main"}, token)
        text = f"{name} writes their own line " * 3
        while time.monotonic() < stop_at:
            ok = step(s, token, "main", text)
            status, _ = s.call("POST", "/v1/runs/main/sample",
                               {"prompt": [1, 2, 3], "sampling_params": {"max_tokens": 16}}, token)
            with lock:
                ops[0] += 3
                if not ok or status != 200:
                    errors.append((name, status))

    def sdk(name, token):
        sc = tinker.ServiceClient(base_url=s.url, api_key="tml-" + token)
        tc = sc.create_lora_training_client(base_model="tiny", rank=4, seed=1).result()
        ids = list(f"{name} trains through the sdk".encode())
        d = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        while time.monotonic() < stop_at:
            try:
                tc.forward_backward([d], "cross_entropy").result()
                tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
                sampler = tc.save_weights_and_get_sampling_client().result()
                futures = [sampler.sample(types.ModelInput.from_ints(ids[:4]), 2, types.SamplingParams(max_tokens=16))
                           for _ in range(12)]
                [f.result() for f in futures]
                with lock:
                    ops[0] += 3 + len(futures)
            except Exception as e:  # noqa: BLE001 (counted, printed)
                with lock:
                    errors.append((name, repr(e)[:200]))

    threads = [threading.Thread(target=native if i < 20 else sdk, args=(n, t))
               for i, (n, t) in enumerate(tokens.items())]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        peak[0] = max(peak[0], s.rss_mb())
        time.sleep(1)
    status, info = s.call("GET", "/v1/info")
    before = {r["id"]: r["step"] for r in info["runs"]}
    _, usage = s.call("GET", "/v1/usage")
    trained = sum(u["tokens_trained"] for u in usage["users"])
    print(f"thirty clients, {minutes} min: {ops[0]} operations, {len(errors)} errors, server peak RSS {peak[0]:.0f} MB, "
          f"{len(before)} runs, {trained} tokens trained")
    for e in errors[:5]:
        print("  error:", e)
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(timeout=300)
    again = Server(bin_dir, home)
    _, runs = again.call("GET", "/v1/runs")
    after = {r["id"]: r["step"] for r in runs}
    same = sum(after.get(k) == v for k, v in before.items())
    print(f"SIGTERM: exit {code}; the next start resumed {same}/{len(before)} runs at their step")
    again.proc.terminate()
    again.proc.wait(timeout=60)


def leak(bin_dir, iterations):
    import tinker
    from tinker import types

    gguf = os.environ["HEARTH_SMOLLM2_GGUF"]
    s = Server(bin_dir, tempfile.mkdtemp(prefix="hearth-tenants-leak-"), model=gguf)
    sc = tinker.ServiceClient(base_url=s.url, api_key="tml-" + s.token)
    tc = sc.create_lora_training_client(base_model=gguf, rank=32, seed=1).result()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    marks = {}
    for i in range(1, iterations + 1):
        sampler = tc.save_weights_and_get_sampling_client().result()
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1)).result()
        if i in (1, 64, iterations // 2, iterations):
            marks[i] = s.rss_mb()
    print("sampler loop on SmolLM2 (rank 32): server RSS " + ", ".join(f"after {i}: {m:.0f} MB" for i, m in sorted(marks.items())))
    s.proc.terminate()
    s.proc.wait(timeout=60)


def batching(bin_dir, k, threads):
    """K runs on the real SmolLM2 (HEARTH_SMOLLM2_GGUF): K concurrent sampling requests (one
    sample, 64-token prompt, 32 new tokens each, each from its own run) against one alone, and K
    runs looping forward_backward + optim_step on 128 tokens against one alone: aggregate
    tokens/s, the ratio, and the p95 latency of one operation per client."""
    s = Server(bin_dir, tempfile.mkdtemp(prefix="hearth-tenants-batch-"), model=os.environ["HEARTH_SMOLLM2_GGUF"],
               threads=threads)
    try:
        runs = [f"r{i}" for i in range(k)]
        for r in runs:
            assert s.call("POST", "/v1/runs", {"name": r})[0] == 200
        prompt = [100 + (7 * i) % 4000 for i in range(64)]

        def sample(run, seed):
            body = {"prompt": prompt, "sampling_params": {"max_tokens": 32, "temperature": 1.0, "seed": seed}}
            t0 = time.perf_counter()
            status, out = s.call("POST", f"/v1/runs/{run}/sample", body)
            assert status == 200, out
            return time.perf_counter() - t0, len(out["sequences"][0]["tokens"])

        def train(run, seed):
            t = [(seed * 31 + 17 * i) % 49000 + 10 for i in range(129)]
            body = {"data": [{"model_input": t[:-1], "loss_fn_inputs": {"target_tokens": t[1:], "weights": [1.0] * 128}}],
                    "loss_fn": "cross_entropy"}
            t0 = time.perf_counter()
            assert s.call("POST", f"/v1/runs/{run}/forward_backward", body)[0] == 200
            assert s.call("POST", f"/v1/runs/{run}/optim_step", {"learning_rate": 1e-4})[0] == 200
            return time.perf_counter() - t0, 128

        def measure(op, clients, rounds):
            lat, tokens = [], [0]
            lock = threading.Lock()

            def client(i):
                for j in range(rounds):
                    took, n = op(runs[i], 1000 * i + j)
                    with lock:
                        lat.append(took)
                        tokens[0] += n

            ths = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            wall = time.perf_counter() - t0
            lat.sort()
            return tokens[0] / wall, lat[min(len(lat) - 1, int(0.95 * len(lat)))]

        for name, op, rounds in (("sampling", sample, 3), ("training", train, 3)):
            op(runs[0], 0)  # warm
            alone, p95_alone = measure(op, 1, rounds)
            together, p95 = measure(op, k, rounds)
            print(f"{name}: {k} clients {together:.1f} tok/s aggregate vs one alone {alone:.1f} tok/s = "
                  f"{together / alone:.2f}x; p95 latency {p95:.2f} s ({p95_alone:.2f} s alone) "
                  f"[SmolLM2-135M Q4_1, {threads} threads]")
    finally:
        s.proc.terminate()
        s.proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--skip-thirty", action="store_true")
    ap.add_argument("--leak", type=int, default=0, help="iterations of the sampler loop on SmolLM2 (0: skip)")
    ap.add_argument("--batching", type=int, default=0, metavar="K",
                    help="K concurrent sampling and training clients on SmolLM2 against one alone (0: skip)")
    ap.add_argument("--only-batching", action="store_true", help="skip the fairness and thirty-client parts")
    ap.add_argument("--threads", type=int, default=2, help="the server's threads for --batching")
    a = ap.parse_args()
    avx512 = sum("avx512f" in l for l in open("/proc/cpuinfo"))
    print(f"machine: {os.cpu_count()} cores, avx512f lines {avx512}")
    if not a.only_batching:
        fairness(a.bin)
        if not a.skip_thirty:
            thirty(a.bin, a.minutes)
    if a.batching:
        batching(a.bin, a.batching, a.threads)
    if a.leak:
        leak(a.bin, a.leak)


if __name__ == "__main__":
    sys.exit(main())
