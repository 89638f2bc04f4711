"""The dataset captioner's stages in-process: readers, resume bookkeeping, the Parquet journal."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.bulk_data import picture
from tests.support.leftovers import OLD, YOUNG, aged
from vision_server.bulk.outputs import (
    WRITTEN_MEANWHILE,
    JsonlOutput,
    Output,
    ParquetOutput,
    RowFacts,
    Sidecars,
    SidecarStyle,
    check_writable,
    fold_journal,
    same_input,
    write_all,
)
from vision_server.bulk.plan import Fail, Skip, Work, plan
from vision_server.bulk.readers import ReadOptions, count_images, iter_records
from vision_server.bulk.records import Record
from vision_server.model_specs import adapter_identity, model_identity

FACTS = RowFacts(("<CAPTION>",), "test:tiny", None)


def test_folder_reader_streams_sorted_and_flags_what_it_can_tell(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "b").mkdir(parents=True)
    for name in ("z.png", "a.png", "a.jpg", "b/c.webp", "notes.txt", "._a.png"):
        (root / name).write_bytes(picture(1))
    os.mkfifo(root / "pipe.png")
    (root / "linked").symlink_to(root / "b")  # a symlinked folder is not entered (no loops)
    records = list(iter_records([root], ReadOptions()))
    assert [r.key for r in records] == ["a.jpg", "a.png", "pipe.png", "z.png", "b/c.webp"]
    by_key = {r.key: r for r in records}
    assert by_key["a.jpg"].stem_clash == ("a.png",) and by_key["a.png"].stem_clash == ("a.jpg",)
    assert by_key["pipe.png"].error == "not a regular file"  # never opened: it would block
    assert by_key["z.png"].error is None and by_key["z.png"].stem_clash == ()
    assert count_images([root], ReadOptions()) == 5
    flat = list(iter_records([root], ReadOptions(recursive=False)))
    assert [r.key for r in flat] == ["a.jpg", "a.png", "pipe.png", "z.png"]


def test_plan_skips_done_fails_clashes_and_stops_at_the_limit(tmp_path: Path) -> None:
    images = [tmp_path / f"{n}.png" for n in range(4)]
    records = [Record(str(tmp_path), p.name, path=p) for p in images]
    images[0].with_suffix(".txt").write_text("done", encoding="utf-8")
    records[1] = Record(str(tmp_path), "1.png", path=images[1], stem_clash=("1.jpg",))
    sidecars = Sidecars(SidecarStyle())
    units = list(plan(records, ["<CAPTION>"], [sidecars]))
    assert [type(u) for u in units] == [Skip, Fail, Work, Work]
    assert len([u for u in plan(records, ["<CAPTION>"], [sidecars], limit=1) if isinstance(u, Work)]) == 1


def test_plan_fails_an_image_whose_caption_path_is_a_directory_in_every_mode(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    (tmp_path / "cat.txt").mkdir()
    record = Record(str(tmp_path), image.name, path=image)
    for mode in ("skip", "overwrite", "append"):
        (unit,) = plan([record], ["<CAPTION>"], [Sidecars(SidecarStyle(mode=mode))])
        assert isinstance(unit, Fail) and unit.reason == "cat.txt is a directory, not a caption file", mode


def test_plan_fails_an_image_whose_caption_name_is_too_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 240-byte stem fits ``STEM.txt`` but not ``STEM.more_detailed_caption.txt`` (266 bytes):
    a run of several tasks fails that image with what to do, in every mode (it neither stops on
    the error nor takes the image for done), and a run of one task captions it without claiming
    a several-task file is there."""
    image = tmp_path / f"{'x' * 240}.jpg"
    image.write_bytes(picture(1))
    record = Record(str(tmp_path), image.name, path=image)
    tasks = ["<CAPTION>", "<MORE_DETAILED_CAPTION>"]
    for mode in ("skip", "overwrite", "append"):
        (unit,) = plan([record], tasks, [Sidecars(SidecarStyle(mode=mode, several_tasks=True))])
        assert isinstance(unit, Fail), mode
        assert unit.reason == (
            "the name of its caption file (266 bytes) is too long for the file system; "
            "rename the image to a shorter name"
        )
    (unit,) = plan([record], ["<MORE_DETAILED_CAPTION>"], [Sidecars(SidecarStyle())])
    assert isinstance(unit, Work)
    assert "exists" not in caplog.text


def test_plan_finds_the_caption_files_behind_the_prefix_wrapper(tmp_path: Path) -> None:
    """--prefix/--suffix wrap the sidecar output: its stem clashes and directories still fail."""
    from vision_server.bulk.command import _Wrapped

    wrapped = _Wrapped(Sidecars(SidecarStyle()), "style, ", "")
    clash = Record(str(tmp_path), "a.png", path=tmp_path / "a.png", stem_clash=("a.jpg",))
    (unit,) = plan([clash], ["<CAPTION>"], [wrapped])
    assert isinstance(unit, Fail)
    assert unit.reason == "shares its caption file a.txt with a.jpg; neither is captioned, rename one of them"


def test_table_outputs_resume_an_input_spelled_another_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``caption ds`` then ``caption ds/`` or ``caption /abs/ds``: the rows name the input as
    given, and a rerun that spelled it otherwise captioned every image again, each a second row."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    out = tmp_path / "out.jsonl"
    first = JsonlOutput(out, FACTS)
    first.write(Record("ds", "a.png"), {"<CAPTION>": "a cat"}, None)
    first.write(Record("ds", "bad.png"), {}, "cannot decode the image")
    first.close()
    for spelling in ("ds/", "./ds", str(tmp_path / "ds"), str(tmp_path / "ds" / ".." / "ds")):
        again = JsonlOutput(out, FACTS)
        assert again.missing(Record(spelling, "a.png"), ["<CAPTION>"]) == [], spelling
        assert again.missing(Record(spelling, "b.png"), ["<CAPTION>"]) == ["<CAPTION>"], spelling
        again.write(Record(spelling, "a.png"), {"<CAPTION>": "a cat again"}, None)
        again.write(Record(spelling, "bad.png"), {}, "cannot decode the image")  # said once already
        again.close()
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    parquet = tmp_path / "out.parquet"
    table = ParquetOutput(parquet, FACTS)
    table.write(Record("ds", "a.png"), {"<CAPTION>": "a cat"}, None)
    table.close()
    assert ParquetOutput(parquet, FACTS).missing(Record(f"{tmp_path}/ds/", "a.png"), ["<CAPTION>"]) == []


def test_a_relative_input_is_read_from_the_working_directory_of_each_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolved inputs are cached for speed; a process that runs again from another folder
    (a caller using the package as a library) must not compare ``ds`` as the ``ds`` of the run
    before: there the rows of ``one/ds`` say nothing about ``two/ds``."""
    out = tmp_path / "out.jsonl"
    for name in ("one", "two"):
        (tmp_path / name / "ds").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / name)
        output = JsonlOutput(out, FACTS)
        assert output.missing(Record("ds", "a.png"), ["<CAPTION>"]) == ["<CAPTION>"], name
        output.write(Record(str(tmp_path / name / "ds"), "a.png"), {"<CAPTION>": "a cat"}, None)
        assert output.missing(Record("ds", "a.png"), ["<CAPTION>"]) == [], name
        output.close()
    assert same_input("ds") == str((tmp_path / "two" / "ds").resolve())


def test_a_symlinked_parquet_output_is_written_where_it_points(tmp_path: Path) -> None:
    """The fold renames a new table over the output: through a symlink it replaced the link with
    a plain file, leaving the table it named behind without the new rows."""
    table = tmp_path / "data" / "captions.parquet"
    table.parent.mkdir()
    link = tmp_path / "captions.parquet"
    link.symlink_to(table)
    first = ParquetOutput(link, FACTS)
    first.write(Record("ds", "a.png"), {"<CAPTION>": "a cat"}, None)
    first.close()
    assert link.is_symlink() and [row["key"] for row in pq.read_table(table).to_pylist()] == ["a.png"]
    again = ParquetOutput(table, FACTS)  # the same table, spelled as its own path
    again.write(Record("ds", "b.png"), {"<CAPTION>": "a dog"}, None)  # journaled, not folded yet
    assert ParquetOutput(link, FACTS, sweep=False).missing(Record("ds", "b.png"), ["<CAPTION>"]) == []
    again.close()


def test_jsonl_resume_ignores_a_torn_line_and_terminates_it(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = {"source": "d", "key": "a.png", "task": "<CAPTION>", "caption": "a cat"}
    out.write_text(json.dumps(whole) + '\n{"source": "d", "key": "b.png", "task": "<CAP', encoding="utf-8")
    output = JsonlOutput(out, FACTS)
    a, b = Record("d", "a.png"), Record("d", "b.png")
    assert output.missing(a, ["<CAPTION>"]) == [] and output.missing(b, ["<CAPTION>"]) == ["<CAPTION>"]
    output.write(b, {"<CAPTION>": "a dog"}, None)
    output.write(b, {"<CAPTION>": "a dog again"}, None)  # already written in this run: no second row
    output.close()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["caption"] == "a dog"


def test_parquet_journal_of_a_killed_run_is_folded_in_by_the_next(tmp_path: Path) -> None:
    table = tmp_path / "out.parquet"
    first = ParquetOutput(table, FACTS)
    first.write(Record("d", "a.png"), {"<CAPTION>": "a cat"}, None)
    first.close()
    killed = ParquetOutput(table, FACTS)
    killed.write(Record("d", "b.png"), {"<CAPTION>": "a dog"}, None)
    killed._log.close()  # killed: never closed, the journal stays
    assert pq.read_table(table).num_rows == 1 and killed.journal.exists()
    again = ParquetOutput(table, FACTS)
    assert again.missing(Record("d", "b.png"), ["<CAPTION>"]) == []
    again.write(
        Record("d", "c.png"),
        {"<CAPTION>": "a bird"},
        None,
    )
    again.close()
    rows = pq.read_table(table).to_pylist()
    assert [(r["key"], r["caption"]) for r in rows] == [
        ("a.png", "a cat"),
        ("b.png", "a dog"),
        ("c.png", "a bird"),
    ]
    assert not again.journal.exists()


def test_a_journal_killed_after_its_fold_renamed_the_table_is_not_folded_in_twice(tmp_path: Path) -> None:
    """kill -9 between the fold's rename (the table holds the journal's rows) and the journal's
    deletion: the next run finds both. Its fold must not add those rows a second time."""
    table = tmp_path / "out.parquet"
    killed = ParquetOutput(table, FACTS)
    killed.write(Record("d", "a.png"), {"<CAPTION>": "a cat"}, None)
    killed.write(Record("d", "b.png"), {"<CAPTION>": "a dog"}, None)
    killed._log.close()
    journal = killed.journal.read_bytes()
    fold_journal(table, killed.journal)
    killed.journal.write_bytes(journal)  # the state the kill left: folded, journal still there
    again = ParquetOutput(table, FACTS)
    assert again.missing(Record("d", "c.png"), ["<CAPTION>"]) == ["<CAPTION>"]
    again.write(Record("d", "c.png"), {"<CAPTION>": "a bird"}, None)
    again.close()
    rows = pq.read_table(table).to_pylist()
    assert [(r["key"], r["caption"]) for r in rows] == [
        ("a.png", "a cat"),
        ("b.png", "a dog"),
        ("c.png", "a bird"),
    ]
    assert not again.journal.exists()


def test_parquet_output_sweeps_the_fold_temp_files_a_killed_fold_left(tmp_path: Path) -> None:
    """kill -9 while folding leaves ``.out.parquet.<8 hex>.tmp`` (as big as the table): the next
    run that opens the output deletes the stale ones, and nothing that only looks like them."""
    table = tmp_path / "out.parquet"
    stale = [
        aged(tmp_path / ".out.parquet.0123abcd.tmp", OLD),
        aged(tmp_path / ".out.parquet.ffffffff.tmp", OLD),
    ]
    kept = [
        aged(tmp_path / ".out.parquet.89abcdef.tmp", YOUNG),  # perhaps another run folding right now
        aged(tmp_path / ".out.parquet.0123ABCD.tmp", OLD),  # not a name a fold makes
        aged(tmp_path / ".out.parquet.0123abc.tmp", OLD),
        aged(tmp_path / ".other.parquet.0123abcd.tmp", OLD),  # another output's
        aged(tmp_path / "out.parquet.0123abcd.tmp", OLD),
        aged(tmp_path / ".out.parquet.journal.jsonl", OLD, b""),
    ]
    (tmp_path / ".out.parquet.aaaaaaaa.tmp").mkdir()  # a folder, not a regular file
    os.utime(tmp_path / ".out.parquet.aaaaaaaa.tmp", (0, 0))
    (tmp_path / ".out.parquet.bbbbbbbb.tmp").symlink_to(kept[3])  # a link
    kept += [tmp_path / ".out.parquet.aaaaaaaa.tmp", tmp_path / ".out.parquet.bbbbbbbb.tmp"]
    output = ParquetOutput(table, FACTS)
    assert output.stale_temps_removed == 2
    assert not any(path.exists() for path in stale)
    assert all(path.is_symlink() or path.exists() for path in kept)
    output.write(Record("d", "a.png"), {"<CAPTION>": "a cat"}, None)
    output.close()
    assert pq.read_table(table).num_rows == 1
    left = {p.name for p in tmp_path.glob(".out.parquet.*.tmp")}
    assert left == {p.name for p in kept if p.name.startswith(".out.parquet.") and p.suffix == ".tmp"}


def test_parquet_output_under_its_lock_sweeps_even_a_young_fold_temp(tmp_path: Path) -> None:
    """Holding the table's lock, no other run can be folding it: a fold temp of it, however
    young (a run killed a minute ago), is a dead run's and goes now, not 15 minutes later.
    Without the lock (none could be had there) a young one may be a live fold: it stays."""
    young = aged(tmp_path / ".out.parquet.89abcdef.tmp", YOUNG)
    ahead = aged(tmp_path / ".out.parquet.0123abcd.tmp", -3600)  # a share's clock ahead of ours
    other = aged(tmp_path / ".other.parquet.89abcdef.tmp", YOUNG)  # another table's: not ours
    assert ParquetOutput(tmp_path / "out.parquet", FACTS).stale_temps_removed == 0
    assert young.exists() and ahead.exists()
    assert ParquetOutput(tmp_path / "out.parquet", FACTS, locked=True).stale_temps_removed == 2
    assert not young.exists() and not ahead.exists() and other.exists()


def test_parquet_output_of_a_dry_run_sweeps_nothing(tmp_path: Path) -> None:
    leftover = aged(tmp_path / ".out.parquet.0123abcd.tmp", OLD)
    assert ParquetOutput(tmp_path / "out.parquet", FACTS, sweep=False).stale_temps_removed == 0
    assert leftover.exists()


def test_a_shard_cut_or_damaged_between_members_is_reported_not_ended_quietly(tmp_path: Path) -> None:
    # tarfile treats a cut-short, missing or garbage header after the first as the end of the
    # archive; a shard cut by an interrupted copy must not lose its remaining samples unreported.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as shard:
        for n in range(3):
            for name, data in ((f"s{n}.png", picture(n)), (f"s{n}.txt", b"text")):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                shard.addfile(member, io.BytesIO(data))
    whole = buffer.getvalue()
    second = whole.index(b"s1.png")  # where the second sample's first header starts
    damaged = bytearray(whole)
    damaged[second : second + 8] = b"garbage!"
    cases = {
        "between.tar": whole[:second],  # ends exactly between two samples
        "header.tar": whole[: second + 100],  # ends inside a header
        "garbage.tar": bytes(damaged),  # a header overwritten
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        records = list(iter_records([tmp_path / name], ReadOptions()))
        assert [r.error for r in records[:1]] == [None], name  # s0 is whole: it is captioned
        assert len(records) == 2 and records[1].error is not None, name
        assert "corrupt or truncated after sample 's0'" in records[1].error, name
    (tmp_path / "whole.tar").write_bytes(whole)
    assert [(r.key, r.error) for r in iter_records([tmp_path / "whole.tar"], ReadOptions())] == [
        ("s0", None),
        ("s1", None),
        ("s2", None),
    ]


def test_sidecars_put_only_the_models_line_breaks_on_one_line(tmp_path: Path) -> None:
    """The caption's line breaks become spaces; the user's prefix, suffix and separator, and the
    text already in the file, stay as given (an append with a line-break separator builds a
    caption-per-line file on purpose)."""
    image = tmp_path / "cat.png"
    (tmp_path / "cat.txt").write_text("old one\nold two", encoding="utf-8")
    style = SidecarStyle(mode="append", separator="\n", prefix="ohwx\n", suffix=" !")
    record = Record(str(tmp_path), "cat.png", path=image)
    Sidecars(style).write(record, {"<CAPTION>": "a cat.\r\nIt sleeps.\rZzz\nend"}, None)
    assert (tmp_path / "cat.txt").read_bytes() == b"old one\nold two\nohwx\na cat. It sleeps. Zzz end !"


def test_table_outputs_note_the_row_shape_they_hold_and_refuse_the_other(tmp_path: Path) -> None:
    """One-task rows refuse a run of several tasks and several-task rows a run of one; an empty
    output and one that already holds both shapes (an older version's) take either."""
    one = {"source": "d", "key": "a.png", "task": "<CAPTION>", "caption": "a cat", "model": "m"}
    several = {
        "source": "d",
        "key": "b.png",
        "tasks": ["<CAPTION>", "<ANALYZE>"],
        "caption": "x",
        "analyze": "y",
    }
    table = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist([one]), table)
    parquet = ParquetOutput(table, FACTS)
    assert parquet.shapes.refusal(table, ["<CAPTION>"]) is None
    assert "holds rows of one task each (<CAPTION>:" in (
        parquet.shapes.refusal(table, ["<CAPTION>", "<ANALYZE>"]) or ""
    )
    lines = tmp_path / "several.jsonl"
    lines.write_text(json.dumps(several) + "\n", encoding="utf-8")
    jsonl = JsonlOutput(lines, FACTS)
    assert jsonl.shapes.refusal(lines, ["<CAPTION>", "<ANALYZE>"]) is None
    assert "(--task caption --task analyze)" in (jsonl.shapes.refusal(lines, ["<CAPTION>"]) or "")
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps(one) + "\n" + json.dumps(several) + "\n", encoding="utf-8")
    for tasks in (["<CAPTION>"], ["<CAPTION>", "<ANALYZE>"]):
        assert JsonlOutput(both, FACTS).shapes.refusal(both, tasks) is None
        assert (
            JsonlOutput(tmp_path / "new.jsonl", FACTS).shapes.refusal(tmp_path / "new.jsonl", tasks) is None
        )


def test_a_path_list_flags_images_that_would_share_a_caption_file(tmp_path: Path) -> None:
    """As a folder does: ``a.jpg`` and ``a.png`` listed (lines apart, spelled differently, or in
    another list or as an image input) are both refused; the same image listed twice is not."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "a.png", "b.png", "c.png", "c.webp", "sub/d.png"):
        (root / name).write_bytes(picture(1))
    (tmp_path / "alias").symlink_to(root)  # the same folder by another name: the same caption files
    first = root / "first.txt"
    first.write_text("a.jpg\nb.png\nb.png\nsub/d.png\nc.png\n", encoding="utf-8")
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"path": "alias/sub/../a.png"}) + "\n", encoding="utf-8")
    records = list(iter_records([first, second, root / "c.webp"], ReadOptions()))
    clash = {r.key: r.stem_clash for r in records}
    assert clash == {
        "a.jpg": ("alias/sub/../a.png",),
        "b.png": (),
        "sub/d.png": (),
        "c.png": (str(root / "c.webp"),),
        "alias/sub/../a.png": ("a.jpg",),
        "c.webp": ("c.png",),
    }
    units = list(plan(records, ["<CAPTION>"], [Sidecars(SidecarStyle())]))
    assert [u.reason for u in units if isinstance(u, Fail)] == [
        "shares its caption file a.txt with alias/sub/../a.png; neither is captioned, rename one of them",
        "shares its caption file c.txt with "
        + str(root / "c.webp")
        + "; neither is captioned, rename one of them",
        "shares its caption file a.txt with a.jpg; neither is captioned, rename one of them",
        "shares its caption file c.txt with c.png; neither is captioned, rename one of them",
    ]


def test_table_outputs_resume_per_model_and_old_rows_still_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run with another model captions again what the file holds for other models; rows of
    this model written with its source (older versions) or naming no model still count."""
    named = RowFacts(("<CAPTION>",), "tiny", None, older_names=("test:tiny",))
    rows: dict[str, dict[str, str | None]] = {
        "a.png": {"model": "tiny", "adapter": None},  # this model, by its served name
        "b.png": {"model": "test:tiny", "adapter": None},  # this model, by its source (older rows)
        "c.png": {},  # no model named at all: cannot tell, counts as before
        "d.png": {"model": "other", "adapter": None},  # another model
        "e.png": {"model": "tiny", "adapter": "lora"},  # this model with an adapter is another
        "f.png": {"model": "tiny", "adapter": None, "caption": None, "error": "cannot decode"},
    }
    lines = [{"source": "d", "key": k, "task": "<CAPTION>", "caption": "x", **v} for k, v in rows.items()]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    table = tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist([line for line in lines if line["caption"]]), table)
    with caplog.at_level("INFO"):
        outputs: list[Output] = [JsonlOutput(out, named), ParquetOutput(table, named)]
    for output in outputs:
        todo = [k for k in rows if output.missing(Record("d", k), ["<CAPTION>"])]
        assert todo == ["d.png", "e.png", "f.png"], output
    assert (
        "resuming from the rows of tiny only; its rows of other models (1 of other, 1 of tiny + lora)"
        in caplog.text
    )
    assert "1 row(s) name no model; they count as done" in caplog.text
    jsonl = outputs[0]
    jsonl.write(Record("d", "f.png"), {}, "cannot decode")  # the same model's error row: not again
    other = JsonlOutput(out, RowFacts(("<CAPTION>",), "other", None))
    assert [k for k in rows if other.missing(Record("d", k), ["<CAPTION>"])] == [
        "a.png",
        "b.png",
        "e.png",
        "f.png",
    ]
    other.write(Record("d", "f.png"), {}, "cannot decode")  # another model's failure is its own row
    for output in (*outputs, other):
        output.close()
    assert [json.loads(line).get("model") for line in out.read_text(encoding="utf-8").splitlines()[6:]] == [
        "other"
    ]


def test_rows_name_the_adapter_by_its_resolved_folder_and_older_spellings_still_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows held the adapter as typed, so ``my-adapter/`` did not resume ``my-adapter``'s rows.
    New rows hold its resolved path; older ones resolve from the run's working directory."""
    (tmp_path / "my-adapter").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "my-adapter")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    facts = RowFacts(("<CAPTION>",), "tiny", adapter_identity("my-adapter/"))
    assert facts.adapter == str(tmp_path.resolve() / "my-adapter")
    spellings = {
        "a.png": "my-adapter",  # older rows, as typed
        "b.png": "./my-adapter/",
        "c.png": "link",  # the same folder through a symlink
        "d.png": str(tmp_path / "my-adapter"),  # new rows
        "e.png": "elsewhere",  # another adapter
        "f.png": None,  # no adapter
    }
    lines = [
        {"source": "d", "key": k, "task": "<CAPTION>", "caption": "x", "model": "tiny", "adapter": v}
        for k, v in spellings.items()
    ]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    output = JsonlOutput(out, facts)
    assert [k for k in spellings if output.missing(Record("d", k), ["<CAPTION>"])] == ["e.png", "f.png"]
    monkeypatch.chdir(tmp_path / "elsewhere")  # a rerun from another folder: new rows still count
    again = JsonlOutput(out, RowFacts(("<CAPTION>",), "tiny", adapter_identity("../my-adapter")))
    assert not again.missing(Record("d", "d.png"), ["<CAPTION>"])
    # typed paths resolve from this run's folder, where "my-adapter" is another one (even after
    # a run in the same process resolved it from the first folder)
    assert again.missing(Record("d", "a.png"), ["<CAPTION>"])
    output.write(Record("d", "e.png"), {"<CAPTION>": "y"}, None)
    for each in (output, again):
        each.close()
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[-1])["adapter"] == facts.adapter


def test_caption_files_named_for_another_number_of_tasks_are_said_once_not_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One task writes ``a.txt``, several ``a.<task>.txt``: a run with the other number of tasks
    neither resumes from nor overwrites the other run's files, and says so once."""
    images = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    records = [Record(str(tmp_path), p.name, path=p) for p in images]
    for image in images[:2]:
        image.with_suffix(".txt").write_text("from a run of one task", encoding="utf-8")
    several = Sidecars(SidecarStyle(several_tasks=True))
    tasks = ["<CAPTION>", "<GENERATE_TAGS>"]
    with caplog.at_level("WARNING"):
        units = list(plan(records, tasks, [several]))
    assert [(type(u), getattr(u, "tasks", None)) for u in units] == [(Work, tuple(tasks))] * 3
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(
        f"{images[0].with_suffix('.txt')} exists, as a run of one task names caption files;"
    )
    assert "(a.caption.txt, a.generate_tags.txt)" in warning and "run one --task at a time" in warning

    caplog.clear()
    (tmp_path / "c.caption.txt").write_text("from a run of two tasks", encoding="utf-8")
    one = Sidecars(SidecarStyle())
    with caplog.at_level("WARNING"):
        units = list(plan(records, ["<CAPTION>"], [one]))
    assert [type(u) for u in units] == [Skip, Skip, Work]  # c.txt is still missing
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{tmp_path / 'c.caption.txt'} exists, as a run of several tasks names")
    assert "this run of one task writes c.txt" in warning


def test_a_parquet_path_column_flags_images_that_would_share_a_caption_file(tmp_path: Path) -> None:
    for name in ("x.jpg", "x.png", "y.png"):
        (tmp_path / name).write_bytes(picture(1))
    table = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": ["x.jpg", "y.png"]}), table)
    listing = tmp_path / "more.txt"
    listing.write_text("x.png\n", encoding="utf-8")
    records = list(iter_records([table, listing], ReadOptions()))
    assert {r.key: r.stem_clash for r in records} == {"x.jpg": ("x.png",), "y.png": (), "x.png": ("x.jpg",)}


def test_rows_name_an_unnamed_local_model_by_its_resolved_folder_and_older_spellings_still_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows held an unnamed local model as typed, so ``./m/`` did not resume ``m``'s rows. New
    rows hold its resolved path; older ones resolve from the run's working directory; hub ids
    and ``test:`` presets are names as they are."""
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    (tmp_path / "other").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_identity("org/model") == "org/model" and model_identity("test:tiny") == "test:tiny"
    model = model_identity("./m/")
    assert model == str(tmp_path.resolve() / "m") == model_identity("link") == model_identity("m")
    facts = RowFacts(("<CAPTION>",), model, None, local_model=True)
    spellings = {
        "a.png": "m",  # older rows, as typed
        "b.png": "./m/",
        "c.png": "link",  # the same folder through a symlink
        "d.png": model,  # new rows
        "e.png": "other",  # another folder
        "f.png": "org/model",  # a hub id
    }
    lines = [
        {"source": "d", "key": k, "task": "<CAPTION>", "caption": "x", "model": v, "adapter": None}
        for k, v in spellings.items()
    ]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    output = JsonlOutput(out, facts)
    assert [k for k in spellings if output.missing(Record("d", k), ["<CAPTION>"])] == ["e.png", "f.png"]
    named = JsonlOutput(out, RowFacts(("<CAPTION>",), "m", None))  # NAME=SOURCE: the name, as it is
    assert [k for k in spellings if not named.missing(Record("d", k), ["<CAPTION>"])] == ["a.png"]
    monkeypatch.chdir(tmp_path / "elsewhere")  # a rerun from another folder: new rows still count
    again = JsonlOutput(out, RowFacts(("<CAPTION>",), model_identity("../m"), None, local_model=True))
    assert not again.missing(Record("d", "d.png"), ["<CAPTION>"])
    assert again.missing(Record("d", "c.png"), ["<CAPTION>"])  # "link" from here is no folder
    output.write(Record("d", "e.png"), {"<CAPTION>": "y"}, None)
    for each in (output, named, again):
        each.close()
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[-1])["model"] == model


def test_a_failed_ray_task_is_said_by_its_cause_not_by_rays_retry_advice() -> None:
    from vision_server.bulk.ray import _last_line

    failed = RuntimeError(
        "ray::MapWorker(MapBatches(CaptionActor)).submit() (pid=1)\n"
        '  File "ray_stages.py", line 115, in _caption_row\n'
        "RuntimeError: the model did not load: /m has no config.json\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
        "To change retry attempts, backoff, or which errors are retried, configure ...\n"
    )
    assert _last_line(failed) == "RuntimeError: the model did not load: /m has no config.json"
    assert _last_line(ConnectionError("Could not find any running Ray instance.\nStart one")) == "Start one"


def test_checking_that_an_output_can_be_written_leaves_no_file_behind(tmp_path: Path) -> None:
    """A run that ends before its first row (a model that cannot load, a stop) must not leave an
    empty output that was not there; a file that was there stays as it was."""
    for name in ("new.jsonl", "new.parquet"):
        assert check_writable(tmp_path / name) is None
        assert not (tmp_path / name).exists()
    kept = tmp_path / "kept.jsonl"
    kept.write_bytes(b"")
    assert check_writable(kept) is None and kept.read_bytes() == b""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"key": "a"}\n', encoding="utf-8")
    assert check_writable(rows) is None and rows.read_text(encoding="utf-8") == '{"key": "a"}\n'
    shared = tmp_path / "shared"  # an output linked to where it is to be written, not yet there
    shared.mkdir()
    for name in ("linked.jsonl", "linked.parquet"):
        (tmp_path / name).symlink_to(shared / name)
        assert check_writable(tmp_path / name) is None
        assert (tmp_path / name).is_symlink() and not (shared / name).exists(), name
    missing = tmp_path / "missing"
    assert (
        check_writable(missing / "x.jsonl")
        == f"folder {missing} does not exist; create it first (mkdir -p {missing})"
    )


def test_an_image_whose_caption_file_appeared_meanwhile_is_skipped_unless_a_row_was_written(
    tmp_path: Path,
) -> None:
    # Planned when a.txt and b.txt were missing; saved in the gallery while the model captioned.
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for image in (a, b):
        image.with_suffix(".txt").write_text(f"by hand {image.stem}", encoding="utf-8")
    captions = {"<CAPTION>": "the model's"}
    sidecars = Sidecars(SidecarStyle())
    assert write_all([sidecars], Record(str(tmp_path), "a.png", path=a), captions, None) == (
        True,
        WRITTEN_MEANWHILE,
    )
    # With a JSONL output the row is written (the model's caption of the image is still true):
    # the image counts as captioned, and only the caption file is left as it is.
    jsonl = JsonlOutput(tmp_path / "rows.jsonl", FACTS)
    assert write_all([sidecars, jsonl], Record(str(tmp_path), "b.png", path=b), captions, None) == (
        False,
        None,
    )
    jsonl.close()
    assert [json.loads(line)["key"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == [
        "b.png"
    ]
    assert {p.name: p.read_text() for p in tmp_path.glob("*.txt")} == {
        "a.txt": "by hand a",
        "b.txt": "by hand b",
    }
    # A failure stays a failure; a caption file still missing is written.
    c = tmp_path / "c.png"
    assert write_all([sidecars], Record(str(tmp_path), "c.png", path=c), {}, "bad") == (False, "bad")
    assert write_all([sidecars], Record(str(tmp_path), "c.png", path=c), captions, None) == (False, None)
    assert c.with_suffix(".txt").read_text() == "the model's"
