"""Everything a GPU must show, in one command that fits a short GPU window (9 minutes on an H100).

Runs, each step in its own process with its own time budget, under one overall deadline:

1. ``versions``: GPU, driver, CUDA, cuDNN, torch, transformers and the other packages;
2. ``prepare``: builds the random-weight ``large`` test model once (later steps share it);
3. ``cuda_tests``: the tests marked ``cuda`` (``tests/system/test_cuda.py``);
4. ``serve_eager`` and ``serve_compiled``: ``serve_bench.py`` on ``large`` fp16, 768 px, 128 new
   tokens, 128 clients, without and with ``--compile``; each run also times the reference design,
   raw ``generate`` at the server's batch size, the cold start and warm single requests;
5. ``model_bench``: ``model_bench.py`` on ``large`` fp16 at batch 1, 16 and 64, eager and compiled.

The steps run in that order (the issue's targets first). A step that would not fit in the time
left is skipped and reported; a step past its budget is stopped (with the server it started) and
reported. ``--out`` gets ``gpu_check.json``, ``gpu_check.md`` (also printed) and ``gpu_check.log``
(the tail of every step's output), rewritten after every step, so a run cut short still leaves
its results.

``--smoke`` runs every step on the CPU with the ``tiny`` model (about 90 s); what needs CUDA
(compiled decoding, the cuda tests, GPU memory) is skipped or falls back, and the report says so.

The GPU machine has no package registry: only what its image holds. Wheels of anything else go
in the git-ignored folder ``.whl`` at the repository root (BENCHMARKS.md, "GPU check"); they are
unpacked into the work dir when the package is not installed there, or is older than
pyproject.toml's floor for it (an image's transformers before 5.4).

    PYTHONPATH=. python benchmarks/gpu_check.py --out /tmp/gpu-check
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check-smoke
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gpu_report  # beside this file (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
WHEELS = REPO / ".whl"
CUDA_TESTS = "tests/system/test_cuda.py"
RESERVE_S = 8.0  # kept back from every step for writing the report and stopping children
LOG_HEAD, LOG_TAIL = 8_000, 24_000  # characters of each step's output kept in gpu_check.log
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "peft",
    "aiohttp",
    "click",
    "pillow",
    "numpy",
    "prometheus-client",
    "platformdirs",
    "psutil",
    "pytest",
)


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the real thing on a GPU, or the smoke run on the CPU."""

    smoke: bool
    preset: str
    device: str
    dtype: str
    batch_sizes: str
    new_tokens: int
    clients: int
    requests: int
    image_size: int
    max_batch: int
    reference_requests: int
    single_requests: int
    repeats: int
    deadline_s: float
    # model_bench times both modes only with this many seconds left, else eager alone.
    model_bench_both_s: float
    # Seconds each step is expected to need (skipped when less is left) and may take at most.
    needs: dict[str, tuple[float, float]] = field(default_factory=dict)


FULL = Plan(
    smoke=False,
    preset="large",
    device="cuda",
    dtype="float16",
    batch_sizes="1,16,64",
    new_tokens=128,
    clients=128,
    requests=256,
    image_size=768,
    max_batch=64,
    reference_requests=3,
    single_requests=3,
    repeats=2,
    deadline_s=540,
    model_bench_both_s=110,
    # Estimates for an H100 host, where importing torch + transformers alone takes about 20 s
    # (reference §10) and each new compiled batch size 8-25 s.
    needs={
        "versions": (20, 60),
        "prepare": (30, 120),
        "cuda_tests": (90, 180),
        "serve_eager": (100, 200),
        "serve_compiled": (150, 300),
        "model_bench": (45, 200),
    },
)
SMOKE = Plan(
    smoke=True,
    preset="tiny",
    device="cpu",
    dtype="float32",
    batch_sizes="1,2",
    new_tokens=8,
    clients=4,
    requests=8,
    image_size=64,
    max_batch=4,
    reference_requests=2,
    single_requests=2,
    repeats=1,
    # About 90 s on an idle 2-core machine; the deadline only guards against a hang, so a busy
    # CI machine does not turn the smoke run into a timing test.
    deadline_s=600,
    model_bench_both_s=0,
    needs={name: (3, 240) for name in FULL.needs},
)


class Interrupted(Exception):
    """SIGTERM or SIGINT (an outer ``timeout``): stop the running step, write what we have."""


STOPPED_BY_SIGNAL = "stopped by a signal (outer time limit?)"


@dataclass
class Check:
    """One run: where things go, what is known so far, and the clock."""

    plan: Plan
    out: Path
    workdir: Path
    started: float = field(default_factory=time.monotonic)
    env: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def left(self) -> float:
        return self.plan.deadline_s - (time.monotonic() - self.started)

    @property
    def cache(self) -> Path:
        return self.workdir / "cache"

    @property
    def model_dir(self) -> Path:
        return self.cache / "test-models" / f"{self.plan.preset}-v1"


# --- running children -------------------------------------------------------------------------


def run_child(check: Check, name: str, command: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``command`` in its own process group; on timeout stop the whole group (a server too).

    Returns the exit code (None on timeout) and stdout; both outputs' tails go to the log.
    """
    out_path, err_path = check.workdir / f"{name}.out", check.workdir / f"{name}.err"
    with out_path.open("wb") as stdout, err_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=check.env, stdout=stdout, stderr=stderr, start_new_session=True
        )
        code: int | None = None
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop_group(process)
        except Interrupted:
            stop_group(process)
            raise
        finally:
            stdout.flush()
            stderr.flush()
            check.log.append(log_entry(name, command, code, out_path, err_path))
    return code, out_path.read_text(errors="replace")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_entry(name: str, command: list[str], code: int | None, out: Path, err: Path) -> str:
    parts = [f"===== {name}: {' '.join(command)}", f"exit: {'timeout' if code is None else code}"]
    for label, path in (("stdout", out), ("stderr", err)):
        text = path.read_text(errors="replace") if path.exists() else ""
        if len(text) > LOG_HEAD + LOG_TAIL:  # the start (load, compile times) and the end (results)
            left_out = len(text) - LOG_HEAD - LOG_TAIL
            text = f"{text[:LOG_HEAD]}\n[... {left_out} characters left out ...]\n{text[-LOG_TAIL:]}"
        parts.append(f"----- {label}\n{text}")
    return "\n".join(parts)


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """The JSON objects a benchmark printed, one per line, in order."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# --- the steps --------------------------------------------------------------------------------

VERSIONS_CODE = """
import importlib, importlib.metadata as md, json, platform, sys
out = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": {}}
for name in sys.argv[1:]:
    try:
        out["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["packages"][name] = None
import torch
out["cuda_available"] = torch.cuda.is_available()
out["torch_cuda"] = torch.version.cuda
out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
if out["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = {"name": p.name, "memory_mib": p.total_memory // 2**20,
                  "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count}
imports = {}
for module in ("platformdirs", "vision_server.app", "vision_server.florence.captioner"):
    try:
        imports[module] = getattr(importlib.import_module(module), "__file__", "ok")
    except Exception as exc:
        imports[module] = f"FAILED: {type(exc).__name__}: {exc}"
out["imports"] = imports
print(json.dumps(out))
"""

PREPARE_CODE = """
import json, sys, time
from pathlib import Path
from vision_server.florence.source import test_model_dir
started = time.perf_counter()
path = test_model_dir(sys.argv[1], Path(sys.argv[2]))
size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
print(json.dumps({"path": str(path), "seconds": time.perf_counter() - started, "mb": size / 1e6}))
"""


def step_versions(check: Check, timeout: float) -> dict[str, Any]:
    code, stdout = run_child(check, "versions", python("-c", VERSIONS_CODE, *PACKAGES), timeout)
    found = json_lines(stdout)
    if code != 0 or not found:
        raise StepError(f"the version probe exited with {code}")
    data = found[-1]
    data["nvidia_smi"] = nvidia_smi()
    failed = {m: r for m, r in data["imports"].items() if str(r).startswith("FAILED")}
    if failed:
        raise StepError(f"imports failed: {failed}", data)
    if not check.plan.smoke and not data["cuda_available"]:
        check.report["no_cuda"] = True
        raise StepError("torch sees no CUDA device: the GPU figures cannot be measured", data)
    return data


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm"
    try:
        result = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    return result.stdout.strip() or result.stderr.strip()


def step_prepare(check: Check, timeout: float) -> dict[str, Any]:
    command = python("-c", PREPARE_CODE, check.plan.preset, str(check.cache))
    code, stdout = run_child(check, "prepare", command, timeout)
    found = json_lines(stdout)
    if code != 0 or not found:
        raise StepError(f"building the {check.plan.preset} test model exited with {code}")
    return found[-1]


def step_cuda_tests(check: Check, timeout: float) -> dict[str, Any]:
    junit = check.workdir / "cuda-tests.xml"
    command = python(
        "-m", "pytest", CUDA_TESTS, "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
        f"--junitxml={junit}", f"--basetemp={check.workdir / 'pytest'}",
    )  # fmt: skip
    code, stdout = run_child(check, "cuda_tests", command, timeout)
    if code is None:
        raise StepError(f"the cuda tests ran past {timeout:.0f} s")
    if not junit.exists():
        raise StepError(f"pytest exited with {code} and wrote no report")
    tests = read_junit(junit)
    data = {"exit_code": code, "tests": tests, "summary": stdout.strip().splitlines()[-1:]}
    if code not in (0, 5) or any(t["outcome"] in ("failed", "error") for t in tests):
        raise StepError("some cuda tests failed", data)
    if check.plan.smoke:
        data["note"] = "CPU: every cuda test skips (" + ", ".join(sorted({t["message"] for t in tests})) + ")"
    return data


def read_junit(path: Path) -> list[dict[str, Any]]:
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip()[:600]
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
                "properties": properties,
            }
        )
    return tests


def serve_command(check: Check, compiled: bool) -> list[str]:
    plan = check.plan
    command = python(
        str(BENCHMARKS / "serve_bench.py"),
        "--model", f"test:{plan.preset}", "--cache-dir", str(check.cache),
        "--clients", str(plan.clients), "--requests", str(plan.requests),
        "--image-size", str(plan.image_size), "--num-beams", "1",
        "--min-new-tokens", str(plan.new_tokens), "--max-new-tokens", str(plan.new_tokens),
        "--reference-requests", str(plan.reference_requests),
        "--single-requests", str(plan.single_requests),
        f"--server-arg=--device={plan.device}", f"--server-arg=--dtype={plan.dtype}",
        f"--server-arg=--max-batch-size={plan.max_batch}",
    )  # fmt: skip
    # The cold start is timed on the uncompiled server: with --compile a reload compiles every
    # batch size again (its first request, load + compile, is reported instead).
    return [*command, "--compile"] if compiled else [*command, "--cold-start"]


def serve_step(compiled: bool) -> Callable[[Check, float], dict[str, Any]]:
    name = "serve_compiled" if compiled else "serve_eager"

    def step(check: Check, timeout: float) -> dict[str, Any]:
        code, stdout = run_child(check, name, serve_command(check, compiled), timeout)
        found = json_lines(stdout)
        if code != 0 or not found:
            raise StepError(f"serve_bench exited with {'a timeout' if code is None else code}")
        data = found[-1]
        if compiled and not data.get("baselines", {}).get("compiled"):
            data["note"] = "not compiled: --compile needs CUDA, so these are uncompiled figures"
        return data

    return step


def step_model_bench(check: Check, timeout: float) -> dict[str, Any]:
    plan = check.plan
    both = timeout >= plan.model_bench_both_s
    modes = "eager,compiled" if both else "eager"
    command = python(
        str(BENCHMARKS / "model_bench.py"),
        "--preset", plan.preset, "--model-dir", str(check.model_dir),
        "--workdir", str(check.workdir / "model-bench"),
        "--device", plan.device, "--dtype", plan.dtype, "--batch-sizes", plan.batch_sizes,
        "--new-tokens", str(plan.new_tokens), "--repeats", str(plan.repeats), "--modes", modes,
    )  # fmt: skip
    code, stdout = run_child(check, "model_bench", command, timeout)
    found = json_lines(stdout)
    if code != 0 or not found:
        raise StepError(f"model_bench exited with {'a timeout' if code is None else code}")
    data = found[0]
    data["preprocessing_ms"] = next((f["preprocessing_ms"] for f in found if "preprocessing_ms" in f), {})
    if any(mode["mode"] == "compiled" and not mode["compiled"] for mode in data["modes"]):
        data["note"] = "compiled mode not compiled: --compile needs CUDA, so its figures are uncompiled"
    if not both:
        data["note"] = (
            f"compiled mode left out: {timeout:.0f} s left, it needs about {plan.model_bench_both_s:.0f}"
        )
    return data


class StepError(Exception):
    """A step that ran and failed; ``data`` is whatever it measured before failing."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


STEPS: list[tuple[str, str, Callable[[Check, float], dict[str, Any]]]] = [
    ("versions", "versions of the GPU and the software", step_versions),
    ("prepare", "build the test model", step_prepare),
    ("cuda_tests", "tests marked cuda", step_cuda_tests),
    ("serve_eager", "serve_bench, uncompiled", serve_step(compiled=False)),
    ("serve_compiled", "serve_bench, --compile", serve_step(compiled=True)),
    ("model_bench", "model_bench, eager and compiled", step_model_bench),
]
DEPENDS = {"serve_eager": "prepare", "serve_compiled": "prepare", "model_bench": "prepare"}


def run_steps(check: Check, wanted: list[str]) -> None:
    steps = check.report["steps"]
    for name, title, func in STEPS:
        entry: dict[str, Any] = {
            "title": title,
            "status": "skipped",
            "seconds": 0.0,
            "reason": "",
            "data": {},
        }
        steps[name] = entry
        need, budget = check.plan.needs[name]
        if name not in wanted:
            entry["reason"] = "not asked for (--steps)"
        elif check.report.get("no_cuda"):
            entry["reason"] = "no CUDA device (see versions); try --smoke on a CPU"
        elif DEPENDS.get(name) in steps and steps[DEPENDS[name]]["status"] not in ("ok", "skipped"):
            entry["reason"] = f"{DEPENDS[name]} failed"
        elif check.left - RESERVE_S < need:
            entry["reason"] = (
                f"would overrun: needs about {need:.0f} s, {check.left:.0f} s left of the deadline"
            )
        else:
            timeout = min(budget, check.left - RESERVE_S)
            # Said before its first line: a signal landing between that line and the step's
            # own handler (run_one) left the step "skipped" in the report.
            entry["status"], entry["reason"] = "interrupted", STOPPED_BY_SIGNAL
            print(
                f"[gpu_check] {name}: starting, budget {timeout:.0f} s, {check.left:.0f} s left", flush=True
            )
            run_one(check, entry, func, timeout)
        print(f"[gpu_check] {name}: {entry['status']} {entry['seconds']:.1f} s {entry['reason']}", flush=True)
        write_outputs(check)


def run_one(check: Check, entry: dict[str, Any], func: Callable[..., dict[str, Any]], timeout: float) -> None:
    started = time.monotonic()
    entry["budget_s"] = round(timeout, 1)
    try:
        entry["data"] = func(check, timeout)
        entry["status"] = "ok"
        entry["reason"] = entry["data"].get("note", "") if isinstance(entry["data"], dict) else ""
    except Interrupted:
        entry["status"], entry["reason"] = "interrupted", STOPPED_BY_SIGNAL
        raise
    except StepError as exc:
        entry["status"], entry["reason"], entry["data"] = "failed", str(exc), exc.data
        if "timeout" in str(exc) or "ran past" in str(exc):
            entry["status"] = "timeout"
    except Exception as exc:  # a bug in this script must not cost the other steps
        entry["status"], entry["reason"] = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        entry["seconds"] = round(time.monotonic() - started, 1)


# --- packages the GPU machine lacks -----------------------------------------------------------


def prepare_packages(workdir: Path, floors: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Unpack the wheels in .whl whose package is missing or older than the project's floor for it
    (``floors``, default: pyproject.toml's); shim platformdirs from pip if need be.

    An unpacked wheel goes ahead of the installed copy on the children's ``PYTHONPATH``. Returns
    those folders and a note per decision.
    """
    floors = project_floors() if floors is None else floors
    site, notes = workdir / "site", []
    for wheel in sorted(WHEELS.glob("*.whl")):
        dist = wheel.name.split("-")[0]
        floor = floors.get(normalized(dist))
        try:
            installed: str | None = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is not None and (floor is None or release(installed) >= release(floor)):
            notes.append(f"{dist} {installed} installed; {wheel.name} not used")
            continue
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        except (OSError, zipfile.BadZipFile) as exc:  # a download cut short: the rest still count
            notes.append(f"{dist}: {wheel.name} could not be unpacked ({type(exc).__name__}: {exc})")
            continue
        why = "not installed" if installed is None else f"{installed} installed, older than >={floor}"
        notes.append(f"{dist}: {why}; unpacked {wheel.name}")
    has_platformdirs = importlib.util.find_spec("platformdirs") or (site / "platformdirs").exists()
    if not has_platformdirs and pip_vendors_platformdirs():
        site.mkdir(parents=True, exist_ok=True)
        (site / "platformdirs.py").write_text(
            "from pip._vendor.platformdirs import *  # noqa: F403\n"
            "from pip._vendor.platformdirs import __version__  # noqa: F401\n"
        )
        notes.append("platformdirs: not installed and no wheel in .whl; using the copy vendored in pip")
    return ([str(site)] if site.exists() else []), notes


def carried_packages(workdir: Path) -> tuple[list[str], list[str]]:
    """:func:`prepare_packages`, or none of the carried wheels if that fails (a wheel cut short
    in the download): the run goes on with the image's packages and the report says why."""
    try:
        return prepare_packages(workdir)
    except Exception as exc:
        return [], [f"the carried wheels were not used: {type(exc).__name__}: {exc}"]


def project_floors() -> dict[str, str]:
    """``name >= version`` of each runtime dependency in pyproject.toml, by normalized name."""
    floors: dict[str, str] = {}
    if sys.version_info < (3, 11):  # no tomllib: no floors known, so only missing packages are unpacked
        return floors
    else:  # the import sits under the version check so that `mypy --python-version 3.10` passes
        import tomllib

        text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
        for requirement in tomllib.loads(text)["project"]["dependencies"]:
            name, _, rest = requirement.partition(">=")
            if rest:
                floors[normalized(name)] = rest.split(",")[0].split(";")[0].strip()
        return floors


def normalized(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: ``2.13.0+cpu`` -> (2, 13), ``5.4`` == ``5.4.0``; a
    pre-release tag (``5.4.0rc1``) is ignored."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:
            break
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def pip_vendors_platformdirs() -> bool:
    """Whether pip carries its own platformdirs, looked up on disk: even ``find_spec("pip")`` has
    side effects (setuptools' distutils shim turns itself off when it sees pip being looked up)."""
    return any((Path(entry) / "pip" / "_vendor" / "platformdirs").is_dir() for entry in sys.path if entry)


def child_env(extra_paths: list[str], workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_SERVER_")}
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep)), *extra_paths]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # test models only; never wait on a network
    env["VISION_SERVER_LOG_LEVEL"] = "info"  # the benchmarks then log load and compile times
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))  # shared by every step
    return env


def write_outputs(check: Check) -> str:
    """Write the three files; returns the table. The report code has only seen CPU figures: if it
    fails on the GPU's, the JSON (every step's figures) and the log are still written."""
    check.report["elapsed_s"] = round(time.monotonic() - check.started, 1)
    try:
        check.report["targets"] = gpu_report.evaluate_targets(check.report)
        table = gpu_report.markdown(check.report)
        check.report.pop("report_error", None)
    except Exception as exc:
        check.report["report_error"] = f"{type(exc).__name__}: {exc}"
        table = (
            f"## GPU check\n\nThe table could not be made (gpu_report: {check.report['report_error']}); "
            "every step's figures are in gpu_check.json.\n"
        )
    check.out.mkdir(parents=True, exist_ok=True)
    atomic_write(check.out / "gpu_check.json", json.dumps(check.report, indent=2, default=str))
    atomic_write(check.out / "gpu_check.md", table)
    atomic_write(check.out / "gpu_check.log", "\n\n".join(check.log) + "\n")
    return table


def atomic_write(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, .md and .log")
    parser.add_argument("--smoke", action="store_true", help="every step on the CPU with the tiny model")
    parser.add_argument("--deadline", type=float, help="seconds for the whole run (default 540; smoke 600)")
    parser.add_argument(
        "--steps", help=f"comma list of steps to run (default all: {', '.join(s[0] for s in STEPS)})"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where models and outputs go (default: a temp dir, removed)"
    )
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.deadline is not None:
        plan = Plan(**{**plan.__dict__, "deadline_s": args.deadline})
    wanted = args.steps.split(",") if args.steps else [s[0] for s in STEPS]
    unknown = set(wanted) - {s[0] for s in STEPS}
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    check = Check(plan, args.out, workdir)
    extra, notes = carried_packages(workdir)
    check.env = child_env(extra, workdir)
    check.report = {
        "smoke": plan.smoke,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "finished": None,
        "command": [sys.executable, *sys.argv],
        "deadline_s": plan.deadline_s,
        "plan": {k: v for k, v in plan.__dict__.items() if k != "needs"},
        "packages_from_wheels": notes,
        "steps": {},
    }

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        run_steps(check, wanted)
        check.report["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except Interrupted as exc:
        check.report["interrupted"] = str(exc)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        table = write_outputs(check)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table)
    print(f"[gpu_check] wrote {check.out / 'gpu_check.json'}, gpu_check.md and gpu_check.log")
    bad = [n for n, e in check.report["steps"].items() if e["status"] not in ("ok",) and n in wanted]
    return 1 if bad or check.report.get("interrupted") or check.report.get("report_error") else 0


if __name__ == "__main__":
    sys.exit(main())
