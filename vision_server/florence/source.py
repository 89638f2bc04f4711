"""Where a model's files come from: a local directory, the Hugging Face hub, or a built test model.

The result is always a local directory; layout detection and conversion happen afterwards
(:mod:`vision_server.florence.convert`).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

from vision_server.errors import ModelSourceError

log = logging.getLogger(__name__)

TEST_PREFIX = "test:"
TEST_PRESETS = ("tiny", "base", "large")
TEST_MODEL_VERSION = 1  # bump when the builder's output changes, so cached copies are rebuilt
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a Florence-2 checkpoint needs; anything else in the repository (remote code, READMEs,
# images, duplicate weight formats we cannot read) is not downloaded.
HUB_PATTERNS = [
    "*.json",
    "*.txt",
    "*.safetensors",
    "pytorch_model.bin",
]


def is_test_model(spec: str) -> bool:
    return spec.startswith(TEST_PREFIX)


def resolve_model_dir(spec: str, *, revision: str | None, cache_dir: Path) -> Path:
    """A local directory holding the files of ``spec`` (downloading or building it if needed)."""
    problem = source_problem(spec)
    if problem is not None:
        raise ModelSourceError(problem)
    if is_test_model(spec):
        return test_model_dir(spec[len(TEST_PREFIX) :], cache_dir)
    path = Path(spec).expanduser()
    return path if path.exists() else download(spec, revision=revision)


def source_problem(spec: str) -> str | None:
    """Why ``spec`` can never load, found without the network or a build; None when it may.

    The server checks every configured model with this before it listens, so a mistyped local
    path fails at start (exit status 2), not on the first request hours later. A hub id is only
    looked up when its model first loads (it may need the network then)."""
    if is_test_model(spec):
        preset = spec[len(TEST_PREFIX) :]
        if preset not in TEST_PRESETS:
            return f"Unknown test model {spec!r}; use one of test:{', test:'.join(TEST_PRESETS)}."
        return None
    path = Path(spec).expanduser()
    if path.exists():
        return (
            None
            if path.is_dir()
            else f"Model path {path} is a file; pass the directory that holds config.json."
        )
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        return (
            f"Model directory {path} does not exist. Pass an existing directory or a hub id like "
            "'MiaoshouAI/Florence-2-large-PromptGen-v2.0'."
        )
    return None


def download(repo_id: str, *, revision: str | None) -> Path:
    """Fetch ``repo_id`` through huggingface_hub (honours HF_HOME and HF_HUB_OFFLINE; progress on stderr)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise ModelSourceError(
            f"Model {repo_id!r} (revision {revision or 'main'}) is not on the hub: {exc}"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        raise ModelSourceError(offline_message(repo_id, revision, exc)) from None


def offline_message(repo_id: str, revision: str | None, exc: Exception) -> str:
    pinned = f" --revision {revision}" if revision else ""
    return (
        f"Cannot download model {repo_id!r} ({type(exc).__name__}: {exc}). The hub is unreachable or "
        "HF_HUB_OFFLINE is set and the model is not in the local cache. On a machine with internet run "
        f"'hf download {repo_id}{pinned} --local-dir DIR', copy DIR here and start with "
        "--model DIR (or copy the HF cache into HF_HOME)."
    )


def test_model_dir(preset: str, cache_dir: Path) -> Path:
    """Build (once) and return the self-made test model ``preset``; its captions are meaningless."""
    problem = source_problem(f"{TEST_PREFIX}{preset}")
    if problem is not None:
        raise ModelSourceError(problem)
    target = cache_dir / "test-models" / f"{preset}-v{TEST_MODEL_VERSION}"
    if (target / "config.json").is_file():
        return target
    from vision_server.testing.tiny_model import build_test_model

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=target.parent))
    try:
        log.info("building test model %s in %s", preset, target)
        build_test_model(staging, preset=preset)  # type: ignore[arg-type]
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # lost a race with another process: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
