"""Signals at random moments to clients/vision-client.sh: how many runs hang or exit wrongly.

bash 5.2 can hang, or exit 2 with "unexpected EOF while looking for matching `)'", when a trapped
signal lands while it runs a command substitution ``$(...)``. This starts ``--runs`` clients
against a small in-process HTTP server that answers at once (a caption, a refused prompt, an
error page, a model name), sends each SIGINT or SIGTERM (to the script alone, or to its whole
process group as Ctrl+C does) after a random delay, and counts:

- hangs: still running ``--hang-after`` seconds after the signal (then killed);
- wrong statuses: anything but the run's own status (the signal came after it ended), 130/143
  (the trap), or death by the signal itself (it came before the trap was set).

    python benchmarks/shell_signal_stress.py --runs 300 [--client /tmp/before/clients/vision-client.sh]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000005000157a0ad"
    "0000000049454e44ae426082"
)

# (arguments after the URL, the status of a run that no signal interrupts)
SCENARIOS: dict[str, tuple[list[str], int]] = {
    "caption": (["CAPTION", "{image}"], 0),
    "bad-prompt": (["BAD", "{image}"], 7),
    "error-page": (["ERROR", "{image}"], 1),
    "model": (["model"], 0),
    "prompts": (["prompts"], 0),
}


class Handler(BaseHTTPRequestHandler):
    """Answers at once: the client spends its time in its own code, where the signals land."""

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client was stopped mid-answer: the point of this
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/model":
            self.reply(200, b'"stand-in-model"')
        else:
            self.reply(200, json.dumps(["<CAPTION>", "<DETAILED_CAPTION>"]).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        prompt = json.loads(body)["prompt"]
        if prompt == "<BAD>":
            self.reply(400, b'{"detail": "Invalid prompt: <BAD>"}')
        elif prompt == "<ERROR>":
            self.reply(500, b"<html><body>Internal error</body></html>\n", "text/html")
        else:
            self.reply(200, b'{"result": "  a caption \\n"}')


def one_run(
    client: str, url: str, image: str, tmpdir: str, rng: random.Random, args: argparse.Namespace
) -> str:
    """One client run and one signal; returns its outcome's name."""
    name = rng.choice(list(SCENARIOS))
    argv, normal = SCENARIOS[name]
    signum = rng.choice([signal.SIGINT, signal.SIGTERM])
    to_group = rng.random() < 0.5
    env = {**os.environ, "TMPDIR": tmpdir}
    proc = subprocess.Popen(
        [client, "--url", url, *(a.format(image=image) for a in argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(rng.uniform(0, args.max_delay))
    ended_before = proc.poll() is not None
    if not ended_before:
        try:
            if to_group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
        except ProcessLookupError:
            pass
    try:
        _, stderr = proc.communicate(timeout=args.hang_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hang"
    rc = proc.returncode
    trapped = 130 if signum == signal.SIGINT else 143
    if rc in (normal, trapped, -signum):
        return {normal: "finished", trapped: "trapped", -signum: "killed-before-trap"}[rc]
    text = stderr.decode(errors="replace").strip().splitlines()
    print(f"wrong status {rc} ({name}, {signum.name}, group={to_group}): {text[-1] if text else ''}")
    return "wrong-status"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-delay", type=float, default=0.15, help="seconds; the signal comes within")
    parser.add_argument("--hang-after", type=float, default=15.0)
    parser.add_argument("--client", default=str(REPO / "clients" / "vision-client.sh"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    outcomes: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as work:
        image = str(Path(work) / "pixel.png")
        Path(image).write_bytes(PNG)
        tmpdir = Path(work) / "tmp"
        tmpdir.mkdir()
        rngs = [random.Random(args.seed * 100003 + i) for i in range(args.runs)]
        with ThreadPoolExecutor(args.parallel) as pool:
            for outcome in pool.map(lambda r: one_run(args.client, url, image, str(tmpdir), r, args), rngs):
                outcomes[outcome] += 1
        leftovers = len(list(tmpdir.iterdir()))
    httpd.shutdown()
    print(f"client: {args.client}")
    print(f"runs: {args.runs}  " + "  ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    hangs, wrong = outcomes["hang"], outcomes["wrong-status"]
    print(f"hangs: {hangs}  wrong statuses: {wrong}  leftover temp dirs: {leftovers}")


if __name__ == "__main__":
    main()
