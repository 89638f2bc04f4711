"""Tiny random models of the generic families (BLIP, GIT, ViT+GPT-2, Idefics3), built from configs.

Like the tiny Florence-2 (:mod:`vision_server.testing.tiny_model`), each is written with a working
tokenizer and processor beside its weights, so it loads with ``from_pretrained`` and captions
without a download. Weights are random from a fixed seed: captions are meaningless tokens, but
they are deterministic and change with the image and the prompt. Every model looks at 32x32
images and has one layer of width 32 (well under a megabyte).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AddedToken,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPImageProcessorPil,
    GenerationConfig,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    GPT2Config,
    GPT2Tokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedTokenizerBase,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

from vision_server.testing._model_dir import new_model_dir, quiet_progress_bars
from vision_server.testing._tokenizer import CAPTION_WORDS, train_bpe

SIDE = 32  # input images are SIDE x SIDE
PATCH = 8
WIDTH = 32  # hidden size of every tower
# Wide random weights (the libraries' default is 0.02): outputs then depend visibly on the image
# and the prompt, instead of every input giving the same few tokens.
INIT = 1.0
TOWER: dict[str, Any] = {
    "hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "initializer_range": INIT,
}  # fmt: skip
VISION: dict[str, Any] = {**TOWER, "image_size": SIDE, "patch_size": PATCH}
HALF = [0.5, 0.5, 0.5]
BPE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
IDEFICS_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)  # fmt: skip
# SmolVLM's template, shortened: "<|im_start|>User:<image>TEXT<end_of_utterance>\nAssistant:".
IDEFICS_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
FAMILIES = ("blip", "git", "vision-encoder-decoder", "idefics3")


def build_generic_model(
    out_dir: str | Path, family: str, *, seed: int = 0, text_positions: int | None = None
) -> Path:
    """Write a tiny ``family`` model (weights, config, tokenizer, processor) and return its path.

    ``text_positions`` gives BLIP's text decoder that many positions instead of its default 512
    (tests of the generation limit, which then runs out in a few dozen tokens).
    """
    if text_positions is not None and family != "blip":
        raise ValueError("text_positions is for the blip family only")
    builders: dict[str, Callable[[Path], None]] = {
        "blip": lambda out: _blip(out, text_positions),
        "git": _git,
        "vision-encoder-decoder": _vision_encoder_decoder,
        "idefics3": _idefics3,
    }
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    with new_model_dir(out_dir) as out:
        torch.manual_seed(seed)
        with quiet_progress_bars():
            builders[family](out)
        _drop_load_flags(out)
    return out


# --- tokenizers ---------------------------------------------------------------------------------


def wordpiece_tokenizer(**specials: Any) -> BertTokenizer:
    """A BERT WordPiece tokenizer over ASCII characters and the caption words (BLIP, GIT)."""
    characters = [chr(code) for code in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *specials.values()]
    vocab += characters + ["##" + c for c in characters] + sorted(set(CAPTION_WORDS))
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, **specials)
    return tokenizer


def bpe_tokenizer(specials: tuple[str, ...], **roles: str) -> GPT2Tokenizer:
    """A byte-level BPE tokenizer (the tiny Florence-2's merges) with ``specials`` added."""
    vocab, merges = train_bpe()
    plain = [token for token in vocab if token not in BPE_SPECIALS]
    # transformers annotates merges as strings; the tokenizers BPE it builds takes these (a, b) pairs.
    tokenizer = GPT2Tokenizer(vocab={t: i for i, t in enumerate(plain)}, merges=merges, **roles)  # type: ignore[arg-type]
    tokenizer.add_tokens(
        [AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True
    )
    return tokenizer


# --- families -----------------------------------------------------------------------------------


def _blip(out: Path, text_positions: int | None = None) -> None:
    tokenizer = wordpiece_tokenizer(bos_token="[DEC]")
    ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    text = {**TOWER, "vocab_size": len(tokenizer), "encoder_hidden_size": WIDTH, **ids}
    if text_positions is not None:
        text["max_position_embeddings"] = text_positions
    text |= {"sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id}
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=VISION, projection_dim=WIDTH)
    )
    model.save_pretrained(out)
    square = {"height": SIDE, "width": SIDE}
    BlipProcessor(BlipImageProcessorPil(size=square), tokenizer).save_pretrained(out)


def _git(out: Path) -> None:
    tokenizer = wordpiece_tokenizer()
    ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    config = GitConfig(
        vision_config=VISION, vocab_size=len(tokenizer), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, **TOWER, **ids,
    )  # fmt: skip
    model = GitForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, **ids)
    model.save_pretrained(out)
    images = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    GitProcessor(images, tokenizer).save_pretrained(out)


def _vision_encoder_decoder(out: Path) -> None:
    tokenizer = bpe_tokenizer(("<|endoftext|>",), bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    end = tokenizer.eos_token_id
    encoder = ViTConfig(**VISION)
    decoder = GPT2Config(
        vocab_size=len(tokenizer), n_embd=WIDTH, n_layer=1, n_head=2, n_positions=128, initializer_range=INIT,
        bos_token_id=end, eos_token_id=end, add_cross_attention=True,
    )  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=end, bos_token_id=end, eos_token_id=end, pad_token_id=end
    )
    model.save_pretrained(out)
    ViTImageProcessorPil(
        size={"height": SIDE, "width": SIDE}, image_mean=HALF, image_std=HALF
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _idefics3(out: Path) -> None:
    tokenizer = bpe_tokenizer(
        IDEFICS_SPECIALS, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )  # fmt: skip
    roles: dict[str, Any] = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    roles |= {"pad_token_id": tokenizer.pad_token_id}
    text = {**TOWER, "model_type": "llama", "vocab_size": len(tokenizer), "num_key_value_heads": 1, **roles}
    scale = 2  # pixel shuffle: (32 / 8)^2 patches / 2^2 = 4 image tokens
    config = Idefics3Config(
        text_config=text, vision_config=VISION, scale_factor=scale,
        image_token_id=_token_id(tokenizer, "<image>"),
    )  # fmt: skip
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**roles)
    model.save_pretrained(out)
    edge = {"longest_edge": SIDE}
    images = Idefics3ImageProcessorPil(
        size=edge, max_image_size=edge, do_image_splitting=False, image_mean=HALF, image_std=HALF
    )
    tokens = (SIDE // PATCH) ** 2 // scale**2
    Idefics3Processor(
        images, tokenizer, image_seq_len=tokens, chat_template=IDEFICS_CHAT_TEMPLATE
    ).save_pretrained(out)


def _drop_load_flags(directory: Path) -> None:
    """Drop the machine-specific entries ``save_pretrained`` leaves in tokenizer_config.json."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.chmod(path, 0o644)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"{token} is not one token")
    return found
