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
import logging
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
    command = [sys.executable, "-m", "vision_server", "serve", "--model", args.model, "--port", str(port)]
    command += ["--idle-timeout", "-1", "--max-queue", str(max(256, args.requests))]
    command += ["--min-new-tokens", str(args.min_new_tokens), "--max-new-tokens", str(args.max_new_tokens)]
    if args.num_beams is not None:
        command += ["--num-beams", str(args.num_beams)]
    if args.cache_dir is not None:
        command += ["--cache-dir", str(args.cache_dir)]
    if args.compile:
        command.append("--compile")
    command += args.server_arg
    # Quiet by default; VISION_SERVER_LOG_LEVEL=info shows load and compile times (gpu_check does).
    env = {**os.environ, "VISION_SERVER_LOG_LEVEL": os.environ.get("VISION_SERVER_LOG_LEVEL", "warning")}
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
    singles: dict = {}
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if args.single_requests:
            singles = await run_singles(session, url, payloads, args)
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
        **singles,
    }


async def run_singles(
    session: aiohttp.ClientSession, url: str, payloads: list[str], args: argparse.Namespace
) -> dict:
    """The first request, the cold start, then warm single-request latency (one request at a time).

    ``first_request_s`` is the first request's round trip when the model was not loaded: load (and
    compile, with --compile) plus one caption, plus whatever the server imports on first use.
    With ``--cold-start`` the model is then unloaded (the admin route; loopback needs no key) and
    the next request's round trip is the cold start: imports done, weights in the page cache.
    """

    async def one(index: int) -> float:
        body = {"image": payloads[index % len(payloads)], "prompt": args.task}
        started = time.perf_counter()
        async with session.post(f"{url}/process_image", json=body) as response:
            await response.read()
            if response.status != 200:
                raise SystemExit(f"request failed: {response.status} {await response.text()}")
        return time.perf_counter() - started

    result: dict = {"first_request_s": None, "cold_start_s": None}
    state = (await status(session, url)).get("state")
    first = await one(0)
    if state == "unloaded":
        result["first_request_s"] = first
    if args.cold_start:
        async with session.post(f"{url}/v1/model/unload") as response:
            if response.status != 200:
                raise SystemExit(f"unload failed: {response.status} {await response.text()}")
        if (await status(session, url)).get("state") != "unloaded":
            raise SystemExit("the model did not unload")
        result["cold_start_s"] = await one(1)
    runs = [await one(index + 2) for index in range(args.single_requests)]
    result["single_request_s"] = statistics.median(runs)
    result["single_request_runs"] = runs
    return result


def run_in_process(images: list[bytes], args: argparse.Namespace, batch_size: int) -> dict:
    """Three in-process baselines on the same images, one model load:

    - ``reference``: the florence2-visionapi design (one image at a time, transformers' processor,
      generate, decode) -- what the daemon replaces;
    - ``direct``: ``FlorenceCaptioner.caption`` at the server's mean batch size (no HTTP, no queue);
    - ``raw``: bare ``model.generate`` on ready tensors at that batch size (the ceiling).
    """
    import torch

    from vision_server.captioner import CaptionItem
    from vision_server.florence.captioner import FlorenceCaptioner
    from vision_server.images import open_image, prepare_image
    from vision_server.settings import Settings
    from vision_server.torch_captioner import generate_kwargs

    overrides: dict = {"num_beams": args.num_beams} if args.num_beams is not None else {}
    if args.cache_dir is not None:
        overrides["cache_dir"] = args.cache_dir
    for flag in args.server_arg:  # the server's device and dtype apply in-process too
        name, _, value = flag.removeprefix("--").partition("=")
        if name in ("device", "dtype") and value:
            overrides[name] = value
    settings = Settings(
        model=args.model,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        **overrides,
    )
    options = settings.generation_defaults()
    captioner = FlorenceCaptioner.from_settings(settings)
    if args.compile:
        # Compile only the one batch size timed here (each size costs 10-25 s); the reference
        # design below runs uncompiled, as the reference server does.
        captioner.compile = True
        captioner.compile_buckets = (batch_size,)
    captioner.load()
    task = "<" + args.task.strip("<>").upper() + ">"
    pictures = [open_image(images[i % len(images)], max_pixels=10**9) for i in range(args.requests)]
    prepared = [
        prepare_image(images[i % len(images)], captioner.pixel_spec, max_pixels=10**9)
        for i in range(args.requests)
    ]
    items = [CaptionItem(image, task, options) for image in prepared]
    loaded = captioner._loaded
    assert loaded is not None

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def reference(picture: Image.Image) -> None:
        inputs = loaded.processor(text=task, images=picture, return_tensors="pt").to(loaded.device)
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"].to(loaded.dtype),
                **generate_kwargs(options),
            )
        text = loaded.processor.batch_decode(out, skip_special_tokens=False)[0]
        loaded.processor.post_process_generation(text, task=task, image_size=picture.size)

    results: dict = {}
    count = min(args.reference_requests, len(pictures))
    reference(pictures[0])
    sync()
    started = time.perf_counter()
    for picture in pictures[:count]:
        reference(picture)
    sync()
    results["reference"] = {"throughput_img_s": count / (time.perf_counter() - started), "batch_size": 1}

    captioner.caption(items[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        captioner.caption(items[start : start + batch_size])
    sync()
    results["direct"] = {
        "throughput_img_s": len(items) / (time.perf_counter() - started),
        "batch_size": batch_size,
    }

    plan = loaded.plan  # compiled: the same padded prompt length and static cache as caption()
    rows = plan.pad(items[:batch_size]) if plan else items[:batch_size]
    ready = captioner._prepare(loaded, rows, plan.prompt_length if plan else None)
    static = {"cache_implementation": "static"} if plan else {}
    with torch.inference_mode():
        loaded.model.generate(**ready, **generate_kwargs(options), **static)
        sync()
        rounds = max(1, len(items) // batch_size)
        started = time.perf_counter()
        for _ in range(rounds):
            loaded.model.generate(**ready, **generate_kwargs(options), **static)
        sync()
    elapsed = time.perf_counter() - started
    results["raw"] = {"throughput_img_s": rounds * len(rows) / elapsed, "batch_size": len(rows)}
    results["compiled"] = plan is not None
    captioner.unload()
    return results


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
    parser.add_argument("--no-direct", action="store_true", help="skip the in-process comparisons")
    parser.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        help="force at least this many tokens (random-weight models stop at once otherwise)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--reference-requests",
        type=int,
        default=32,
        help="images for the one-at-a-time reference design (it is slow)",
    )
    parser.add_argument(
        "--num-beams", type=int, help="beams, for the server and in-process (default: the server's)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="model cache (built test models), for the server and in-process"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="serve with --compile; the in-process direct and raw runs compile their batch size too",
    )
    parser.add_argument(
        "--single-requests",
        type=int,
        default=0,
        help="first the cold start (first request, model not loaded), then this many requests one "
        "at a time: the warm single-request latency",
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="with --single-requests: unload the model after the first request and time the next "
        "(load + one caption, imports done, weights in the page cache)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra 'vision-server serve' argument (--device=X and --dtype=X apply in-process too)",
    )
    args = parser.parse_args()
    log_level = os.environ.get("VISION_SERVER_LOG_LEVEL", "warning").upper()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    images = make_images(min(args.requests, 64), args.image_size)
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args)
    try:
        asyncio.run(wait_until_up(url))
        http = asyncio.run(run_http(url, images, args))
        http["gpu_mib"] = gpu_peak(url)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=120)
    direct = None
    if not args.no_direct:
        direct = run_in_process(images, args, max(1, round(http["mean_batch_size"])))
    report(args, http, direct)


def gpu_peak(url: str) -> float | None:
    """GPU memory in use as the server reports it on /health (MiB), when it has a GPU."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            usage = json.loads(response.read()).get("memory_usage") or {}
    except OSError:
        return None
    used = usage.get("gpu_memory_used")
    return used / 2**20 if used else None


def report(args: argparse.Namespace, http: dict, baselines: dict | None) -> None:
    print(
        f"model {args.model}  clients {args.clients}  requests {args.requests}  task {args.task}  "
        f"image {args.image_size}px  min/max new tokens {args.min_new_tokens}/{args.max_new_tokens}  "
        f"device {http['device']} {http['dtype']}"
    )
    print(f"{'path':<34}{'img/s':>10}{'p50 s':>10}{'p95 s':>10}{'batch':>8}")
    print(
        f"{'HTTP (vision-server)':<34}{http['throughput_img_s']:>10.2f}{http['p50_s']:>10.3f}"
        f"{http['p95_s']:>10.3f}{http['mean_batch_size']:>8.2f}"
    )
    if http.get("single_request_s") is not None:
        first, cold = http.get("first_request_s"), http.get("cold_start_s")
        print(
            f"first request (model not loaded): {'-' if first is None else f'{first:.3f} s'}   "
            f"cold start after an unload: {'-' if cold is None else f'{cold:.3f} s'}   "
            f"warm single request: {http['single_request_s']:.3f} s (median of {args.single_requests})"
        )
    if http.get("gpu_mib"):
        print(f"server GPU memory after the run: {http['gpu_mib']:.0f} MiB")
    result = {
        "model": args.model,
        "clients": args.clients,
        "requests": args.requests,
        "num_beams": args.num_beams,
        "compile": args.compile,
        "http": http,
    }
    if baselines is not None:
        names = {
            "reference": "reference design (b1, in-process)",
            "direct": "direct caption() calls",
            "raw": "raw generate (ready tensors)",
        }
        for key, label in names.items():
            row = baselines[key]
            print(f"{label:<34}{row['throughput_img_s']:>10.2f}{'':>10}{'':>10}{row['batch_size']:>8d}")
        for key in ("reference", "direct", "raw"):
            ratio = http["throughput_img_s"] / baselines[key]["throughput_img_s"]
            print(f"server / {key}: {ratio:.2f}x")
            result[f"server_over_{key}"] = ratio
        result["baselines"] = baselines
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
