"""``vision-server caption`` end to end, next to the model alone, on the same machine in one run.

1. Builds the random-weight test model (``--preset``) and a folder of ``--images`` 768 px JPEGs.
2. Runs ``vision-server caption FOLDER --jsonl`` (fixed ``--new-tokens`` captions, greedy) and
   measures its steady rate from the moment the first rows appear to the last one (so model
   load and Ray start-up are not counted; they are printed apart as the time to the first row).
3. Times the model alone: ``FlorenceCaptioner.caption()`` on ready, preprocessed inputs of the
   same images at the same batch size, in this process. Prints the ratio end-to-end / model.
4. The same command with ``--ray`` (an embedded local Ray runtime) and its ratio to step 2.
5. Peak RSS of the whole process tree of ``caption`` (the command and its decoding processes)
   on ``--small-images`` small JPEGs and on ``--large-images`` 4000x3000 JPEGs, each also at a
   quarter of the count: memory must not grow with the count. These runs use ``--rss-preset``
   (default tiny: the pipeline's memory is the question, not the model's speed).

Prints a table and a JSON line. ``--smoke`` runs everything small (a test runs it).

    python benchmarks/caption_bench.py --preset base --images 24 --batch-size 4
    python benchmarks/caption_bench.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

TASK = "<MORE_DETAILED_CAPTION>"


def command() -> list[str]:
    script = Path(sys.executable).with_name("vision-server")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vision_server"]


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients plus noise; a pure-noise JPEG is unrealistically big)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    paths = []
    base = None
    for index in range(count):
        path = folder / f"img{index:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        if base is None or width * height < 4_000_000 or index < 4:
            colour = rng.uniform(0, 255, size=(1, 1, 3)).astype(np.float32)
            noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
            base = np.clip(colour * ramp + (255 - colour) * (1 - ramp) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(base).save(path, "JPEG", quality=90)
        else:  # large images: a few distinct ones, then copies (decoding each still costs the same)
            shutil.copyfile(paths[index % 4], path)
    return paths


class RowClock:
    """Polls a JSONL output and notes its bursts of rows: rows that came in polls one after
    another are one burst (a batch, or a block of rows that Ray hands back at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bursts: list[tuple[float, int]] = []  # (when the burst ended, rows by then)
        self.first_row_at: float | None = None
        self._file: BinaryIO | None = None
        self._rows = 0
        self._quiet = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> RowClock:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._count()
        if self._file is not None:
            self._file.close()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):  # a tiny model's batch can take under 20 ms
            self._count()

    def _count(self) -> None:
        """Counts the newlines added since the last look (reading only the new bytes keeps a
        5 ms poll cheap next to the run it measures)."""
        if self._file is None:
            try:
                self._file = self.path.open("rb")
            except FileNotFoundError:
                return
        added = self._file.read().count(b"\n")
        if not added:
            self._quiet = True
            return
        now = time.perf_counter()
        self._rows += added
        if self.first_row_at is None:
            self.first_row_at = now
        if self._quiet:
            self.bursts.append((now, self._rows))
        else:
            self.bursts[-1] = (now, self._rows)
        self._quiet = False

    def steady_rate(self) -> float | None:
        """Images per second after the first burst, to the end of the last (None: fewer than
        three bursts, too few to tell a rate from start-up and batching)."""
        if len(self.bursts) < 3:
            return None
        (first_t, first_n), (last_t, last_n) = self.bursts[0], self.bursts[-1]
        return (last_n - first_n) / (last_t - first_t)

    def first_row_s(self) -> float | None:
        return self.first_row_at - self.started if self.first_row_at is not None else None


def run_caption(args: list[str], env: dict[str, str], jsonl: Path, log: Path) -> dict[str, Any]:
    jsonl.unlink(missing_ok=True)
    started = time.perf_counter()
    with RowClock(jsonl) as clock, log.open("w") as out:
        result = subprocess.run([*command(), "caption", *args, "--jsonl", str(jsonl)], env=env, stderr=out)
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise SystemExit(f"caption failed ({result.returncode}):\n{text[-3000:]}")
    summary = re.findall(r"^captioned (\d+), skipped \d+, failed \d+", text, flags=re.MULTILINE)
    return {
        "img_s": clock.steady_rate(),
        "bursts": len(clock.bursts),
        "first_row_s": clock.first_row_s(),
        "wall_s": wall,
        "wall_img_s": count / wall if (count := int(summary[-1]) if summary else 0) else None,
        "captioned": int(summary[-1]) if summary else None,
    }


def peak_rss(args: list[str], env: dict[str, str], log: Path) -> float:
    """Peak RSS in MiB of ``caption`` and all its children, sampled every 50 ms."""
    import psutil

    with log.open("w") as out:
        process = subprocess.Popen([*command(), "caption", *args], env=env, stderr=out)
        root = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"caption failed ({process.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
    return peak / 2**20


def model_alone(
    model_dir: Path, cache: Path, paths: list[Path], batch: int, tokens: int, device: str, dtype: str
) -> float:
    """Images per second of ``caption()`` on ready inputs (decoded and preprocessed beforehand)."""
    from vision_server.captioner import CaptionItem, GenerationOptions
    from vision_server.florence.captioner import FlorenceCaptioner
    from vision_server.images import fit_image

    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1)
    captioner = FlorenceCaptioner(
        str(model_dir),
        cache_dir=cache,
        device=device,
        dtype=dtype,
        default_options=options,
        max_batch_size=batch,
    )
    captioner.load()
    items = []
    for path in paths:  # ready: decoded and resized to the model's size, as a queued job holds them
        with Image.open(path) as image:
            items.append(CaptionItem(fit_image(image.convert("RGB"), captioner.pixel_spec), TASK, options))
    captioner.caption(items[:batch])  # warm-up, as the command's first batch is not counted either
    started = time.perf_counter()
    for start in range(0, len(items), batch):
        captioner.caption(items[start : start + batch])
    seconds = time.perf_counter() - started
    captioner.unload()
    return len(items) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["tiny", "base", "large"], default="base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--images", type=int, default=24, help="768 px JPEGs for the throughput runs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--small-images", type=int, default=5000, help="small JPEGs for the RSS run")
    parser.add_argument("--large-images", type=int, default=200, help="4000x3000 JPEGs for the RSS run")
    parser.add_argument("--rss-preset", choices=["tiny", "base", "large"], default="tiny")
    parser.add_argument("--no-ray", action="store_true", help="skip the --ray run")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak RSS runs")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few images: checks it runs")
    parser.add_argument("--workdir", type=Path, help="keep models and images here (default: a temp dir)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.rss_preset = "tiny", "tiny"
        # Twelve batches of 60 tokens: the steady rate needs rows in three or more bursts, and
        # with three short batches a fast machine wrote two of them inside one poll (CI printed
        # n/a). Ray hands rows back in blocks of 8 here, too few bursts for its rate.
        args.images, args.batch_size, args.new_tokens = 24, 2, 60
        args.small_images, args.large_images = 24, 4

    from vision_server.testing.tiny_model import build_test_model

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="caption-bench-"))
    cache = workdir / "cache"
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env.update({"VISION_SERVER_CACHE_DIR": str(cache), "XDG_CONFIG_HOME": str(workdir / "config")})
    models = {}
    for preset in {args.preset, args.rss_preset}:
        models[preset] = workdir / f"model-{preset}"
        if not (models[preset] / "config.json").exists():
            build_test_model(models[preset], preset=preset)

    photos = write_jpegs(workdir / "photos768", args.images, (768, 768))
    fixed = [
        "--num-beams",
        "1",
        "--min-new-tokens",
        str(args.new_tokens),
        "--max-new-tokens",
        str(args.new_tokens),
    ]
    common = [
        "--model",
        str(models[args.preset]),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-batch-size",
        str(args.batch_size),
        "--task",
        TASK,
        "--no-sidecars",
        *fixed,
    ]
    results: dict[str, Any] = {"preset": args.preset, "images": args.images, "batch_size": args.batch_size}
    local = run_caption(
        [str(workdir / "photos768"), *common], env, workdir / "local.jsonl", workdir / "local.log"
    )
    results["caption"] = local
    results["model_img_s"] = model_alone(
        models[args.preset], cache, photos, args.batch_size, args.new_tokens, args.device, args.dtype
    )
    if local["img_s"]:
        results["caption_to_model"] = local["img_s"] / results["model_img_s"]
    if not args.no_ray:
        ray = run_caption(
            [str(workdir / "photos768"), *common, "--ray"], env, workdir / "ray.jsonl", workdir / "ray.log"
        )
        results["ray"] = ray
        if ray["img_s"] and local["img_s"]:
            results["ray_to_caption"] = ray["img_s"] / local["img_s"]

    rss_args = [
        "--model",
        str(models[args.rss_preset]),
        "--no-sidecars",
        "--max-new-tokens",
        "8",
        "--num-beams",
        "1",
    ]
    rss: dict[str, float] = {}
    for name, count, size in (
        ()
        if args.no_rss
        else (
            ("small", args.small_images, (320, 240)),
            ("large", args.large_images, (4000, 3000)),
        )
    ):
        paths = write_jpegs(workdir / f"{name}-images", count, size, seed=1)
        for part in (max(1, count // 4), count):
            listing = workdir / f"{name}-{part}.txt"
            listing.write_text("".join(f"{path}\n" for path in paths[:part]))
            out = workdir / f"rss-{name}-{part}.jsonl"
            out.unlink(missing_ok=True)
            rss[f"{name}_{part}"] = peak_rss(
                [str(listing), *rss_args, "--jsonl", str(out)], env, workdir / "rss.log"
            )
    results["peak_rss_mib"] = rss

    print(
        f"preset {args.preset}, {args.images} images of 768x768, batch {args.batch_size}, "
        f"{args.new_tokens} tokens"
    )

    def rate(value: float | None) -> str:
        return f"{value:.3f} img/s" if value else "n/a (rows came in fewer than 3 bursts)"

    print(
        f"  caption (end to end, steady) {rate(local['img_s'])}   "
        f"first row after {local['first_row_s']:.1f} s"
    )
    print(f"  model alone (caption())      {rate(results['model_img_s'])}")
    if "caption_to_model" in results:
        print(f"  ratio caption / model        {results['caption_to_model']:.2f}   (goal >= 0.9)")
    if "ray" in results:
        ray = results["ray"]
        print(
            f"  caption --ray (local Ray)    {rate(ray['img_s'])}   "
            f"first row after {ray['first_row_s']:.1f} s"
        )
        if "ray_to_caption" in results:
            print(f"  ratio --ray / local          {results['ray_to_caption']:.2f}   (goal >= 0.8)")
        print(
            f"  whole command, start-up included: local {local['wall_img_s']:.3f} img/s "
            f"({local['wall_s']:.0f} s), --ray {ray['wall_img_s']:.3f} img/s ({ray['wall_s']:.0f} s)"
        )
    if rss:
        print(f"peak RSS of caption and its decoding processes ({args.rss_preset} model):")
    for key, mib in rss.items():
        name, count = key.split("_")
        label = "320x240" if name == "small" else "4000x3000"
        print(f"  {count:>6} {label} JPEGs   {mib:8.0f} MiB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
