"""``vision-server train`` before any model loads: reading datasets, naming every bad file,
augmentation, the validation split, and the output-folder and resume checks."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import hidden_names
from tests.support.images import image_bytes, save
from tests.support.train_data import CAPTIONS, captioned_folder
from vision_server.train.augment import Augmentation, caption_rng
from vision_server.train.dataset import DatasetError, load_dataset, split
from vision_server.train.loop import run_training
from vision_server.train.model import ModelError
from vision_server.train.options import TrainOptions, plan_differences
from vision_server.train.preflight import TrainError


def test_a_folder_pairs_each_image_with_its_caption_in_subfolders_too(tmp_path: Path) -> None:
    root = captioned_folder(tmp_path / "data", CAPTIONS[:2])
    save(root / "deeper" / "x.jpg", 7)
    (root / "deeper" / "x.txt").write_text("  photo cat  \n")
    (root / "img0.generate_tags.txt").write_text("cat, red")  # another task's sidecar: ignored
    examples = load_dataset(root)
    assert [(ex.name, ex.text) for ex in examples] == [
        ("img0.png", CAPTIONS[0]),
        ("img1.png", CAPTIONS[1]),
        ("deeper/x.jpg", "photo cat"),
    ]


def test_hidden_files_and_folders_are_no_part_of_a_folder_dataset(tmp_path: Path) -> None:
    """As for the folder captioners: a checkpoint copy in .ipynb_checkpoints/ with its caption,
    a dot-named image or caption are not trained on, and not reported as a problem either."""
    root = hidden_names.make_tree(tmp_path / ".data")
    for name in (*hidden_names.VISIBLE, *hidden_names.HIDDEN_IMAGES, ".link.png"):
        (root / name).with_suffix(".txt").write_text(f"photo of {name}")
    (root / "sub" / ".orphan.txt").write_text("a caption without an image")
    examples = load_dataset(root)
    assert [(ex.name, ex.text) for ex in examples] == [
        ("a.png", "photo of a.png"),
        ("sub/b.png", "photo of sub/b.png"),
    ]


@pytest.mark.skipif(os.mkdir not in os.supports_dir_fd, reason="builds the tree through dir_fd")
def test_a_hidden_folder_is_not_entered(tmp_path: Path) -> None:
    """Hidden folders were walked to their end (all of a large repository's .git), only for
    what they hold to be left out: one too deep to walk (paths longer than the system takes)
    stopped the run with an OSError. A folder is left out by its name, before it is entered."""
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    (root / ".git").mkdir()
    folder = os.open(root / ".git", os.O_RDONLY)
    try:
        for _ in range(20):  # 20 names of 250 characters: past PATH_MAX (4096 on Linux)
            os.mkdir("d" * 250, dir_fd=folder)
            inner = os.open("d" * 250, os.O_RDONLY, dir_fd=folder)
            os.close(folder)
            folder = inner
    finally:
        os.close(folder)
    assert [(ex.name, ex.text) for ex in load_dataset(root)] == [("img0.png", CAPTIONS[0])]


def test_captions_with_another_extension_are_pointed_out(tmp_path: Path) -> None:
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1], ext="caption")
    with pytest.raises(DatasetError, match=r"img0.png \(expected img0.txt beside it; found img0.caption: "):
        load_dataset(root)


def test_caption_ext_picks_the_caption_files(tmp_path: Path) -> None:
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1], ext="caption")
    assert load_dataset(root, caption_ext="caption")[0].text == CAPTIONS[0]
    with pytest.raises(DatasetError, match=r"images without captions.*\n.*img0.png \(expected img0.txt"):
        load_dataset(root)


def test_every_problem_is_reported_at_once_with_its_files(tmp_path: Path) -> None:
    root = captioned_folder(tmp_path / "data", CAPTIONS[:2])
    save(root / "lonely.png", 3)  # image without caption
    (root / "orphan.txt").write_text("photo dog")  # caption without image
    (root / "img1.txt").write_text("   \n")  # empty caption
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    (root / "broken.txt").write_text("photo broken")
    with pytest.raises(DatasetError) as caught:
        load_dataset(root)
    message = str(caught.value)
    assert "images without captions (1):\n    lonely.png" in message
    assert "captions without images (1):\n    orphan.txt" in message
    assert "empty captions (1):\n    img1.png" in message
    assert "unreadable images (1):\n    broken.png (" in message
    assert "img0.png" not in message


def test_an_empty_dataset_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no images with captions"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing")


def test_jsonl_rows_and_the_bulk_captioners_rows(tmp_path: Path) -> None:
    save(tmp_path / "images" / "a.png", 1)
    save(tmp_path / "images" / "b.png", 2)
    rows = [
        {"file": "images/a.png", "text": "photo cat"},
        {"source": str(tmp_path / "images"), "key": "b.png", "task": "<CAPTION>", "caption": "photo dog"},
        {"file": "images/gone.png", "text": "photo gone"},
        {"file": "images/a.png"},
    ]
    listing = tmp_path / "train.jsonl"
    listing.write_text("\n".join(json.dumps(row) for row in rows) + "\nnot json\n")
    with pytest.raises(DatasetError) as caught:
        load_dataset(listing)
    message = str(caught.value)
    assert "gone.png (train.jsonl line 3: no such file)" in message
    assert "images without captions (1):" in message and "train.jsonl line 4" in message
    assert "lines that are not JSON objects (1):\n    train.jsonl line 5" in message
    listing.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n")
    assert [ex.text for ex in load_dataset(listing)] == ["photo cat", "photo dog"]


def test_parquet_with_image_bytes_and_text(tmp_path: Path) -> None:
    table = pa.table({"image": [image_bytes(1), image_bytes(2)], "text": ["photo cat", ""]})
    pq.write_table(table, tmp_path / "data.parquet")
    with pytest.raises(DatasetError, match=r"empty captions \(1\):\n    data.parquet row 1"):
        load_dataset(tmp_path / "data.parquet")
    pq.write_table(table.slice(0, 1), tmp_path / "one.parquet")
    (example,) = load_dataset(tmp_path / "one.parquet")
    assert example.text == "photo cat" and example.read() == image_bytes(1)


def test_augmentation_keeps_the_trigger_and_is_reproducible() -> None:
    text = "ohwx, red, cat, sitting, table"
    shuffle = Augmentation(shuffle_tags=True, keep_tokens=1)
    outputs = {shuffle.apply(text, caption_rng(1, epoch, 0)) for epoch in range(20)}
    assert len(outputs) > 1 and all(out.startswith("ohwx, ") for out in outputs)
    assert all(sorted(out.split(", ")) == sorted(text.split(", ")) for out in outputs)
    assert shuffle.apply(text, caption_rng(1, 3, 0)) == shuffle.apply(text, caption_rng(1, 3, 0))
    dropout = Augmentation(caption_dropout=1.0, keep_tokens=1)
    dropped = dropout.apply(text, random.Random(0)).split(", ")
    assert dropped[0] == "ohwx" and len(dropped) == 4
    assert Augmentation().apply(text, random.Random(0)) == text


def test_validation_split_by_fraction_or_count(tmp_path: Path) -> None:
    examples = load_dataset(captioned_folder(tmp_path / "data"))
    train, val = split(examples, 0.4, seed=1)
    assert len(val) == 2 and len(train) == 3 and not {ex.name for ex in val} & {ex.name for ex in train}
    assert split(examples, 0.4, seed=1) == (train, val)
    assert [len(part) for part in split(examples, 1, seed=1)] == [4, 1]
    with pytest.raises(ValueError, match="leaves no training images"):
        split(examples, 5, seed=1)


def options(tmp_path: Path, **changes: object) -> TrainOptions:
    dataset = tmp_path / "data"
    if not dataset.exists():
        captioned_folder(dataset)
    settings = {"output": tmp_path / "out", "cache_dir": tmp_path / "cache", **changes}
    return TrainOptions(dataset=dataset, **settings)  # type: ignore[arg-type]


def test_an_existing_output_needs_overwrite_and_must_be_a_training_run(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match=r"--output .*out already exists and is not empty; pass --overwrite"):
        run_training(options(tmp_path))
    with pytest.raises(TrainError, match="not a training run's"):
        run_training(options(tmp_path, overwrite=True))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_an_output_that_cannot_be_written_is_found_before_the_model_loads(tmp_path: Path) -> None:
    """Checked before the (hub) model is fetched; the check leaves nothing behind."""
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(TrainError, match=r"--output .*afile/sub/out: .*afile is a file, not a folder"):
        run_training(options(tmp_path, output=tmp_path / "afile" / "sub" / "out"))
    with pytest.raises(TrainError, match=r"--output /proc/vs-out: cannot write there \(No such file"):
        run_training(options(tmp_path, output=Path("/proc/vs-out")))
    with pytest.raises(ModelError, match="--precision"):  # past the output check: nothing left there
        run_training(options(tmp_path, output=tmp_path / "new" / "out", device="cpu", precision="bf16"))
    assert not (tmp_path / "new").exists()


def test_the_task_is_the_token_the_server_asks_for(tmp_path: Path) -> None:
    from vision_server.train.preflight import canonical_task

    assert canonical_task("more_detailed_caption", "test:tiny") == "<MORE_DETAILED_CAPTION>"
    assert canonical_task("<mix_caption>", "test:tiny") == "<MIXED_CAPTION>"
    with pytest.raises(TrainError, match=r"--task 'NONSENSE' is no task of this model; use one of <GEN"):
        run_training(options(tmp_path, task="NONSENSE"))
    with pytest.raises(TrainError, match=r"'<GENERATE_TAGS>' is no task .* <CAPTION>, <DETAILED_CAPTION>"):
        canonical_task("<GENERATE_TAGS>", "microsoft/Florence-2-large")


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path: Path) -> None:
    """Its folder holds only TensorBoard events: --overwrite replaces it, --resume says so."""
    logs = tmp_path / "out" / "logs"
    logs.mkdir(parents=True)
    (logs / "events.out.tfevents.1795890301.host.21217.0").write_bytes(b"")
    with pytest.raises(
        TrainError, match=r"stopped before its first checkpoint: start again with --overwrite"
    ):
        run_training(options(tmp_path, resume=tmp_path / "out"))
    with pytest.raises(ModelError, match="--precision"):  # past the output check
        run_training(options(tmp_path, overwrite=True, device="cpu", precision="bf16"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainError, match=r"holds a finished adapter: there is nothing to resume"):
        run_training(options(tmp_path, resume=tmp_path / "done"))
    (logs / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="not a training run's"):
        run_training(options(tmp_path, overwrite=True))


def test_a_second_ctrl_c_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.train import loop

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_training", interrupted)
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    result = CliRunner().invoke(main, ["train", "--dataset", str(root), "--output", str(tmp_path / "out")])
    assert result.exit_code == 130 and "aborted without a checkpoint" in result.output


def test_a_model_that_cannot_be_loaded_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"cannot load model '.*no-such-model'.*does not exist"):
        run_training(options(tmp_path, model=str(tmp_path / "no-such-model")))
    (tmp_path / "bad-model").mkdir()
    (tmp_path / "bad-model" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"cannot load model '.*bad-model'"):
        run_training(options(tmp_path, model=str(tmp_path / "bad-model")))


def test_a_resume_must_keep_the_options_that_shape_the_run(tmp_path: Path) -> None:
    saved = options(tmp_path).as_dict()
    assert plan_differences(saved, options(tmp_path, save_every=5, log_with="none")) == []
    assert plan_differences(saved, options(tmp_path, learning_rate=1e-3, rank=8)) == [
        "--learning-rate: 0.0001 in the checkpoint, 0.001 now",
        "--rank: 4 in the checkpoint, 8 now",
    ]


def test_the_command_prints_the_problems_and_exits_1_or_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vision_server.cli import main

    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    save(root / "lonely.png", 3)
    args = ["train", "--dataset", str(root), "--output", str(tmp_path / "out"), "--log-with", "none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "images without captions (1):\n    lonely.png" in result.output
    assert "Traceback" not in result.output
    (root / "lonely.png").unlink()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "training.json").write_text("{}")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "already exists and is not empty; pass --overwrite" in result.output
    result = CliRunner().invoke(main, [*args[:-2], "--val-split", "0.5x"])
    assert result.exit_code == 2 and "--val-split" in result.output


def test_a_failure_inside_training_is_not_reported_as_bad_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the user's mistakes are usage errors (exit 2, "Try --help"); a ValueError from deep in
    the model is ours and surfaces as itself."""
    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.train import loop

    def fail(*_args: object, **_kwargs: object) -> None:
        raise ValueError("Image features and image tokens do not match")

    monkeypatch.setattr(loop, "run_training", fail)
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    result = CliRunner().invoke(main, ["train", "--dataset", str(root), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Usage:" not in result.output
    assert isinstance(result.exception, ValueError) and "do not match" in str(result.exception)


def test_the_help_names_every_value_plainly() -> None:
    import click
    from click.testing import CliRunner

    from vision_server.cli import main, train

    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "--val-split FRACTION|COUNT" in text and "--target-modules NAMES" in text
    assert " _" not in text  # no helper function's name as a metavar
    options = [param for param in train.params if isinstance(param, click.Option)]
    assert len(options) > 30 and [o.name for o in options if not o.help] == []


def test_trackers_are_used_only_when_installed() -> None:
    import importlib.util

    from vision_server.train.reporting import LoggerUnavailable, pick_tracker

    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert pick_tracker("auto") == ("tensorboard" if has_tensorboard else "none")
    assert pick_tracker("none") == "none"
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(LoggerUnavailable, match="pip install wandb"):
            pick_tracker("wandb")


def test_the_summary_counts_one_step_in_the_singular(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.train import loop
    from vision_server.train.reporting import counted

    assert [counted(1, "step"), counted(2, "step"), counted(0, "image")] == ["1 step", "2 steps", "0 images"]

    def one_step(options: TrainOptions, **_kwargs: object) -> loop.TrainResult:
        return loop.TrainResult(options.output, 1, 1, [], None, {"final_train_loss": 0.5})

    monkeypatch.setattr(loop, "run_training", one_step)
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    result = CliRunner().invoke(main, ["train", "--dataset", str(root), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0 and "trained 1 step; final train loss 0.5000" in result.output


def test_sigterm_says_what_a_second_signal_does_and_ctrl_c_says_ctrl_c(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first signal asks for a stop after the step; a second (of either kind) aborts at once."""
    import signal

    from vision_server.train.command import stop_on_signals

    for first, second, named in [
        (signal.SIGTERM, signal.SIGTERM, "a second SIGTERM aborts without one"),
        (signal.SIGINT, signal.SIGINT, "Ctrl+C again aborts without one"),
    ]:
        with stop_on_signals() as received:
            handler = signal.getsignal(first)
            assert callable(handler)
            handler(first, None)
            message = capsys.readouterr().err
            assert "stopping after this step" in message and named in message
            assert (first == signal.SIGINT) == ("Ctrl+C" in message)
            assert received == [first]
            with pytest.raises(KeyboardInterrupt):
                handler(second, None)
            assert received == [first, second]


def test_a_second_sigterm_aborts_with_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.train import loop

    def terminated_twice(*_args: object, **_kwargs: object) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)

    monkeypatch.setattr(loop, "run_training", terminated_twice)
    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    result = CliRunner().invoke(main, ["train", "--dataset", str(root), "--output", str(tmp_path / "out")])
    assert result.exit_code == 143 and "aborted without a checkpoint" in result.output


def test_image_column_for_a_dataset_that_is_not_parquet_is_bad_usage(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.train.dataset import OptionError

    root = captioned_folder(tmp_path / "data", CAPTIONS[:1])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"file": "data/img0.png", "text": CAPTIONS[0]}) + "\n")
    with pytest.raises(
        OptionError, match=r"--image-column applies to a .parquet dataset only; .* is a folder"
    ):
        load_dataset(root, image_column="image")
    args = ["train", "--dataset", str(rows), "--output", str(tmp_path / "out"), "--image-column", "image"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert (
        "--image-column applies to a .parquet dataset only" in result.output
        and "is a .jsonl" in result.output
    )


def test_image_column_naming_captions_says_they_hold_no_images(tmp_path: Path) -> None:
    """Not one 'no such file' line per multi-line caption: one line that says what the column is."""
    from click.testing import CliRunner

    from vision_server.cli import main
    from vision_server.train.dataset import OptionError

    captioned_folder(tmp_path / "data", CAPTIONS[:2])
    long_note = "a note\nover two lines " + "and long " * 20
    table = pa.table(
        {
            "file": ["data/img0.png", "data/img1.png"],
            "text": ["photo cat\nsecond line", "photo dog\nmore"],
            "notes": [long_note, "x\ny"],
        }
    )
    pq.write_table(table, tmp_path / "set.parquet")
    args = ["train", "--dataset", str(tmp_path / "set.parquet"), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--image-column", "text"])
    assert result.exit_code == 2, result.output
    assert "'text': that is the caption text column" in result.output and "holds no images" in result.output
    assert "second line" not in result.output and "no such file" not in result.output
    with pytest.raises(
        OptionError, match=r"column 'notes' holds no image paths: none of its 2 values"
    ) as caught:
        load_dataset(tmp_path / "set.parquet", image_column="notes")
    message = str(caught.value)
    assert "\n" not in message and "(the first is 'a note over two lines and long" in message
    assert message.endswith("…')") and message.count("and long") < 10  # cut short
    assert len(load_dataset(tmp_path / "set.parquet", image_column="file")) == 2
    # Found by its name, a column of paths to nothing is the dataset's problem (exit 1), said once.
    pq.write_table(
        table.set_column(0, "file", pa.array(["gone\n0.png", "gone1.png"])), tmp_path / "gone.parquet"
    )
    with pytest.raises(DatasetError, match=r"column 'file' holds no image paths: .*first is 'gone 0.png'"):
        load_dataset(tmp_path / "gone.parquet")
    pq.write_table(
        table.set_column(0, "file", pa.array(["data/img0.png", "gone1.png"])), tmp_path / "one.parquet"
    )
    with pytest.raises(
        DatasetError, match=r"captions without images \(1\):\n    .*gone1.png \(one.parquet row 1"
    ):
        load_dataset(tmp_path / "one.parquet")


def test_an_image_over_the_training_pixel_limit_is_left_out_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It raised PayloadTooLarge out of the dataset check, which only caught bad images."""
    from vision_server.train import dataset

    monkeypatch.setattr(dataset, "MAX_PIXELS", 100)
    image = tmp_path / "big.png"
    image.write_bytes(image_bytes(1, "PNG", (30, 20)))
    reason = dataset._unreadable(dataset.Example("big.png", "a caption", path=image))
    assert reason == "Image is 30x20 = 600 pixels; the limit is 100. Downscale it."
