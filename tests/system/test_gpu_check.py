"""``benchmarks/gpu_check.py --smoke`` as a test, so the GPU check cannot rot before a GPU comes.

Every step runs for real on the CPU with the tiny model (90-130 s: six child processes, two of
them servers), with only the GPU image's packages importable; the CUDA-only parts must be
skipped and say so. It checks the JSON and the Markdown the script leaves, not how fast anything
is. That run is marked ``slow`` like the other benchmark smoke runs (leave it out with
``pytest -m "not slow"``); the quick tests below check that a step past its budget, one that
raises, or an outer ``timeout`` still leaves the report, and which carried wheels are used.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import paths

BENCH = paths.BENCHMARKS / "gpu_check.py"
STEPS = ["versions", "prepare", "cuda_tests", "serve_eager", "serve_compiled", "model_bench"]


# What the GPU image holds (BENCHMARKS.md, "GPU check"); platformdirs comes from .whl or pip.
IMAGE = {
    "torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "peft", "aiohttp", "click",
    "pillow", "numpy", "prometheus_client", "tqdm", "psutil", "pytest", "filelock", "platformdirs",
}  # fmt: skip


def hidden_modules() -> list[str]:
    """The top-level modules of every dependency in pyproject.toml (extras too), and of what they
    pull in, that the image lacks (what the image's packages pull in stays)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # tomli is in the test extra for Python 3.10
        import tomli as tomllib

    project = tomllib.loads((paths.REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    lacking = installed_closure({requirement_name(r) for r in wanted} - IMAGE) - installed_closure(IMAGE)
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module.isidentifier() and any(requirement_name(d) in lacking for d in dists)
    )


def requirement_name(requirement: str) -> str:
    return (
        re.split(r"[\[<>=!~; (]", requirement.strip(), maxsplit=1)[0]
        .lower()
        .replace("-", "_")
        .replace(".", "_")
    )


def installed_closure(names: set[str]) -> set[str]:
    """``names`` and, transitively, what they require when installed (extras' needs left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def image_like_env(tmp_path: Path) -> dict[str, str]:
    """This venv as the GPU image sees it: a ``sitecustomize`` on the path makes every module
    the image lacks unimportable in each process (children and servers too), and no pytest
    plugin loads (the image has plain pytest)."""
    site = tmp_path / "image-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {hidden_modules()!r}:\n    sys.modules[name] = None\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(paths.REPO), str(site), env.get("PYTHONPATH", "")])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_and_reports(tmp_path: Path) -> None:
    """With only the image's packages importable: a module that the check reaches importing one
    the image lacks (pyarrow, pytest-asyncio...) fails here, not in the GPU window."""
    env = image_like_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import pyarrow"], env=env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, "the image's view is not in force"
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert list(report["steps"]) == STEPS
    assert {name: step["status"] for name, step in report["steps"].items()} == dict.fromkeys(STEPS, "ok")
    assert report["finished"] and report["smoke"]

    steps = {name: step["data"] for name, step in report["steps"].items()}
    assert steps["versions"]["packages"]["torch"] and steps["versions"]["packages"]["transformers"]
    tests = steps["cuda_tests"]["tests"]
    assert len(tests) >= 4 and all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests)
    for name in ("serve_eager", "serve_compiled"):
        http = steps[name]["http"]
        assert http["throughput_img_s"] > 0 and http["single_request_s"] > 0
        assert set(steps[name]["baselines"]) >= {"reference", "direct", "raw"}
    assert steps["serve_eager"]["http"]["cold_start_s"] > 0
    assert "--compile needs CUDA" in report["steps"]["serve_compiled"]["reason"]
    modes = {mode["mode"]: mode for mode in steps["model_bench"]["modes"]}
    assert set(modes) == {"eager", "compiled"} and not modes["compiled"]["compiled"]
    assert [row["batch"] for row in modes["eager"]["rows"]] == [1, 2]

    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 10
    memory = next(t for name, t in targets.items() if name.startswith("GPU memory"))
    assert memory["result"] == "not measured" and "CUDA" in memory["note"]
    assert {t["result"] for t in targets.values()} <= {"n/a (smoke)", "not measured"}

    table = (out / "gpu_check.md").read_text(encoding="utf-8")
    assert table in result.stdout  # the table is printed too
    assert "| target | measured | result | note |" in table and "n/a (smoke)" in table
    assert "| model_bench mode |" in table and "| serve_eager |" in table
    log = (out / "gpu_check.log").read_text(encoding="utf-8")
    assert all(f"===== {name}:" in log for name in STEPS)


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (its report module sits beside it)."""
    monkeypatch.syspath_prepend(str(paths.BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_step_past_its_budget_is_stopped_with_its_children(gpu_check: ModuleType, tmp_path: Path) -> None:
    """serve_bench starts a server: a timed-out step must not leave it holding the GPU."""
    check = gpu_check.Check(gpu_check.SMOKE, tmp_path / "out", tmp_path, env=dict(os.environ))
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '120'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    exit_code, stdout = gpu_check.run_child(check, "sleeper", [sys.executable, "-c", code], timeout=3)
    assert exit_code is None and stdout.strip() == "started"
    child = int(pid_file.read_text())
    for _ in range(50):
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} outlived the step")
    assert "===== sleeper:" in check.log[0] and "exit: timeout" in check.log[0]


def test_steps_that_would_overrun_are_skipped_and_reported(gpu_check: ModuleType, tmp_path: Path) -> None:
    plan = dataclasses.replace(gpu_check.SMOKE, deadline_s=5.0)  # less than any step needs
    check = gpu_check.Check(plan, tmp_path / "out", tmp_path, env=dict(os.environ))
    check.report = {"started": "now", "finished": None, "plan": vars(plan), "steps": {}}
    gpu_check.run_steps(check, ["versions", "prepare"])
    steps = check.report["steps"]
    assert {step["status"] for step in steps.values()} == {"skipped"}
    assert steps["versions"]["reason"].startswith("would overrun: needs about 3 s")
    assert steps["cuda_tests"]["reason"] == "not asked for (--steps)"
    table = (tmp_path / "out" / "gpu_check.md").read_text(encoding="utf-8")
    assert "| versions | skipped | 0 | would overrun" in table
    assert (
        json.loads((tmp_path / "out" / "gpu_check.json").read_text())["targets"][0]["result"]
        == "not measured"
    )


def test_a_step_that_raises_is_reported_and_the_next_step_still_runs(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one step (a KeyError on a figure the GPU run names differently) must not cost
    the steps after it, nor the report."""

    def broken(check: object, timeout: float) -> dict[str, object]:
        raise KeyError("throughput_img_s")

    def fine(check: object, timeout: float) -> dict[str, object]:
        return {"note": "ran"}

    monkeypatch.setattr(gpu_check, "STEPS", [("versions", "broken", broken), ("prepare", "fine", fine)])
    check = gpu_check.Check(gpu_check.SMOKE, tmp_path / "out", tmp_path, env=dict(os.environ))
    check.report = {"started": "now", "finished": None, "plan": vars(gpu_check.SMOKE), "steps": {}}
    gpu_check.run_steps(check, ["versions", "prepare"])
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["steps"]["versions"]["status"] == "failed"
    assert report["steps"]["versions"]["reason"] == "KeyError: 'throughput_img_s'"
    assert report["steps"]["prepare"]["status"] == "ok" and report["steps"]["prepare"]["reason"] == "ran"
    table = (tmp_path / "out" / "gpu_check.md").read_text(encoding="utf-8")
    assert "| versions | failed | 0 | KeyError: 'throughput_img_s' |" in table


def test_a_report_the_table_code_cannot_read_still_leaves_the_figures(
    gpu_check: ModuleType, tmp_path: Path
) -> None:
    """gpu_report has only seen CPU figures: if the GPU's trip it up, the JSON and log still come
    back (a report without its plan stands in for figures of an unexpected shape)."""
    check = gpu_check.Check(gpu_check.SMOKE, tmp_path / "out", tmp_path, env=dict(os.environ))
    check.report = {"started": "now", "finished": None, "steps": {"versions": {"status": "ok", "data": {}}}}
    check.log.append("===== versions: probe")
    table = gpu_check.write_outputs(check)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["steps"]["versions"]["status"] == "ok"
    assert report["report_error"].startswith("KeyError")
    assert (tmp_path / "out" / "gpu_check.md").read_text(encoding="utf-8") == table
    assert "every step's figures are in gpu_check.json" in table
    assert "===== versions: probe" in (tmp_path / "out" / "gpu_check.log").read_text(encoding="utf-8")


def test_an_outer_timeout_stops_the_step_and_leaves_the_report(tmp_path: Path) -> None:
    """``timeout 570 python gpu_check.py`` sends SIGTERM: the running step stops, the files stay."""
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH), "--smoke", "--steps", "prepare", "--out", str(out)]
    process = subprocess.Popen(
        command, cwd=paths.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Inside the prepare step (its child imports torch and builds a model for seconds): stopped
    # once the script says it starts it, not after a fixed 1.5 s that a loaded machine could
    # still spend starting the script, before its SIGTERM handler is in place.
    assert process.stdout is not None
    before = []
    for line in process.stdout:
        before.append(line)
        if line.startswith("[gpu_check] prepare: starting"):
            break
    process.terminate()
    rest, _ = process.communicate(timeout=60)
    output = "".join(before) + rest
    assert process.returncode == 1, output
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["interrupted"] == "SIGTERM" and report["finished"] is None
    assert report["steps"]["versions"]["reason"] == "not asked for (--steps)"
    assert report["steps"]["prepare"]["status"] == "interrupted"
    assert "(not finished)" in (out / "gpu_check.md").read_text(encoding="utf-8")


def test_a_signal_as_a_step_starts_leaves_it_interrupted_not_skipped(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM landing right after the step's "starting" line, before its run, left the step
    "skipped" in the report (the outer-timeout test above, stopping the script as soon as it
    said the step started, met it)."""
    check = gpu_check.Check(gpu_check.SMOKE, tmp_path / "out", tmp_path, env=dict(os.environ))
    check.report = {"steps": {}}

    def signal_arrives(*args: object, **kwargs: object) -> None:  # as the line is written
        if "prepare: starting" in str(args[0]):
            raise gpu_check.Interrupted("SIGTERM")

    monkeypatch.setattr(gpu_check, "print", signal_arrives, raising=False)
    with pytest.raises(gpu_check.Interrupted):
        gpu_check.run_steps(check, ["prepare"])
    prepare = check.report["steps"]["prepare"]
    assert (prepare["status"], prepare["reason"]) == (
        "interrupted",
        "stopped by a signal (outer time limit?)",
    )


def test_missing_packages_come_from_wheels_or_pips_platformdirs(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU image lacks platformdirs: a wheel in .whl is unpacked; without one, pip's copy is used."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gpucheckdemo-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("gpucheckdemo/__init__.py", "ANSWER = 42\n")
    with zipfile.ZipFile(wheels / "pytest-0.1-py3-none-any.whl", "w") as archive:
        archive.writestr("pytest/__init__.py", "raise ImportError('never unpacked: pytest is installed')\n")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "platformdirs" else real_find_spec(name, *a),
    )
    paths_added, notes = gpu_check.prepare_packages(tmp_path / "work")
    site = tmp_path / "work" / "site"
    assert paths_added == [str(site)]
    assert (site / "gpucheckdemo" / "__init__.py").is_file() and not (site / "pytest").exists()
    assert any("pytest" in note and "not used" in note for note in notes)
    assert any("vendored in pip" in note for note in notes)
    probe = (
        "import gpucheckdemo, platformdirs\n"
        "assert gpucheckdemo.ANSWER == 42\n"
        "assert platformdirs.user_cache_dir.__module__.startswith('pip._vendor'), platformdirs.__file__\n"
        "print(platformdirs.user_cache_dir('vision-server'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "vision-server" in result.stdout, result.stderr


def test_a_wheel_replaces_an_installed_package_older_than_the_projects_floor(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image whose transformers is older than pyproject's floor gets the carried wheel, ahead
    of its own copy; one that meets the floor keeps its own."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "pytest-999.0-py3-none-any.whl", "w") as archive:
        archive.writestr("pytest/__init__.py", "CARRIED = True\n")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    _, notes = gpu_check.prepare_packages(tmp_path / "old", floors={"pytest": "999"})
    assert (tmp_path / "old" / "site" / "pytest" / "__init__.py").is_file()
    assert any(note.startswith("pytest: ") and "older than >=999; unpacked" in note for note in notes)
    _, notes = gpu_check.prepare_packages(tmp_path / "new", floors={"pytest": "1.0"})
    assert not (tmp_path / "new" / "site" / "pytest").exists()
    assert any("pytest-999.0-py3-none-any.whl not used" in note for note in notes)


def test_a_broken_wheel_leaves_the_image_s_packages_and_says_why(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download cut short must not stop the run before it has written anything, nor cost the
    other wheels; anything else going wrong leaves the image's packages alone."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "gpucheckbroken-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut short")
    with zipfile.ZipFile(wheels / "gpucheckdemo-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("gpucheckdemo/__init__.py", "ANSWER = 42\n")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    paths_added, notes = gpu_check.carried_packages(tmp_path / "work")
    assert paths_added == [str(tmp_path / "work" / "site")]
    assert (tmp_path / "work" / "site" / "gpucheckdemo" / "__init__.py").is_file()
    assert "gpucheckbroken: gpucheckbroken-1.0-py3-none-any.whl could not be unpacked (BadZipFile" in notes[0]
    (tmp_path / "pyproject.toml").write_text("not = [toml")
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    paths_added, notes = gpu_check.carried_packages(tmp_path / "other")
    assert paths_added == [] and notes[0].startswith("the carried wheels were not used: TOMLDecodeError")


def test_the_floors_come_from_pyproject_and_compare_by_release(gpu_check: ModuleType) -> None:
    floors = gpu_check.project_floors()
    assert floors["huggingface_hub"] and floors["prometheus_client"]  # names normalized
    # transformers 5.0-5.3 lack the PIL image processors (CLIPImageProcessorPil...) the test
    # models use: gpu_check's import probe failed on 5.0.0 and 5.3.0, passed on 5.4.0 and 5.17.0.
    assert gpu_check.release(floors["transformers"]) >= (5, 4)
    release = gpu_check.release
    assert release("2.13.0+cpu") > release("2.4") and release("5.4") == release("5.4.0")
    assert release("5.17.0") > release("5.4") > release("5.3.0") and release("5.4.0rc1") == (5, 4)


def test_without_cuda_the_full_check_stops_after_the_versions(tmp_path: Path) -> None:
    """The real command on a machine without a GPU: one clear failure, nothing run for nothing."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full check would run for minutes")
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH), "--out", str(out), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=paths.REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))["steps"]
    assert steps["versions"]["status"] == "failed" and "no CUDA device" in steps["versions"]["reason"]
    assert steps["versions"]["data"]["packages"]["torch"]
    assert all(steps[name]["reason"].startswith("no CUDA device") for name in STEPS[1:])
