"""The dataset captioner's pipeline in-process: the model loads when the first image comes up."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, ThreadPoolExecutor

import pytest

from tests.conftest import StartEngine
from tests.support.bulk_data import picture
from vision_server.bulk.pipeline import BulkPipeline, PipelineConfig, Summary
from vision_server.bulk.plan import Work
from vision_server.bulk.records import Record
from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.images import PixelSpec
from vision_server.testing.fake import FAKE_SPEC, FakeCaptioner

LOADED_SPEC = PixelSpec(height=24, width=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class SizedOnLoad(FakeCaptioner):
    """A model whose input size is known only once it has loaded (a backend picked at load):
    before, it answers a guess, as the generic captioner does under ``--backend auto``."""

    def __init__(self) -> None:
        super().__init__(spec=FAKE_SPEC)
        self.shapes: list[tuple[int, ...]] = []

    @property
    def pixel_spec(self) -> PixelSpec:
        return LOADED_SPEC if self.loaded else FAKE_SPEC

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.shapes.extend(item.image.pixels.shape for item in batch)
        return super().caption(batch)


class Kept:
    """An output that keeps what it is given."""

    def __init__(self) -> None:
        self.rows: dict[str, str | None] = {}

    def write(self, record: Record, captions: dict[str, str], error: str | None) -> None:
        self.rows[record.key] = error

    def close(self) -> None:
        pass


class Quiet:
    def report(self, summary: Summary, outcome: str, display: str, reason: str | None) -> None:
        pass


async def test_images_after_the_load_are_decoded_at_the_size_the_loaded_model_wants(
    start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size read before the load is a guess; once loaded, the rest of the run decodes at the
    model's own size instead of every image being resized again on the model's thread."""
    model = SizedOnLoad()
    engine = await start_engine(model, idle_timeout=-1, max_batch_size=1)

    def in_threads(self: BulkPipeline) -> Executor:  # no decoding processes in a unit test
        return ThreadPoolExecutor(1)

    monkeypatch.setattr(BulkPipeline, "_new_pool", in_threads)
    config = PipelineConfig(("<CAPTION>",), GenerationOptions(), 10**8, workers=1, in_flight=1)
    output = Kept()
    pipeline = BulkPipeline(engine, [output], config, Quiet())
    units = (Work(Record("d", f"{n}.png", data=picture(n)), ("<CAPTION>",)) for n in range(3))
    summary = await asyncio.wait_for(pipeline.run(units), 60)
    assert (summary.captioned, summary.failed, pipeline.load_error) == (3, 0, None), output.rows
    # in_flight=1: the first image was decoded while the model loaded (at the guessed size), each
    # later one only once the one before it was captioned, so after the load
    assert model.shapes[1:] == [(LOADED_SPEC.height, LOADED_SPEC.width, 3)] * 2
