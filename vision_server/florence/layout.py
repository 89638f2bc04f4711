"""What differs between the original (remote-code) and the native Florence-2 layouts.

Shared by the converter and by the test-model builder, which writes the original layout by running
these rules backwards, so the two can never drift apart.
"""

from __future__ import annotations

import re

IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64
PEFT_PREFIX = "base_model.model."

# The 1024 task and location tokens that Florence-2 appends to the BART vocabulary, in id order.
# "desciption" is misspelled in the real vocabulary too.
FLORENCE_TOKENS: tuple[str, ...] = (
    "<od>", "</od>", "<ocr>", "</ocr>",
    *(f"<loc_{i}>" for i in range(1000)),
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
    "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
    "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
)  # fmt: skip

_LOC_PATTERN = r"(.+?)" + r"<loc_(\d+)>" * 8


def post_processor_config() -> dict[str, dict[str, object]]:
    """Parse rules for every parse type; without an entry per type `post_process_generation` raises."""
    ocr: dict[str, object] = {"pattern": _LOC_PATTERN, "area_threshold": 0.0}
    # transformers 5 reads the upper-case spelling, the official converter writes the lower-case one.
    ocr |= {"PATTERN": _LOC_PATTERN, "AREA_THRESHOLD": 0.0}
    banned = ["it", "is", "are", "what", "who", "this", "that", "these", "those", "there", "the image"]
    empty = ("pure_text", "description_with_bboxes", "description_with_polygons", "polygons", "bboxes",
             "description_with_bboxes_or_polygons")  # fmt: skip
    rules: dict[str, dict[str, object]] = {
        "ocr": ocr,
        "phrase_grounding": {"banned_grounding_tokens": banned},
    }
    return rules | {k: {} for k in empty}


# Original key -> native key. The first matching rule wins; a key no rule matches is an error.
_VT = r"vision_tower\.blocks\.(\d+)\.(\d+)\."
_NT = "model.vision_tower.blocks.{0}.{1}."
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"vision_tower\.convs\.(\d+)\.proj\.", "model.vision_tower.convs.{0}.conv."),
    (r"vision_tower\.convs\.(\d+)\.norm\.", "model.vision_tower.convs.{0}.norm."),
    (_VT + r"(spatial|channel)_block\.conv([12])\.fn\.dw\.", _NT + "{2}_block.conv{3}."),
    (_VT + r"spatial_block\.window_attn\.norm\.", _NT + "spatial_block.norm1."),
    (_VT + r"spatial_block\.window_attn\.fn\.", _NT + "spatial_block.window_attn."),
    (_VT + r"channel_block\.channel_attn\.norm\.", _NT + "channel_block.norm1."),
    (_VT + r"channel_block\.channel_attn\.fn\.", _NT + "channel_block.channel_attn."),
    (_VT + r"(spatial|channel)_block\.ffn\.norm\.", _NT + "{2}_block.norm2."),
    (_VT + r"(spatial|channel)_block\.ffn\.fn\.net\.", _NT + "{2}_block.ffn."),
    (r"image_projection$", "model.multi_modal_projector.image_projection.weight"),
    (r"image_proj_norm\.", "model.multi_modal_projector.image_proj_norm."),
    (r"image_pos_embed\.", "model.multi_modal_projector.image_position_embed."),
    (r"visual_temporal_embed\.", "model.multi_modal_projector.visual_temporal_embed."),
    (r"language_model\.model\.", "model.language_model."),
    (r"language_model\.lm_head\.weight$", "lm_head.weight"),
)
_COMPILED = tuple((re.compile(src), dst) for src, dst in KEY_RULES)

# The original weight is an [in, out] parameter; the native one is a Linear weight [out, in].
TRANSPOSED_ORIGINAL_KEY = "image_projection"
DROPPED_ORIGINAL_KEY = "language_model.final_logits_bias"


def native_key(original: str) -> str | None:
    """The native name of an original key, or None when no rule covers it."""
    return _apply(_COMPILED, original)


def _apply(rules: tuple[tuple[re.Pattern[str], str], ...], key: str) -> str | None:
    """Rewrite the matched prefix of ``key`` with the first rule that matches it."""
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(*match.groups()) + key[match.end() :]
    return None


# Native key -> original key, for the test builder. `tests/system/test_convert.py` checks that every key of a
# model survives the round trip through both tables.
_NV = r"model\.vision_tower\.blocks\.(\d+)\.(\d+)\."
_OV = "vision_tower.blocks.{0}.{1}."
INVERSE_RULES: tuple[tuple[str, str], ...] = (
    (r"model\.vision_tower\.convs\.(\d+)\.conv\.", "vision_tower.convs.{0}.proj."),
    (r"model\.vision_tower\.convs\.(\d+)\.norm\.", "vision_tower.convs.{0}.norm."),
    (_NV + r"(spatial|channel)_block\.conv([12])\.", _OV + "{2}_block.conv{3}.fn.dw."),
    (_NV + r"spatial_block\.norm1\.", _OV + "spatial_block.window_attn.norm."),
    (_NV + r"spatial_block\.window_attn\.", _OV + "spatial_block.window_attn.fn."),
    (_NV + r"channel_block\.norm1\.", _OV + "channel_block.channel_attn.norm."),
    (_NV + r"channel_block\.channel_attn\.", _OV + "channel_block.channel_attn.fn."),
    (_NV + r"(spatial|channel)_block\.norm2\.", _OV + "{2}_block.ffn.norm."),
    (_NV + r"(spatial|channel)_block\.ffn\.", _OV + "{2}_block.ffn.fn.net."),
    (r"model\.multi_modal_projector\.image_projection\.weight$", "image_projection"),
    (r"model\.multi_modal_projector\.image_proj_norm\.", "image_proj_norm."),
    (r"model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed."),
    (r"model\.multi_modal_projector\.visual_temporal_embed\.", "visual_temporal_embed."),
    (r"model\.language_model\.", "language_model.model."),
    (r"lm_head\.weight$", "language_model.lm_head.weight"),
)
_INVERSE_COMPILED = tuple((re.compile(src), dst) for src, dst in INVERSE_RULES)


def original_key(native: str) -> str | None:
    """The original name of a native key (the inverse of `native_key`), or None."""
    return _apply(_INVERSE_COMPILED, native)
