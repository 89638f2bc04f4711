"""``vision-server train`` meeting faults as real processes on the tiny model: killed (``kill -9``)
while a checkpoint or the final adapter is written, a full disk, a second run into the same
output folder, images that change after the run checked them. Nothing done is lost, nothing torn
is trusted, and the message says what to fix."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.full_disk import fill, fill_exactly, small_disk, small_ext2_disk
from tests.support.processes import cli_command
from tests.support.train_data import captioned_folder
from vision_server.train.dataset import load_dataset, split

ROOT = Path(__file__).resolve().parents[2]
GATED = ROOT / "tests" / "support" / "gated_train.py"
# Five images, one a step: an epoch is five steps, with a checkpoint at its end.
OPTIONS = ("--model", "test:tiny", "--log-with", "none", "--val-samples", "0", "--device", "cpu")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _train(data: Path, output: Path, cache: Path, *more: str) -> list[str]:
    return [
        "train",
        "--dataset",
        str(data),
        "--output",
        str(output),
        "--cache-dir",
        str(cache),
        *OPTIONS,
        *more,
    ]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli_command(), *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


class Gated:
    """``gated_train.py`` in the background, held at ``at`` until :meth:`open`. Its output goes
    to ``train.log`` in the gate folder, or to pipes (``piped``: for a test that limits the size
    of the files it writes) read by :meth:`finish`."""

    def __init__(self, gate: Path, at: str, args: list[str], piped: bool = False) -> None:
        gate.mkdir(parents=True, exist_ok=True)
        self.gate, self.point = gate, at.split(":")[0]
        self.log = gate / "train.log"
        self._sink = self.log.open("wb")
        env = _env(TRAIN_GATE=str(gate), TRAIN_GATE_AT=at)
        sink = subprocess.PIPE if piped else self._sink
        self.process = subprocess.Popen(
            [sys.executable, str(GATED), *args],
            stdout=sink,
            stderr=subprocess.PIPE if piped else subprocess.STDOUT,
            env=env,
            text=piped,
        )

    def finish(self) -> tuple[int, str, str]:
        """The exit status, stdout and stderr of a ``piped`` run once it ends."""
        out, err = self.process.communicate(timeout=300)
        return self.process.returncode, out, err

    def wait_entered(self) -> None:
        deadline = time.monotonic() + 300
        while not (self.gate / f"{self.point}.entered").exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def open(self) -> None:
        (self.gate / f"{self.point}.open").touch()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(60)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(60)
        self._sink.close()


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[list[Gated]]:
    runs: list[Gated] = []
    yield runs
    for run in runs:
        run.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return captioned_folder(tmp_path / "data")


def _hidden(output: Path) -> list[str]:
    return sorted(str(p.relative_to(output)) for p in output.rglob(".*"))


def test_kill_9_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """The torn checkpoint is not trusted, and its leftover goes though the resumed run (which
    may save at other steps: ``--save-every`` may change) never writes that step again."""
    output, cache = tmp_path / "out", tmp_path / "cache"
    args = _train(data, output, cache, "--epochs", "3", "--save-every", "2")
    run = Gated(tmp_path / "gate", "checkpoint:2", args)
    gated.append(run)
    run.wait_entered()  # step-4's adapter is written, its trainer state not yet
    run.kill()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        ".step-00000004.partial",
        "step-00000002",
    ]
    resumed = _run(_train(data, output, cache, "--epochs", "3", "--resume", str(output)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {output / 'checkpoints' / 'step-00000002'} at step 2/15" in resumed.stderr
    assert (output / "adapter_config.json").is_file() and _hidden(output) == []
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]


def test_kill_9_while_the_adapter_is_written_leaves_no_adapter_config_and_resumes(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    output, cache = tmp_path / "out", tmp_path / "cache"
    run = Gated(tmp_path / "gate", "final", _train(data, output, cache, "--epochs", "2"))
    gated.append(run)
    run.wait_entered()  # the weights are in place, training.json and the config not yet
    run.kill()
    assert (output / "adapter_model.safetensors").is_file() and not (output / "adapter_config.json").exists()
    served = _run(["serve", "--model", "test:tiny", "--cache-dir", str(cache), "--adapter", str(output)], 120)
    assert served.returncode != 0 and "step-00000005" in served.stderr, served.stderr
    resumed = _run(_train(data, output, cache, "--epochs", "2", "--resume", str(output)))
    assert resumed.returncode == 0, resumed.stderr
    assert (output / "adapter_config.json").is_file() and _hidden(output) == []


def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    output, cache = tmp_path / "out", tmp_path / "cache"
    first = Gated(tmp_path / "gate", "checkpoint:2", _train(data, output, cache, "--epochs", "3"))
    gated.append(first)
    first.wait_entered()
    for extra in (["--overwrite"], ["--resume", str(output)]):
        second = _run(_train(data, output, cache, "--epochs", "3", *extra))
        assert second.returncode == 2, second.stderr
        assert "is being written by another run" in second.stderr and str(output) in second.stderr
        assert "Traceback" not in second.stderr
    assert (output / "checkpoints" / "step-00000005" / "trainer_state.pt").is_file()  # untouched
    first.open()
    assert first.process.wait(300) == 0, first.log.read_text()
    assert (output / "adapter_config.json").is_file()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]


def test_a_full_disk_stops_the_run_naming_the_checkpoint_and_keeping_the_last(
    tmp_path: Path, data: Path
) -> None:
    cache = tmp_path / "cache"
    # One checkpoint of the tiny model takes about 95 kB: the second does not fit beside the first.
    with small_disk(tmp_path / "disk", "160k") as disk:
        output = disk / "out"
        run = _run(_train(data, output, cache, "--epochs", "4", "--keep-checkpoints", "4"))
        assert run.returncode == 1, run.stderr
        last = output / "checkpoints" / "step-00000005"
        assert (
            f"Error: cannot write {output / 'checkpoints' / 'step-00000010'}: no space left on the device; "
            f"the last complete checkpoint is {last}: free some space, then continue with --resume {output}"
        ) in run.stderr
        assert "Traceback" not in run.stderr
        assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000005"]  # no torn one
        kept = torch.load(last / "trainer_state.pt", weights_only=True)
        assert kept["step"] == 5


def test_a_full_disk_while_the_adapter_is_written_leaves_no_partial_adapter(
    tmp_path: Path, data: Path
) -> None:
    """One epoch (no checkpoint before the adapter), on a disk too small for the adapter's weights."""
    with small_disk(tmp_path / "disk", "16k") as disk:
        output = disk / "out"
        run = _run(_train(data, output, tmp_path / "cache", "--epochs", "1"))
        assert run.returncode == 1, run.stderr
        assert (
            f"Error: cannot write {output}: no space left on the device; no checkpoint was written: "
            "free some space, then run the same command again\n"  # the folder is empty: no --overwrite
        ) in run.stderr
        assert "Traceback" not in run.stderr
        assert sorted(p.name for p in output.iterdir()) == []  # no weights without a config, no leftover


def test_a_full_disk_for_the_tensorboard_logs_is_said_once_plainly(tmp_path: Path, data: Path) -> None:
    pytest.importorskip("tensorboard")
    with small_disk(tmp_path / "disk", "16k") as disk:
        fill(disk)
        output = disk / "out"
        run = _run(_train(data, output, tmp_path / "cache", "--epochs", "1", "--log-with", "tensorboard"))
        assert run.returncode == 1, run.stderr
        assert f"Error: cannot write {output / 'logs'}: no space left on the device" in run.stderr
        assert "Traceback" not in run.stderr and "Exception in thread" not in run.stderr, run.stderr


def test_an_image_deleted_during_the_run_stops_it_with_a_checkpoint_to_resume(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    output, cache = tmp_path / "out", tmp_path / "cache"
    order = torch.randperm(5, generator=torch.Generator().manual_seed(42 * 1_000_003)).tolist()
    # Two images a step: the first epoch reads it in its second step, after that step's first
    # image went through the model (its dropout drew random numbers: a resume must not see them).
    last = data / f"img{order[3]}.png"
    recipe = ("--epochs", "2", "--gradient-accumulation", "2")
    run = Gated(tmp_path / "gate", "start", _train(data, output, cache, *recipe))
    gated.append(run)
    run.wait_entered()  # the dataset was checked
    kept = last.read_bytes()
    last.unlink()
    run.open()
    assert run.process.wait(300) == 1, run.log.read_text()
    message = run.log.read_text()
    assert f"{last.name} can no longer be read (" in message and "Traceback" not in message, message
    checkpoint = output / "checkpoints" / "step-00000001"
    assert f"the last complete checkpoint is {checkpoint}: put the image back as it was" in message
    assert (checkpoint / "trainer_state.pt").is_file()
    last.write_bytes(kept[: len(kept) // 2])  # back, but truncated: unreadable, named at the start
    refused = _run(_train(data, output, cache, *recipe, "--resume", str(output)))
    assert (
        refused.returncode == 1 and "unreadable images (1)" in refused.stderr and last.name in refused.stderr
    )
    last.write_bytes(kept)
    resumed = _run(_train(data, output, cache, *recipe, "--resume", str(output)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} at step 1/6" in resumed.stderr
    straight = _run(_train(data, tmp_path / "straight", cache, *recipe))
    assert straight.returncode == 0, straight.stderr
    one = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    two = load_file(output / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:  # the failed step left no trace: the run ends where an uninterrupted one does
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def _when(condition: Callable[[], bool], run: Gated) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert run.process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def test_logs_that_cannot_be_finished_after_the_adapter_is_written_are_a_warning(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """The adapter is whole: the run is done (exit 0), and the warning names the events file
    without sending the user to ``--resume`` (which would train the last epoch again).

    The fault comes where it does overnight: TensorBoard's writer thread is still writing the
    last values when the adapter is done, and meets a file that may grow no more (the run's
    file size limit lowered from outside, ``prlimit``: the same ``DiskFull`` as a full disk,
    which cannot be made to refuse a few bytes inside a block already written)."""
    pytest.importorskip("tensorboard")
    output, cache = tmp_path / "out", tmp_path / "cache"
    args = _train(data, output, cache, "--epochs", "1", "--log-with", "tensorboard")
    run = Gated(tmp_path / "gate", "logs", args, piped=True)
    gated.append(run)
    run.wait_entered()  # the writer thread holds the epoch's loss, the main thread goes on
    _when(lambda: (output / "adapter_config.json").is_file(), run)
    (events,) = (output / "logs").glob("events.out.tfevents.*")
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.prlimit(run.process.pid, resource.RLIMIT_FSIZE, (events.stat().st_size, hard))
    run.open()
    status, out, err = run.finish()
    assert status == 0, err
    assert (
        f"Warning: cannot write {events}: file too large: no space left within the size limit; the "
        f"adapter in {output} is complete: only the TensorBoard logs lack their last values "
        "(nothing to resume)"
    ) in err
    assert "--resume" not in err and "Traceback" not in err and "Exception in thread" not in err, err
    assert "trained 5 steps" in err and out.strip() == str(output)
    assert (output / "training.json").is_file() and _hidden(output) == []


def test_a_full_disk_when_the_output_folder_is_made_is_said_in_one_line(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """The disk fills up while the model loads, and the folder is made after it: exit 1, the
    folder and the full disk named (ext2: a new folder takes a block, on tmpfs none)."""
    with small_ext2_disk(tmp_path / "disk") as disk:
        output = disk / "out"
        run = Gated(tmp_path / "gate", "start", _train(data, output, tmp_path / "cache", "--epochs", "1"))
        gated.append(run)
        run.wait_entered()  # checked and locked: the lock file beside the folder is made
        fill_exactly(disk)
        run.open()
        assert run.process.wait(300) == 1, run.log.read_text()
        message = run.log.read_text()
        assert (
            f"Error: cannot write {output}: no space left on the device; no checkpoint was written: "
            "free some space, then run the same command again\n"
        ) in message
        assert "Traceback" not in message, message


def test_a_disk_full_before_the_run_is_a_full_disk_not_a_usage_error(tmp_path: Path, data: Path) -> None:
    """Found by the check of a new nested folder, before the model loads: exit 1 (not the exit
    2 of a mistake in the command), said as every full disk is, and nothing left behind."""
    with small_ext2_disk(tmp_path / "disk") as disk:
        fill_exactly(disk)
        nested = disk / "runs" / "one" / "out"
        run = _run(_train(data, nested, tmp_path / "cache", "--epochs", "1"))
        assert run.returncode == 1, run.stderr
        assert (
            f"Error: cannot write {nested}: no space left on the device; no checkpoint was written: "
            "free some space, then run the same command again\n"
        ) in run.stderr
        assert "Traceback" not in run.stderr and not (disk / "runs").exists()


def test_two_runs_into_a_new_nested_output_are_one_run_before_the_model_loads(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """The folders above ``--output`` are made and the lock taken before the (slow) model load:
    the second run, started while the first loads its model, is refused at once."""
    output, cache = tmp_path / "runs" / "day" / "out", tmp_path / "cache"
    first = Gated(tmp_path / "gate", "start", _train(data, output, cache, "--epochs", "1"))
    gated.append(first)
    first.wait_entered()  # checked, locked, about to load the model
    second = _run(_train(data, output, cache, "--epochs", "1"))
    assert second.returncode == 2, second.stderr
    assert f"--output {output} is being written by another run" in second.stderr
    assert "training" not in second.stderr and "caption" not in second.stderr  # no model, no captions
    first.open()
    assert first.process.wait(300) == 0, first.log.read_text()
    assert (output / "adapter_config.json").is_file()


def test_a_validation_image_deleted_during_the_run_stops_it_with_a_checkpoint_to_resume(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """The steps of the epoch are checkpointed before its validation, which the resumed run
    does first: it ends as an uninterrupted run does, loss history included."""
    output, cache = tmp_path / "out", tmp_path / "cache"
    recipe = ("--epochs", "2", "--val-split", "1")  # four training images: four steps an epoch
    straight = _run(_train(data, tmp_path / "straight", cache, *recipe))
    assert straight.returncode == 0, straight.stderr
    expected = json.loads((tmp_path / "straight" / "training.json").read_text())
    held_out = data / expected["validation_images"][0]
    run = Gated(tmp_path / "gate", "start", _train(data, output, cache, *recipe))
    gated.append(run)
    run.wait_entered()
    kept = held_out.read_bytes()
    held_out.unlink()
    run.open()
    assert run.process.wait(300) == 1, run.log.read_text()
    message = run.log.read_text()
    assert f"{held_out.name} can no longer be read (" in message and "Traceback" not in message, message
    checkpoint = output / "checkpoints" / "step-00000004"
    assert f"the last complete checkpoint is {checkpoint}: put the image back as it was" in message
    held_out.write_bytes(kept)
    resumed = _run(_train(data, output, cache, *recipe, "--resume", str(output)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} at step 4/8" in resumed.stderr
    assert "epoch 1: train loss" in resumed.stderr and "validation loss" in resumed.stderr
    done = json.loads((output / "training.json").read_text())
    assert [entry["epoch"] for entry in done["history"]] == [1, 2]
    for got, want in zip(done["history"], expected["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    one = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    two = load_file(output / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_a_validation_image_deleted_before_the_last_validation_leaves_only_it_to_do(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """The checkpoint holds every step; the resumed run validates, then writes the adapter."""
    output, cache = tmp_path / "out", tmp_path / "cache"
    recipe = ("--epochs", "1", "--val-split", "1")
    run = Gated(tmp_path / "gate", "start", _train(data, output, cache, *recipe))
    gated.append(run)
    run.wait_entered()
    held_out = data / split(load_dataset(data), 1, seed=42)[1][0].name  # the one held out
    kept = held_out.read_bytes()
    held_out.unlink()
    run.open()
    assert run.process.wait(300) == 1, run.log.read_text()
    checkpoint = output / "checkpoints" / "step-00000004"
    assert f"the last complete checkpoint is {checkpoint}" in run.log.read_text()
    assert not (output / "adapter_config.json").exists()
    held_out.write_bytes(kept)
    resumed = _run(_train(data, output, cache, *recipe, "--resume", str(output)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} at step 4/4" in resumed.stderr
    history = json.loads((output / "training.json").read_text())["history"]
    assert [(entry["epoch"], entry["step"]) for entry in history] == [(1, 4)]
    assert history[0]["val_loss"] is not None and (output / "adapter_config.json").is_file()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (hidden ones included) with its inode and size."""
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_size) for p in root.rglob("*")}


def test_a_failed_model_load_takes_away_the_new_folders_and_lock_it_made(tmp_path: Path, data: Path) -> None:
    """The folders above a new nested ``--output`` and the lock file made in them before the
    model loads go again when it cannot be loaded: the disk is as it was."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    output = tmp_path / "runs" / "day" / "out"
    run = _run(_train(data, output, tmp_path / "cache", "--model", str(not_a_model)))
    assert run.returncode == 1, run.stderr
    assert f"Error: cannot load model '{not_a_model}'" in run.stderr
    assert not (tmp_path / "runs").exists(), sorted(_tree(tmp_path / "runs"))


def test_a_failed_start_keeps_what_an_earlier_run_left(tmp_path: Path, data: Path) -> None:
    """Beside an earlier run (its folder, its lock file, another output's lock), a start that
    fails takes away only what it made: the new folder and its lock file in ``runs/``, or
    nothing at all where the lock file was an earlier run's."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    first = _run(_train(data, runs / "first", cache, "--max-steps", "1"))
    assert first.returncode == 0, first.stderr
    before = _tree(runs)
    assert ".first.lock" in before  # an earlier run's lock file stays on Unix
    for output in (runs / "day" / "out", runs / "second", runs / "first"):
        more = ("--model", str(not_a_model), *(("--overwrite",) if output.name == "first" else ()))
        run = _run(_train(data, output, cache, *more))
        assert run.returncode == 1, run.stderr
        assert _tree(runs) == before, output


def test_a_start_refused_after_the_lock_takes_away_the_lock_file_it_made(tmp_path: Path, data: Path) -> None:
    """``--output`` holds files that are not a run's: refused (exit 2) after the lock is taken,
    and the lock file made for it goes again."""
    output = tmp_path / "photos"
    output.mkdir()
    (output / "cat.png").write_bytes(b"not mine to replace")
    run = _run(_train(data, output, tmp_path / "cache"))
    assert run.returncode == 2, run.stderr
    assert "already exists and is not empty" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "photos"]


def test_aborting_while_the_model_loads_takes_away_the_new_folders_and_lock(
    tmp_path: Path, data: Path, gated: list[Gated]
) -> None:
    """A second Ctrl+C while the model loads aborts before anything is trained: the folders
    above the new nested ``--output`` and the lock file made in them go too."""
    output = tmp_path / "runs" / "day" / "out"
    run = Gated(tmp_path / "gate", "start", _train(data, output, tmp_path / "cache", "--epochs", "1"))
    gated.append(run)
    run.wait_entered()  # checked, folders made, locked, about to load the model
    assert (tmp_path / "runs" / "day" / ".out.lock").is_file()
    run.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while "stopping after this step" not in run.log.read_text():
        assert time.monotonic() < deadline, run.log.read_text()
        time.sleep(0.05)
    run.process.send_signal(signal.SIGINT)
    assert run.process.wait(60) == 130, run.log.read_text()
    assert "aborted without a checkpoint" in run.log.read_text()
    assert not (tmp_path / "runs").exists()
