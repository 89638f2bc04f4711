"""What only a CUDA GPU can show: compiled decoding, real out-of-memory splitting, memory after unload.

Marked ``cuda``; every test skips with its reason where torch sees no CUDA device (CI, laptops).
``benchmarks/gpu_check.py`` runs them first on a GPU machine and copies each test's measured
figures (``record_property``) into its report. Written for a machine without pytest-asyncio
(the GPU image has plain pytest only), so the engine runs under ``asyncio.run`` here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.images import noise
from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.engine.lifecycle import ModelState
from vision_server.engine.scheduler import Engine, EngineConfig
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.images import PreparedImage, fit_image
from vision_server.testing.tiny_model import preset_pixel_spec, tiny_pixel_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

MIB = 2**20
BASELINE_SLACK = 64 * MIB  # the cuBLAS workspace (about 33 MB) may stay after a model has run
SHORT = GenerationOptions(max_new_tokens=8, min_new_tokens=8, num_beams=1)


def base_picture(seed: int) -> PreparedImage:
    return fit_image(noise(seed, (800, 600)), preset_pixel_spec("base"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real-shaped ``base`` preset (231 M parameters, 442 MB in fp16): big enough that a leak shows."""
    from vision_server.testing.tiny_model import build_test_model

    return build_test_model(tmp_path_factory.mktemp("cuda-base") / "model", preset="base")


@pytest.fixture
def memory_cap() -> Iterator[None]:
    """Whatever a test caps, the next one starts with the whole GPU again."""
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def base_captioner(base_dir: Path, tmp_path: Path, **kwargs: Any) -> FlorenceCaptioner:
    return FlorenceCaptioner(
        str(base_dir), cache_dir=tmp_path, device="cuda", dtype="float16", default_options=SHORT, **kwargs
    )


async def caption_all(engine: Engine, items: list[CaptionItem]) -> list[Caption]:
    return list(await asyncio.gather(*(engine.submit(item) for item in items)))


def test_idle_unload_returns_gpu_memory_to_the_context_baseline(
    base_dir: Path, tmp_path: Path, record_property: Any
) -> None:
    """Idle: ready → offloaded (weights in pinned host memory) → unloaded; GPU memory back each time."""
    torch.cuda.init()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    free_before, total = torch.cuda.mem_get_info()

    def held() -> tuple[int, int]:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    async def wait_for(engine: Engine, state: ModelState) -> None:
        for _ in range(300):
            if engine.state is state:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the engine never became {state.value} (it is {engine.state.value})")

    async def scenario() -> dict[str, tuple[int, int]]:
        config = EngineConfig(idle_timeout=0.5, offload_timeout=1.0)
        engine = Engine(base_captioner(base_dir, tmp_path), config)
        await engine.start()
        try:
            await engine.submit(CaptionItem(base_picture(1), "<CAPTION>", SHORT))
            seen = {"loaded": held()}
            await wait_for(engine, ModelState.OFFLOADED)
            seen["offloaded"] = held()
            await wait_for(engine, ModelState.UNLOADED)
            seen["unloaded"] = held()
            return seen
        finally:
            await engine.stop(grace=0)

    seen = asyncio.run(scenario())
    free_after, _ = torch.cuda.mem_get_info()
    record_property("allocated_before_mib", round(before[0] / MIB, 1))
    record_property("reserved_before_mib", round(before[1] / MIB, 1))
    for stage, (allocated, reserved) in seen.items():
        record_property(f"allocated_{stage}_mib", round(allocated / MIB, 1))
        record_property(f"reserved_{stage}_mib", round(reserved / MIB, 1))
    record_property("device_used_before_mib", round((total - free_before) / MIB, 1))
    record_property("device_used_after_unload_mib", round((total - free_after) / MIB, 1))
    assert seen["loaded"][0] - before[0] > 300 * MIB, (
        "the model was not on the GPU: the check would prove nothing"
    )
    for stage in ("offloaded", "unloaded"):
        allocated, reserved = seen[stage]
        assert allocated <= before[0] + BASELINE_SLACK, f"{stage}: allocated {allocated / MIB:.0f} MiB"
        assert reserved <= before[1] + BASELINE_SLACK, f"{stage}: reserved {reserved / MIB:.0f} MiB"


def test_cudnn_attention_is_switched_off_after_load(
    base_dir: Path, tmp_path: Path, record_property: Any
) -> None:
    """cuDNN SDPA builds a plan per new shape (a 10 s first call per batch size); load turns it off."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    captioner = base_captioner(base_dir, tmp_path)
    captioner.load()
    try:
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        items = [CaptionItem(base_picture(seed), "<CAPTION>", SHORT) for seed in range(2)]
        captioner.caption(items)  # warm-up outside the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            captioner.caption(items)
        attention = {e.key: e.count for e in profile.key_averages() if "scaled_dot_product" in e.key}
    finally:
        captioner.unload()
    record_property("sdpa_ops", attention)
    assert attention, "no scaled_dot_product_attention call was seen: the check would prove nothing"
    assert not [name for name in attention if "cudnn" in name], attention


def test_out_of_memory_inside_a_batch_is_split_and_answered(
    base_dir: Path,
    tmp_path: Path,
    memory_cap: None,
    caplog: pytest.LogCaptureFixture,
    record_property: Any,
) -> None:
    """A real CUDA OOM: the process is capped below what a batch of 16 needs but above a batch of 4."""
    caplog.set_level(logging.WARNING, logger="vision_server.engine.scheduler")
    captioner = base_captioner(base_dir, tmp_path, max_batch_size=16)
    items = [CaptionItem(base_picture(seed), "<CAPTION>", SHORT) for seed in range(16)]

    async def scenario() -> tuple[int, list[Caption]]:
        engine = Engine(captioner, EngineConfig(max_batch_size=16, max_batch_wait=0.5, idle_timeout=-1))
        await engine.start(preload=True)
        try:
            await caption_all(engine, items)  # uncapped: what a batch of 16 needs
            torch.cuda.synchronize()
            weights = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            await caption_all(engine, items)
            need = torch.cuda.max_memory_allocated() - weights
            torch.cuda.empty_cache()
            allowed = torch.cuda.memory_reserved() + 0.4 * need
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(allowed / total)
            return need, await caption_all(engine, items)
        finally:
            await engine.stop(grace=0)

    need, captions = asyncio.run(scenario())
    splits = [r.getMessage() for r in caplog.records if "out of memory on a batch" in r.getMessage()]
    record_property("batch16_needs_mib", round(need / MIB, 1))
    record_property("splits", splits)
    assert need > 200 * MIB, f"a batch of 16 needs only {need / MIB:.0f} MiB: too little to cap reliably"
    assert splits and splits[0].startswith("out of memory on a batch of 16"), splits
    assert len(captions) == 16 and all(isinstance(c, Caption) for c in captions)
    assert all(c.completion_tokens > 0 for c in captions), captions


def test_compiled_decoding_gives_the_uncompiled_answers(
    tiny_native_dir: Path, tmp_path: Path, record_property: Any
) -> None:
    """The real thing on CUDA (static cache, torch.compile with CUDA graphs); float32 so both runs
    must agree token for token, whatever the kernels' rounding."""
    options = GenerationOptions(max_new_tokens=24, num_beams=1)
    common: dict[str, Any] = {"cache_dir": tmp_path, "device": "cuda", "dtype": "float32"}
    plain = FlorenceCaptioner(str(tiny_native_dir), default_options=options, **common)
    compiled = FlorenceCaptioner(
        str(tiny_native_dir), default_options=options, max_batch_size=2, compile=True, **common
    )

    def picture(seed: int) -> PreparedImage:
        return fit_image(noise(seed, (56, 40)), tiny_pixel_spec())

    plain.load()
    compiled.load()
    try:
        loaded = compiled._loaded
        assert loaded is not None and loaded.plan is not None, "--compile did not take effect on CUDA"
        short = GenerationOptions(max_new_tokens=8, num_beams=1)  # other options: the uncompiled path
        batches = [
            [CaptionItem(picture(1), "<CAPTION>", options)],
            [
                CaptionItem(picture(2), "<GENERATE_TAGS>", options),
                CaptionItem(picture(3), "<ANALYZE>", options),
            ],
            [CaptionItem(picture(4), "<DETAILED_CAPTION>", options)],
            [CaptionItem(picture(5), "<MORE_DETAILED_CAPTION>", short)],
        ]
        got = [[c.text for c in compiled.caption(batch)] for batch in batches]
        want = [[c.text for c in plain.caption(batch)] for batch in batches]
    finally:
        compiled.unload()
        plain.unload()
    record_property("captions", got)
    assert got == want
