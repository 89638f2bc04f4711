"""Test layers and session-wide test models.

The tests live in three layers, one directory each, and every test gets its layer's marker here
(never per test), so ``pytest -m unit`` runs the fast in-process layer on its own:

- ``unit``: functions and objects in-process: no socket, no subprocess, no model generation;
- ``http``: the real aiohttp application on a real local port, inside the test process;
- ``system``: real processes (the CLIs, the server, the shell/PowerShell clients, HAProxy, docs
  builds) and the real model stack in-process (loading, converting, compiling, generating).

The tiny models are built once per run into temp dirs (about a second in all).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from vision_server.engine.clock import Clock
from vision_server.engine.models import NamedModel
from vision_server.engine.scheduler import Engine, EngineConfig
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

LAYERS = ("unit", "http", "system")
TESTS = Path(__file__).parent


def layer_of(path: Path) -> str | None:
    """The layer a test file belongs to: the first directory under tests/, if it is a layer."""
    parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
    return parts[0] if len(parts) > 1 and parts[0] in LAYERS else None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m LAYER`` alone, do not even import the other layers' modules (collection is costly)."""
    wanted = config.getoption("markexpr", "")
    if wanted not in LAYERS or not collection_path.is_relative_to(TESTS) or collection_path == TESTS:
        return None
    layer = collection_path.relative_to(TESTS).parts[0]
    return True if layer in LAYERS and layer != wanted else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its directory's layer."""
    for item in items:
        layer = layer_of(item.path)
        if layer is not None:
            item.add_marker(layer)


@pytest.fixture(scope="session")
def tiny_native_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Florence-2 in the native transformers 5 layout (seed 0)."""
    from vision_server.testing.tiny_model import build_test_model

    return build_test_model(tmp_path_factory.mktemp("tiny-native") / "model")


@pytest.fixture(scope="session")
def tiny_original_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in PromptGen's original remote-code layout (model.safetensors, fp32)."""
    from vision_server.testing.tiny_model import build_test_model

    return build_test_model(tmp_path_factory.mktemp("tiny-original") / "model", fmt="original")


@pytest.fixture(scope="session")
def tiny_original_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original layout as microsoft/Florence-2 ships it: an fp16 pytorch_model.bin."""
    from vision_server.testing.tiny_model import build_test_model

    out = tmp_path_factory.mktemp("tiny-original-bin") / "model"
    return build_test_model(out, fmt="original", weights="bin")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_native_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (r=4, q_proj/v_proj, non-zero B) for the tiny model, native key names."""
    from vision_server.testing.tiny_model import build_test_adapter

    return build_test_adapter(tiny_native_dir, tmp_path_factory.mktemp("tiny-adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_original_adapter_dir(tiny_native_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same adapter with the key names of the original layout."""
    from vision_server.testing.tiny_model import build_test_adapter

    out = tmp_path_factory.mktemp("tiny-original-adapter") / "adapter"
    return build_test_adapter(tiny_native_dir, out, fmt="original")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings serving the real tiny model (``test:tiny``), built once per run into a shared cache.

    In-process servers take it as is; ``tests.support.api.tiny_settings`` gives the same with
    overrides, and ``tiny_server_url`` serves the same model from a real process.
    """
    from tests.support.api import tiny_settings

    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vision-server serve --model test:tiny`` as a real process on a free port, one per module.

    The model is preloaded (it is ready once the server listens) and captions are capped at 32
    tokens to keep modules fast; everything else is the server's default.
    """
    from tests.support.api import tiny_cache_dir
    from tests.support.processes import tiny_server

    tmp = tmp_path_factory.mktemp("tiny-server")
    with tiny_server(tmp, tiny_cache_dir(tmp_path_factory), "--max-new-tokens", "32") as process:
        yield process.wait_listening(timeout=90)
        process.stop()


StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    """``await start_engine(captioner or models, clock=None, **config)``: a started engine, stopped after.

    Every engine started here is stopped when the test ends, passed or failed, so no worker or
    model thread outlives its test (a test may also stop it itself: stopping twice is harmless).
    """
    engines: list[Engine] = []

    async def start(
        models: FakeCaptioner | Sequence[NamedModel],
        *,
        clock: Clock | None = None,
        default_model: str | None = None,
        **config: float,
    ) -> Engine:
        engine = Engine(models, EngineConfig(**config), clock=clock, default_model=default_model)  # type: ignore[arg-type]
        engines.append(engine)
        await engine.start()
        return engine

    yield start
    for engine in reversed(engines):
        await engine.stop(grace=0)


@pytest.fixture(scope="session")
def generic_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model per generic family (BLIP, GIT, ViT+GPT-2, Idefics3), built once."""
    from vision_server.testing.tiny_generic import FAMILIES, build_generic_model

    root = tmp_path_factory.mktemp("generic-models")
    return {family: build_generic_model(root / family, family) for family in FAMILIES}
