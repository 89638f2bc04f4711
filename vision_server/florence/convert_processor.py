"""The processing side of a converted checkpoint: tokenizer, image processor, and the processor around them.

Split from `convert` because the tokenizer work (Florence tokens marked special, ``<image>`` added)
and the image-processor settings depend only on the original's tokenizer and preprocessor files,
not on its weights or model config.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, cast

from transformers import (
    AddedToken,
    BartTokenizer,
    CLIPImageProcessorPil,
    Florence2Processor,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_torchvision_available

from vision_server.errors import ConversionError
from vision_server.florence.layout import FLORENCE_TOKENS, IMAGE_TOKEN, post_processor_config

IMAGE_PROCESSOR_FIELDS = (
    "size", "crop_size", "do_center_crop", "do_resize", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_seq_length",
)  # fmt: skip


def native_processor(src: Path, tokenizer: PreTrainedTokenizerBase) -> Florence2Processor:
    """The native processor: ``src``'s image processor, the converted tokenizer, the post-processing rules."""
    return Florence2Processor(
        image_processor=_image_processor(src),
        tokenizer=tokenizer,
        post_processor_config=post_processor_config(),
    )


def convert_tokenizer(src: Path, *, max_length: int = 1024) -> PreTrainedTokenizerBase:
    """The original BART tokenizer with the 1024 Florence tokens special and ``<image>`` named."""
    tokenizer = _load_original_tokenizer(src)
    _mark_florence_tokens(tokenizer, src)
    _mark_listed_specials(tokenizer, src)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([_special(IMAGE_TOKEN)], special_tokens=True)
    # The model-specific `image_token` attribute is only set up through from_pretrained.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return BartTokenizer.from_pretrained(tmp, image_token=IMAGE_TOKEN, model_max_length=max_length)


def _load_original_tokenizer(src: Path) -> PreTrainedTokenizerBase:
    bpe_files = all((src / name).is_file() for name in ("vocab.json", "merges.txt"))
    if not (src / "tokenizer.json").is_file() and not bpe_files:
        raise ConversionError(
            f"{src} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); copy them from "
            "the original model repository"
        )
    try:
        return BartTokenizer.from_pretrained(src)
    except Exception as error:  # tokenizers raises plain Exceptions for malformed files
        raise ConversionError(
            f"cannot load the tokenizer in {src} ({error}); download its files again"
        ) from error


def _mark_florence_tokens(tokenizer: PreTrainedTokenizerBase, src: Path) -> None:
    """Add the Florence tokens (microsoft files lack them) or mark them special (PromptGen files)."""
    vocab = tokenizer.get_vocab()
    present = sum(token in vocab for token in FLORENCE_TOKENS)
    if present not in (0, len(FLORENCE_TOKENS)):
        raise ConversionError(f"{src}: the tokenizer holds only {present} of the 1024 Florence-2 tokens")
    tokenizer.add_tokens([_special(token) for token in FLORENCE_TOKENS], special_tokens=True)
    ids = cast(list[int], tokenizer.convert_tokens_to_ids(list(FLORENCE_TOKENS)))  # a list in, a list out
    # In the real vocabulary <od> is 50265 and <loc_0> 50269; in any vocabulary they must be consecutive.
    if ids != list(range(ids[0], ids[0] + len(FLORENCE_TOKENS))):
        raise ConversionError(f"{src}: the Florence-2 tokens do not have consecutive ids starting at <od>")


def _mark_listed_specials(tokenizer: PreTrainedTokenizerBase, src: Path) -> None:
    """Tokens that the 4.x (``additional_special_tokens``) or 5.x (``extra_special_tokens``) files list."""
    listed: list[str] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json_or_empty(src / name)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = data.get(key)
            listed += [_token_text(item) for item in value] if isinstance(value, list) else []
    vocab = tokenizer.get_vocab()
    known = [token for token in dict.fromkeys(listed) if token and token in vocab]
    if known:
        tokenizer.add_tokens([_special(token) for token in known], special_tokens=True)


def _token_text(item: object) -> str:
    """A listed special token is a string or a serialised AddedToken dict."""
    if isinstance(item, dict):
        return str(item.get("content", ""))
    return item if isinstance(item, str) else ""


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _special(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False)


def _image_processor(src: Path) -> Any:
    """The CLIP processor from preprocessor_config.json (768 px, bicubic, no crop for every Florence-2)."""
    saved = _read_json_or_empty(src / "preprocessor_config.json")
    fields: dict[str, Any] = {key: saved[key] for key in IMAGE_PROCESSOR_FIELDS if key in saved}
    fields.setdefault("size", {"height": 768, "width": 768})
    fields.setdefault("do_center_crop", False)
    size = fields["size"]
    edge = (size.get("height") or size.get("shortest_edge")) if isinstance(size, dict) else size
    height = int(edge or 768)
    fields.setdefault("image_seq_length", (height // 32) ** 2 + 1)
    if not is_torchvision_available():  # the torchvision-backed class would warn and fall back anyway
        return CLIPImageProcessorPil(**fields)
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**fields)
