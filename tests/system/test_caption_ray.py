"""``vision-server caption --ray``: real subprocesses, a real local Ray runtime, the tiny model.

Each Ray run starts a runtime and an actor with its own model (tens of seconds on two cores),
so the main test runs three commands: the local path, the same inputs through ``--ray``
(rows, sidecars and a Parquet output compared with the local path), and a ``--ray`` rerun that
must resume instead of captioning again; the others each check one way a run ends.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support.gated import gated_caption_command
from tests.support.processes import cli_command, server_env

pytest.importorskip("ray.data")

OPTIONS = ["--model", "test:tiny", "--max-new-tokens", "12", "--progress-interval", "60"]


def _jpeg(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for x in range(0, size[0], 8):  # a little structure, so captions differ between images
        image.putpixel((x, (seed * x) % size[1]), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder (nested, a space and Unicode in names, a non-image), a Parquet file of image
    bytes in several row groups, and a WebDataset shard."""
    root = tmp_path_factory.mktemp("ray-dataset")
    folder = root / "photos"
    (folder / "sub dir").mkdir(parents=True)
    for index in range(10):
        name = f"sub dir/ñ {index}.jpg" if index % 3 == 0 else f"img{index}.jpg"
        (folder / name).write_bytes(_jpeg(index))
    (folder / "broken.png").write_bytes(b"not a png at all")
    table = pa.table({"key": [f"row-{i}" for i in range(9)], "image": [_jpeg(100 + i) for i in range(9)]})
    pq.write_table(table, root / "table.parquet", row_group_size=4)
    with tarfile.open(root / "shard.tar", "w") as shard:
        for index in range(5):
            for name, data in ((f"s{index:03d}.jpg", _jpeg(200 + index)), (f"s{index:03d}.txt", b"x")):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                shard.addfile(member, io.BytesIO(data))
    return root


def _caption(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = server_env(root)
    env["VISION_SERVER_CACHE_DIR"] = str(root / "cache")
    inputs = [str(root / "photos"), str(root / "table.parquet"), str(root / "shard.tar")]
    return subprocess.run(
        [*cli_command(), "caption", *inputs, *OPTIONS, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    keyed = {(row["source"], row["key"]): row for row in rows}
    assert len(keyed) == len(rows), "a row was written twice"
    return keyed


def test_ray_writes_the_same_rows_as_the_local_path_and_resumes(dataset: Path) -> None:
    local = _caption(dataset, "--jsonl", str(dataset / "local.jsonl"))
    assert local.returncode == 1, local.stderr  # the broken file fails, the rest is captioned
    ray_run = _caption(
        dataset,
        "--ray",
        "--jsonl",
        str(dataset / "ray.jsonl"),
        "--parquet",
        str(dataset / "ray.parquet"),
        "--sidecars",
    )
    assert ray_run.returncode == 1, ray_run.stderr
    assert "captioned 24, skipped 0, failed 1" in ray_run.stderr

    expected, got = _rows(dataset / "local.jsonl"), _rows(dataset / "ray.jsonl")
    assert got == expected
    assert len(expected) == 25
    failed = [row for row in got.values() if "error" in row]
    assert [row["key"] for row in failed] == ["broken.png"]
    assert "broken.png" in ray_run.stderr

    table = {(row["source"], row["key"]): row for row in pq.read_table(dataset / "ray.parquet").to_pylist()}
    assert {key: row["caption"] for key, row in table.items()} == {
        key: row["caption"] for key, row in expected.items() if "error" not in row
    }

    folder = str(dataset / "photos")
    for (source, key), row in expected.items():
        if source == folder and "error" not in row:
            assert (dataset / "photos" / key).with_suffix(".txt").read_text(encoding="utf-8") == row[
                "caption"
            ]

    again = _caption(
        dataset, "--ray", "--jsonl", str(dataset / "ray.jsonl"), "--parquet", str(dataset / "ray.parquet")
    )
    assert again.returncode == 1, again.stderr  # the broken file is tried, and fails, again
    assert "captioned 0, skipped 24, failed 1" in again.stderr
    rows = (dataset / "ray.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 25  # nothing new: the same failure is not recorded twice
    assert pq.read_table(dataset / "ray.parquet").num_rows == 24


def test_without_ray_installed_the_command_says_how_to_get_it(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    image = tmp_path / "cat.jpg"
    image.write_bytes(_jpeg(1))
    env = server_env(tmp_path)
    env["PYTHONPATH"] = f"{tmp_path / 'blocked'}:{env.get('PYTHONPATH', '')}"
    result = subprocess.run(
        [*cli_command(), "caption", str(image), "--ray", "--model", "test:tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert 'pip install "vision-server[ray]"' in result.stderr
    assert not image.with_suffix(".txt").exists()


def test_a_ray_rerun_with_nothing_left_starts_no_ray_and_loads_no_model(tmp_path: Path) -> None:
    # Files, folders and lists are planned before Ray starts; with nothing left to caption, no
    # runtime starts (its session folder would be under RAY_TMPDIR) and no actor loads a model,
    # here a folder that is no model at all (a load would fail).
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        (folder / f"img{index}.jpg").write_bytes(_jpeg(index))
        (folder / f"img{index}.txt").write_text("done", encoding="utf-8")
    (tmp_path / "no-model").mkdir()
    env = server_env(tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="vs-ray-"))  # short: Ray's socket paths must fit 107 bytes
    env["RAY_TMPDIR"] = str(ray_tmp)
    command = [*cli_command(), "caption", str(folder), "--ray", "--model", str(tmp_path / "no-model")]
    try:
        result = subprocess.run(
            [*command, "--log-level", "info"], env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr
        assert "captioned 0, skipped 3, failed 0" in result.stderr
        assert "nothing left to caption: Ray is not started" in result.stderr
        assert not list(ray_tmp.iterdir())  # no Ray session
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_ray_run_whose_model_cannot_load_ends_as_the_local_path_does(tmp_path: Path) -> None:
    # It ended with "error: the Ray run failed: RuntimeError: the model did not load: The model
    # could not be loaded: ..." after Ray's own log lines (its traceback among them), did not
    # report the broken image of the same batch, nor how many images were left, and left an
    # empty JSONL file that was not there before.
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        (folder / f"img{index}.jpg").write_bytes(_jpeg(index))
    (folder / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "no-model").mkdir()
    out = tmp_path / "out.jsonl"
    env = server_env(tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="vs-ray-"))  # short: Ray's socket paths must fit 107 bytes
    env["RAY_TMPDIR"] = str(ray_tmp)
    model = ["--model", str(tmp_path / "no-model"), "--progress-interval", "60"]
    command = [*cli_command(), "caption", str(folder), "--ray", *model, "--jsonl", str(out)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    err = result.stderr
    assert result.returncode == 1, err
    broken = f"{folder / 'broken.png'}: the file is not in a supported image format"
    assert f"failed: {broken}" in err and "captioned 0, skipped 0, failed 1 in " in err, err
    # the cause once, worded as without --ray, after the summary, then what is left
    assert err.count("has no config.json") == 1 and "error: the model could not be loaded: " in err, err
    assert "3 of the 4 images are not captioned yet: run the same command again once the model loads" in err
    assert err.index("captioned 0,") < err.index("error: the model") < err.index("3 of the 4 images")
    # Ray's own lines: its token warning, its traceback of the failed task, the actor's log line
    # forwarded with its "(MapWorker(...) pid=N)" prefix. (Ray Data's C++ line about actor
    # constructor arguments, ray-project/ray#57733, comes with every run and has no switch.)
    noise = ("Traceback", "the Ray run failed", "Token authentication", "streaming_executor", "(MapWorker(")
    assert not [line for line in noise if line in err], err
    assert [(row["key"], row["caption"]) for row in map(json.loads, out.read_text().splitlines())] == [
        ("broken.png", None)
    ]


def test_an_adapter_gone_when_ray_builds_the_model_ends_as_the_local_path_does(
    tmp_path: Path, tiny_adapter_dir: Path
) -> None:
    # The driver builds the captioner (for its input size) once Ray has started, after planning
    # checked the adapter: one removed in between ended as "error: the Ray run failed:
    # SettingsError: ..." and a "(the run)" failure, not as the local path's failed load.
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        (folder / f"img{index}.jpg").write_bytes(_jpeg(index))
    (folder / "img0.txt").write_text("done", encoding="utf-8")
    gate = tmp_path / "gate"
    gate.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="vs-ray-"))  # short: Ray's socket paths must fit 107 bytes
    env = {
        **server_env(tmp_path),
        "RAY_TMPDIR": str(ray_tmp),
        "CAPTION_GATE": str(gate),
        "CAPTION_GATE_AT": "build",
    }
    command = gated_caption_command(folder, "--ray", *OPTIONS, "--adapter", adapter)
    try:
        with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
            try:
                deadline = time.monotonic() + 300
                while not (gate / "build.entered").exists():  # Ray is up, the model is being built
                    assert process.poll() is None and time.monotonic() < deadline
                    time.sleep(0.05)
                (adapter / "adapter_config.json").unlink()
            finally:
                (gate / "build.open").touch()
            code = process.wait(300)
            err = process.stderr.read() if process.stderr else ""
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 1, err
    assert "the Ray run failed" not in err and "Traceback" not in err, err
    assert "captioned 0, skipped 1, failed 0 in " in err, err
    gone = f"model test:tiny: the adapter directory {adapter} has no adapter_config.json"
    assert f"error: the model could not be loaded: {gone}" in err, err
    assert "2 of the 3 images are not captioned yet: run the same command again once the model loads" in err
    assert sorted(path.name for path in folder.iterdir()) == ["img0.jpg", "img0.txt", "img1.jpg", "img2.jpg"]


def test_a_caption_actor_whose_model_cannot_be_built_leaves_its_rows_with_the_reason(
    tmp_path: Path, tiny_adapter_dir: Path
) -> None:
    # An actor builds the captioner again (an adapter may be gone since the driver built it): its
    # constructor raised the SettingsError, which Ray reported as a failed actor ("the Ray run
    # failed"). Its rows now say why the model is missing, as a failed load's do, and the driver
    # stops the run with the local path's message; a row that failed to decode is still said.
    from vision_server.bulk.plan import Fail, Skip, Work
    from vision_server.bulk.ray_rows import unit_rows
    from vision_server.bulk.ray_stages import CaptionActor
    from vision_server.bulk.records import Record
    from vision_server.settings import Settings

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    (adapter / "adapter_config.json").unlink()
    actor = CaptionActor(Settings(model=("test:tiny",), adapter=str(adapter)))
    units: list[Work | Skip | Fail] = [
        Work(Record("photos", "a.jpg", path=tmp_path / "a.jpg"), ("<CAPTION>",)),
        Fail(
            Record("photos", "b.png", path=tmp_path / "b.png"), "the file is not in a supported image format"
        ),
    ]
    rows = actor({name: np.array(values, dtype=object) for name, values in unit_rows(units).items()})
    gone = f"model test:tiny: the adapter directory {adapter} has no adapter_config.json"
    assert list(rows["unloaded"]) == [f"{gone}, so it is not a PEFT adapter", ""]
    assert list(rows["error"]) == ["", "the file is not in a supported image format"]
    assert list(rows["captions"]) == ["{}", "{}"]
