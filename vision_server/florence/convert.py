"""Turn an original-layout Florence-2 checkpoint (PromptGen v2.0, microsoft/*) into the native layout.

The original checkpoints need remote code that no longer runs on transformers 5, and the native
classes cannot read them. Everything here works from the files alone: weight renames (see
`layout`), one transposed projection, a tokenizer with ``<image>`` added, embeddings padded to a
multiple of 64, and a processor that carries the post-processing rules.

This module holds layout detection and the checkpoint conversion itself (weights, config,
generation config). The tokenizer and processor come from `convert_processor`, PEFT adapters are
renamed by `adapters`, and `conversion_cache.ensure_native` keeps one converted copy per source in a
cache directory so later loads are plain ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    BartConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from vision_server.errors import ConversionError, ModelSourceError
from vision_server.florence.convert_processor import convert_tokenizer, native_processor
from vision_server.florence.layout import (
    DROPPED_ORIGINAL_KEY,
    TRANSPOSED_ORIGINAL_KEY,
    VOCAB_MULTIPLE,
    native_key,
)

Layout = Literal["native", "original"]

logger = logging.getLogger(__name__)

SHARED_KEY = "language_model.model.shared.weight"
LM_HEAD_KEY = "language_model.lm_head.weight"
TIED_COPY_KEYS = (
    "language_model.model.encoder.embed_tokens.weight",
    "language_model.model.decoder.embed_tokens.weight",
)
NATIVE_SHARED_KEY = "model.language_model.shared.weight"
NATIVE_LM_HEAD_KEY = "lm_head.weight"
BART_FIELDS = (
    "activation_dropout", "activation_function", "attention_dropout", "d_model", "decoder_attention_heads",
    "decoder_ffn_dim", "decoder_layerdrop", "decoder_layers", "dropout", "encoder_attention_heads",
    "encoder_ffn_dim", "encoder_layerdrop", "encoder_layers", "init_std", "max_position_embeddings",
    "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
    "forced_eos_token_id", "tie_word_embeddings",
)  # fmt: skip
GENERATION_DEFAULTS: dict[str, Any] = {
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2,
    "forced_bos_token_id": 0, "forced_eos_token_id": 2, "num_beams": 3, "no_repeat_ngram_size": 3,
    "early_stopping": True,
}  # fmt: skip
FEATURE_SOURCE = ["spatial_avg_pool", "temporal_avg_pool"]
# Adapter files sit beside model weights in some repositories; `load_weights` skips them.
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class _Counter:
    """How many conversions this process has run; tests use it to prove a cache hit did no work.

    It lives here, beside the converters that count, so they need not import the cache module;
    read it through `conversion_cache.conversions_performed`.
    """

    def __init__(self) -> None:
        self.value = 0


CONVERSIONS = _Counter()


# ---------------------------------------------------------------------------------------------------
# Layout detection


def detect_layout(model_dir: Path) -> Layout:
    """Say whether ``model_dir`` holds a native or an original-layout Florence-2 checkpoint."""
    return _layout_of(read_config(Path(model_dir)), Path(model_dir))


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict, with an error that says what is wrong with the directory."""
    if not model_dir.is_dir():
        raise ModelSourceError(f"model directory {model_dir} does not exist (or is not a directory)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelSourceError(
            f"{model_dir} has no config.json, so it is not a model directory; "
            "point to the folder that holds config.json and the weights"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"cannot read {path}: {error}; download the model again") from error
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object; download the model again")
    return data


def _layout_of(config: dict[str, Any], model_dir: Path) -> Layout:
    """Original sub-configs are florence2_language + davit; native ones bart + florence_vision."""
    if config.get("model_type") != "florence2":
        raise ModelSourceError(
            f"{model_dir} is not a Florence-2 model (config.json model_type is "
            f"{config.get('model_type')!r}, expected 'florence2')"
        )
    text_type = _sub_type(config, "text_config")
    vision_type = _sub_type(config, "vision_config")
    if text_type == "florence2_language" or vision_type == "davit":
        return "original"
    if vision_type == "florence_vision" and text_type in (None, "bart"):
        return "native"
    raise ModelSourceError(
        f"{model_dir}: unknown Florence-2 layout (text_config model_type {text_type!r}, vision_config "
        f"model_type {vision_type!r}); expected the original (florence2_language/davit) or the native "
        "(bart/florence_vision) layout"
    )


def _sub_type(config: dict[str, Any], name: str) -> str | None:
    section = config.get(name)
    return section.get("model_type") if isinstance(section, dict) else None


# ---------------------------------------------------------------------------------------------------
# Conversion


def convert_checkpoint(src: Path, dst: Path) -> Path:
    """Write a native copy of the original-layout checkpoint ``src`` into ``dst`` (new or empty)."""
    src, dst = Path(src), Path(dst)
    started = time.perf_counter()
    config = read_config(src)
    if _layout_of(config, src) != "original":
        raise ConversionError(f"{src} is already in the native layout; load it directly, nothing to convert")
    _check_vision_config(config, src)
    with writing_into(dst):
        try:
            _convert_into(src, dst, config)
        except OSError as error:
            raise ConversionError(
                f"converting {src} into {dst} failed ({error}); check permissions and free disk space"
            ) from error
    logger.info("converted %s -> %s in %.1f s", src, dst, time.perf_counter() - started)
    return dst


def _convert_into(src: Path, dst: Path, config: dict[str, Any]) -> None:
    """The conversion steps; ``dst`` exists and is empty."""
    text_config = config.get("text_config") or {}
    tokenizer = convert_tokenizer(src, max_length=text_config.get("max_position_embeddings", 1024))
    state, dtype = _convert_weights(src, tokenizer, tie=text_config.get("tie_word_embeddings", True))
    native_config = _native_config(config, state, tokenizer, dtype)
    _check_against_model(native_config, state, src)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    native_config.save_pretrained(dst)
    _generation_config(src, text_config).save_pretrained(dst)
    native_processor(src, tokenizer).save_pretrained(dst)
    for path in dst.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; a shared cache must stay readable


@contextmanager
def writing_into(dst: Path) -> Iterator[None]:
    """Write a conversion into ``dst`` (new or empty): all of it, or on any failure nothing.

    Both converters go through here so that the no-half-written-output rule and the count of
    conversions run (`CONVERSIONS`) cannot drift apart.
    """
    created = prepare_destination(dst)
    try:
        yield
    except BaseException:
        discard(dst, created)
        raise
    CONVERSIONS.value += 1


def prepare_destination(dst: Path) -> bool:
    """Create ``dst`` (True) or accept an existing empty one (False); never write over files."""
    if dst.exists():
        if not dst.is_dir() or any(dst.iterdir()):
            raise ConversionError(f"destination {dst} exists and is not an empty directory; choose a new one")
        return False
    dst.mkdir(parents=True)
    return True


def discard(dst: Path, created: bool) -> None:
    """Leave no half-written output: remove what we created, or empty what was given to us empty."""
    if created:
        shutil.rmtree(dst, ignore_errors=True)
        return
    for path in dst.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _check_vision_config(config: dict[str, Any], src: Path) -> None:
    """Only the pooling that every published Florence-2 uses is implemented natively."""
    vision = config.get("vision_config") or {}
    source = vision.get("image_feature_source", FEATURE_SOURCE)
    if list(source) != FEATURE_SOURCE:
        raise ConversionError(
            f"{src}: image_feature_source {source!r} is not supported; the native Florence-2 only "
            f"implements {FEATURE_SOURCE}"
        )


# ---------------------------------------------------------------------------------------------------
# Weights


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: ``*.safetensors`` if present, else ``pytorch_model*.bin``."""
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.name not in ADAPTER_WEIGHT_FILES)
    files = files or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(
            f"{model_dir} has no weights (model.safetensors or pytorch_model.bin); "
            "download the complete model repository"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_weight_file(path))
    return state


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file; a truncated or corrupt file becomes a ConversionError that names it."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zip and pickle each raise their own types
        raise ConversionError(
            f"cannot read weights file {path} ({type(error).__name__}: {error}); "
            "the file is probably incomplete or corrupt, download it again"
        ) from error
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConversionError(f"{path} does not hold a plain state dict of tensors; download it again")
    return loaded


def _convert_weights(
    src: Path, tokenizer: PreTrainedTokenizerBase, *, tie: bool
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Rename, transpose and pad the original weights; returns the native state dict and its dtype."""
    state = load_weights(src)
    if SHARED_KEY not in state:
        raise ConversionError(f"{src}: the weights have no {SHARED_KEY}; this is not a complete Florence-2")
    shared = state[SHARED_KEY]
    _check_dropped(state, src, shared, tie=tie)
    native = rename_weights(state, src)
    vocab = _padded_vocab_size(shared.shape[0], len(tokenizer))
    native[NATIVE_SHARED_KEY] = pad_rows(shared, vocab)
    if NATIVE_LM_HEAD_KEY in native:
        native[NATIVE_LM_HEAD_KEY] = pad_rows(native[NATIVE_LM_HEAD_KEY], vocab)
    return native, shared.dtype


def _check_dropped(state: dict[str, torch.Tensor], src: Path, shared: torch.Tensor, *, tie: bool) -> None:
    """Drop the zero logits bias (refusing a non-zero one) and the copies of tied embeddings."""
    bias = state.pop(DROPPED_ORIGINAL_KEY, None)
    if bias is not None and bool(bias.any()):
        raise ConversionError(
            f"{src}: {DROPPED_ORIGINAL_KEY} is not zero; the native model has no such bias, so this "
            "checkpoint cannot be converted without changing its output"
        )
    copies = list(TIED_COPY_KEYS) + ([LM_HEAD_KEY] if tie else [])
    for key in copies:
        copy = state.pop(key, None)
        if copy is not None and not torch.equal(copy, shared):
            # Tied weights are a single tensor in the original model; keep the shared embedding.
            logger.warning(
                "%s: %s differs from %s; using %s as the original code does", src, key, SHARED_KEY, SHARED_KEY
            )


def rename_weights(state: dict[str, torch.Tensor], src: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Apply the key table to every key (after ``prefix``); any key without a rule is an error."""
    native: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        name = native_key(key[len(prefix) :]) if key.startswith(prefix) else None
        if name is None:
            unmapped.append(key)
        elif key[len(prefix) :] == TRANSPOSED_ORIGINAL_KEY:
            native[prefix + name] = tensor.t().contiguous()
        else:
            native[prefix + name] = tensor
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:5])
        raise ConversionError(
            f"{src}: {len(unmapped)} weight(s) have no rule in the original->native key table ({shown}); "
            "this is not a Florence-2 checkpoint the converter knows"
        )
    return native


def _padded_vocab_size(rows: int, tokens: int) -> int:
    """Room for every token (``<image>`` included), rounded up to a multiple of 64 as the official files."""
    if tokens - 1 > rows:
        raise ConversionError(
            f"the tokenizer has {tokens - 1} tokens but the embeddings only {rows} rows; "
            "the tokenizer files do not belong to these weights"
        )
    return -(-max(rows, tokens) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows holding the mean embedding: deterministic, and their logit is never the maximum."""
    missing = rows - weight.shape[0]
    if missing <= 0:
        return weight
    mean = weight.float().mean(dim=0).to(weight.dtype)
    return torch.cat([weight, mean.expand(missing, -1)])


def _check_against_model(config: Florence2Config, state: dict[str, torch.Tensor], src: Path) -> None:
    """Compare names and shapes with a weightless native model, so a bad conversion fails here."""
    with torch.device("meta"):
        expected = Florence2ForConditionalGeneration(config).state_dict()
    tied = {f"model.language_model.{part}.embed_tokens.weight" for part in ("encoder", "decoder")}
    if config.tie_word_embeddings:
        tied.add(NATIVE_LM_HEAD_KEY)
    missing = sorted(set(expected) - set(state) - tied)
    wrong = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    extra = sorted(set(state) - set(expected))
    if missing or wrong or extra:
        raise ConversionError(
            f"{src}: the converted weights do not fit the native model (missing: {missing[:3]}, "
            f"wrong shape: {wrong[:3]}, unexpected: {extra[:3]}); the config and weights do not match"
        )


# ---------------------------------------------------------------------------------------------------
# Config and generation config


def _native_config(
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
) -> Florence2Config:
    """Florence2Config from the original text (BART) and DaViT sections."""
    text = config.get("text_config") or {}
    fields = {name: text[name] for name in BART_FIELDS if name in text}
    fields["vocab_size"] = state[NATIVE_SHARED_KEY].shape[0]
    return Florence2Config(
        text_config=BartConfig(**fields).to_dict(),
        vision_config=_native_vision_config(config.get("vision_config") or {}),
        image_token_id=tokenizer.image_token_id,
        tie_word_embeddings=fields.get("tie_word_embeddings", True),
        dtype=str(dtype).removeprefix("torch."),
    )


def _native_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    """DaViT fields under their native names; absent ones keep the native defaults."""
    renamed = {"dim_embed": "embed_dim"}
    same = ("depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm", "num_heads",
            "num_groups", "window_size", "drop_path_rate", "projection_dim")  # fmt: skip
    native = {name: vision[name] for name in same if name in vision}
    native |= {new: vision[old] for old, new in renamed.items() if old in vision}
    temporal = vision.get("visual_temporal_embedding") or {}
    if "max_temporal_embeddings" in temporal:
        native["max_temporal_embeddings"] = temporal["max_temporal_embeddings"]
    position = vision.get("image_pos_embed") or {}
    if "max_pos_embeddings" in position:
        native["max_position_embeddings"] = position["max_pos_embeddings"]
    return native


def _generation_config(src: Path, text: dict[str, Any]) -> GenerationConfig:
    """Florence-2 decoding defaults, overridden by the original text config, then generation_config.json."""
    values = dict(GENERATION_DEFAULTS)
    values |= {key: text[key] for key in GENERATION_DEFAULTS if key in text}
    path = src / "generation_config.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(f"cannot read {path}: {error}; download it again") from error
        values |= {key: saved[key] for key in GENERATION_DEFAULTS if key in saved}
    return GenerationConfig(**values)
