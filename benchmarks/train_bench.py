"""``vision-server train`` speed and memory: optimizer steps per second and peak memory.

Each configuration runs in its own process (so its peak memory is its own) on the random-weight
test model of ``--preset`` and ``--images`` 768 px JPEGs with short captions, through the real
training loop (``run_training``). The first ``--warmup`` steps are not timed.

- On the CPU: the ``--preset`` (default ``base``) in fp32; memory is the process's peak RSS.
- With CUDA (or ``--gpu``): ``large`` in bf16 with and without ``--gradient-checkpointing``
  (plus the CPU-preset run on the GPU); memory is ``torch.cuda.max_memory_allocated``.

Prints a table and a JSON line. ``--smoke`` runs the tiny model for a few steps (a test runs it).

    python benchmarks/train_bench.py                       # base preset, CPU
    python benchmarks/train_bench.py --steps 20 --gpu      # on a GPU machine
    python benchmarks/train_bench.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

WORDS = "red cat dog bird tree house car boat sky water grass table window street field".split()


def write_dataset(folder: Path, count: int, size: int) -> Path:
    """``count`` photo-like JPEGs with comma-separated captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for index in range(count):
        image = folder / f"img{index:04d}.jpg"
        if not image.exists():
            pixels = ramp[None, :, None] * rng.random(3, dtype=np.float32) + rng.normal(
                0, 20, (size, size, 3)
            )
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image, quality=90)
            words = rng.choice(WORDS, 8, replace=False)
            image.with_suffix(".txt").write_text(", ".join(words), encoding="utf-8")
    return folder


def one_run(config: dict[str, Any]) -> dict[str, Any]:
    """One training run in this process; the per-step times come from the loop's stop check."""
    import torch

    from vision_server.train.loop import run_training
    from vision_server.train.options import TrainOptions

    marks: list[float] = []

    def mark() -> bool:
        marks.append(time.perf_counter())
        return False

    warmup, steps = config["warmup"], config["steps"]
    options = TrainOptions(
        dataset=Path(config["dataset"]),
        output=Path(config["output"]),
        model=config["model"],
        cache_dir=Path(config["cache_dir"]),
        device=config["device"],
        precision=config["precision"],
        batch_size=config["batch_size"],
        max_steps=warmup + steps + 2,  # the loop asks after every step but the last
        gradient_checkpointing=config["gradient_checkpointing"],
        log_with="none",
        overwrite=True,
    )
    cuda = config["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run_training(options, should_stop=mark, stream=sys.stderr)
    total = time.perf_counter() - started
    timed = marks[warmup : warmup + steps + 1]
    rate = (len(timed) - 1) / (timed[-1] - timed[0])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        **{key: config[key] for key in ("name", "model", "device", "precision", "gradient_checkpointing")},
        "batch_size": config["batch_size"],
        "steps_per_s": round(rate, 4),
        "images_per_s": round(rate * config["batch_size"], 4),
        "seconds_per_step": round(1 / rate, 3),
        "timed_steps": len(timed) - 1,
        "wall_s": round(total, 1),
        "peak_rss_mib": round(peak_rss / 2**20),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }


def run_isolated(config: dict[str, Any]) -> dict[str, Any]:
    """``one_run`` in a fresh interpreter, so peak memory belongs to this configuration alone."""
    command = [sys.executable, __file__, "--one", json.dumps(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{config['name']} failed:\n{result.stderr[-4000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="also the GPU runs (default: when CUDA exists)")
    parser.add_argument("--workdir", type=Path, help="keeps the built models between runs")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 timed steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    if args.smoke:
        args.preset, args.steps, args.warmup = "tiny", 2, 1
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-bench-"))
    cache = workdir / "cache"
    size = 64 if args.preset == "tiny" else 768
    count = (args.warmup + args.steps + 3) * args.batch_size  # one epoch: no checkpoint mid-run
    dataset = write_dataset(workdir / f"data-{size}", count, size)
    common = {
        "dataset": str(dataset), "cache_dir": str(cache), "warmup": args.warmup, "steps": args.steps,
        "batch_size": args.batch_size,
    }  # fmt: skip
    configs = [
        {**common, "name": f"{args.preset} cpu fp32", "model": f"test:{args.preset}", "device": "cpu",
         "precision": "fp32", "gradient_checkpointing": False},
    ]  # fmt: skip
    if (args.gpu or torch.cuda.is_available()) and not args.smoke:
        for checkpointing in (False, True):
            configs.append(
                {**common, "name": f"large cuda bf16{' +gc' if checkpointing else ''}", "model": "test:large",
                 "device": "cuda", "precision": "bf16", "gradient_checkpointing": checkpointing}
            )  # fmt: skip
    results = []
    for config in configs:
        config["output"] = str(workdir / "out" / config["name"].replace(" ", "-"))
        print(f"running {config['name']} ...", file=sys.stderr, flush=True)
        results.append(run_isolated(config))
    header = f"{'configuration':26} {'steps/s':>9} {'s/step':>8} {'img/s':>8}"
    print(f"{header} {'peak RSS MiB':>13} {'peak GPU MiB':>13}")
    for row in results:
        gpu = row["peak_gpu_mib"] if row["peak_gpu_mib"] is not None else "-"
        print(
            f"{row['name']:26} {row['steps_per_s']:>9} {row['seconds_per_step']:>8} {row['images_per_s']:>8} "
            f"{row['peak_rss_mib']:>13} {gpu:>13}"
        )
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps({"machine": machine, "results": results}))


if __name__ == "__main__":
    main()
