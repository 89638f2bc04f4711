"""Soak: many requests from concurrent clients, some of which hang up at random, against a real server.

One command starts ``vision-server serve`` (the self-built tiny model by default) as a subprocess,
warms it up, then sends ``--requests`` requests spread over every route family (native, OpenAI
plain and streamed, SillyTavern Extras, multipart ``/caption`` and ``/batch_caption``) from
``--clients`` concurrent clients. About ``--abort-fraction`` of them are abandoned at a random
moment (while uploading, queued, running or answering): the client closes its connection. That
moment falls within ``--abort-window`` seconds, by default the warm-up's median request time, so
that most planned hang-ups land before the reply on a machine of any speed (a fixed window longer
than a request takes on a fast machine is mostly answered first). A few (``--bad-fraction``) carry
a file that is not an image and must get a 4xx.

At the end it checks, and prints as a table and one JSON line:

- no 5xx, neither seen by clients nor counted by the server's own metrics (aborted requests
  included, which no client sees the end of);
- no stuck jobs: ``/v1/status`` reaches queue depth 0 and 0 jobs running, and a new request works;
- resident memory of the server (start after warm-up, middle, end, peak) stays flat: end - start
  under ``--rss-limit-mb``;
- no traceback or ERROR line in the server log.

The exit status is 0 only when every check passes.

    python benchmarks/soak.py                      # 1,000 requests, 16 clients, 10% aborted
    python benchmarks/soak.py --requests 5000 --clients 32 --json-out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

KINDS = ("native", "openai", "openai_stream", "extras", "caption", "batch_caption")
_LISTENING = re.compile(r"listening on (https?://[\w.:\[\]-]+)")
MIB = 1024 * 1024


# --- the server ------------------------------------------------------------------------------------


def server_command(args: argparse.Namespace) -> list[str]:
    script = Path(sys.executable).with_name("vision-server")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "vision_server"]
    return [
        *base,
        "serve",
        "--model", args.model,
        "--cache-dir", str(args.cache_dir),
        "--host", "127.0.0.1",
        "--port", "0",
        "--preload",
        "--idle-timeout", "-1",
        "--num-beams", str(args.num_beams),
        "--max-new-tokens", str(args.max_new_tokens),
        "--min-new-tokens", str(args.max_new_tokens),  # fixed caption length: steady job times
        *args.server_arg,
    ]  # fmt: skip


@contextlib.contextmanager
def running_server(args: argparse.Namespace, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env.setdefault("OMP_NUM_THREADS", str(args.torch_threads))
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_CONFIG_HOME"] = str(log_path.parent / "config")  # no user config file
    with log_path.open("wb") as log:
        process = subprocess.Popen(server_command(args), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            found = _LISTENING.search(log_path.read_text(errors="replace"))
            if found:
                yield process, found.group(1)
                break
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            time.sleep(0.05)
        else:
            raise SystemExit(f"server did not start:\n{log_path.read_text()}")
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# --- requests ----------------------------------------------------------------------------------------


def make_images(count: int, seed: int) -> list[bytes]:
    """Noise images of mixed sizes and formats, so decoding work varies like real uploads."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(24, 640, 2))
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG" if index % 2 else "PNG")
        images.append(buffer.getvalue())
    return images


NOT_AN_IMAGE = b"this is a text file that claims to be an image\n" * 8


@dataclass
class Outcome:
    index: int
    kind: str
    bad: bool
    status: int | None = None  # None: aborted by the client, or a connection error
    aborted: bool = False
    error: str | None = None
    seconds: float = 0.0


async def send(session: aiohttp.ClientSession, url: str, kind: str, image: bytes) -> int:
    """One request of ``kind`` with ``image``; the HTTP status once the whole body is read."""
    text = base64.b64encode(image).decode()
    if kind == "native":
        request = session.post(f"{url}/process_image", json={"image": text, "prompt": "<CAPTION>"})
    elif kind in ("openai", "openai_stream"):
        content = [
            {"type": "text", "text": "Describe this image in detail."},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{text}"}},
        ]
        body = {"model": "soak", "messages": [{"role": "user", "content": content}]}
        request = session.post(f"{url}/v1/chat/completions", json={**body, "stream": kind == "openai_stream"})
    elif kind == "extras":
        request = session.post(f"{url}/api/caption", json={"image": text})
    else:
        form = aiohttp.FormData()
        field_name = "image" if kind == "caption" else "images"
        for number in range(1 if kind == "caption" else 2):
            form.add_field(
                field_name, image, filename=f"soak{number}.bin", content_type="application/octet-stream"
            )
        request = session.post(f"{url}/{kind}", data=form)
    async with request as response:
        await response.read()
        return response.status


async def timed_send(session: aiohttp.ClientSession, url: str, kind: str, image: bytes) -> tuple[int, float]:
    """:func:`send`, and how many seconds it took."""
    started = time.perf_counter()
    status = await send(session, url, kind, image)
    return status, time.perf_counter() - started


@dataclass
class Plan:
    """What each request will be, drawn up front from one seed, so runs are repeatable."""

    kinds: list[str]
    images: list[int]
    bad: list[bool]
    abort_at: list[float | None]  # a fraction of the abort window: the seed fixes which and when

    @classmethod
    def draw(cls, args: argparse.Namespace, image_count: int) -> Plan:
        rng = random.Random(args.seed)
        n = args.requests
        return cls(
            kinds=[rng.choice(KINDS) for _ in range(n)],
            images=[rng.randrange(image_count) for _ in range(n)],
            bad=[rng.random() < args.bad_fraction for _ in range(n)],
            abort_at=[rng.random() if rng.random() < args.abort_fraction else None for _ in range(n)],
        )


@dataclass
class Memory:
    pid: int
    samples: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0

    def rss(self) -> float:
        value = psutil.Process(self.pid).memory_info().rss / MIB
        self.peak = max(self.peak, value)
        return value

    def mark(self, name: str) -> None:
        self.samples[name] = self.rss()

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.rss()
            await asyncio.sleep(0.25)


async def one(
    session: aiohttp.ClientSession, url: str, plan: Plan, index: int, images: list[bytes], window: float
) -> Outcome:
    kind, bad, abort_at = plan.kinds[index], plan.bad[index], plan.abort_at[index]
    abort_after = None if abort_at is None else abort_at * window
    outcome = Outcome(index, kind, bad)
    image = NOT_AN_IMAGE if bad else images[plan.images[index]]
    started = time.perf_counter()
    task = asyncio.create_task(send(session, url, kind, image))
    try:
        if abort_after is None:
            outcome.status = await task
        else:
            done, _ = await asyncio.wait({task}, timeout=abort_after)
            if done:
                outcome.status = task.result()  # answered before the client meant to hang up
            else:
                task.cancel()  # the connection is closed mid-request
                with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                    await task
                outcome.aborted = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - started
    return outcome


async def run_clients(
    session: aiohttp.ClientSession, url: str, plan: Plan, images: list[bytes], args: argparse.Namespace,
    memory: Memory, window: float,
) -> list[Outcome]:  # fmt: skip
    outcomes: list[Outcome] = []
    next_index = 0
    half = args.requests // 2

    async def client() -> None:
        nonlocal next_index
        while next_index < args.requests:
            index = next_index
            next_index += 1
            outcomes.append(await one(session, url, plan, index, images, window))
            if len(outcomes) == half:
                memory.mark("middle")

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return outcomes


# --- checks ---------------------------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        return dict(await response.json())


async def settle(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[dict[str, Any], float]:
    """The engine status once nothing is queued or running (or at the timeout), and how long that took."""
    started = time.perf_counter()
    while True:
        status = await get_json(session, f"{url}/v1/status")
        if status["queue_depth"] == 0 and status["jobs_running"] == 0:
            break
        if time.perf_counter() - started > timeout:
            break
        await asyncio.sleep(0.05)
    return status, time.perf_counter() - started


async def server_statuses(session: aiohttp.ClientSession, url: str) -> Counter[str]:
    """Requests by status code, as the server's own metrics counted them (probes left out)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "vision_server_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and not sample.labels["route"].startswith("ops."):
                counts[sample.labels["status"]] += int(sample.value)
    return counts


def log_problems(log_path: Path) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if "Traceback" in line or " ERROR " in line]


async def soak(args: argparse.Namespace, url: str, pid: int, log_path: Path) -> dict[str, Any]:
    images = make_images(args.images, args.seed)
    plan = Plan.draw(args, len(images))
    memory = Memory(pid)
    memory.mark("before_warmup")
    connector = aiohttp.TCPConnector(limit=args.clients + 4)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm-up at full concurrency, every kind and image: the allocators reach their working
        # size for full batches of large images before the first sample is taken.
        warmup = [(KINDS[n % len(KINDS)], images[n % len(images)]) for n in range(args.warmup)]
        warmup_seconds = []
        for start in range(0, len(warmup), args.clients):
            chunk = warmup[start : start + args.clients]
            answers = await asyncio.gather(*(timed_send(session, url, kind, image) for kind, image in chunk))
            if {status for status, _ in answers} != {200}:
                raise SystemExit(f"warm-up got {[status for status, _ in answers]}")
            warmup_seconds += [seconds for _, seconds in answers]
        window = args.abort_window if args.abort_window is not None else statistics.median(warmup_seconds)
        memory.mark("start")
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(memory.watch(stop_watch))
        started = time.perf_counter()
        outcomes = await run_clients(session, url, plan, images, args, memory, window)
        wall = time.perf_counter() - started
        engine, settle_seconds = await settle(session, url, args.settle_timeout)
        final_status = await send(session, url, "native", images[0])
        health = await get_json(session, f"{url}/health")
        stop_watch.set()
        await watcher
        memory.mark("end")
        by_server = await server_statuses(session, url)

    completed = [o for o in outcomes if o.status is not None]
    good = [o for o in completed if not o.bad]
    latencies = [o.seconds for o in good if o.status == 200]
    client_5xx = [o for o in completed if o.status is not None and o.status >= 500]
    server_5xx = sum(count for status, count in by_server.items() if status.startswith("5"))
    results = {
        "requests": len(outcomes),
        "clients": args.clients,
        "wall_s": round(wall, 2),
        "throughput_req_s": round(len(outcomes) / wall, 1),
        "ok_200": sum(o.status == 200 for o in completed),
        "bad_inputs_4xx": sum(o.bad and o.status is not None and 400 <= o.status < 500 for o in completed),
        "bad_inputs_sent": sum(o.bad for o in outcomes),
        "abort_window_s": round(window, 3),
        "abort_planned": sum(at is not None for at in plan.abort_at),
        "aborted_by_client": sum(o.aborted for o in outcomes),
        "abort_planned_but_answered_first": sum(
            plan.abort_at[o.index] is not None and not o.aborted for o in outcomes
        ),
        "unexpected_status": sorted(
            {f"{o.kind}:{o.status}" for o in completed if (o.status != 200) != o.bad}
        ),
        "connection_errors": [o.error for o in outcomes if o.error][:5],
        "client_5xx": len(client_5xx),
        "server_5xx": server_5xx,
        "server_499": by_server.get("499", 0),
        "server_statuses": dict(sorted(by_server.items())),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "queue_depth_after": engine["queue_depth"],
        "jobs_running_after": engine["jobs_running"],
        "settle_s": round(settle_seconds, 2),
        "request_after_soak": final_status,
        "health_after": health["status"],
        "rss_mib": {name: round(value, 1) for name, value in memory.samples.items()},
        "rss_peak_mib": round(memory.peak, 1),
        "rss_growth_mib": round(memory.samples["end"] - memory.samples["start"], 1),
        "log_problems": log_problems(log_path)[:5],
    }
    results["checks"] = {
        "no_5xx": results["client_5xx"] == 0 and server_5xx == 0,
        "no_stuck_jobs": engine["queue_depth"] == 0 and engine["jobs_running"] == 0,
        "serves_after": final_status == 200 and health["status"] == "ok",
        "expected_statuses": not results["unexpected_status"] and not results["connection_errors"],
        "rss_flat": results["rss_growth_mib"] < args.rss_limit_mb,
        "clean_log": not results["log_problems"],
    }
    results["passed"] = all(results["checks"].values())
    return results


def print_table(results: dict[str, Any]) -> None:
    rss = results["rss_mib"]
    rows = [
        ("requests (clients)", f"{results['requests']} ({results['clients']})"),
        ("wall / throughput", f"{results['wall_s']} s / {results['throughput_req_s']} req/s"),
        ("200 OK", results["ok_200"]),
        ("bad inputs -> 4xx", f"{results['bad_inputs_4xx']} of {results['bad_inputs_sent']}"),
        (
            "aborted by client (planned, window)",
            f"{results['aborted_by_client']} ({results['abort_planned']}, 0..{results['abort_window_s']} s)",
        ),
        ("5xx (client / server)", f"{results['client_5xx']} / {results['server_5xx']}"),
        ("server-side 499 (client gone)", results["server_499"]),
        ("latency p50 / p95 (200s)", f"{results['p50_s']} s / {results['p95_s']} s"),
        ("after: queue / running", f"{results['queue_depth_after']} / {results['jobs_running_after']}"),
        ("settled within", f"{results['settle_s']} s"),
        ("request after soak", results["request_after_soak"]),
        (
            "RSS start / middle / end",
            f"{rss.get('start')} / {rss.get('middle')} / {rss.get('end')} MiB",
        ),
        ("RSS growth / peak", f"{results['rss_growth_mib']} MiB / {results['rss_peak_mib']} MiB"),
    ]
    rows += [(f"check: {name}", "pass" if ok else "FAIL") for name, ok in results["checks"].items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test:tiny")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--abort-fraction", type=float, default=0.10)
    parser.add_argument(
        "--abort-window", type=float, default=None,
        help="aborts happen 0..this many s in (default: the warm-up's median request time)",
    )  # fmt: skip
    parser.add_argument("--bad-fraction", type=float, default=0.03)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=96, help="requests before the start sample")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS unless already set")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--settle-timeout", type=float, default=30)
    parser.add_argument("--rss-limit-mb", type=float, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for serve")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vision-soak-"))
    args.cache_dir = args.cache_dir or workdir / "cache"
    log_path = workdir / "server.log"
    try:
        with running_server(args, log_path) as (process, url):
            results = asyncio.run(soak(args, url, process.pid, log_path))
            process.terminate()
            results["exit_code"] = process.wait(60)
    finally:
        if args.json_out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["checks"]["clean_exit"] = results["exit_code"] == 0
    results["passed"] = all(results["checks"].values())
    print_table(results)
    print(json.dumps(results))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"server log kept in {log_path}", file=sys.stderr)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
