"""HTTP throughput and latency of a vision-server, next to direct in-process caption() calls.

One command: without ``--url`` it starts ``vision-server serve`` itself on a free port, sends
``--requests`` captions from ``--clients`` concurrent clients, then captions the same images
in-process with the same model, in batches of the server's observed mean batch size, so the
HTTP/queue overhead ratio is measured in the same run. Prints a table and a JSON line.

    python benchmarks/serve_bench.py --model test:tiny --clients 32 --requests 256
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
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image


def make_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "vision_server",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--idle-timeout",
        "-1",
        "--max-queue",
        str(max(256, args.requests)),
        *args.server_arg,
    ]
    env = {**os.environ, "VISION_SERVER_LOG_LEVEL": "warning"}
    return subprocess.Popen(command, env=env), f"http://127.0.0.1:{port}"


async def wait_until_up(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/prompts") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server at {url} did not come up within {timeout:.0f} s")


async def status(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/v1/status") as response:
        return await response.json()


async def run_http(url: str, images: list[bytes], args: argparse.Namespace) -> dict:
    payloads = [base64.b64encode(image).decode() for image in images]
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(args.requests):
        queue.put_nowait(index)
    timeout = aiohttp.ClientTimeout(total=None)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            body = {"image": payloads[index % len(payloads)], "prompt": args.task}
            started = time.perf_counter()
            async with session.post(f"{url}/process_image", json=body) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"request failed: {response.status} {await response.text()}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # warm-up: load the model and touch every code path once
        body = {"image": payloads[0], "prompt": args.task}
        async with session.post(f"{url}/process_image", json=body) as response:
            await response.read()
        before = await status(session, url)
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(args.clients)))
        wall = time.perf_counter() - started
        after = await status(session, url)
    batches = after["batches_run"] - before["batches_run"]
    jobs = after["jobs_done"] - before["jobs_done"]
    return {
        "throughput_img_s": args.requests / wall,
        "wall_s": wall,
        "p50_s": statistics.median(latencies),
        "p95_s": float(np.percentile(latencies, 95)),
        "mean_batch_size": jobs / batches if batches else 0.0,
        "device": after.get("device"),
        "dtype": after.get("dtype"),
    }


def run_direct(images: list[bytes], args: argparse.Namespace, batch_size: int) -> dict:
    """The same captions through ``FlorenceCaptioner.caption`` with no HTTP, queue or asyncio."""
    from vision_server.captioner import CaptionItem, GenerationOptions
    from vision_server.florence.captioner import FlorenceCaptioner
    from vision_server.images import open_image
    from vision_server.settings import Settings

    settings = Settings(model=args.model)
    captioner = FlorenceCaptioner.from_settings(settings)
    captioner.load()
    options = GenerationOptions(max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams)
    task = "<" + args.task.strip("<>").upper() + ">"
    items = [
        CaptionItem(open_image(images[i % len(images)], max_pixels=10**9), task, options)
        for i in range(args.requests)
    ]
    captioner.caption(items[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        captioner.caption(items[start : start + batch_size])
    wall = time.perf_counter() - started
    captioner.unload()
    return {"throughput_img_s": args.requests / wall, "wall_s": wall, "batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server; default: start one with --model")
    parser.add_argument("--model", default="test:tiny", help="model to serve and to run in-process")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--task", default="<CAPTION>")
    parser.add_argument("--no-direct", action="store_true", help="skip the in-process comparison")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra 'vision-server serve' argument"
    )
    args = parser.parse_args()

    images = make_images(min(args.requests, 64), args.image_size)
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args)
    try:
        asyncio.run(wait_until_up(url))
        http = asyncio.run(run_http(url, images, args))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=120)
    direct = None
    if not args.no_direct:
        direct = run_direct(images, args, max(1, round(http["mean_batch_size"])))
    report(args, http, direct)


def report(args: argparse.Namespace, http: dict, direct: dict | None) -> None:
    print(
        f"model {args.model}  clients {args.clients}  requests {args.requests}  task {args.task}  "
        f"image {args.image_size}px  device {http['device']} {http['dtype']}"
    )
    print(f"{'path':<28}{'img/s':>10}{'p50 s':>10}{'p95 s':>10}{'batch':>8}")
    print(
        f"{'HTTP (vision-server)':<28}{http['throughput_img_s']:>10.2f}{http['p50_s']:>10.3f}"
        f"{http['p95_s']:>10.3f}{http['mean_batch_size']:>8.2f}"
    )
    result = {"model": args.model, "clients": args.clients, "requests": args.requests, "http": http}
    if direct is not None:
        print(
            f"{'direct caption() calls':<28}{direct['throughput_img_s']:>10.2f}{'':>10}{'':>10}"
            f"{direct['batch_size']:>8d}"
        )
        ratio = http["throughput_img_s"] / direct["throughput_img_s"]
        print(f"server / direct throughput: {ratio:.2f}")
        result["direct"] = direct
        result["server_over_direct"] = ratio
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
