"""How fast the web page's gallery answers on a large dataset folder, without HTTP in the way.

Builds ``--images`` small PNGs (with a ``.txt`` caption each, in folders of 500) and times the
gallery's catalog (:class:`vision_server.gallery.catalog.Catalog`) the way the page uses it: the
first listing, page 1, a page in the middle, a caption search over every image (cold: each
caption file read once; warm: only stat'ed), and a thumbnail made and then served from the cache.

Prints a table and a JSON line.

    python benchmarks/gallery_bench.py --images 20000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vision_server.gallery.catalog import Catalog, Query
from vision_server.gallery.thumbs import Thumbnails

WORDS = ("cat", "dog", "tree", "house", "river", "car", "bridge", "flower", "window", "person")


def build(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = root / "template.png"
    picture.save(buffer)
    data = buffer.read_bytes()
    buffer.unlink()
    for index in range(count):
        folder = root / f"part{index // 500:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"img{index:06d}.png").write_bytes(data)
        words = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 12))
        (folder / f"img{index:06d}.txt").write_text(f"a photo of {words} number {index}", encoding="utf-8")


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = func()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--page-size", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gallery-bench-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        build(root, args.images)
        catalog = Catalog(root, writable=False, page_size=args.page_size)
        figures: dict[str, float] = {}
        figures["listing_s"], entries = timed(lambda: catalog.entries(rescan=True))
        figures["page_1_s"], _ = timed(lambda: catalog.page(1, Query()))
        middle = max(1, args.images // args.page_size // 2)
        figures["page_middle_s"], _ = timed(lambda: catalog.page(middle, Query()))
        needle = Query(text=f"number {args.images - 1}", field="caption")
        figures["search_cold_s"], found = timed(lambda: catalog.page(1, needle))
        figures["search_warm_s"], _ = timed(lambda: catalog.page(1, needle))
        thumbs = Thumbnails(Path(tmp) / "thumbs", 64_000_000)
        first = next(iter(entries.values())).path
        figures["thumbnail_made_s"], _ = timed(lambda: thumbs.get(first))
        figures["thumbnail_cached_s"], _ = timed(lambda: thumbs.get(first))
        assert found["total"] == 1, found["total"]
    print(f"{'images':<22}{args.images}")
    for name, seconds in figures.items():
        print(f"{name:<22}{seconds * 1000:10.1f} ms")
    print(json.dumps({"images": args.images, **{k: round(v, 4) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
