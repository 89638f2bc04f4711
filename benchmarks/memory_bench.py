"""``memory_parts()``: the estimate before a load against what the load measures, and its cost.

For a test model preset (random weights, real shapes for ``base``/``large``) this prints:

1. the estimate before the model exists (its config on the meta device) and from its weight
   file's header once built, each with the time one fresh captioner takes to answer;
2. what the loaded model measures (distinct parameter and buffer storages), and RSS growth
   once a caption has touched every weight (a load maps the file; pages come in on use);
3. a base with a LoRA adapter: two captioners sharing the base (one pool) against the same two
   loaded apart (the adapter merged into a second copy), by their memory parts and by RSS.

Prints a table and a JSON line.

    python benchmarks/memory_bench.py                 # tiny
    python benchmarks/memory_bench.py --preset base --dtype float16
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.devices import release_memory
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.florence.shared_base import SharedBases
from vision_server.florence.source import test_model_dir
from vision_server.images import fit_image
from vision_server.testing.tiny_model import build_test_adapter


def answer_time(make: Any, repeats: int = 5) -> tuple[dict[str, int], float]:
    """The first memory_parts() answer of fresh captioners, and its median time in ms."""
    times, parts = [], {}
    for _ in range(repeats):
        captioner = make()
        started = time.perf_counter()
        parts = captioner.memory_parts()
        times.append((time.perf_counter() - started) * 1000)
    return parts, statistics.median(times)


def total(*captioners: FlorenceCaptioner) -> int:
    """Bytes the engine would count: every distinct key once."""
    merged: dict[str, int] = {}
    for captioner in captioners:
        merged.update(captioner.memory_parts())
    return sum(merged.values())


def warm(captioner: FlorenceCaptioner) -> None:
    """Load and caption once (two tokens), so every weight page is resident."""
    captioner.load()
    pixels = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    image = fit_image(Image.fromarray(pixels), captioner.pixel_spec)
    captioner.caption([CaptionItem(image, "<CAPTION>", GenerationOptions(max_new_tokens=2, num_beams=1))])


def rss() -> int:
    gc.collect()
    release_memory()
    return int(psutil.Process().memory_info().rss)


def run(preset: str, dtype: str, cache: Path) -> dict[str, Any]:
    spec = f"test:{preset}"

    def make(**kwargs: Any) -> FlorenceCaptioner:
        return FlorenceCaptioner(spec, cache_dir=cache, device="cpu", dtype=dtype, **kwargs)

    make().memory_parts()  # imports (transformers) once, outside the timing
    unbuilt, unbuilt_ms = answer_time(make)
    built_dir = test_model_dir(preset, cache)
    header, header_ms = answer_time(make)
    captioner = make()
    before = rss()
    warm(captioner)
    measured = captioner.memory_parts()
    grew = rss() - before
    captioner.unload()
    adapter = build_test_adapter(built_dir, cache / "adapter")

    before = rss()
    apart = [make(), make(adapter=str(adapter))]
    for one in apart:
        warm(one)
    apart_rss, apart_parts = rss() - before, total(*apart)
    for one in apart:
        one.unload()
    del apart
    bases = SharedBases()
    before = rss()
    shared = [make(bases=bases), make(adapter=str(adapter), bases=bases)]
    for one in shared:
        warm(one)
    shared_rss, shared_parts = rss() - before, total(*shared)
    for one in shared:
        one.unload()
    return {
        "preset": preset,
        "dtype": dtype,
        "estimate_unbuilt": sum(unbuilt.values()),
        "estimate_unbuilt_ms": round(unbuilt_ms, 2),
        "estimate_header": sum(header.values()),
        "estimate_header_ms": round(header_ms, 2),
        "measured": sum(measured.values()),
        "load_rss_growth": grew,
        "pair_apart_parts": apart_parts,
        "pair_apart_rss": apart_rss,
        "pair_shared_parts": shared_parts,
        "pair_shared_rss": shared_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "base", "large"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        result = run(args.preset, args.dtype, Path(tmp))
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
