"""``distinct_inputs`` (``vision-server caption`` leaves out inputs another input already gives)
looks places up instead of comparing every input with every other, so ``caption data/*.png``
with tens of thousands of images does not take minutes before the first caption
(``benchmarks/scale_bench.py``). These tests hold it to the rule as first written: the
pairwise comparison below, kept here as the reference, on random mixes of folders, nested
folders, files, a symlinked folder, repeats and inputs that have no place (lists).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_server.bulk.readers import InputKind, _place, distinct_inputs

IMAGES = (
    "x.png",
    "a/x.png",
    "a/y.png",
    "a/b/x.png",
    "a/b/c/z.png",
    "a/e/w.png",
    "d/z.png",
    "a/.v.png",
    "a/.h/u.png",
)


def pairwise(
    inputs: Sequence[Path], kinds: dict[Path, InputKind], recursive: bool
) -> tuple[tuple[Path, ...], list[tuple[Path, Path]]]:
    """The rule as first written: each input against every other, the first match wins."""
    places = [_place(path, kinds[path]) if kinds[path] in ("folder", "file") else None for path in inputs]
    covered: dict[int, int] = {}
    for index, (path, place) in enumerate(zip(inputs, places, strict=True)):
        if place is None:
            continue
        for other, top in enumerate(places):
            if top is None or other == index or other in covered:
                continue
            if place == top:
                if kinds[inputs[other]] == kinds[path] and other < index:
                    covered[index] = other
                    break
                continue
            if kinds[inputs[other]] != "folder":
                continue
            if recursive:
                listed = place.is_relative_to(top) and not any(
                    part.startswith(".") for part in place.relative_to(top).parts
                )
            else:
                listed = kinds[path] == "file" and place.parent == top and not place.name.startswith(".")
            if listed:
                covered[index] = other
                break
    kept = tuple(path for index, path in enumerate(inputs) if index not in covered)
    return kept, [(inputs[index], inputs[other]) for index, other in sorted(covered.items())]


@pytest.fixture(scope="module")
def universe(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, InputKind]:
    """Folders two deep, images in each, a symlink to a folder, a list: every input spelled
    one or two ways (``a`` and ``a/../a``), as a user's command line may give them."""
    root = tmp_path_factory.mktemp("inputs")
    for folder in ("a/b/c", "a/e", "d", "a/.h"):
        (root / folder).mkdir(parents=True)
    for image in IMAGES:
        (root / image).write_bytes(b"png")
    os.symlink(root / "a", root / "link")
    (root / "list.txt").write_text("a/x.png\n", encoding="utf-8")
    kinds: dict[Path, InputKind] = {root / "list.txt": "list"}
    for folder in ("", "a", "a/b", "a/b/c", "a/e", "d", "link", "link/b", "a/.h", "link/.h"):
        kinds[root / folder] = "folder"
    kinds[root / "a" / ".." / "a"] = "folder"
    for image in (*IMAGES, "link/x.png", "link/.v.png"):  # each image, two through the link
        kinds[root / image] = "file"
    kinds[root / "a" / "b" / ".." / "x.png"] = "file"
    return kinds


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.integers(min_value=0, max_value=100), max_size=12), recursive=st.booleans())
def test_the_same_inputs_are_left_out_as_by_comparing_every_pair(
    universe: dict[Path, InputKind], picks: list[int], recursive: bool
) -> None:
    names = list(universe)
    inputs = [names[pick % len(names)] for pick in picks]
    assert distinct_inputs(inputs, universe, recursive) == pairwise(inputs, universe, recursive)


def test_many_images_of_one_folder_are_kept_and_the_folder_wins(tmp_path: Path) -> None:
    images = [tmp_path / f"img{index:05d}.png" for index in range(3000)]
    kinds: dict[Path, InputKind] = {path: "file" for path in images}
    kinds[tmp_path] = "folder"
    assert distinct_inputs(images, kinds, True) == (tuple(images), [])
    kept, left_out = distinct_inputs([*images, tmp_path, images[0]], kinds, True)
    assert kept == (tmp_path,)
    assert left_out == [(path, tmp_path) for path in images] + [(images[0], tmp_path)]


def test_a_hidden_folder_or_image_inside_a_folder_given_is_kept(tmp_path: Path) -> None:
    """The folder does not list hidden names below it, so ``caption data data/.cache
    data/.x.png`` captions all three: none is left out as given by ``data`` (it was, and then
    nothing captioned .cache at all)."""
    data, cache, sub, image = tmp_path, tmp_path / ".cache", tmp_path / ".cache" / "sub", tmp_path / ".x.png"
    sub.mkdir(parents=True)
    image.write_bytes(b"png")
    kinds: dict[Path, InputKind] = {data: "folder", cache: "folder", sub: "folder", image: "file"}
    assert distinct_inputs([data, cache, sub, image], kinds, True) == ((data, cache, image), [(sub, cache)])
    assert distinct_inputs([data, cache, sub, image], kinds, False) == ((data, cache, sub, image), [])
