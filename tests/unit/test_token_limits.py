"""Each model family's limit on generated tokens, read from its config before any load, and the
request check built on it (a 400 past the model's limit, the server's own cap first)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import (
    BlipConfig,
    GitConfig,
    GPT2Config,
    Idefics3Config,
    TrOCRConfig,
    VisionEncoderDecoderConfig,
    ViTConfig,
)

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import generation_options
from vision_server.captioner import GenerationOptions, token_limit
from vision_server.engine.lifecycle import ModelCard
from vision_server.florence.captioner import FlorenceCaptioner, decoder_positions
from vision_server.generic.captioner import GenericCaptioner
from vision_server.generic.families import FAMILIES
from vision_server.generic.family import caption_room
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

LLAMA = {"model_type": "llama"}


def encoder_decoder(decoder: Any) -> dict[str, Any]:
    return VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder).to_dict()


@pytest.mark.parametrize(
    ("family", "config", "positions"),
    [
        # as transformers writes each config (the key names and nesting it really uses)
        ("blip", BlipConfig(text_config={"max_position_embeddings": 77}).to_dict(), 77),
        ("git", GitConfig(max_position_embeddings=77).to_dict(), 77),
        ("vision-encoder-decoder", encoder_decoder(GPT2Config(n_positions=77)), 77),
        ("vision-encoder-decoder", encoder_decoder(TrOCRConfig(max_position_embeddings=77)), 77),
        ("idefics3", Idefics3Config(text_config={**LLAMA, "max_position_embeddings": 77}).to_dict(), 77),
        # a config that leaves the value out: the library's default where it has one
        ("blip", {"text_config": {}}, 512),
        ("git", {}, 1024),
        ("vision-encoder-decoder", {"decoder": {"model_type": "gpt2"}}, 1024),
        ("vision-encoder-decoder", {"decoder": {"model_type": "something-else"}}, None),
        ("idefics3", {"text_config": {"model_type": "llama"}}, None),
    ],
)  # fmt: skip
def test_each_family_reads_its_text_decoders_positions(
    family: str, config: dict[str, Any], positions: int | None
) -> None:
    assert FAMILIES[family].text_positions(config) == positions


def test_a_caption_gets_the_positions_the_given_tokens_leave_and_one_more() -> None:
    # Measured on the tiny BLIP (512 positions): 512 new tokens after its start token, 509 after
    # [DEC] + a three-token prompt; one more is an IndexError in the position table.
    assert caption_room(512, 1) == 512
    assert caption_room(512, 4) == 509
    assert caption_room(8, 9) == 0


def test_florence_reads_its_decoder_positions() -> None:
    assert decoder_positions({"max_position_embeddings": 4096}) == 4096
    assert decoder_positions({}) == 1024  # BART's default, which every Florence-2 uses


def test_options_capped_to_a_limit() -> None:
    options = GenerationOptions(max_new_tokens=1024, min_new_tokens=900)
    assert options.capped(2000) is options
    assert options.capped(512) == GenerationOptions(max_new_tokens=512, min_new_tokens=512)


def card(limit: int | None) -> ModelCard:
    return ModelCard(
        "m", ("<CAPTION>",), None, None, name="blip", source="Salesforce/blip", max_new_tokens=limit
    )


def test_a_request_past_the_models_limit_is_a_400_naming_both() -> None:
    settings = Settings(max_new_tokens=1024)
    with pytest.raises(InvalidParameter) as caught:
        generation_options(settings, max_new_tokens=513, model=card(512), length_name="max_tokens")
    assert caught.value.param == "max_tokens"
    message = caught.value.message
    assert "'max_tokens' asks for 513" in message
    assert "'blip' (Salesforce/blip) generates at most 512" in message
    assert generation_options(settings, max_new_tokens=512, model=card(512)).max_new_tokens == 512


def test_the_servers_cap_comes_first_and_its_default_is_never_refused() -> None:
    # A client asking for more than --max-new-tokens gets the cap, as always, when the model reaches it.
    capped = generation_options(Settings(max_new_tokens=1024), max_new_tokens=4096, model=card(1024))
    assert capped.max_new_tokens == 1024
    # Nothing asked: the server's default, even past the model's limit (the captioner stops there).
    assert generation_options(Settings(max_new_tokens=1024), model=card(512)).max_new_tokens == 1024
    # A model whose limit is not known yet: no check here.
    assert generation_options(Settings(), max_new_tokens=1000, model=card(None)).max_new_tokens == 1000


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_captioners_know_their_limit_from_config_json_before_loading(tmp_path: Path) -> None:
    text = {"max_position_embeddings": 40}
    blip = write_config(tmp_path / "blip", {"model_type": "blip", "text_config": text})
    captioner = GenericCaptioner(str(blip), backend="blip", cache_dir=tmp_path / "cache")
    assert token_limit(captioner) == 40
    unknown = GenericCaptioner(str(blip), backend=None, cache_dir=tmp_path / "cache")
    assert token_limit(unknown) is None  # no family picked yet

    florence = write_config(tmp_path / "florence", {"text_config": {"max_position_embeddings": 256}})
    assert token_limit(FlorenceCaptioner(str(florence), cache_dir=tmp_path / "cache")) == 256
    assert token_limit(FakeCaptioner()) is None
