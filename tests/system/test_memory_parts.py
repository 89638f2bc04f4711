"""``memory_parts()`` of the real captioners: estimated from files before a load, measured after."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.florence.shared_base import SharedBases
from vision_server.generic.captioner import GenericCaptioner
from vision_server.testing.tiny_generic import FAMILIES


def only(parts: dict[str, int]) -> int:
    (value,) = parts.values()
    return value


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_test_model_is_sized_before_it_is_built_and_measured_after(tmp_path: Path, dtype: str) -> None:
    captioner = FlorenceCaptioner("test:tiny", cache_dir=tmp_path, device="cpu", dtype=dtype)
    before = captioner.memory_parts()
    assert not (tmp_path / "test-models").exists()  # sized from the preset's config, nothing built
    captioner.load()
    after = captioner.memory_parts()
    assert after.keys() == before.keys() and only(after) == only(before) > 0
    model = captioner._loaded.model  # type: ignore[union-attr]
    assert only(after) == sum(t.nbytes for t in (*model.parameters(), *model.buffers()))  # tied ones once
    del model
    captioner.unload()
    assert captioner.memory_parts() == after  # remembered across the unload
    fresh = FlorenceCaptioner("test:tiny", cache_dir=tmp_path, device="cpu", dtype=dtype)
    assert only(fresh.memory_parts()) == only(after)  # now read from the built model's header
    assert fresh.memory_parts().keys() != after.keys()  # two private copies are two blocks


@pytest.mark.parametrize("layout", ["tiny_original_dir", "tiny_original_bin_dir"])
def test_an_original_checkpoint_is_sized_from_its_files_then_from_the_converted_copy(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(layout), source)
    captioner = FlorenceCaptioner(str(source), cache_dir=tmp_path / "cache", device="cpu")
    estimate = only(captioner.memory_parts())
    captioner.load()
    measured = only(captioner.memory_parts())
    captioner.unload()
    # The original layout has the same tensors, minus a few padding rows of the vocabulary.
    assert 0.97 * measured < estimate <= measured
    again = FlorenceCaptioner(str(source), cache_dir=tmp_path / "cache", device="cpu")
    assert only(again.memory_parts()) == measured


def test_an_adapter_is_its_own_part_and_its_estimate_is_what_it_measures(
    tiny_native_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    bases = SharedBases()
    plain = FlorenceCaptioner(str(tiny_native_dir), cache_dir=tmp_path, device="cpu", bases=bases)
    adapted = FlorenceCaptioner(
        str(tiny_native_dir), cache_dir=tmp_path, device="cpu", adapter=str(tiny_adapter_dir), bases=bases
    )
    estimated = adapted.memory_parts()
    assert set(estimated) > set(plain.memory_parts()) and len(estimated) == 2
    adapted.load()
    assert adapted.memory_parts() == estimated and plain.memory_parts().items() <= estimated.items()
    adapted.unload()


def test_unknown_when_the_files_are_not_here_or_the_device_is_missing(tmp_path: Path) -> None:
    hub = FlorenceCaptioner("nobody-here/no-such-model", cache_dir=tmp_path, device="cpu")
    assert hub.memory_parts() == {}
    if not torch.cuda.is_available():
        gpu = FlorenceCaptioner("test:tiny", cache_dir=tmp_path, device="cuda")
        assert gpu.memory_parts() == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_models_estimate_what_they_measure(
    family: str, generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    captioner = GenericCaptioner(
        str(generic_model_dirs[family]), backend=family, cache_dir=tmp_path, device="cpu"
    )
    estimate = captioner.memory_parts()
    captioner.load()
    measured = captioner.memory_parts()
    captioner.unload()
    assert measured.keys() == estimate.keys() and captioner.memory_parts() == measured
    # Buffers a model makes itself (position ids) are in no file: the estimate can only miss those.
    assert 0 < only(estimate) <= only(measured) < 1.05 * only(estimate)
