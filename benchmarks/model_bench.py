"""Model-layer timings for one preset and device: conversion, load, and generate per batch size.

Builds the random-weight test model (``--preset tiny|base|large``) in both layouts in a temp
dir, converts the original layout to the native one (timed), loads it through
``FlorenceCaptioner`` (timed, warm page cache), then times ``caption()`` for each batch size
with a fixed number of new tokens (random weights would otherwise stop at once). Prints a table
and a JSON line.

    python benchmarks/model_bench.py --preset base --batch-sizes 1,4,16 --new-tokens 20
    python benchmarks/model_bench.py --preset large --device cuda --dtype float16 \\
        --batch-sizes 1,16,64 --new-tokens 128 --modes eager,compiled
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from vision_server.captioner import GenerationOptions, ModelInfo
    from vision_server.florence.captioner import FlorenceCaptioner

P = ParamSpec("P")
R = TypeVar("R")


def timed(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
    """Call ``func`` once; return its result and the wall time it took, in seconds."""
    started = time.perf_counter()
    result = func(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["tiny", "base", "large"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes",
        default="eager",
        help="comma list of eager,compiled; compiled = static cache + torch.compile of exactly the "
        "batch sizes timed (CUDA only: elsewhere it runs uncompiled and says so)",
    )
    parser.add_argument("--workdir", type=Path, help="keep built models here (default: a temp dir)")
    parser.add_argument(
        "--model-dir", type=Path, help="an already built native model: skip building and conversion"
    )
    args = parser.parse_args()
    log_level = os.environ.get("VISION_SERVER_LOG_LEVEL", "warning").upper()  # info: compile times
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from vision_server.captioner import GenerationOptions
    from vision_server.florence.convert import convert_checkpoint
    from vision_server.testing.tiny_model import build_test_model

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="model-bench-"))
    conversion_s = None
    if args.model_dir is not None:
        native = args.model_dir
    else:
        original = workdir / f"{args.preset}-original"
        if not original.exists():
            build_test_model(original, preset=args.preset, fmt="original")
        native = workdir / f"{args.preset}-converted"
        if not native.exists():
            _, conversion_s = timed(convert_checkpoint, original, native)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (768, 768, 3), dtype=np.uint8))
    options = GenerationOptions(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=args.beams
    )
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    modes: list[dict[str, Any]] = []
    prep: dict[str, float] = {}
    info: ModelInfo | None = None
    for mode in args.modes.split(","):
        if mode not in ("eager", "compiled"):
            raise SystemExit(f"unknown mode {mode!r}: use eager and/or compiled")
        result, info, costs = run_mode(args, native, workdir, mode, image, options, sizes)
        modes.append(result)
        prep = prep or costs
    assert info is not None, "the loop above ran at least once"
    report(args, info, conversion_s, modes)
    print("preprocessing, ms per image (2048x1536 JPEG, one thread):")
    for name, ms in prep.items():
        print(f"  {name:<44}{ms:>8.1f}")
    print(json.dumps({"preprocessing_ms": prep}))


def run_mode(
    args: argparse.Namespace,
    native: Path,
    workdir: Path,
    mode: str,
    image: Image.Image,
    options: GenerationOptions,
    sizes: list[int],
) -> tuple[dict[str, Any], ModelInfo, dict[str, float]]:
    """Load (timed; compiling every batch size first when compiled), time each batch size, unload."""
    import torch

    from vision_server.captioner import CaptionItem
    from vision_server.florence.captioner import FlorenceCaptioner
    from vision_server.images import fit_image

    compiled = mode == "compiled"
    captioner = FlorenceCaptioner(
        str(native),
        cache_dir=workdir / "cache",
        device=args.device,
        dtype=args.dtype,
        default_options=options,
        max_batch_size=max(sizes),
        compile=compiled,
        compile_buckets=tuple(sizes) if compiled else None,
    )
    info, load_s = timed(captioner.load)
    if not compiled:
        captioner.unload()
        info, load_s = timed(captioner.load)  # second load: warm page cache, as in production
    loaded = captioner._loaded
    is_compiled = loaded is not None and loaded.plan is not None
    prepared = fit_image(image, captioner.pixel_spec)  # what the queue holds: resized uint8 pixels
    rows = []
    for size in sizes:
        items = [CaptionItem(prepared, "<MORE_DETAILED_CAPTION>", options)] * size
        captioner.caption(items)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = [timed(captioner.caption, items)[1] for _ in range(args.repeats)]
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        median = statistics.median(times)
        rows.append({"batch": size, "median_s": median, "img_s": size / median, "peak_mib": peak})
    prep = preprocessing_costs(captioner) if not compiled else {}
    _, unload_s = timed(captioner.unload)
    result = {
        "mode": mode,
        "compiled": is_compiled,
        "load_s": load_s,
        "unload_s": unload_s,
        "rows": rows,
    }
    return result, info, prep


def preprocessing_costs(captioner: FlorenceCaptioner) -> dict[str, float]:
    """Where CPU time goes before generate: decode, resize, normalise, and transformers' processor."""
    import io

    import torch

    from vision_server.florence.inputs import pixel_values
    from vision_server.florence.pixels import pixel_spec
    from vision_server.images import fit_image, open_image

    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (1536, 2048, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    loaded = captioner._loaded
    assert loaded is not None, "called while the model is loaded"
    processor = loaded.processor
    spec = pixel_spec(processor)
    decoded = open_image(data, max_pixels=10**9)
    resized = fit_image(decoded, spec).pixels[None]
    cpu = torch.device("cpu")

    def per_image(func: Callable[[], object]) -> float:
        func()
        return statistics.median(timed(func)[1] for _ in range(7)) * 1000

    return {
        "decode (Image.open + load, full size)": per_image(lambda: Image.open(io.BytesIO(data)).load()),
        "decode as served (JPEG draft for large images)": per_image(
            lambda: open_image(data, max_pixels=10**9)
        ),
        "resize to uint8 (vision-server, fit_image)": per_image(lambda: fit_image(decoded, spec)),
        "normalise one image (vision-server, pixel_values)": per_image(
            lambda: pixel_values(resized, spec, cpu)
        ),
        "transformers processor (images + text)": per_image(
            lambda: processor(text="<CAPTION>", images=decoded, return_tensors="pt")
        ),
    }


def report(
    args: argparse.Namespace,
    info: ModelInfo,
    conversion_s: float | None,
    modes: list[dict[str, Any]],
) -> None:
    import torch
    import transformers

    print(
        f"preset {args.preset}  device {info.device}  dtype {info.dtype}  new tokens {args.new_tokens}  "
        f"beams {args.beams}  torch {torch.__version__}  transformers {transformers.__version__}"
    )
    if conversion_s is not None:
        print(f"conversion original -> native: {conversion_s:.2f} s")
    for mode in modes:
        name = mode["mode"]
        if name == "compiled" and not mode["compiled"]:
            name += " (not compiled: --compile needs CUDA; these are uncompiled figures)"
        print(
            f"{name}: load (warm{', compiling every batch size' if mode['compiled'] else ''}): "
            f"{mode['load_s']:.2f} s   unload: {mode['unload_s']:.2f} s"
        )
        print(f"{'batch':>6}{'median s':>12}{'img/s':>10}{'peak MiB':>10}")
        for row in mode["rows"]:
            peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "-"
            print(f"{row['batch']:>6}{row['median_s']:>12.3f}{row['img_s']:>10.2f}{peak:>10}")
    first = modes[0]
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": info.device,
                "dtype": info.dtype,
                "new_tokens": args.new_tokens,
                "beams": args.beams,
                "conversion_s": conversion_s,
                "load_s": first["load_s"],
                "unload_s": first["unload_s"],
                "rows": first["rows"],
                "modes": modes,
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
