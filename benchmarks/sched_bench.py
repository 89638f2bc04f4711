"""Scheduling and lifecycle figures: priority lanes under a saturating bulk run, and the warm tier.

``lanes``: one server (a subprocess, ``--model``, greedy with a fixed caption length so every
batch costs the same) is kept saturated by ``--bulk-clients`` folder-like clients with
``--bulk-concurrency`` requests each in flight, while one interactive client sends a single image
every ``--interval`` seconds for ``--seconds``. Two phases in the same run, same server: the bulk
clients mark themselves ``X-Priority: bulk`` (lanes), then ``interactive`` (everything in one
FIFO lane, as before lanes existed). Prints the interactive latency p50/p95, the mean batch time
(``/metrics``), the ratio p95 / batch time (goal: at most 2 with lanes) and the bulk throughput.

``tier``: the model layer alone (``--preset`` built with random weights, or ``--model DIR``):
load from disk (warm page cache) against a wake from the warm tier (pinned host memory) on a GPU.
On a CPU the tier is skipped by the server, so the load time is what it would save there; the
wake is reported as not applicable.

    python benchmarks/sched_bench.py lanes --seconds 20
    python benchmarks/sched_bench.py tier --preset base
    python benchmarks/sched_bench.py tier --preset large --device cuda --dtype float16

Each prints a table and, last, one JSON line. ``--smoke`` makes either one short (a test runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    tokens = str(args.new_tokens)
    command = [sys.executable, "-m", "vision_server", "serve", "--model", args.model, "--port", str(port)]
    command += ["--preload", "--idle-timeout", "-1", "--cache-dir", args.cache_dir, "--num-beams", "1"]
    command += ["--max-new-tokens", tokens, "--min-new-tokens", tokens, "--request-timeout", "3600"]
    command += ["--max-batch-size", str(args.max_batch_size)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, url
        except OSError:
            if process.poll() is not None:
                raise SystemExit("the server exited at start") from None
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start")


def noise_png(seed: int, size: int = 96) -> str:
    import base64

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def inference_totals(session: aiohttp.ClientSession) -> tuple[float, float]:
    """(sum of batch seconds, number of batches) from /metrics, every served model's together."""
    async with session.get("/metrics") as response:
        text = await response.text()

    def summed(name: str) -> float:
        found = re.findall(
            rf"^vision_server_inference_duration_seconds_{name}(?:{{[^}}]*}})? ([\d.e+-]+)$", text, re.M
        )
        assert found, "no inference metrics"
        return sum(float(value) for value in found)

    return summed("sum"), summed("count")


async def bulk_client(
    session: aiohttp.ClientSession,
    name: str,
    lane: str,
    images: list[str],
    stop: asyncio.Event,
    done: list[int],
) -> None:
    headers = {"X-Priority": lane, "X-Client-Id": name}
    n = 0
    while not stop.is_set():
        body = {"image": images[n % len(images)], "prompt": "<CAPTION>"}
        n += 1
        async with session.post("/process_image", json=body, headers=headers) as response:
            await response.read()
            if response.status == 200:
                done.append(1)
            else:
                await asyncio.sleep(0.2)  # a 503 would mean the bulk lane is full: back off


async def phase(args: argparse.Namespace, url: str, lane: str, images: list[str]) -> dict[str, Any]:
    """One measurement: bulk clients in ``lane`` saturate the server; interactive probes are timed."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        stop, done = asyncio.Event(), list[int]()
        workers = [
            asyncio.create_task(bulk_client(session, f"folder-{c}", lane, images, stop, done))
            for c in range(args.bulk_clients)
            for _ in range(args.bulk_concurrency)
        ]
        await asyncio.sleep(args.warmup)  # the queue fills
        batch_sum, batches = await inference_totals(session)
        started, bulk_before = time.monotonic(), len(done)
        latencies: list[float] = []
        while time.monotonic() - started < args.seconds:
            sent = time.monotonic()
            body = {"image": images[len(latencies) % len(images)], "prompt": "<CAPTION>"}
            async with session.post("/process_image", json=body) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.monotonic() - sent)
            await asyncio.sleep(args.interval)
        elapsed = time.monotonic() - started
        batch_sum2, batches2 = await inference_totals(session)
        bulk_done = len(done) - bulk_before
        stop.set()
        await asyncio.gather(*workers)
    batch_time = (batch_sum2 - batch_sum) / max(1.0, batches2 - batches)
    p50 = statistics.median(latencies)
    p95 = float(np.percentile(latencies, 95))
    return {
        "bulk_lane": lane,
        "probes": len(latencies),
        "p50_s": round(p50, 4),
        "p95_s": round(p95, 4),
        "batch_s": round(batch_time, 4),
        "p95_in_batches": round(p95 / batch_time, 2),
        "bulk_img_s": round(bulk_done / elapsed, 1),
    }


def lanes(args: argparse.Namespace) -> dict[str, Any]:
    images = [noise_png(seed) for seed in range(16)]
    process, url = start_server(args)
    try:
        results = [asyncio.run(phase(args, url, lane, images)) for lane in ("bulk", "interactive")]
    finally:
        process.terminate()
        process.wait(60)
    in_flight = args.bulk_clients * args.bulk_concurrency
    print(
        f"model {args.model}, {args.new_tokens} tokens per caption, batch size {args.max_batch_size}, "
        f"{in_flight} bulk requests in flight, "
        f"one interactive request every {args.interval} s for {args.seconds} s"
    )
    print("| bulk requests sent as | interactive p50 | p95 | mean batch | p95 / batch | bulk img/s |")
    print("|---|---|---|---|---|---|")
    for row, name in zip(results, ("`bulk` (lanes)", "`interactive` (one FIFO lane)"), strict=True):
        print(
            f"| {name} | {row['p50_s']:.3f} s | {row['p95_s']:.3f} s | {row['batch_s']:.3f} s "
            f"| {row['p95_in_batches']:.1f} | {row['bulk_img_s']:.1f} |"
        )
    return {"lanes": results[0], "fifo": results[1]}


def tier(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vision_server.captioner import CaptionItem, GenerationOptions
    from vision_server.florence.captioner import FlorenceCaptioner
    from vision_server.images import fit_image
    from vision_server.testing.tiny_model import build_test_model

    model = Path(args.model_dir) if args.model_dir else Path(args.cache_dir) / f"{args.preset}-native"
    if not args.model_dir and not (model / "config.json").exists():
        started = time.perf_counter()
        build_test_model(model, preset=args.preset)
        print(f"built the {args.preset} model in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    captioner = FlorenceCaptioner(
        str(model), cache_dir=Path(args.cache_dir), device=args.device, dtype=args.dtype
    )
    spec = captioner.pixel_spec
    pixels = np.random.default_rng(0).integers(0, 255, (spec.height, spec.width, 3), dtype=np.uint8)
    item = CaptionItem(
        fit_image(Image.fromarray(pixels), spec), "<CAPTION>", GenerationOptions(8, num_beams=1)
    )
    size = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    captioner.load()  # the first load may convert or fill the page cache; not counted
    reference = captioner.caption([item])[0].text
    loads, wakes, offloads = [], [], []
    for _ in range(args.repeats):
        if captioner.can_offload:
            started = time.perf_counter()
            captioner.offload()
            offloads.append(time.perf_counter() - started)
            started = time.perf_counter()
            captioner.restore()
            wakes.append(time.perf_counter() - started)
            assert captioner.caption([item])[0].text == reference, "a wake changed the captions"
        captioner.unload()
        started = time.perf_counter()
        info = captioner.load()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        loads.append(time.perf_counter() - started)
    captioner.unload()
    result: dict[str, Any] = {
        "model": args.model_dir or args.preset,
        "weights_mb": round(size / 2**20),
        "device": info.device,
        "dtype": info.dtype,
        "reload_s": round(statistics.median(loads), 3),
        "wake_s": round(statistics.median(wakes), 3) if wakes else None,
        "offload_s": round(statistics.median(offloads), 3) if offloads else None,
    }
    wake = f"{result['wake_s']:.3f} s" if wakes else "n/a (CPU: the tier is skipped)"
    offload = f"{result['offload_s']:.3f} s" if offloads else "n/a"
    print("| model | weights | device, dtype | reload (disk, warm cache) | wake (host memory) | offload |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['model']} | {result['weights_mb']} MB | {info.device}, {info.dtype} "
        f"| {result['reload_s']:.3f} s | {wake} | {offload} |"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("lanes", "tier"))
    parser.add_argument("--smoke", action="store_true", help="a short run that checks the script works")
    parser.add_argument("--cache-dir", default=None, help="models and conversions (default: a temp dir)")
    lanes_group = parser.add_argument_group("lanes")
    lanes_group.add_argument("--model", default="test:tiny")
    lanes_group.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    lanes_group.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of bulk load before measuring"
    )
    lanes_group.add_argument("--bulk-clients", type=int, default=4)
    lanes_group.add_argument(
        "--bulk-concurrency", type=int, default=16, help="requests in flight per bulk client"
    )
    lanes_group.add_argument(
        "--interval", type=float, default=0.2, help="seconds between interactive requests"
    )
    lanes_group.add_argument("--new-tokens", type=int, default=20, help="tokens per caption (fixed)")
    lanes_group.add_argument("--max-batch-size", type=int, default=16)
    tier_group = parser.add_argument_group("tier")
    tier_group.add_argument("--preset", choices=("tiny", "base", "large"), default="base")
    tier_group.add_argument("--model-dir", default=None, help="a native model directory instead of --preset")
    tier_group.add_argument("--device", default="auto")
    tier_group.add_argument("--dtype", default="auto")
    tier_group.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.warmup, args.bulk_clients, args.bulk_concurrency = 1.0, 0.5, 2, 4
        args.preset, args.repeats = "tiny", 1
    with tempfile.TemporaryDirectory(prefix="sched-bench-") as scratch:
        args.cache_dir = args.cache_dir or scratch
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        figures = lanes(args) if args.what == "lanes" else tier(args)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
