"""Request fields → generation options, built on the one place defaults are made.

Cross-family batching depends on it: the engine batches only equal options, so a request that
overrides nothing must get exactly ``Settings.generation_defaults()`` whatever the family.
"""

from __future__ import annotations

import dataclasses

import pytest

from vision_server.api.generation import generation_options
from vision_server.captioner import GenerationOptions
from vision_server.settings import Settings

SERVER_SETUPS = [
    Settings(),
    Settings(num_beams=1, max_new_tokens=40),
    Settings(max_new_tokens=8, min_new_tokens=20),  # the floor is capped by the limit
]


@pytest.mark.parametrize("settings", SERVER_SETUPS)
def test_a_request_that_overrides_nothing_gets_the_server_defaults(settings: Settings) -> None:
    assert generation_options(settings) == settings.generation_defaults()
    # greedy spelled out in a request is still the default
    assert generation_options(settings, temperature=0.0, do_sample=False) == settings.generation_defaults()


def test_overrides_change_only_what_they_name() -> None:
    settings = Settings(num_beams=3, max_new_tokens=100, min_new_tokens=30)
    assert generation_options(settings, max_new_tokens=500) == settings.generation_defaults()  # capped
    assert generation_options(settings, max_new_tokens=10) == GenerationOptions(
        max_new_tokens=10, num_beams=3, min_new_tokens=10
    )
    sampled = generation_options(settings, temperature=0.7, top_p=0.9)
    assert sampled == GenerationOptions(
        max_new_tokens=100, num_beams=1, temperature=0.7, top_p=0.9, min_new_tokens=30
    )
    assert generation_options(settings, temperature=0.7, do_sample=False) == settings.generation_defaults()
    scored = generation_options(settings, with_confidence=True)
    assert scored.with_confidence and scored.batch_key == settings.generation_defaults()


def test_a_caption_token_limit_leaves_room_for_the_forced_tokens_within_the_cap() -> None:
    """OpenAI's max_tokens counts the caption: generate gets those plus what the model forces
    (Florence-2's start and end tokens), never past the server's --max-new-tokens."""
    settings = Settings(num_beams=3, max_new_tokens=100)
    asked = generation_options(settings, max_new_tokens=1, caption_tokens=True)
    assert asked.for_generate(2) == dataclasses.replace(settings.generation_defaults(), max_new_tokens=3)
    assert asked.for_generate(0).max_new_tokens == 1  # a model that forces nothing
    assert (
        generation_options(settings, max_new_tokens=99, caption_tokens=True).for_generate(2).max_new_tokens
        == 100
    )
    # at or past the cap it is the server's default, which batches with everyone's
    assert (
        generation_options(settings, max_new_tokens=100, caption_tokens=True)
        == settings.generation_defaults()
    )
