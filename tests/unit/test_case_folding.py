"""Images whose stems differ in case alone (``b.jpg``, ``B.png``) on a file system that folds case.

There ``b.txt`` and ``B.txt`` are one file, so the pair shares a caption file exactly as
``b.jpg`` and ``b.png`` do. This machine's file system keeps case apart (a case-insensitive mount
needs root), so the probe is checked here for what it must say on it, and the rule is checked
with the probe's answer given (``case_probe``), as a macOS or Windows disk would answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.support.bulk_data import picture
from vision_server.bulk.listed_clashes import find_clashes
from vision_server.bulk.outputs import Sidecars, SidecarStyle
from vision_server.bulk.plan import Fail, Work, plan
from vision_server.bulk.readers import ReadOptions, iter_records
from vision_server.captionfiles import CaseRules, folds_case, sharing_stems
from vision_server.gallery.catalog import Catalog

PAIR = "neither is captioned, rename one of them"


def folding(folder: Path) -> bool:
    return True


def keeping(folder: Path) -> bool:
    return False


def entries(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


# --- the probe, on this (case-sensitive) file system ---------------------------------------------


def test_the_probe_says_case_sensitive_here_and_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    named = tmp_path / "named"  # a name to look up with its case swapped: nothing is written
    named.mkdir()
    (named / "Cat.jpg").write_bytes(b"x")
    empty = tmp_path / "empty"  # nothing to look up: a temporary file of ours, deleted again
    empty.mkdir()
    digits = tmp_path / "digits"  # names without letters: the same
    digits.mkdir()
    (digits / "0001").write_bytes(b"x")
    both = tmp_path / "both"  # both spellings are entries: that alone says case-sensitive
    both.mkdir()
    (both / "b.jpg").write_bytes(b"1")
    (both / "B.JPG").write_bytes(b"2")
    before = entries(tmp_path)
    for folder in (named, empty, digits, both):
        assert folds_case(folder) is False, folder.name
    assert entries(tmp_path) == before  # no probe file left behind, nothing else touched


def test_the_probe_says_no_where_nothing_can_be_listed_or_written(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    assert folds_case(tmp_path / "missing") is False
    assert folds_case(tmp_path / "file") is False  # not a folder
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert folds_case(locked) is False
            assert os.listdir(locked) == []
        finally:
            locked.chmod(0o700)


def test_each_folder_is_asked_once_and_only_where_stems_differ_in_case_alone(tmp_path: Path) -> None:
    asked: list[Path] = []

    def probe(folder: Path) -> bool:
        asked.append(folder)
        return True

    case = CaseRules(probe)
    plain = sharing_stems(["a.jpg", "a.png", "b.png"], tmp_path / "plain", case)
    assert plain("a.jpg") == ["a.jpg", "a.png"] and plain("b.png") == ["b.png"]
    assert asked == []  # no stems that differ in case alone: no question
    for _ in range(2):
        mixed = sharing_stems(["B.png", "b.jpg", "c.png"], tmp_path / "mixed", case)
        assert mixed("b.jpg") == ["B.png", "b.jpg"] and mixed("c.png") == ["c.png"]
    assert asked == [tmp_path / "mixed"]
    kept = sharing_stems(["B.png", "b.jpg"], tmp_path, CaseRules(keeping))
    assert kept("b.jpg") == ["b.jpg"] and kept("B.png") == ["B.png"]


# --- vision-server caption: folders, lists, image files, Parquet path columns ------------------


def test_a_folder_on_a_file_system_that_folds_case_refuses_stems_equal_in_any_case(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for seed, name in enumerate(("b.jpg", "B.png", "c.png", "sub/Straße.jpg", "sub/STRASSE.png")):
        (root / name).write_bytes(picture(seed))
    sidecars = [Sidecars(SidecarStyle())]
    folded = list(plan(iter_records([root], ReadOptions(case_probe=folding)), ["<CAPTION>"], sidecars))
    assert {unit.record.key: unit.reason for unit in folded if isinstance(unit, Fail)} == {
        "B.png": f"shares its caption file B.txt with b.jpg; {PAIR}",
        "b.jpg": f"shares its caption file b.txt with B.png; {PAIR}",
        "sub/STRASSE.png": f"shares its caption file STRASSE.txt with Straße.jpg; {PAIR}",
        "sub/Straße.jpg": f"shares its caption file Straße.txt with STRASSE.png; {PAIR}",
    }
    assert [unit.record.key for unit in folded if isinstance(unit, Work)] == ["c.png"]
    kept = list(plan(iter_records([root], ReadOptions(case_probe=keeping)), ["<CAPTION>"], sidecars))
    assert all(isinstance(unit, Work) for unit in kept) and len(kept) == 5
    real = list(plan(iter_records([root], ReadOptions()), ["<CAPTION>"], sidecars))  # this disk: ext4
    assert all(isinstance(unit, Work) for unit in real) and len(real) == 5


def test_lists_image_files_and_path_columns_follow_the_folders_rule(tmp_path: Path) -> None:
    """Listed anywhere (two lists, a Parquet path column, an image given on the command line),
    ``d.jpg`` and ``D.png`` clash where the folder folds case; ``d.jpg`` listed again as
    ``D.JPG`` is the same image there (one file); on a case-sensitive disk it is another image,
    which shares ``D.txt`` with ``D.png``."""
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("d.jpg", "D.png", "e.png", "f.png", "F.webp")):
        (root / name).write_bytes(picture(seed))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'd.jpg'}\n{root / 'e.png'}\n{root / 'D.JPG'}\n", encoding="utf-8")
    second = tmp_path / "more.jsonl"
    second.write_text(json.dumps({"path": str(root / "f.png")}) + "\n", encoding="utf-8")
    table = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": [str(root / "D.png")]}), table)
    inputs = [listing, second, table, root / "F.webp"]
    folded = [(r.source, r.key, r.stem_clash) for r in iter_records(inputs, ReadOptions(case_probe=folding))]
    assert folded == [
        (str(listing), str(root / "d.jpg"), (str(root / "D.png"),)),
        (str(listing), str(root / "e.png"), ()),
        (str(listing), str(root / "D.JPG"), (str(root / "D.png"),)),  # d.jpg again, in other words
        (str(second), str(root / "f.png"), (str(root / "F.webp"),)),
        (str(table), str(root / "D.png"), (str(root / "d.jpg"),)),
        (str(root / "F.webp"), "F.webp", (str(root / "f.png"),)),
    ]
    kept = [r.stem_clash for r in iter_records(inputs, ReadOptions(case_probe=keeping))]
    # case kept apart: D.JPG (another file here) and D.png share D.txt, d.jpg and f.png clash with none
    assert kept == [(), (), (str(root / "D.png"),), (), (str(root / "D.JPG"),), ()]
    units = list(
        plan(iter_records(inputs, ReadOptions(case_probe=folding)), ["<CAPTION>"], [Sidecars(SidecarStyle())])
    )
    reasons = [unit.reason for unit in units if isinstance(unit, Fail)]
    assert f"shares its caption file d.txt with {root / 'D.png'}; {PAIR}" in reasons
    assert f"shares its caption file F.txt with {root / 'f.png'}; {PAIR}" in reasons
    assert [unit.record.path for unit in units if isinstance(unit, Work)] == [root / "e.png"]


def test_only_the_folders_of_candidates_are_asked_about_and_each_once(tmp_path: Path) -> None:
    asked: list[Path] = []

    def probe(folder: Path) -> bool:
        asked.append(folder)
        return True

    paths = [f"{tmp_path}/one/x{n}.jpg" for n in range(50)] + [
        f"{tmp_path}/two/g.jpg",
        f"{tmp_path}/two/G.png",
    ]
    paths += [f"{tmp_path}/two/h.jpg", f"{tmp_path}/three/k.png"]
    found = find_clashes(lambda: ((path, path) for path in paths), CaseRules(probe))
    assert asked == [Path(os.path.realpath(tmp_path / "two"))]
    assert found.others(Path(tmp_path, "two", "g.jpg")) == (f"{tmp_path}/two/G.png",)
    assert found.others(Path(tmp_path, "two", "h.jpg")) == ()
    assert found.others(Path(tmp_path, "one", "x1.jpg")) == ()


def test_the_gallery_shows_a_caption_whose_name_differs_in_case_where_the_disk_folds_it(
    tmp_path: Path,
) -> None:
    """``Cat.jpg`` beside ``cat.txt`` (the PowerShell script used to lower-case caption names on
    Windows and macOS): the other dataset tools read that file as the image's caption there, so
    the gallery shows it too, and a clash there is refused as everywhere."""
    root = tmp_path / "data"
    root.mkdir()
    for seed, name in enumerate(("Cat.jpg", "dog.png", "b.jpg", "B.png")):
        (root / name).write_bytes(picture(seed))
    for name in ("cat.txt", "cat.tags", "dog.txt"):
        (root / name).write_text("a caption", encoding="utf-8")
    asked: list[Path] = []

    def counting(folder: Path) -> bool:
        asked.append(folder)
        return True

    folded = Catalog(root, writable=False, page_size=10, case_probe=counting).entries()
    assert (folded["Cat.jpg"].sidecars, folded["dog.png"].sidecars) == ((".txt", ".tags"), (".txt",))
    assert folded["B.png"].stem_clash == ("b.jpg",) and asked == [root]  # one question, shared
    kept = Catalog(root, writable=False, page_size=10, case_probe=keeping).entries()
    assert (kept["Cat.jpg"].sidecars, kept["dog.png"].sidecars, kept["B.png"].stem_clash) == (
        (),
        (".txt",),
        (),
    )
