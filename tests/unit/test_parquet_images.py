"""One rule for a Parquet table's image column: ``vision-server caption``'s reader and
``vision-server train``'s dataset read the same file from the same column."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.images import image_bytes, save
from vision_server.bulk.readers import InputError, ReadOptions, check_inputs, image_column_note, iter_records
from vision_server.parquet_images import image_column
from vision_server.train.dataset import DatasetError, OptionError, load_dataset

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_images(*seeds: int) -> pa.Array:
    return pa.array([{"bytes": image_bytes(seed), "path": f"{seed}.png"} for seed in seeds], HF_IMAGE)


def both_readers(table: Path) -> tuple[list[bytes], list[bytes]]:
    """The image bytes each command takes from ``table``, row by row."""
    caption = [
        record.data or (record.path.read_bytes() if record.path else b"")
        for record in iter_records([table], ReadOptions())
    ]
    train = [example.read() for example in load_dataset(table)]
    return caption, train


def test_an_image_struct_under_another_name_beats_a_path_column_in_both_commands(tmp_path: Path) -> None:
    """Before, ``train`` took a struct only when named ``image`` and read ``file_name`` here."""
    save(tmp_path / "a.png", 90)
    save(tmp_path / "b.png", 91)
    table = tmp_path / "data.parquet"
    columns = {"file_name": ["a.png", "b.png"], "img": hf_images(1, 2), "text": ["cat", "dog"]}
    pq.write_table(pa.table(columns), table)
    caption, train = both_readers(table)
    assert caption == train == [image_bytes(1), image_bytes(2)]


def test_the_column_named_image_comes_first_and_the_others_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = tmp_path / "data.parquet"
    columns = {
        "jpg": [image_bytes(5), image_bytes(6)],
        "thumb": hf_images(7, 8),
        "image": hf_images(1, 2),
        "text": ["cat", "dog"],
    }
    pq.write_table(pa.table(columns), table)
    caption, train = both_readers(table)
    assert caption == train == [image_bytes(1), image_bytes(2)]
    chosen = image_column(pq.read_schema(table))
    assert (chosen.name, chosen.kind, chosen.passed_over) == ("image", "struct", ("jpg", "thumb"))
    note = image_column_note(table, ReadOptions()) or ""
    assert "from column 'image', not 'jpg', 'thumb'" in note and "--image-column" in note
    assert image_column_note(table, ReadOptions(image_column="jpg")) is None  # the user chose
    assert "from column 'image', not 'jpg', 'thumb'" in caplog.text  # train says so too
    caplog.clear()
    chosen_by_user = [example.read() for example in load_dataset(table, image_column="thumb")]
    assert chosen_by_user == [image_bytes(7), image_bytes(8)] and "not 'jpg'" not in caplog.text
    # without `image`: Image structs before raw bytes, then the table's order
    pq.write_table(pa.table({k: v for k, v in columns.items() if k != "image"}), table)
    caption, train = both_readers(table)
    assert caption == train == [image_bytes(7), image_bytes(8)]


def test_a_table_without_an_image_column_is_refused_naming_its_columns(tmp_path: Path) -> None:
    table = tmp_path / "data.parquet"
    meta = pa.struct([("width", pa.int64())])  # a struct without bytes is not an image
    pq.write_table(
        pa.table({"text": ["cat"], "url": ["http://x/a.png"], "size": pa.array([{"width": 3}], meta)}), table
    )
    columns = re.escape("columns: text (string), url (string), size (struct<width: int64>)")
    with pytest.raises(InputError, match=rf"no image column found \({columns}\).*--image-column") as caught:
        check_inputs([table], ReadOptions())
    assert "a string column of paths named path, file, file_name" in str(caught.value)
    with pytest.raises(
        DatasetError, match=rf"data.parquet: no image column found \({columns}\).*--image-column"
    ):
        load_dataset(table)
    # a column the user named that holds no images is bad usage (exit 2), as is naming one at all
    # for a dataset that is not a table
    with pytest.raises(OptionError, match=r"column 'size' holds struct<width: int64>, not image bytes or"):
        load_dataset(table, image_column="size")
    with pytest.raises(OptionError, match=r"--image-column applies to a .parquet dataset only"):
        load_dataset(tmp_path, image_column="image")
    with pytest.raises(
        InputError, match=r"column 'size' holds struct<width: int64>, not image bytes or paths"
    ):
        check_inputs([table], ReadOptions(image_column="size"))


@pytest.fixture(autouse=True)
def _warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)


def test_a_named_column_of_text_is_refused_by_caption_as_by_train(tmp_path: Path) -> None:
    """Both commands ask one check, up front; a real path column passes it at its first value."""
    save(tmp_path / "a.png", 1)
    table = tmp_path / "data.parquet"
    pq.write_table(
        pa.table({"file": ["gone.png", "a.png"], "notes": ["a cat\non a mat", "x"], "text": ["c", "d"]}),
        table,
    )
    said = "column 'notes' holds no image paths: none of its 2 values is an existing file"
    with pytest.raises(InputError, match=re.escape(f"--image-column 'notes': {table}: {said}")) as caught:
        check_inputs([table], ReadOptions(image_column="notes"))
    assert str(caught.value).endswith("(the first is 'a cat on a mat')")
    with pytest.raises(OptionError, match=re.escape(f"--image-column 'notes': {table}: {said}")):
        load_dataset(table, image_column="notes")
    assert check_inputs([table], ReadOptions(image_column="file")) == {table: "parquet"}
