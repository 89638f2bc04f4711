"""Shared-base keys: one base per device, however the device is spelled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.florence.shared_base import BaseKey, SharedBases, device_key


@pytest.mark.parametrize(
    ("spellings", "key"),
    [
        (("cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)), "cpu"),
        (("cuda:0", torch.device("cuda", 0)), "cuda:0"),
        (("cuda:1", torch.device("cuda", 1)), "cuda:1"),
    ],
)
def test_every_spelling_of_a_device_is_one_key(spellings: tuple[object, ...], key: str) -> None:
    assert {device_key(spelling) for spelling in spellings} == {key}  # type: ignore[arg-type]


def test_cuda_without_an_index_is_the_current_device() -> None:
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert device_key("cuda") == device_key(torch.device("cuda")) == f"cuda:{current}"


def test_base_keys_of_one_device_in_two_spellings_are_equal() -> None:
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    bare = BaseKey("test:tiny", None, "cuda", "float16")
    indexed = BaseKey("test:tiny", None, f"cuda:{current}", "float16")
    assert bare == indexed and hash(bare) == hash(indexed) and bare.label == indexed.label
    assert BaseKey("test:tiny", None, "cpu:0", "float32") == BaseKey("test:tiny", None, "cpu", "float32")
    assert BaseKey("test:tiny", None, "cuda:1", "float16") != BaseKey("test:tiny", None, "cuda:0", "float16")


def test_captioners_that_spell_the_cpu_differently_share_one_base(tmp_path: Path) -> None:
    bases = SharedBases()
    plain = FlorenceCaptioner("test:tiny", cache_dir=tmp_path, device="cpu", bases=bases)
    adapted = FlorenceCaptioner(
        "test:tiny", cache_dir=tmp_path, device="cpu:0", adapter=str(tmp_path / "adapter"), bases=bases
    )
    assert plain.shares_base and adapted.shares_base  # the adapter found a sharer: it is not merged
    assert bases.sharers(BaseKey("test:tiny", None, "cpu", "float32")) == 2
