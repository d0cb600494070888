"""Launch → first prompt and launch → `session` ready for the `hearth` REPL, in a pseudo-terminal.

    python3 bench/repl_start.py [path/to/hearth] [runs]

Each run uses a fresh hearth home, so it includes starting the session server (the `tiny`
preset); the prelude comes from evcxr's cache after the first run (reported apart). The pty
answers the REPL's device-attributes query the way a terminal does (no sixel). Prints one JSON
line with the medians.
"""

import json
import os
import pty
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time

HEARTH = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "release", "hearth")
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 6


def stop_server(home):
    try:
        with open(os.path.join(home, "session.json")) as f:
            pid = json.load(f)["pid"]
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            os.kill(pid, 0)
            time.sleep(0.05)
    except (OSError, ValueError, KeyError):
        pass


def once():
    home = tempfile.mkdtemp(prefix="hearth-bench-repl-")
    env = dict(os.environ, HEARTH_HOME=home, TERM="xterm-256color")
    t0 = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(HEARTH, [HEARTH], env)
    buf, prompt, ready = b"", None, None
    while ready is None and time.monotonic() - t0 < 600:
        r, _, _ = select.select([fd], [], [], 0.5)
        if not r:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if b"\x1b[c" in data:
            os.write(fd, b"\x1b[?62;22c")
        buf += data
        if prompt is None and b"hearth> " in buf:
            prompt = time.monotonic() - t0
        if b"is ready" in buf:
            ready = time.monotonic() - t0
    os.write(fd, b"\x04")  # Ctrl-D
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            if not select.select([fd], [], [], 0.5)[0] or not os.read(fd, 65536):
                pass
        except OSError:
            break
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
    stop_server(home)
    shutil.rmtree(home, ignore_errors=True)
    if prompt is None or ready is None:
        sys.exit("no prompt or no ready message; output:\n" + buf.decode(errors="replace"))
    return prompt, ready


results = [once() for _ in range(RUNS)]
first, rest = results[0], results[1:] or results
print(json.dumps({
    "launch_to_prompt_s_median": round(statistics.median(p for p, _ in rest), 3),
    "launch_to_session_ready_s_median": round(statistics.median(r for _, r in rest), 2),
    "first_run": {"prompt_s": round(first[0], 3), "ready_s": round(first[1], 2)},
    "runs": len(rest),
}))
