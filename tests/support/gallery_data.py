"""A small dataset folder for the gallery tests: images, caption files of several kinds, a JSONL,
and things that must stay out of reach (a file outside the root, symlinks leading out)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import image_bytes

XSS = "<img src=x onerror=alert(1)>"


@dataclass(frozen=True)
class GalleryData:
    root: Path
    jsonl: Path
    outside: Path  # a caption-like file next to the root, never reachable through the gallery
    names: tuple[str, ...]  # every image, relative to the root, in listing order


def make_gallery(base: Path, count: int = 7) -> GalleryData:
    """``count`` images (the last two in ``sub/``): ``img00`` has a .txt, ``img01`` an untrusted
    .txt and .tags holding markup, ``img02`` a per-task file; a JSONL row for ``img00``."""
    root = base / "dataset"
    (root / "sub").mkdir(parents=True)
    names = []
    for index in range(count):
        name = f"sub/img{index:02d}.png" if index >= count - 2 else f"img{index:02d}.png"
        (root / name).write_bytes(image_bytes(index))
        names.append(name)
    (root / "img00.txt").write_text("a red cat on a sofa", encoding="utf-8")
    (root / "img01.txt").write_text(XSS, encoding="utf-8")
    (root / "img01.tags").write_text(f"tags {XSS}", encoding="utf-8")
    (root / "img02.generate_tags.txt").write_text("tree, sky", encoding="utf-8")
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    outside = base / "secret.txt"
    outside.write_text("outside the gallery", encoding="utf-8")
    (base / "secret.png").write_bytes(image_bytes(99))
    os.symlink(base / "secret.png", root / "escape.png")  # a symlinked image leading out
    os.symlink(base, root / "up")  # a symlinked folder leading out
    jsonl = base / "captions.jsonl"
    row = {"source": str(root), "key": "img00.png", "task": "<CAPTION>", "caption": "jsonl says cat"}
    jsonl.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return GalleryData(root, jsonl, outside, tuple(sorted(names, key=lambda n: ("/" in n, n))))
