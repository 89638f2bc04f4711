"""Picking a generic family from config.json, its input size, and how free text becomes a prompt."""

from __future__ import annotations

import pytest

from vision_server.api.task_words import read_prompt
from vision_server.errors import BadRequest, InvalidTask
from vision_server.generic.families import FAMILIES, FLORENCE, backend_of, supported
from vision_server.settings import Settings, SettingsError
from vision_server.tasks import CAPTION_TASK, PROMPTGEN_TASKS

ONE_TASK = (CAPTION_TASK,)
VED = "vision-encoder-decoder"


@pytest.mark.parametrize(
    ("config", "backend"),
    [
        ({"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}, "blip"),
        ({"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}, None),  # another head
        ({"model_type": "git", "architectures": ["GitForCausalLM"]}, "git"),
        ({"model_type": "git"}, "git"),  # no architectures listed: the model type decides
        ({"model_type": VED, "architectures": ["VisionEncoderDecoderModel"]}, VED),
        ({"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"]}, "idefics3"),
        ({"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"]}, FLORENCE),
        ({"model_type": "florence2"}, FLORENCE),
        ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, None),
        ({}, None),
    ],
)  # fmt: skip
def test_backend_is_read_from_architectures_then_model_type(config: dict, backend: str | None) -> None:
    assert backend_of(config) == backend


def test_the_supported_list_names_every_model_class() -> None:
    text = supported()
    for name in ("Florence2", "BlipForConditionalGeneration", "GitForCausalLM", "VisionEncoderDecoderModel"):
        assert name in text
    assert "Idefics3ForConditionalGeneration" in text


def test_input_size_comes_from_each_image_processor_layout() -> None:
    blip = FAMILIES["blip"].pixel_spec(
        {
            "size": {"height": 384, "width": 384},
            "image_mean": [0.1, 0.2, 0.3],
            "image_std": [1, 2, 3],
            "resample": 3,
        }
    )
    assert (blip.height, blip.width, blip.mean, blip.std) == (384, 384, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    clip = FAMILIES["git"].pixel_spec(  # resize the short side to 224, then crop 224x224
        {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
    )
    assert (clip.height, clip.width) == (224, 224)
    smol = FAMILIES["idefics3"].pixel_spec(
        {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}
    )
    assert (smol.height, smol.width) == (512, 512)  # one tile at the encoder's size
    assert FAMILIES["blip"].default_spec().height == 384  # nothing on disk yet


def test_free_text_goes_to_a_model_that_reads_it() -> None:
    assert read_prompt("What is in this image?", ONE_TASK, "<MORE_DETAILED_CAPTION>", free_text=True) == (
        CAPTION_TASK,
        "What is in this image?",
    )
    assert read_prompt("  caption ", ONE_TASK, CAPTION_TASK, free_text=True) == (CAPTION_TASK, None)
    assert read_prompt("<caption>", ONE_TASK, CAPTION_TASK, free_text=True) == (CAPTION_TASK, None)
    assert read_prompt(None, ONE_TASK, CAPTION_TASK, free_text=True) == (CAPTION_TASK, None)
    assert read_prompt("   ", ONE_TASK, CAPTION_TASK, free_text=True) == (CAPTION_TASK, None)
    with pytest.raises(InvalidTask, match="<CAPTION>"):
        read_prompt("<OD>", ONE_TASK, CAPTION_TASK, free_text=True)
    with pytest.raises(BadRequest, match="limit"):
        read_prompt("x" * 9000, ONE_TASK, CAPTION_TASK, free_text=True)


def test_without_free_text_a_prompt_only_picks_a_task_as_before() -> None:
    assert read_prompt("tags please", PROMPTGEN_TASKS, "<CAPTION>", free_text=False) == (
        "<GENERATE_TAGS>",
        None,
    )
    assert read_prompt("a red cat", ONE_TASK, "<MORE_DETAILED_CAPTION>", free_text=False) == (
        CAPTION_TASK,
        None,
    )


def test_backend_setting_is_checked() -> None:
    assert Settings(backend="git").backend == "git"
    with pytest.raises(SettingsError, match="idefics3"):
        Settings(backend="llava")
