"""The generic captioner on the tiny random models, in-process: the Captioner contract itself.

Answers against transformers are checked through the APIs (tests/http/test_generic_backends.py);
here: choosing the backend, token counts and finish reasons, out-of-memory, unload, load errors.
"""

from __future__ import annotations

import gc
import http.server
import json
import threading
import weakref
from pathlib import Path

import pytest
import torch

from tests.support.generic_reference import reference_caption
from tests.support.images import noise
from tests.support.processes import free_port
from tests.system.test_warm_tier import FakeMover
from vision_server.captioner import CaptionItem, GenerationOptions, Offloadable
from vision_server.errors import ModelLoadError, OutOfMemory
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.generic.captioner import GenericCaptioner
from vision_server.images import PixelSpec, PreparedImage, fit_image
from vision_server.runtime import build_captioner, build_models
from vision_server.settings import Settings, load_settings
from vision_server.testing.tiny_generic import FAMILIES, SIDE

GREEDY = GenerationOptions(max_new_tokens=5, num_beams=1)
TINY_SPEC = PixelSpec(height=SIDE, width=SIDE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def prepared(seed: int) -> PreparedImage:
    """A picture at the tiny models' input size, as the decode pool would hand it over."""
    return fit_image(noise(seed, (SIDE, SIDE)), TINY_SPEC)


def captioner(directory: Path, tmp_path: Path, **settings: object) -> GenericCaptioner:
    built = build_captioner(Settings(model=str(directory), cache_dir=tmp_path, **settings))  # type: ignore[arg-type]
    assert isinstance(built, GenericCaptioner)
    return built


def test_auto_backend_reads_the_config_and_keeps_florence_for_florence(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for family, directory in generic_model_dirs.items():
        built = captioner(directory, tmp_path)
        assert built.backend == family and built.tasks == ("<CAPTION>",)
        assert (built.pixel_spec.width, built.pixel_spec.height) == (SIDE, SIDE)  # known before loading
        assert built.takes_prompt == (family != "vision-encoder-decoder")
    assert isinstance(build_captioner(Settings(model=("test:tiny",), cache_dir=tmp_path)), FlorenceCaptioner)


def test_each_model_is_built_with_its_own_revision_and_backend(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    flags = {
        "model": (f"g={generic_model_dirs['git']}", f"b={generic_model_dirs['blip']}", "t=test:tiny"),
        "backend": ("git", "b:blip", "t:florence2"),
        "revision": ("pinned", "t:refs/pr/1"),
        "cache_dir": tmp_path,
    }
    built = {model.name: model.captioner for model in build_models(load_settings(flags, environ={}))}
    g, b, t = built["g"], built["b"], built["t"]
    assert isinstance(g, GenericCaptioner) and (g.backend, g.revision) == ("git", "pinned")
    assert isinstance(b, GenericCaptioner) and (b.backend, b.revision) == ("blip", "pinned")
    assert isinstance(t, FlorenceCaptioner) and t.revision == "refs/pr/1"


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_mixed_prompts_and_unload(
    family: str, generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = captioner(generic_model_dirs[family], tmp_path)
    model.load()
    items = [
        CaptionItem(prepared(1), "<CAPTION>", GREEDY),
        CaptionItem(prepared(2), "<CAPTION>", GREEDY, prompt="a red cat"),
        CaptionItem(prepared(1), "<CAPTION>", GREEDY),
    ]
    first = model.caption(items)
    assert first[0] == first[2]  # same image, same prompt: same answer
    for caption in first:
        assert caption.finish_reason == ("length" if caption.completion_tokens == 5 else "stop")
        assert caption.confidence is None  # not asked for
    alone = model.caption([items[1]])[0]
    assert alone == first[1]  # a prompt in a mixed batch gets what it gets alone
    if family in ("blip", "git"):  # the start token, then the prompt's tokens
        assert first[0].prompt_tokens == 1 and first[1].prompt_tokens > 1
        assert first[1].text.startswith("a red cat")
    if family == "vision-encoder-decoder":
        assert first[1] == model.caption([CaptionItem(prepared(2), "<CAPTION>", GREEDY)])[0]  # prompt ignored
    model_ref = weakref.ref(model._loaded.loaded.model)  # type: ignore[union-attr]
    model.unload()
    gc.collect()
    assert model_ref() is None and not model.is_loaded
    if family == "blip":  # loading again (once is enough: it is the same code for every family)
        model.load()
        assert model.caption(items) == first


@pytest.mark.parametrize("family", ["git", "idefics3"])
def test_one_generate_call_for_different_images_gives_each_the_direct_answer(
    family: str, generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A batch of three images in one call (beam search, as served by default) answers what
    transformers answers for each image alone."""
    directory = generic_model_dirs[family]
    model = captioner(directory, tmp_path)
    model.load()
    beams = GenerationOptions(max_new_tokens=5, num_beams=2)
    got = [
        caption.text
        for caption in model.caption([CaptionItem(prepared(s), "<CAPTION>", beams) for s in (4, 5, 6)])
    ]
    pictures = [noise(s, (SIDE, SIDE)) for s in (4, 5, 6)]
    expected = [
        reference_caption(directory, family, image, max_new_tokens=5, num_beams=2) for image in pictures
    ]
    assert got == expected and len(set(expected)) > 1  # the images tell apart


def test_a_row_that_meets_its_end_token_stops_there(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Make a token of a known answer the end token: the caption stops right before it."""
    model = captioner(generic_model_dirs["idefics3"], tmp_path)
    model.load()
    ready = model._loaded
    assert ready is not None
    item = CaptionItem(prepared(3), "<CAPTION>", GREEDY)
    family, loaded = ready.family, ready.loaded
    inputs = model._inputs(ready, [noise(3, (SIDE, SIDE))], None)
    full = loaded.model.generate(**inputs, max_new_tokens=5, do_sample=False)[
        0, family.prompt_length(inputs) :
    ]
    tokens = full.tolist()
    cut = next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])  # its first new token
    loaded.model.generation_config.eos_token_id = tokens[cut]
    ready.stops = family.stop_ids(loaded)
    caption = model.caption([item])[0]
    assert caption.finish_reason == "stop" and caption.completion_tokens == cut
    assert caption.text == loaded.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


def test_cuda_out_of_memory_on_a_batch_is_the_servers_503(
    generic_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = captioner(generic_model_dirs["blip"], tmp_path)
    model.load()
    assert model._loaded is not None

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model._loaded.loaded.model, "generate", out_of_memory)
    with pytest.raises(OutOfMemory, match="batch of 2") as caught:
        model.caption([CaptionItem(prepared(1), "<CAPTION>", GREEDY)] * 2)
    assert caught.value.status == 503


def test_a_forced_backend_that_does_not_fit_the_files_is_a_load_error(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = captioner(generic_model_dirs["git"], tmp_path, backend="blip")
    with pytest.raises(ModelLoadError, match=r"'git' model .* --backend blip runs BLIP .*--backend git"):
        model.load()
    assert not model.is_loaded


def test_warm_tier_parks_the_weights_and_wakes_with_the_same_captions(
    generic_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The engine's warm tier works for generic models too (a fake mover stands in for CUDA)."""
    mover = FakeMover()
    model = GenericCaptioner(str(generic_model_dirs["blip"]), backend="blip", cache_dir=tmp_path, mover=mover)
    assert isinstance(model, Offloadable) and not model.can_offload  # nothing loaded yet
    model.load()
    item = CaptionItem(prepared(4), "<CAPTION>", GREEDY)
    before = model.caption([item])
    assert model.can_offload
    model.offload()
    with pytest.raises(RuntimeError, match="offloaded"):
        model.caption([item])
    model.restore()
    assert model.caption([item]) == before and mover.moves == ["host", "device cpu"]
    model.unload()
    assert not model.is_loaded and not model.can_offload


def test_auto_backend_of_a_hub_id_asks_the_hub_for_config_json_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id that is not cached: its config.json comes from the hub (a local stand-in here) in
    one request; an unreachable hub means Florence-2, as before, without retries."""
    from huggingface_hub import constants

    from vision_server.generic.families import FLORENCE, detect_backend

    asked: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = json.dumps({"model_type": "git", "architectures": ["GitForCausalLM"]}).encode()
            self.send_response(200 if self.path.startswith("/someone/") else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{hub.server_address[1]}")
        try:
            assert detect_backend("someone/captioner", revision=None) == "git"
            assert detect_backend("nobody/captioner", revision=None) == FLORENCE  # 404: as before
        finally:
            hub.shutdown()
    configs = [path for path in asked if path.endswith("/config.json")]
    assert configs == [
        "/someone/captioner/resolve/main/config.json",
        "/nobody/captioner/resolve/main/config.json",
    ]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    assert detect_backend("someone/captioner", revision=None) == FLORENCE
