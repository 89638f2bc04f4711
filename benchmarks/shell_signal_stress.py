"""Signals at random moments to the bash clients: how many runs hang, exit wrongly or miscount.

bash 5.2 can hang, or exit 2 with "unexpected EOF while looking for matching `)'", when a trapped
signal lands while it runs a command substitution ``$(...)``. This starts ``--runs`` clients
against a small in-process HTTP server that answers at once (a caption, a refused prompt, an
error page, a model name), sends each SIGINT or SIGTERM (to the script alone, or to its whole
process group as Ctrl+C does) after a random delay, and counts:

- hangs: still running ``--hang-after`` seconds after the signal (then killed);
- wrong statuses: anything but the run's own status (the signal came after it ended), 130/143
  (the trap), or death by the signal itself (it came before the trap was set).

    python benchmarks/shell_signal_stress.py --runs 300 [--client /tmp/before/clients/vision-client.sh]

``--folder`` runs the folder script (``clients/vision-caption-folder-images.sh``, or ``--client``)
on a folder of ``--images`` images instead, ``--jobs`` 1 to 4 at a time, the server holding each
caption up to ``--post-delay`` seconds; besides hangs and wrong statuses it counts, for the runs
the signal interrupted, wrong summaries: a "captioned" count other than the caption files on
disk, a "not captioned yet" count other than the images without one, any image counted as
failed, temporary caption files left in the folder, and processes of the run still alive.

    python benchmarks/shell_signal_stress.py --folder --runs 100 --max-delay 1.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

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
    """Answers at once: the client spends its time in its own code, where the signals land.
    (``post_delay``: captions wait up to that many seconds, so a folder run has some in flight.)"""

    post_delay = 0.0

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
            if self.post_delay:
                time.sleep(random.uniform(0, self.post_delay))
            self.reply(200, b'{"result": "  a caption \\n"}')


class Ended(NamedTuple):
    """How a signalled run ended: its process (group) id, exit status and standard error."""

    pid: int
    status: int
    stderr: str


def signalled_run(
    argv: list[str], env: dict[str, str], signum: int, to_group: bool, rng: random.Random,
    args: argparse.Namespace,
) -> Ended | None:  # fmt: skip
    """Start ``argv`` in a session of its own (SIGINT at its default, as a shell starts a job),
    send it ``signum`` after a random delay up to ``--max-delay`` unless it has ended already (to
    its whole group, as Ctrl+C does, or to it alone), and wait; None when it hung for
    ``--hang-after`` seconds (then it is killed)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(rng.uniform(0, args.max_delay))
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if to_group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
    try:
        _, raw = proc.communicate(timeout=args.hang_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return Ended(proc.pid, proc.returncode, raw.decode(errors="replace"))


def one_run(
    client: str, url: str, image: str, tmpdir: str, rng: random.Random, args: argparse.Namespace
) -> str:
    """One client run and one signal; returns its outcome's name."""
    name = rng.choice(list(SCENARIOS))
    argv, normal = SCENARIOS[name]
    signum = rng.choice([signal.SIGINT, signal.SIGTERM])
    to_group = rng.random() < 0.5
    env = {**os.environ, "TMPDIR": tmpdir}
    command = [client, "--url", url, *(a.format(image=image) for a in argv)]
    ended = signalled_run(command, env, signum, to_group, rng, args)
    if ended is None:
        return "hang"
    rc = ended.status
    trapped = 130 if signum == signal.SIGINT else 143
    if rc in (normal, trapped, -signum):
        return {normal: "finished", trapped: "trapped", -signum: "killed-before-trap"}[rc]
    text = ended.stderr.strip().splitlines()
    print(f"wrong status {rc} ({name}, {signum.name}, group={to_group}): {text[-1] if text else ''}")
    return "wrong-status"


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SUMMARY = re.compile(r"image\(s\) found: (\d+) captioned, \d+ skipped \(caption exists\), (\d+) failed")
NOT_YET = re.compile(r"Interrupted: (\d+) image\(s\) not captioned yet")


def one_folder_run(
    script: str, url: str, image: bytes, tmpdir: str, rng: random.Random, args: argparse.Namespace
) -> str:
    """One folder run on a fresh folder and one signal; returns its outcome's name."""
    signum = rng.choice([signal.SIGINT, signal.SIGTERM])
    to_group = rng.random() < 0.75  # Ctrl+C signals the whole group: the case that matters most
    jobs = rng.randint(1, 4)
    folder = Path(tempfile.mkdtemp(prefix="folder.", dir=tmpdir))
    for i in range(args.images):
        (folder / f"img{i:03d}.png").write_bytes(image)
    env = {**os.environ, "TMPDIR": str(Path(tmpdir) / "tmp")}
    command = ["bash", script, "--url", url, "--jobs", str(jobs), "-q", "CAPTION", "txt", str(folder)]
    ended = signalled_run(command, env, signum, to_group, rng, args)
    if ended is None:
        return "hang"
    stderr, rc = ended.stderr, ended.status
    trapped = 130 if signum == signal.SIGINT else 143
    where = f"({signum.name}, group={to_group}, jobs={jobs})"
    for _ in range(50):  # the last processes of the run may take a moment to go
        if not group_alive(ended.pid):
            break
        time.sleep(0.1)
    else:
        print(f"processes left {where}")
        os.killpg(ended.pid, signal.SIGKILL)
        return "processes-left"
    if list(folder.glob(".*.tmp")):
        print(f"temporary caption files left {where}")
        return "temp-files-left"
    if rc == 0:
        return "finished"
    if rc == -signum:
        return "killed-before-trap"
    if rc != trapped:
        lines = stderr.strip().splitlines()
        print(f"wrong status {rc} {where}: {lines[-1] if lines else ''}")
        return "wrong-status"
    written = len(list(folder.glob("*.txt")))
    summary, not_yet = SUMMARY.search(stderr), NOT_YET.search(stderr)
    counts = (int(summary[1]), int(summary[2]), int(not_yet[1])) if summary and not_yet else None
    if counts is None and written == 0 and "interrupted; stopping" in stderr:
        return "trapped-before-the-images-were-listed"  # no summary: nothing was started yet
    if counts != (written, 0, args.images - written):
        print(f"wrong summary {where}: {written} caption files; {counts=} (captioned, failed, not yet)")
        print("    " + "\n    ".join(stderr.strip().splitlines()[-6:]))
        return "wrong-summary"
    return "trapped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-delay", type=float, default=0.15, help="seconds; the signal comes within")
    parser.add_argument("--hang-after", type=float, default=15.0)
    parser.add_argument("--client", help="the script to run (default: the one of this checkout)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--folder", action="store_true", help="run the folder script instead")
    parser.add_argument("--images", type=int, default=12, help="--folder: images per folder")
    parser.add_argument(
        "--post-delay", type=float, default=0.3, help="--folder: seconds a caption takes, at most"
    )
    args = parser.parse_args()
    script = "vision-caption-folder-images.sh" if args.folder else "vision-client.sh"
    args.client = args.client or str(REPO / "clients" / script)

    Handler.post_delay = args.post_delay if args.folder else 0.0
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
        if args.folder:

            def run_one(rng: random.Random) -> str:
                return one_folder_run(args.client, url, PNG, work, rng, args)
        else:

            def run_one(rng: random.Random) -> str:
                return one_run(args.client, url, image, str(tmpdir), rng, args)

        with ThreadPoolExecutor(args.parallel) as pool:
            for outcome in pool.map(run_one, rngs):
                outcomes[outcome] += 1
        left_behind = sorted(path.name for path in tmpdir.iterdir())
        leftovers = len(left_behind)
        if left_behind:
            print("left in TMPDIR: " + " ".join(left_behind))
    httpd.shutdown()
    print(f"client: {args.client}")
    print(f"runs: {args.runs}  " + "  ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    hangs, wrong = outcomes["hang"], outcomes["wrong-status"]
    line = f"hangs: {hangs}  wrong statuses: {wrong}  leftover temp dirs: {leftovers}"
    if args.folder:
        line += f"  wrong summaries: {outcomes['wrong-summary']}"
        left = outcomes["processes-left"] + outcomes["temp-files-left"]
        line += f"  runs with processes or temp captions left: {left}"
    print(line)


if __name__ == "__main__":
    main()
