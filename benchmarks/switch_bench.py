"""What switching models costs: two models alternated request by request, in one server.

One server (a subprocess) serves two Florence-2 models built with random weights from the same
``--preset`` (different seeds, so they really are two models; or ``--model-a``/``--model-b``
directories), greedy with a fixed caption length, so every request costs the same. One client
sends ``--requests`` images one at a time, alternating a, b, a, b ... through the native API's
``model`` field, twice over:

- **fits one**: ``--memory-budget`` holds one model but not both, so every request must unload
  the other model and load its own: the switch cost;
- **fits both**: the budget holds both, so after the first two loads every request is a plain
  caption.

The first two requests of each phase (the cold loads) are left out. Prints the per-request
latency of each phase, the loads and evictions the server counted (``/metrics``), and the switch
cost (mean latency with one model's room minus with both), then one JSON line.

    python benchmarks/switch_bench.py --preset base --requests 20
    python benchmarks/switch_bench.py --preset large --device cuda --dtype float16

``--smoke`` runs it small and quick on the tiny preset (a test runs it).
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


def model_dirs(args: argparse.Namespace, root: Path) -> tuple[str, str]:
    """The two model directories: given, or built from the preset with two seeds."""
    if args.model_a and args.model_b:
        return args.model_a, args.model_b
    from vision_server.testing.tiny_model import build_test_model

    built = []
    for seed in (0, 1):
        started = time.perf_counter()
        built.append(str(build_test_model(root / f"model-{seed}", preset=args.preset, seed=seed)))
        print(f"built {args.preset} model {seed} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return built[0], built[1]


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}")
            try:
                async with session.get(f"{url}/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready")


def start_server(args: argparse.Namespace, dirs: tuple[str, str], budget: int, log: Path) -> tuple[Any, str]:
    port = free_port()
    tokens = str(args.new_tokens)
    command = [sys.executable, "-m", "vision_server", "serve", "--port", str(port)]
    command += ["--model", f"a={dirs[0]}", "--model", f"b={dirs[1]}", "--memory-budget", str(budget)]
    command += ["--idle-timeout", "-1", "--cache-dir", args.cache_dir, "--num-beams", "1"]
    command += ["--max-new-tokens", tokens, "--min-new-tokens", tokens, "--request-timeout", "3600"]
    command += ["--device", args.device, "--dtype", args.dtype, "--log-file", str(log)]
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def png(seed: int) -> str:
    import base64

    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def counter(metrics: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples whose labels include ``labels``."""
    total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? ([0-9.e+-]+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


async def phase(url: str, requests: int) -> dict[str, Any]:
    """Alternate a, b, a, b ...; latencies of all but the two cold loads, and the server's counts."""
    images = [png(index) for index in range(requests + 2)]
    latencies = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for index, image in enumerate(images):
            body = {"image": image, "prompt": "<CAPTION>", "model": "ab"[index % 2]}
            started = time.perf_counter()
            async with session.post(f"{url}/process_image", json=body) as response:
                text = await response.text()
                if response.status != 200:
                    raise SystemExit(f"request {index} failed with {response.status}: {text}")
            if index >= 2:
                latencies.append(time.perf_counter() - started)
        async with session.get(f"{url}/metrics") as response:
            metrics = await response.text()
        async with session.get(f"{url}/v1/status") as response:
            status = await response.json()
    return {
        "mean_s": statistics.fmean(latencies),
        "p50_s": statistics.median(latencies),
        "max_s": max(latencies),
        "loads": int(counter(metrics, "vision_server_model_loads_total", outcome="ok")),
        "evictions": int(counter(metrics, "vision_server_model_unloads_total", reason="evicted")),
        "model_bytes": [model["memory_bytes"] for model in status["models"]],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="switch-bench-") as tmp:
        root = Path(tmp)
        dirs = model_dirs(args, root)
        sizes = model_bytes(args, dirs)
        budgets = {"fits one": int(max(sizes) * 1.5), "fits both": int(sum(sizes) * 1.2)}
        results: dict[str, Any] = {"preset": args.preset, "device": args.device, "model_bytes": sizes}
        for label, budget in budgets.items():
            process, url = start_server(args, dirs, budget, root / f"{label}.log")
            try:
                await wait_ready(url, process)
                results[label] = {"budget": budget, **await phase(url, args.requests)}
            finally:
                process.terminate()
                process.wait(60)
        one, both = results["fits one"], results["fits both"]
        results["switch_cost_s"] = one["mean_s"] - both["mean_s"]
        return results


def model_bytes(args: argparse.Namespace, dirs: tuple[str, str]) -> list[int]:
    """Each model's weight bytes as the server will count them (its captioner's estimate)."""
    from vision_server.florence.captioner import FlorenceCaptioner

    sizes = []
    for directory in dirs:
        captioner = FlorenceCaptioner(
            directory, cache_dir=Path(args.cache_dir), device=args.device, dtype=args.dtype
        )
        sizes.append(sum(captioner.memory_parts().values()))
    if not all(sizes):
        raise SystemExit(f"could not size the models from their files ({sizes}); give local directories")
    return sizes


def report(results: dict[str, Any]) -> None:
    print(
        f"\nswitch cost, two {results['preset']} models alternated request by request ({results['device']})"
    )
    print(f"model weights: {', '.join(f'{size / 2**20:.1f} MiB' for size in results['model_bytes'])}")
    print(f"{'budget':<22} {'mean':>9} {'p50':>9} {'max':>9} {'loads':>6} {'evictions':>9}")
    for label in ("fits one", "fits both"):
        row = results[label]
        budget = f"{label} ({row['budget'] / 2**20:.1f} MiB)"
        print(
            f"{budget:<22} {row['mean_s']:>8.3f}s {row['p50_s']:>8.3f}s {row['max_s']:>8.3f}s "
            f"{row['loads']:>6} {row['evictions']:>9}"
        )
    print(f"switch cost per request: {results['switch_cost_s']:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="base", choices=("tiny", "base", "large"))
    parser.add_argument("--model-a", help="first model directory (instead of building one)")
    parser.add_argument("--model-b", help="second model directory")
    parser.add_argument(
        "--requests", type=int, default=20, help="timed requests per phase (after 2 cold ones)"
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="fixed caption length in tokens")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "vision-server-bench-cache"))
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="OMP_NUM_THREADS for the server (0: leave it as it is)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 4 requests: a quick self-check")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.requests, args.new_tokens = "tiny", 4, 4
        args.torch_threads = args.torch_threads or 1  # a crowded test machine: no thread spinning
    results = asyncio.run(run(args))
    report(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
