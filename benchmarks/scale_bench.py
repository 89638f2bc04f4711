"""How the three folder tools scale with the number of files: dry runs and resumed runs.

A user who captions tens of thousands of images overnight restarts a stopped run and waits for
the tool to find the few images still without a caption. This builds, for each of ``--counts``,
a tree of that many small images (hard links to a few distinct PNGs, in nested folders of
``--per-folder``, as datasets are laid out) under ``--workdir``, and measures wall time, CPU time
and peak memory of the whole process tree (the tool and every process it starts):

1. ``vision-server caption DIR --dry-run`` and ``vision-client folder DIR --dry-run`` on the
   tree without captions (every image listed as ``caption``), and ``vision-server caption``
   with every image an argument of its own (``vision-server caption data/*/*.png --dry-run``;
   up to ``--file-args-max`` images, as the command line has a limit);
2. the resume case: every image but ``--missing`` has its caption file; the time until each
   tool has captioned the missing ones and exited: ``vision-server caption DIR`` (in-process
   tiny model: its start-up and model load are part of it), ``vision-client folder DIR`` and
   ``clients/vision-caption-folder-images.sh`` (no ``--dry-run`` of its own) against a running
   server whose stand-in captioner answers at once (``vision_server.testing.fake``), so the
   figures are the tools' own cost, not the model's;
3. the dry runs again on the resumed tree (every image but the missing ones listed as ``skip``).

With ``--tty`` the resume runs are made again with stderr on a pseudo-terminal, so the progress
bars (tqdm, the bash script's progress line) are drawn as a user watching the run sees them.

CPU time (user + system of the tool and every process it waited for) is the figure to compare
on a shared machine: other work stretches the wall time, not the CPU time. Memory is the sum of
the processes' PSS (shared pages counted once, so forked children of the bash script do not
count the parent's arrays again), sampled every 50 ms.

Each tool's output is checked (how many captioned / skipped / listed) so a figure never comes
from a run that did something else. Between two counts the table also gives the cost per
1,000 more files: a tool that scales linearly has the same slope at every step.

Prints a table and a JSON line. ``--smoke`` runs steps 1 and 2 on 40 images, and the terminal
runs of the two clients (a test runs it).

    python benchmarks/scale_bench.py --counts 1000,10000,50000
    python benchmarks/scale_bench.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FOLDER_SCRIPT = REPO / "clients" / "vision-caption-folder-images.sh"
LINKS_PER_FILE = 10_000  # ext4 allows 65,000 links to one inode: stay well below it
TASK = "<CAPTION>"
FAKE_SERVER = (
    "import os\n"
    "from vision_server.server import serve\n"
    "from vision_server.settings import load_settings\n"
    "from vision_server.testing.fake import FakeCaptioner\n"
    "serve(load_settings(environ=os.environ), FakeCaptioner(model_id='stand-in'))\n"
)


@dataclass
class Tree:
    root: Path
    images: list[Path]
    missing: list[Path]  # caption files left out in the resume case


def script(name: str) -> list[str]:
    """An installed console script of this interpreter's environment (else ``python -m``)."""
    found = Path(sys.executable).with_name(name)
    if found.exists():
        return [str(found)]
    module = "vision_server" if name == "vision-server" else "vision_server.client.cli"
    return [sys.executable, "-m", module]


def build_tree(root: Path, count: int, per_folder: int, missing: int) -> Tree:
    """``count`` PNGs in ``root/setNN/partNNN/`` folders of ``per_folder`` (ten parts a set):
    hard links to a few distinct tiny images, so a big tree costs inodes, not disk or time."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    store = root.parent / f"{root.name}-originals"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    rng = np.random.default_rng(0)
    originals = []
    for index in range(max(4, -(-count // LINKS_PER_FILE))):
        path = store / f"original{index}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        originals.append(path)
    images = []
    folder = None
    for index in range(count):
        if index % per_folder == 0:
            part = index // per_folder
            folder = root / f"set{part // 10:02d}" / f"part{part:04d}"
            folder.mkdir(parents=True)
        assert folder is not None
        path = folder / f"img{index:06d}.png"
        os.link(originals[index % len(originals)], path)
        images.append(path)
    step = max(1, count // max(1, missing))  # the missing captions spread over the tree
    left_out = [images[index].with_suffix(".txt") for index in range(0, count, step)][:missing]
    return Tree(root, images, left_out)


def add_captions(tree: Tree) -> None:
    """A caption file beside every image but ``tree.missing`` (hard links to a few texts)."""
    store = tree.root.parent / f"{tree.root.name}-originals"
    texts = []
    for index in range(max(1, -(-len(tree.images) // LINKS_PER_FILE))):
        path = store / f"caption{index}.txt"
        path.write_text(f"a small square picture of coloured noise, number {index}", encoding="utf-8")
        texts.append(path)
    leave = set(tree.missing)
    for index, image in enumerate(tree.images):
        target = image.with_suffix(".txt")
        if target not in leave:
            os.link(texts[index % len(texts)], target)


def drop_new_captions(tree: Tree) -> None:
    """Undo a resumed run: the captions it wrote go, so the next tool finds the same tree."""
    for path in tree.missing:
        path.unlink(missing_ok=True)


def measure(
    command: list[str], env: dict[str, str], out: Path, *, tty: bool = False, cwd: Path | None = None
) -> dict[str, Any]:
    """Run ``command`` with stdout and stderr to files (with ``tty``, stderr on a terminal, as
    a user watching the progress bar has it); wall time, CPU time and peak PSS of its process
    tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(out.with_suffix(".out"), "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        terminal = Terminal(stderr) if tty else None
        errors = terminal.child if terminal is not None else stderr
        try:
            process = subprocess.Popen(
                command, env=env, stdout=stdout, stderr=errors, stdin=subprocess.DEVNULL, cwd=cwd
            )
        finally:
            if terminal is not None:
                terminal.started()
        root = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            total = 0
            for member in tree:
                with contextlib.suppress(psutil.Error):  # it just ended
                    total += member.memory_full_info().pss
            peak = max(peak, total)
            time.sleep(0.05)
        wall = time.perf_counter() - started
        if terminal is not None:
            terminal.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_pss_mib": peak / 2**20,
        "rc": process.returncode,
        "stdout": out.with_suffix(".out").read_text(encoding="utf-8", errors="replace"),
        "stderr": out.with_suffix(".err").read_text(encoding="utf-8", errors="replace"),
    }


class Terminal:
    """A pseudo-terminal for a child's stderr, copied to ``sink`` as it comes (a terminal that
    is not read blocks the writer once its buffer is full)."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.parent, self.child = pty.openpty()
        fcntl.ioctl(self.child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.sink = sink
        self.reader = threading.Thread(target=self._copy, daemon=True)

    def started(self) -> None:
        os.close(self.child)  # only the child holds it now: its exit ends the reader
        self.reader.start()

    def _copy(self) -> None:
        while True:
            try:
                data = os.read(self.parent, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            self.sink.write(data)

    def close(self) -> None:
        self.reader.join(30)
        os.close(self.parent)


def expect(condition: bool, what: str, run: dict[str, Any]) -> None:
    if not condition:
        raise SystemExit(f"{what}; rc {run['rc']}\nstderr:\n{run['stderr'][-3000:]}")


def dry_run_lines(run: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in run["stdout"].splitlines():
        word = line.split("\t", 1)[0]
        counts[word] = counts.get(word, 0) + 1
    return counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The real server process with the stand-in captioner: captions come at once."""
    port = free_port()
    server_env = {**env, "VISION_SERVER_HOST": "127.0.0.1", "VISION_SERVER_PORT": str(port)}
    server_env["VISION_SERVER_LOG_LEVEL"] = "warning"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", FAKE_SERVER], env=server_env, stdout=handle, stderr=handle
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not come up within 120 s")


def run_count(count: int, args: argparse.Namespace, env: dict[str, str], url: str) -> dict[str, Any]:
    work = args.workdir
    started = time.perf_counter()
    tree = build_tree(work / f"tree-{count}", count, args.per_folder, min(args.missing, count))
    built_s = time.perf_counter() - started
    root = str(tree.root)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    missing = len(tree.missing)
    options = ["--model", "test:tiny", "--cache-dir", str(work / "cache"), "--task", TASK]
    options += ["--max-new-tokens", "4", "--workers", "1"]
    offline = [*script("vision-server"), "caption", root, *options]
    client = [*script("vision-client"), "--url", url, "folder", root, "--task", TASK]
    bash = ["bash", str(FOLDER_SCRIPT), "--url", url, "--quiet", TASK, "txt", root]
    figures: dict[str, Any] = {"images": count, "missing": missing, "build_s": built_s}

    def dry_runs(state: str, want_caption: int) -> None:
        for name, command in (("caption", [*offline, "--dry-run"]), ("client", [*client, "--dry-run"])):
            if name not in args.tools:
                continue
            run = measure(command, env, logs / f"{name}-dry-{state}-{count}")
            lines = dry_run_lines(run)
            expect(run["rc"] == 0, f"{name} --dry-run ({state}) failed", run)
            expect(
                lines.get("caption", 0) == want_caption and sum(lines.values()) == count,
                f"{name} --dry-run ({state}) listed {lines}, not {want_caption} of {count} to caption",
                run,
            )
            figures[f"{name}_dry_{state}"] = {k: run[k] for k in FIGURES}

    if not args.no_dry_runs:
        dry_runs("fresh", count)
    if "caption" in args.tools and not args.no_dry_runs and count <= args.file_args_max:
        # ``vision-server caption data/*/*.png``: the images as arguments (relative to the
        # tree, so the command line stays short), each an input of its own
        names = [str(path.relative_to(tree.root)) for path in tree.images]
        command = [*script("vision-server"), "caption", *names, *options, "--dry-run"]
        run = measure(command, env, logs / f"files-{count}", cwd=tree.root)
        lines = dry_run_lines(run)
        expect(
            run["rc"] == 0 and lines.get("caption", 0) == count,
            f"caption FILES --dry-run listed {lines}",
            run,
        )
        figures["caption_dry_files"] = {k: run[k] for k in FIGURES}
    add_captions(tree)
    skipped = count - missing
    checks = {
        "caption": (offline, rf"captioned {missing}, skipped {skipped}, failed 0"),
        "client": (client, rf"{missing} captioned, {skipped} skipped, 0 failed of {count} images"),
        "bash": (bash, rf"{count} image\(s\) found: {missing} captioned, {skipped} skipped"),
    }
    for tty in (False, True):
        for name, (command, summary) in checks.items():
            if name not in (args.tty_tools if tty else args.tools):
                continue
            if tty and name == "bash":
                command = [word for word in command if word != "--quiet"]  # its progress line
            label = f"{name}_resume{'_tty' if tty else ''}"
            run = measure(command, env, logs / f"{label}-{count}", tty=tty)
            expect(run["rc"] == 0, f"{label} failed", run)
            expect(re.search(summary, run["stderr"]) is not None, f"{label}: no '{summary}'", run)
            expect(all(path.exists() for path in tree.missing), f"{label} left captions out", run)
            figures[label] = {k: run[k] for k in FIGURES}
            drop_new_captions(tree)
    if not (args.no_dry_runs or args.no_resumed_dry_runs):
        dry_runs("resumed", missing)
    if not args.keep:
        shutil.rmtree(tree.root)
    return figures


FIGURES = ("wall_s", "cpu_s", "peak_pss_mib")
ROWS = (
    ("caption_dry_fresh", "vision-server caption --dry-run, no captions yet"),
    ("client_dry_fresh", "vision-client folder --dry-run, no captions yet"),
    ("caption_dry_files", "vision-server caption FILE... --dry-run"),
    ("caption_resume", "vision-server caption, resume"),
    ("client_resume", "vision-client folder, resume"),
    ("bash_resume", "vision-caption-folder-images.sh, resume"),
    ("caption_resume_tty", "vision-server caption, resume, on a terminal"),
    ("client_resume_tty", "vision-client folder, resume, on a terminal"),
    ("bash_resume_tty", "vision-caption-folder-images.sh, resume, terminal"),
    ("caption_dry_resumed", "vision-server caption --dry-run, resumed tree"),
    ("client_dry_resumed", "vision-client folder --dry-run, resumed tree"),
)


def _cell(figures: dict[str, float]) -> str:
    return f"{figures['wall_s']:>8.2f} s {figures['cpu_s']:>6.2f} s {figures['peak_pss_mib']:>4.0f} MiB"


def print_table(results: list[dict[str, Any]]) -> None:
    counts = [result["images"] for result in results]
    missing = results[-1]["missing"]
    print("per tool: wall time, CPU time (user + system) and peak memory (PSS) of its whole process tree;")
    print(f"resume = every image but {missing} has its caption file; slope = CPU ms per 1,000 more files")
    print(f"{'':<52}" + "".join(f"{count:>24,} img" for count in counts) + "   slope")
    for key, label in ROWS:
        if any(key not in result for result in results):
            continue
        cpus = [result[key]["cpu_s"] for result in results]
        cells = "".join(_cell(result[key]) for result in results)
        slopes = [(cpus[i + 1] - cpus[i]) / (counts[i + 1] - counts[i]) * 1e6 for i in range(len(counts) - 1)]
        print(f"{label:<52}{cells}   " + " ".join(f"{slope:6.1f}" for slope in slopes))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="1000,10000,50000", help="image counts, comma-separated")
    parser.add_argument("--per-folder", type=int, default=500, help="images per leaf folder")
    parser.add_argument("--missing", type=int, default=5, help="images without a caption in the resume case")
    parser.add_argument(
        "--tty", action="store_true", help="the resume runs again with stderr on a terminal (progress bars)"
    )
    parser.add_argument(
        "--tools", default="caption,client,bash", help="which tools, comma-separated (default: all three)"
    )
    parser.add_argument(
        "--file-args-max",
        type=int,
        default=50_000,
        help="largest count for the run with every image as an argument (the command line's limit)",
    )
    parser.add_argument("--no-dry-runs", action="store_true", help="skip steps 1 and 3 (resume runs only)")
    parser.add_argument("--no-resumed-dry-runs", action="store_true", help="skip step 3")
    parser.add_argument(
        "--workdir", type=Path, help="where the trees go (default: a new /tmp/scale-* folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the trees (default: each is deleted)")
    parser.add_argument("--smoke", action="store_true", help="40 images, steps 1 and 2: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.counts, args.per_folder, args.missing, args.no_resumed_dry_runs = "40", 10, 3, True
    args.tools = {name.strip() for name in args.tools.split(",") if name.strip()}
    if not args.tools or args.tools - {"caption", "client", "bash"}:
        parser.error("--tools takes caption, client and bash")
    # --smoke: the terminal runs of the two quick tools (the captioner's start-up takes seconds)
    args.tty_tools = args.tools if args.tty else args.tools & {"client", "bash"} if args.smoke else set()
    counts = sorted({int(text) for text in args.counts.split(",") if text.strip()})
    if not counts or counts[0] < 1 or args.per_folder < 1 or args.missing < 1:
        parser.error("counts, --per-folder and --missing must be 1 or more")
    own_workdir = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("VISION_SERVER_", "VISION_"))
    }
    env.update({"XDG_CONFIG_HOME": str(args.workdir / "config"), "PYTHONUNBUFFERED": "1"})
    server, url = start_server(env, args.workdir / "server.log")
    results = []
    try:
        for count in counts:
            results.append(run_count(count, args, env, url))
            print(f"done: {count} images", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(30)
        if own_workdir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print_table(results)
    print(json.dumps({"per_folder": args.per_folder, "results": results}))


if __name__ == "__main__":
    main()
