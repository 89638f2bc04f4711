"""After a CUDA out-of-memory, the failed call's tensors are gone before anything is retried.

A Python exception's traceback keeps every frame of the call that raised it, and with them the
tensors those frames held; an error raised inside the handler keeps the first one as its
``__context__``. Splitting a batch in halves while either is alive runs out of memory again on a
real GPU (pytorch/pytorch#18853). The GPU's own check is ``tests/system/test_cuda.py``; here
stand-ins of ours hold a CPU tensor where the model would hold its activations.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from PIL import Image

from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.devices import generate_or_out_of_memory, load_or_explain
from vision_server.engine.batches import caption_splitting
from vision_server.errors import ModelLoadError, OutOfMemory
from vision_server.images import fit_image
from vision_server.testing.fake import FAKE_SPEC


def items(count: int) -> list[CaptionItem]:
    image = fit_image(Image.new("RGB", (8, 8), (9, 9, 9)), FAKE_SPEC)
    return [CaptionItem(image, "<CAPTION>", GenerationOptions()) for _ in range(count)]


class HoldingCaptioner:
    """Runs out of memory on any batch of more than one, holding a tensor in the failing frame;
    notes, at each call, whether an earlier call's tensor is still alive."""

    def __init__(self) -> None:
        self.tensors: list[weakref.ref[torch.Tensor]] = []
        self.leftovers: list[int] = []

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.leftovers.append(sum(ref() is not None for ref in self.tensors))
        activations = torch.zeros(len(batch), 1024)
        self.tensors.append(weakref.ref(activations))
        if len(batch) > 1:
            raise OutOfMemory(f"Out of GPU memory on a batch of {len(batch)}.", retry_after=5)
        return [Caption("ok")]


def test_each_half_is_tried_after_the_failed_batch_let_go_of_its_memory() -> None:
    captioner = HoldingCaptioner()
    results = caption_splitting(captioner, items(4))  # type: ignore[arg-type]
    assert [r.text for r in results] == ["ok"] * 4  # type: ignore[union-attr]
    assert len(captioner.leftovers) == 7  # 4, then 2 + 2, then four singles
    assert captioner.leftovers == [0] * 7, "a retry ran while a failed batch's tensors were alive"


def test_a_single_item_that_fails_gets_its_error_without_the_failed_call_attached() -> None:
    class AlwaysOut(HoldingCaptioner):
        def caption(self, batch: list[CaptionItem]) -> list[Caption]:
            activations = torch.zeros(1024)
            self.tensors.append(weakref.ref(activations))
            raise OutOfMemory("Out of GPU memory on a batch of 1.", retry_after=5)

    captioner = AlwaysOut()
    results = caption_splitting(captioner, items(2))  # type: ignore[arg-type]
    assert all(isinstance(r, OutOfMemory) for r in results)
    assert [ref() for ref in captioner.tensors] == [None] * 3


def cuda_out_of_memory_after_allocating(tensors: list[weakref.ref[torch.Tensor]]) -> Any:
    activations = torch.zeros(4096)
    tensors.append(weakref.ref(activations))
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_generation_out_of_memory_becomes_out_of_memory_with_the_tensors_gone() -> None:
    tensors: list[weakref.ref[torch.Tensor]] = []
    with pytest.raises(OutOfMemory, match="batch of 16") as raised:
        generate_or_out_of_memory(lambda: cuda_out_of_memory_after_allocating(tensors), 16)
    assert raised.value.__context__ is None and raised.value.retry_after == 5
    assert tensors[0]() is None, "the failed generate's tensors outlived its out-of-memory error"


def test_generation_that_succeeds_returns_its_result() -> None:
    assert generate_or_out_of_memory(lambda: 42, 1) == 42


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, OSError], ids=["out-of-memory", "other"])
def test_a_failed_load_lets_go_of_what_it_had_loaded(error: type[Exception]) -> None:
    tensors: list[weakref.ref[torch.Tensor]] = []

    def load() -> None:
        weights = torch.zeros(4096)
        tensors.append(weakref.ref(weights))
        raise error("failed halfway")

    with pytest.raises(ModelLoadError) as raised:
        load_or_explain("some/model", load)
    assert raised.value.__context__ is None
    assert tensors[0]() is None, "the failed load's weights outlived its ModelLoadError"
