"""``vision-server train`` end to end on a tiny model that can learn: the trained adapter makes the
model repeat its captions, in ``caption --adapter`` and in ``serve --adapter``; a stopped and
resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.support.processes import cli_command, http_json, tiny_server
from tests.support.train_data import captioned_folder
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.images import fit_image
from vision_server.testing.trainable import build_trainable_test_model
from vision_server.train.loop import run_training
from vision_server.train.options import TrainOptions
from vision_server.train.preflight import TrainError

TASK = "<MORE_DETAILED_CAPTION>"
GREEDY = GenerationOptions(num_beams=1, max_new_tokens=32)
# Enough for the four training captions on this model (tried on three sets of pictures), in
# 240 steps: a few seconds of CPU.
RECIPE = (
    "--epochs", "60", "--learning-rate", "1e-2", "--lr-scheduler", "cosine",
    "--rank", "8", "--alpha", "16", "--lora-dropout", "0",
)  # fmt: skip


@dataclass(frozen=True)
class Trained:
    model: Path
    data: Path
    adapter: Path
    cache: Path
    run: subprocess.CompletedProcess[str]

    @property
    def metadata(self) -> dict[str, object]:
        return dict(json.loads((self.adapter / "training.json").read_text()))

    def targets(self) -> dict[str, str]:
        """Training image name → its caption (the held-out validation image left out)."""
        held = set(self.metadata["validation_images"])  # type: ignore[call-overload]
        return {
            path.name: path.with_suffix(".txt").read_text().strip()
            for path in sorted(self.data.glob("*.png"))
            if path.name not in held
        }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("train")
    model = build_trainable_test_model(tmp / "model")
    data = captioned_folder(tmp / "data")
    adapter, cache = tmp / "adapter", tmp / "cache"
    command = [
        *cli_command(),
        "train",
        "--dataset",
        str(data),
        "--output",
        str(adapter),
        "--model",
        str(model),
    ]
    command += ["--cache-dir", str(cache), *RECIPE, "--val-split", "1", "--val-samples", "1"]
    command += ["--max-caption-tokens", "32", "--log-with", "none"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env())
    assert run.returncode == 0, run.stderr
    return Trained(model, data, adapter, cache, run)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process torch on one thread: on a crowded CI machine two threads spin and crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_teaches_the_captions_and_reports_losses(trained: Trained, one_thread: None) -> None:
    meta = trained.metadata
    history = meta["history"]
    assert isinstance(history, list) and len(history) == 60
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert isinstance(meta["final_val_loss"], float) and meta["final_val_loss"] == history[-1]["val_loss"]
    assert meta["base_model"] == str(trained.model) and meta["task"] == TASK and meta["steps"] == 240
    assert meta["options"]["rank"] == 8 and meta["precision"] == "float32"  # type: ignore[index]
    assert "epoch 60: train loss" in trained.run.stderr and "validation loss" in trained.run.stderr
    assert "target: photo" in trained.run.stderr  # a validation caption beside its target
    assert trained.run.stdout.strip() == str(trained.adapter)
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= {
        p.name for p in trained.adapter.iterdir()
    }

    targets = trained.targets()
    assert len(targets) == 4
    untrained = _captions(trained, adapter=None)
    assert all(untrained[name] != target for name, target in targets.items()), untrained
    assert _captions(trained, adapter=trained.adapter) == targets


def _captions(trained: Trained, adapter: Path | None) -> dict[str, str]:
    captioner = FlorenceCaptioner(
        str(trained.model), cache_dir=trained.cache, adapter=str(adapter) if adapter else None, device="cpu"
    )
    captioner.load()
    names = list(trained.targets())
    items = [
        CaptionItem(
            fit_image(Image.open(trained.data / name).convert("RGB"), captioner.pixel_spec), TASK, GREEDY
        )
        for name in names
    ]
    try:
        return {name: caption.text for name, caption in zip(names, captioner.caption(items), strict=True)}
    finally:
        captioner.unload()


def test_caption_command_loads_the_adapter(trained: Trained, tmp_path: Path) -> None:
    rows = tmp_path / "captions.jsonl"
    command = [*cli_command(), "caption", str(trained.data), "--model", str(trained.model), "--adapter"]
    command += [str(trained.adapter), "--cache-dir", str(trained.cache), "--num-beams", "1", "--task", TASK]
    command += ["--jsonl", str(rows), "--workers", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr  # peft's FutureWarning about a transformers API
    captions = {row["key"]: row["caption"] for row in map(json.loads, rows.read_text().splitlines())}
    targets = trained.targets()
    assert {name: captions[name] for name in targets} == targets


@pytest.fixture
def adapter_server(trained: Trained, tmp_path: Path) -> Iterator[str]:
    options = ("--model", str(trained.model), "--adapter", str(trained.adapter), "--num-beams", "1")
    with tiny_server(tmp_path, trained.cache, *options, env={"OMP_NUM_THREADS": "1"}) as server:
        yield server.wait_listening(timeout=120)
        server.stop()


def test_serve_loads_the_adapter_and_shows_how_it_was_trained(trained: Trained, adapter_server: str) -> None:
    for name, target in trained.targets().items():
        image = base64.b64encode((trained.data / name).read_bytes()).decode()
        status, reply = http_json(f"{adapter_server}/process_image", {"image": image, "prompt": TASK})
        assert status == 200 and reply["result"] == target, reply
    for route in ("/model_info", "/v1/status"):
        status, reply = http_json(adapter_server + route)
        assert status == 200
        adapter = reply["adapter"]
        assert adapter["name"] == trained.adapter.name and str(trained.adapter) not in json.dumps(reply)
        training = adapter["training"]
        assert training["base_model"] == trained.model.name and training["task"] == TASK  # no path
        assert training["steps"] == 240 and training["final_val_loss"] == trained.metadata["final_val_loss"]
        assert training["options"]["rank"] == 8


def test_a_stopped_run_resumed_ends_where_an_uninterrupted_one_does(
    trained: Trained, tmp_path: Path, one_thread: None
) -> None:
    """K steps, stop (as Ctrl+C does), resume to 2K: the same adapter and losses as 2K straight.

    Everything with randomness is on: LoRA dropout, tag shuffling and dropout, a cosine schedule
    with warm-up, gradient accumulation; the stop falls in the middle of an epoch.
    """
    base = {
        "dataset": trained.data, "model": str(trained.model), "cache_dir": trained.cache, "max_steps": 10,
        "gradient_accumulation": 2, "learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_steps": 2,
        "lora_dropout": 0.2, "shuffle_tags": True, "caption_dropout": 0.5, "val_split": 1.0,
        "val_samples": 0, "log_with": "none", "device": "cpu",
    }  # fmt: skip
    straight = run_training(TrainOptions(output=tmp_path / "straight", **base))  # type: ignore[arg-type]
    stops = iter(range(1, 100))
    stopped = run_training(
        TrainOptions(output=tmp_path / "resumed", **base),  # type: ignore[arg-type]
        should_stop=lambda: next(stops) >= 5,
    )
    assert not stopped.finished and stopped.steps == 5 and stopped.checkpoint is not None
    assert not (tmp_path / "resumed" / "adapter_config.json").exists()
    fewer = tmp_path / "fewer"
    shutil.copytree(trained.data, fewer)
    (fewer / "img0.png").unlink()
    (fewer / "img0.txt").unlink()
    changed = {**base, "dataset": fewer, "learning_rate": 1e-3}
    with pytest.raises(
        TrainError, match=r"(?s)--learning-rate: 0.003 in the checkpoint.*the training images: "
    ):
        run_training(TrainOptions(output=tmp_path / "resumed", resume=tmp_path / "resumed", **changed))  # type: ignore[arg-type]
    resumed = run_training(TrainOptions(output=tmp_path / "resumed", resume=tmp_path / "resumed", **base))  # type: ignore[arg-type]
    assert resumed.finished and resumed.steps == 10
    assert [e["train_loss"] for e in resumed.history] == pytest.approx(
        [e["train_loss"] for e in straight.history], rel=1e-5
    )
    one = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    two = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and len(one) > 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
    assert any(one[key].abs().sum() > 0 for key in one if "lora_B" in key)  # it did train


def test_tensorboard_gets_the_losses(trained: Trained, tmp_path: Path, one_thread: None) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = TrainOptions(
        dataset=trained.data, output=tmp_path / "run", model=str(trained.model), cache_dir=trained.cache,
        max_steps=3, val_split=1.0, val_samples=0, log_with="auto",
    )  # fmt: skip
    run_training(options)
    events = EventAccumulator(str(tmp_path / "run" / "logs"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]


def test_ctrl_c_stops_with_a_checkpoint_to_resume_from(trained: Trained, tmp_path: Path) -> None:
    output, log = tmp_path / "run", tmp_path / "train.log"
    command = [*cli_command(), "train", "--dataset", str(trained.data), "--output", str(output)]
    command += ["--model", str(trained.model), "--cache-dir", str(trained.cache), "--epochs", "1000"]
    command += ["--log-with", "none", "--val-samples", "0"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sink, env=_env())
        try:
            deadline = time.monotonic() + 120
            while "epoch 1:" not in log.read_text() and process.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            assert process.wait(60) == 130, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    message = log.read_text()
    assert "continue with --resume" in message and "Traceback" not in message
    checkpoint = Path(message.rsplit("--resume ", 1)[1].split()[0])
    assert checkpoint.parent == output / "checkpoints" and (checkpoint / "trainer_state.pt").is_file()
    assert (checkpoint / "adapter_config.json").is_file()  # every checkpoint is a usable adapter
    assert not (output / "adapter_config.json").exists()  # the final adapter only when finished


def test_validation_shows_more_samples_than_the_batch_size(
    trained: Trained, tmp_path: Path, one_thread: None
) -> None:
    """The documented defaults (batch 1, three samples) with several held-out images: the samples
    are generated a batch at a time, not all at once against a one-row prompt. A caption's second
    line stays indented under its first. One image and one step are counted in the singular."""
    data = shutil.copytree(trained.data, tmp_path / "data")
    for caption in data.glob("*.txt"):
        caption.write_text(caption.read_text().strip() + "\nsecond line")
    shown = io.StringIO()
    options = TrainOptions(
        dataset=data, output=tmp_path / "run", model=str(trained.model), cache_dir=trained.cache,
        max_steps=1, val_split=4.0, max_caption_tokens=8, log_with="none", device="cpu",
    )  # fmt: skip
    result = run_training(options, stream=shown)
    assert result.finished
    assert "training 1 image (4 for validation), 1 step of 1x1 on cpu" in shown.getvalue(), shown.getvalue()
    assert shown.getvalue().count("target: photo") == 3, shown.getvalue()
    assert shown.getvalue().count("\n            second line\n") == 3, shown.getvalue()


def test_the_cache_dir_comes_from_the_server_s_variable_as_for_serve(tmp_path: Path) -> None:
    """``--cache-dir`` is "as for serve": ``VISION_SERVER_CACHE_DIR`` (what the systemd unit and
    the Docker images set) moves it, and the user cache dir under HOME stays untouched."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    env = {**_env(), "HOME": str(home), "VISION_SERVER_CACHE_DIR": str(cache)}
    env.pop("XDG_CACHE_HOME", None)
    command = [*cli_command(), "train", "--dataset", str(captioned_folder(tmp_path / "data"))]
    command += ["--output", str(tmp_path / "run"), "--model", "test:tiny", "--max-steps", "1"]
    command += ["--val-samples", "0", "--log-with", "none", "--device", "cpu"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert (cache / "test-models").is_dir(), sorted(p.name for p in tmp_path.rglob("*"))[:20]
    assert not (home / ".cache" / "vision-server").exists()
