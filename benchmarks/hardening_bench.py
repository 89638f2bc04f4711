"""Memory under a burst of huge images, and event-loop latency under big uploads.

``memory``: a server on DIR (build one with ``vision-server make-test-model DIR --preset base``)
gets ``--clients`` concurrent 8000x8000 PNGs (about 0.3 MB each on the wire, 256 MB each in
Pillow's RGBX layout while decoding). Prints the server's RSS before, at its peak and after the
burst, beside the model's size; the peak is also split by whether a batch was running then
(``/v1/status`` polled), and the batches' sizes are reported. ``--model test:tiny`` measures the
decode + queue memory alone (its forward pass is negligible); ``--max-batch-size`` and
``--num-beams`` show how much is the forward pass's activations. ``--request-timeout`` is high by
default so that a slow CPU answers every request (a 504 would free its job early and flatter
the figures).

``latency``: a server on test:tiny gets ``--clients`` clients each sending 4000x3000 JPEGs (about
12 MB of base64 each) in a loop for ``--seconds``, while one probe asks ``GET /prompts`` every
20 ms; prints the probe's p50/p99. ``--source DIR`` runs the server from another checkout (for a
before/after comparison in the same run: ``git worktree add /tmp/before <commit>``).

    python benchmarks/hardening_bench.py memory --model /tmp/base --clients 32 [--max-batch-size 2]
    python benchmarks/hardening_bench.py memory --model test:tiny --clients 32
    python benchmarks/hardening_bench.py latency --clients 32 --seconds 30 [--source /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from PIL import Image, ImageDraw


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace, model: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    command = [sys.executable, "-m", "vision_server", "serve", "--model", model, "--port", str(port)]
    command += ["--preload", "--idle-timeout", "-1", "--cache-dir", args.cache_dir, *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start")


def huge_png(seed: int) -> bytes:
    image = Image.new("RGB", (8000, 8000), (seed * 37 % 255, 120, 200))
    draw = ImageDraw.Draw(image)
    for n in range(20):
        draw.ellipse(
            (n * 300, n * 250, n * 300 + 2000, n * 250 + 1500), fill=(n * 12, 255 - n * 12, seed % 255)
        )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def photo_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rss_parts(pid: int) -> dict[str, int]:
    """RSS split as the kernel counts it: anonymous (heaps, tensors) and file-backed (mapped code
    and weights, which the kernel can drop and read again)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def model_bytes(model: Path) -> int:
    return sum(path.stat().st_size for path in model.glob("*.safetensors"))


async def memory(args: argparse.Namespace) -> None:
    extra = ["--max-new-tokens", str(args.max_new_tokens), "--num-beams", str(args.num_beams)]
    extra += ["--request-timeout", str(args.request_timeout), "--decode-threads", str(args.decode_threads)]
    if args.max_batch_size:
        extra += ["--max-batch-size", str(args.max_batch_size)]
    process, url = start_server(args, args.model, *extra)
    server = psutil.Process(process.pid)
    bodies = [
        json.dumps({"image": base64.b64encode(huge_png(n)).decode(), "prompt": "<CAPTION>"}) for n in range(4)
    ]
    peak = 0
    peaks = {"idle": 0, "running": 0}  # by whether the worker had a batch running when sampled
    running = False
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            rss = server.memory_info().rss
            peak = max(peak, rss)
            phase = "running" if running else "idle"
            peaks[phase] = max(peaks[phase], rss)
            time.sleep(0.02)

    async def watch(session: aiohttp.ClientSession) -> None:
        nonlocal running
        while sampling:
            async with session.get("/v1/status") as response:
                running = (await response.json())["jobs_running"] > 0
            await asyncio.sleep(0.05)

    try:
        async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=1800)) as session:
            async with session.post("/process_image", data=bodies[0]) as response:  # warm-up
                assert response.status == 200, await response.text()
            await asyncio.sleep(2)
            before = server.memory_info().rss
            parts_before = rss_parts(process.pid)
            sampler = threading.Thread(target=sample)
            sampler.start()
            watcher = asyncio.ensure_future(watch(session))
            started = time.monotonic()

            async def one(n: int) -> int:
                async with session.post("/process_image", data=bodies[n % len(bodies)]) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(one(n) for n in range(args.clients)))
            burst = time.monotonic() - started
            sampling = False
            sampler.join()
            await watcher
            await asyncio.sleep(args.settle)
            after = server.memory_info().rss
            parts_after = rss_parts(process.pid)
            async with session.get("/v1/status") as response:
                engine = await response.json()
    finally:
        process.terminate()
        process.wait(60)
    mb = 2**20
    result = {
        "source": args.source or "this checkout",
        "model": args.model,
        "clients": args.clients,
        "server_args": " ".join(extra),
        "statuses": {str(code): statuses.count(code) for code in set(statuses)},
        "batches": engine["batches_run"] - 1,  # less the warm-up's
        "mean_batch": round((engine["jobs_done"] - 1) / max(1, engine["batches_run"] - 1), 1),
        "wire_kb": round(len(bodies[0]) / 1024),
        "model_mb": round(model_bytes(Path(args.model)) / mb),
        "rss_before_mb": round(before / mb),
        "rss_peak_mb": round(peak / mb),
        "rss_peak_no_batch_running_mb": round(peaks["idle"] / mb),
        "rss_peak_batch_running_mb": round(peaks["running"] / mb),
        "rss_after_mb": round(after / mb),
        "peak_over_before_mb": round((peak - before) / mb),
        "after_over_before_mb": round((after - before) / mb),
        "anon_after_over_before_mb": round((parts_after["RssAnon"] - parts_before["RssAnon"]) / mb),
        "file_after_over_before_mb": round((parts_after["RssFile"] - parts_before["RssFile"]) / mb),
        "burst_s": round(burst, 1),
    }
    print(json.dumps(result))


async def latency(args: argparse.Namespace) -> None:
    process, url = start_server(args, "test:tiny", "--max-new-tokens", "4", "--num-beams", "1")
    bodies = [
        json.dumps({"image": base64.b64encode(photo_jpeg(n)).decode(), "prompt": "<CAPTION>"})
        for n in range(4)
    ]
    probes: list[float] = []
    sent = 0
    end = 0.0
    try:
        async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def sender(n: int) -> None:
                nonlocal sent
                while time.monotonic() < end:
                    async with session.post("/process_image", data=bodies[n % len(bodies)]) as response:
                        await response.read()
                        sent += response.status == 200

            async def probe() -> None:
                while time.monotonic() < end:
                    started = time.perf_counter()
                    async with session.get("/prompts") as response:
                        await response.read()
                    probes.append(time.perf_counter() - started)
                    await asyncio.sleep(0.02)

            end = time.monotonic() + args.seconds
            await asyncio.gather(probe(), *(sender(n) for n in range(args.clients)))
    finally:
        process.terminate()
        process.wait(60)
    ordered = sorted(probes)
    result = {
        "source": args.source or "this checkout",
        "clients": args.clients,
        "body_mb": round(len(bodies[0]) / 2**20, 1),
        "captions": sent,
        "img_per_s": round(sent / args.seconds, 2),
        "prompts_probes": len(ordered),
        "prompts_p50_ms": round(statistics.median(ordered) * 1000, 1),
        "prompts_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["memory", "latency"])
    parser.add_argument("--model", help="memory: the model directory (a `base` test model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds after the burst before RSS is read"
    )
    parser.add_argument("--source", help="run the server from this checkout instead")
    memory_options = parser.add_argument_group("memory mode: the server's settings")
    memory_options.add_argument("--max-batch-size", type=int, help="default: the server's (16 on a CPU)")
    memory_options.add_argument("--num-beams", type=int, default=1)
    memory_options.add_argument("--max-new-tokens", type=int, default=4)
    memory_options.add_argument("--decode-threads", type=int, default=4)
    memory_options.add_argument(
        "--request-timeout", type=float, default=3600.0, help="high, so that every request is answered"
    )
    parser.add_argument("--cache-dir", default=tempfile.gettempdir() + "/vision-server-bench-cache")
    args = parser.parse_args()
    asyncio.run(memory(args) if args.mode == "memory" else latency(args))


if __name__ == "__main__":
    main()
