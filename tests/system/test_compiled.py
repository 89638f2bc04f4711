"""Compiled decoding: the bucket plan, the CPU fallback, and the compiled path's answers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.images import noise
from vision_server.captioner import CaptionItem, GenerationOptions
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.florence.compiled import CompilePlan
from vision_server.images import PreparedImage, fit_image
from vision_server.testing.tiny_model import tiny_pixel_spec

# torch's inductor imports torch.utils.mkldnn, which still uses torch.jit.script_method: torch's own
# deprecation, raised at import inside torch.compile, not anything this package calls.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

OPTIONS = GenerationOptions(max_new_tokens=24, num_beams=1)


def picture(seed: int) -> PreparedImage:
    return fit_image(noise(seed, (56, 40)), tiny_pixel_spec())


def test_plan_buckets_padding_and_acceptance() -> None:
    plan = CompilePlan.create(OPTIONS, max_batch_size=24, image_tokens=577)
    assert plan.buckets == (1, 2, 4, 8, 16, 24) and plan.prompt_length > 577
    assert [plan.bucket_for(n) for n in (1, 3, 9, 17, 24)] == [1, 4, 16, 24, 24]
    items = [CaptionItem(picture(n), "<CAPTION>", OPTIONS) for n in range(3)]
    assert plan.pad(items) == [*items, items[-1]]
    assert plan.accepts(GenerationOptions(24, 1, with_confidence=True), 24)
    assert not plan.accepts(GenerationOptions(max_new_tokens=10, num_beams=1), 1)
    assert not plan.accepts(OPTIONS, 25)


def test_plan_with_chosen_buckets_compiles_only_those() -> None:
    plan = CompilePlan.create(OPTIONS, max_batch_size=8, image_tokens=577, buckets=(64, 1, 16, 16))
    assert plan.buckets == (1, 16, 64)
    assert [plan.bucket_for(n) for n in (1, 2, 17, 64)] == [1, 16, 64, 64]
    assert plan.accepts(OPTIONS, 64) and not plan.accepts(OPTIONS, 65)


def test_compile_without_cuda_falls_back_and_says_so(
    tiny_native_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    captioner = FlorenceCaptioner(str(tiny_native_dir), cache_dir=tmp_path, device="cpu", compile=True)
    captioner.load()
    assert any("--compile needs a CUDA device" in r.getMessage() for r in caplog.records)
    assert captioner.caption([CaptionItem(picture(1), "<CAPTION>", OPTIONS)])[0].text
    captioner.unload()


def test_compiled_path_gives_the_uncompiled_answers(
    tiny_native_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Forced onto the CPU (inductor), so padding to buckets and fixed prompt lengths are checked here."""
    caplog.set_level(logging.INFO)
    plain = FlorenceCaptioner(str(tiny_native_dir), cache_dir=tmp_path, device="cpu", default_options=OPTIONS)
    compiled = FlorenceCaptioner(
        str(tiny_native_dir),
        cache_dir=tmp_path,
        device="cpu",
        default_options=OPTIONS,
        max_batch_size=2,
        compile=True,
        compile_on_cpu=True,
    )
    plain.load()
    compiled.load()
    warmed = [r.getMessage() for r in caplog.records if "warmed up" in r.getMessage()]
    assert [m.split(" in ")[0] for m in warmed] == [
        "compiled and warmed up batch size 1",
        "compiled and warmed up batch size 2",
    ]
    batches = [
        [CaptionItem(picture(1), "<CAPTION>", OPTIONS)],
        [CaptionItem(picture(2), "<GENERATE_TAGS>", OPTIONS), CaptionItem(picture(3), "<ANALYZE>", OPTIONS)],
        [
            CaptionItem(
                picture(4), "<MORE_DETAILED_CAPTION>", GenerationOptions(max_new_tokens=8, num_beams=1)
            )
        ],
    ]
    for batch in batches:
        assert [c.text for c in compiled.caption(batch)] == [c.text for c in plain.caption(batch)]
    compiled.unload()
    plain.unload()
