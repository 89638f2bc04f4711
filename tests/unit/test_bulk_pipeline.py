"""The dataset captioner's pipeline in-process: the engine is built and its model loaded when the
first image to caption comes up, not before."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import pytest

from tests.support.bulk_data import picture
from vision_server.bulk.pipeline import BulkPipeline, PipelineConfig, Summary
from vision_server.bulk.plan import Skip, Unit, Work
from vision_server.bulk.records import Record
from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.engine.scheduler import Engine, EngineConfig
from vision_server.errors import ModelLoadError
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

    def missing(self, record: Record, tasks: Sequence[str]) -> list[str]:
        return list(tasks)  # a fresh output: every task is still to do

    def write(self, record: Record, captions: dict[str, str], error: str | None) -> bool:
        self.rows[record.key] = error
        return True

    def close(self) -> None:
        pass


class Quiet:
    def report(self, summary: Summary, outcome: str, display: str, reason: str | None) -> None:
        pass


def in_threads(self: BulkPipeline) -> Executor:  # no decoding processes in a unit test
    return ThreadPoolExecutor(1)


ONE_AT_A_TIME = PipelineConfig(
    ("<CAPTION>",), GenerationOptions(), 10**8, workers=1, batches_in_flight=1, min_in_flight=1
)


async def test_images_after_the_load_are_decoded_at_the_size_the_loaded_model_wants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The size read before the load is a guess; once loaded, the rest of the run decodes at the
    model's own size instead of every image being resized again on the model's thread."""
    model = SizedOnLoad()
    built: list[Engine] = []

    def make_engine() -> Engine:
        built.append(Engine(model, EngineConfig(idle_timeout=-1, max_batch_size=1)))
        return built[-1]

    monkeypatch.setattr(BulkPipeline, "_new_pool", in_threads)
    output = Kept()
    pipeline = BulkPipeline(make_engine, [output], ONE_AT_A_TIME, Quiet())
    units = (Work(Record("d", f"{n}.png", data=picture(n)), ("<CAPTION>",)) for n in range(3))
    summary = await asyncio.wait_for(pipeline.run(units), 60)
    assert (summary.captioned, summary.failed, pipeline.load_error) == (3, 0, None), output.rows
    # one image in flight: the first was decoded while the model loaded (at the guessed size),
    # each later one only once the one before it was captioned, so after the load
    assert model.shapes[1:] == [(LOADED_SPEC.height, LOADED_SPEC.width, 3)] * 2
    assert len(built) == 1 and not built[0].running  # built once, stopped by the run


async def test_a_run_with_nothing_to_caption_builds_no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the engine imports torch (seconds): a rerun that finds everything done skips it."""
    built: list[str] = []

    def make_engine() -> Engine:
        built.append("engine")
        raise AssertionError("built an engine with nothing to caption")

    monkeypatch.setattr(BulkPipeline, "_new_pool", in_threads)
    pipeline = BulkPipeline(make_engine, [Kept()], ONE_AT_A_TIME, Quiet())
    units = (Skip(Record("d", f"{n}.png", data=b""), "already captioned") for n in range(5))
    summary = await asyncio.wait_for(pipeline.run(units), 60)
    assert (summary.skipped, summary.captioned, built, pipeline.engine) == (5, 0, [], None)


async def test_a_stop_while_the_engine_is_built_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl+C during the seconds torch takes to import: the run ends once the build returns,
    without starting the engine or loading the model."""
    model = FakeCaptioner(spec=FAKE_SPEC)
    building = asyncio.Event()
    loop = asyncio.get_running_loop()

    def make_engine() -> Engine:
        loop.call_soon_threadsafe(building.set)
        return Engine(model, EngineConfig(idle_timeout=-1))

    monkeypatch.setattr(BulkPipeline, "_new_pool", in_threads)
    output = Kept()
    pipeline = BulkPipeline(make_engine, [output], ONE_AT_A_TIME, Quiet())
    units: list[Unit] = [Work(Record("d", f"{n}.png", data=picture(n)), ("<CAPTION>",)) for n in range(3)]
    running = asyncio.ensure_future(pipeline.run(iter(units)))
    await asyncio.wait_for(building.wait(), 60)
    pipeline.stop(2)
    summary = await asyncio.wait_for(running, 60)
    assert (summary.interrupted, summary.processed, output.rows) == (2, 0, {})
    assert pipeline.engine is None and not model.loaded


async def test_a_failed_load_is_kept_as_its_cause_and_not_logged_by_the_engine_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The summary says the failure once ("error: the model could not be loaded: CAUSE"); the
    engine's own line of it would say it a second time just above. The engine factory tells the
    engine so (log_load_failures), as the command's does."""
    model = FakeCaptioner(spec=FAKE_SPEC)
    model.fail_load = "m has no config.json"
    monkeypatch.setattr(BulkPipeline, "_new_pool", in_threads)
    config = EngineConfig(idle_timeout=-1, log_load_failures=False)
    pipeline = BulkPipeline(lambda: Engine(model, config), [Kept()], ONE_AT_A_TIME, Quiet())
    units = (Work(Record("d", f"{n}.png", data=picture(n)), ("<CAPTION>",)) for n in range(2))
    with caplog.at_level("INFO"):
        summary = await asyncio.wait_for(pipeline.run(units), 60)
    assert pipeline.load_error == "m has no config.json" and summary.captioned == 0
    assert not [r for r in caplog.records if "m has no config.json" in r.getMessage()], caplog.text
    # a server's engine (the default) still logs its failed loads
    engine = Engine(model, EngineConfig(idle_timeout=-1))
    await engine.start()
    try:
        with caplog.at_level("INFO"), pytest.raises(ModelLoadError, match=r"no config\.json"):
            await engine.load()
    finally:
        await engine.stop(grace=0)
    assert "failed to load: m has no config.json" in caplog.text
