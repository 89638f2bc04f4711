"""Adapters on one base share its weights in memory: the real tiny Florence-2 and LoRA adapters."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import pytest

from tests.support.images import noise
from tests.system.test_warm_tier import FakeMover
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.errors import ModelLoadError
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.florence.shared_base import SharedBases
from vision_server.images import fit_image
from vision_server.runtime import build_models
from vision_server.settings import Settings
from vision_server.testing.tiny_model import build_test_adapter, tiny_pixel_spec

GREEDY = GenerationOptions(max_new_tokens=24, num_beams=1)
BEAMS = GenerationOptions(max_new_tokens=24, num_beams=3)
TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<GENERATE_TAGS>")

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def items(options: GenerationOptions = GREEDY) -> list[CaptionItem]:
    return [CaptionItem(fit_image(noise(n), tiny_pixel_spec()), TASKS[n % 4], options) for n in range(4)]


def texts(captioner: FlorenceCaptioner, options: GenerationOptions = GREEDY) -> list[str]:
    return [caption.text for caption in captioner.caption(items(options))]


@pytest.fixture(scope="module")
def second_adapter_dir(tiny_native_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_adapter(tiny_native_dir, tmp_path_factory.mktemp("second-adapter") / "a", seed=7)


@pytest.fixture(scope="module")
def alone(
    tiny_native_dir: Path,
    tiny_adapter_dir: Path,
    second_adapter_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[GenerationOptions, list[str]]]:
    """Each model's captions loaded on its own (no pool: adapters merged), greedy and beam search."""
    cache = tmp_path_factory.mktemp("alone")
    answers = {}
    for name, adapter in (("plain", None), ("first", tiny_adapter_dir), ("second", second_adapter_dir)):
        source = None if adapter is None else str(adapter)
        captioner = FlorenceCaptioner(str(tiny_native_dir), cache_dir=cache, device="cpu", adapter=source)
        captioner.load()
        answers[name] = {options: texts(captioner, options) for options in (GREEDY, BEAMS)}
        captioner.unload()
    assert answers["plain"][GREEDY] != answers["first"][GREEDY] != answers["second"][GREEDY]
    return answers


def florence(model: Path, cache: Path, adapter: Path | None, bases: SharedBases | None) -> FlorenceCaptioner:
    return FlorenceCaptioner(
        str(model), cache_dir=cache, device="cpu", adapter=str(adapter) if adapter else None, bases=bases
    )


Trio = tuple[FlorenceCaptioner, FlorenceCaptioner, FlorenceCaptioner]


@pytest.fixture
def trio(tiny_native_dir: Path, tiny_adapter_dir: Path, second_adapter_dir: Path, tmp_path: Path) -> Trio:
    """The plain base and two adapters on it, one pool, all loaded (the first adapter first)."""
    bases = SharedBases()
    plain, first, second = (
        florence(tiny_native_dir, tmp_path, adapter, bases)
        for adapter in (None, tiny_adapter_dir, second_adapter_dir)
    )
    assert plain.shares_base and first.shares_base and second.shares_base
    for captioner in (first, plain, second):
        captioner.load()
    return plain, first, second


def test_sharers_load_the_base_once_and_caption_as_if_alone(
    trio: Trio,
    tiny_native_dir: Path,
    tiny_adapter_dir: Path,
    alone: dict[str, dict[GenerationOptions, list[str]]],
    tmp_path: Path,
) -> None:
    plain, first, second = trio
    models = {id(c._loaded.model) for c in (plain, first, second)}  # type: ignore[union-attr]
    assert len(models) == 1
    # Switching adapters per call, in an order that differs from the loads, greedy and beams.
    for options in (GREEDY, BEAMS):
        for name, captioner in (("second", second), ("plain", plain), ("first", first), ("plain", plain)):
            assert texts(captioner, options) == alone[name][options], (name, options)

    parts = [c.memory_parts() for c in (plain, first, second)]
    base_keys = {key for part in parts for key in part if key.startswith("base:")}
    assert len(base_keys) == 1 and all(base_keys <= part.keys() for part in parts)
    adapter_keys = [key for part in parts for key in part if key.startswith("adapter:")]
    assert len(adapter_keys) == len(set(adapter_keys)) == 2
    assert str(tiny_adapter_dir.resolve()) in next(k for k in parts[1] if k.startswith("adapter:"))

    # A merged copy holds the base once more; the pool holds it once plus two small adapters.
    (base_key,) = base_keys
    merged = florence(tiny_native_dir, tmp_path, tiny_adapter_dir, None)
    merged.load()
    (merged_size,) = merged.memory_parts().values()
    merged.unload()
    assert parts[0][base_key] == merged_size
    total = sum({k: v for part in parts for k, v in part.items()}.values())
    assert total < 1.1 * merged_size < 2 * merged_size


def test_unloading_one_sharer_keeps_the_others_and_the_last_one_frees_the_base(
    trio: Trio, alone: dict[str, dict[GenerationOptions, list[str]]]
) -> None:
    plain, first, second = trio
    bases = first._bases
    assert bases is not None
    model = weakref.ref(first._loaded.model)  # type: ignore[union-attr]
    first.unload()
    assert texts(second) == alone["second"][GREEDY] and texts(plain) == alone["plain"][GREEDY]
    second.unload()  # the last adapter leaves: the base runs without PEFT's layers again
    assert texts(plain) == alone["plain"][GREEDY]
    first.load()  # and an adapter comes back onto the base that stayed loaded
    assert first._loaded.model is model()  # type: ignore[union-attr]
    assert texts(first) == alone["first"][GREEDY] and texts(plain) == alone["plain"][GREEDY]
    plain.unload()
    assert texts(first) == alone["first"][GREEDY]
    first.unload()
    gc.collect()
    assert model() is None, "the shared base outlived its last sharer"
    assert bases.loaded(first._key) is None  # type: ignore[arg-type]
    first.load()  # a fresh base, loaded again
    assert texts(first) == alone["first"][GREEDY]
    first.unload()


def test_a_lone_adapter_merges_and_a_compiled_model_keeps_its_own_copy(
    tiny_native_dir: Path, tiny_adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bases = SharedBases()
    lone = florence(tiny_native_dir, tmp_path, tiny_adapter_dir, bases)
    assert not lone.shares_base
    (key,) = lone.memory_parts()
    assert key.startswith("model:") and key.endswith(f"#{lone._serial}")
    caplog.set_level(logging.INFO, logger="vision_server.florence.captioner")
    compiled = FlorenceCaptioner(
        str(tiny_native_dir),
        cache_dir=tmp_path,
        device="cpu",
        adapter=str(tiny_adapter_dir),
        compile=True,
        bases=bases,
    )
    assert not compiled.shares_base and not lone.shares_base  # neither counts the other as a sharer
    assert "keeps its own copy of the base model" in caplog.text
    other = florence(tiny_native_dir, tmp_path, None, bases)
    assert lone.shares_base and other.shares_base  # now two share the base


def test_the_warm_tier_never_moves_a_base_another_loaded_sharer_uses(
    tiny_native_dir: Path,
    tiny_adapter_dir: Path,
    alone: dict[str, dict[GenerationOptions, list[str]]],
    tmp_path: Path,
) -> None:
    bases = SharedBases()
    plain = florence(tiny_native_dir, tmp_path, None, bases)
    adapted = florence(tiny_native_dir, tmp_path, tiny_adapter_dir, bases)
    mover = FakeMover()
    plain.mover = adapted.mover = mover
    plain.load()
    assert plain.can_offload  # the only loaded sharer
    adapted.load()
    assert not plain.can_offload and not adapted.can_offload
    adapted.offload()  # refused even when called
    assert mover.moves == [] and texts(plain) == alone["plain"][GREEDY]
    plain.unload()
    assert adapted.can_offload
    adapted.offload()
    assert mover.moves == ["host"]
    plain.load()  # brings the parked base back for itself
    assert mover.moves == ["host", "device cpu"]
    adapted.restore()
    assert mover.moves == ["host", "device cpu"]  # already back: nothing to move
    assert texts(adapted) == alone["first"][GREEDY] and texts(plain) == alone["plain"][GREEDY]
    plain.unload()
    adapted.unload()


def test_a_servers_models_on_one_base_share_it(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    """runtime.build_models gives every Florence-2 model of a server the same pool."""
    settings = Settings(model=("base=test:tiny", f"styled=test:tiny+{tiny_adapter_dir}"), cache_dir=tmp_path)
    base, styled = (model.captioner for model in build_models(settings))
    assert isinstance(base, FlorenceCaptioner) and isinstance(styled, FlorenceCaptioner)
    assert base.shares_base and styled.shares_base
    assert base.memory_parts().items() < styled.memory_parts().items()
    base.load()
    styled.load()
    assert base._loaded.model is styled._loaded.model  # type: ignore[union-attr]
    base.unload()
    styled.unload()


def test_an_adapter_that_fails_to_attach_leaves_the_base_to_the_others(
    tiny_native_dir: Path, alone: dict[str, dict[GenerationOptions, list[str]]], tmp_path: Path
) -> None:
    broken_dir = tmp_path / "not-an-adapter"
    broken_dir.mkdir()
    bases = SharedBases()
    plain = florence(tiny_native_dir, tmp_path, None, bases)
    broken = florence(tiny_native_dir, tmp_path, broken_dir, bases)
    plain.load()
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        broken.load()
    shared = bases.loaded(plain._key)  # type: ignore[arg-type]
    assert not broken.is_loaded and shared is not None and shared.users == {plain}
    assert texts(plain) == alone["plain"][GREEDY]
    plain.unload()
    assert bases.loaded(plain._key) is None  # type: ignore[arg-type]
