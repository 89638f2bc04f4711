"""Florence-2 on transformers' native classes: load, caption a padded batch, unload completely.

This module knows nothing of asyncio or HTTP; the engine calls it from its one model thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from PIL import Image

from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.devices import generate_or_out_of_memory, pick_device, pick_dtype, release_memory
from vision_server.errors import ModelSourceError
from vision_server.florence import footprint
from vision_server.florence.compiled import CompilePlan
from vision_server.florence.inputs import pixel_values, prompt_ids
from vision_server.florence.pixels import pixel_spec, spec_before_load
from vision_server.florence.prompts import tasks_for_model
from vision_server.florence.shared_base import BaseKey, SharedBase, SharedBases
from vision_server.florence.source import resolve_model_dir
from vision_server.florence.streaming import RowStreamer, streams, wants_stream
from vision_server.florence.tiers import DeviceMover
from vision_server.images import PixelSpec, fit_image
from vision_server.model_specs import adapter_identity
from vision_server.torch_captioner import TorchCaptioner, forced_tokens, generate_kwargs
from vision_server.weights import module_bytes

if TYPE_CHECKING:
    from vision_server.model_specs import ModelSpec
    from vision_server.settings import Settings

log = logging.getLogger(__name__)

# from_settings returns the class it is called on (a test's subclass too); typing.Self is 3.11+.
_Self = TypeVar("_Self", bound="FlorenceCaptioner")

_STRIP_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class _Share:
    """A captioner's hold on a shared base: the base, and its adapter there (None: the base alone)."""

    base: SharedBase
    adapter_dir: Path | None
    adapter: str | None


@dataclass
class _Loaded:
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    pixels: PixelSpec
    plan: CompilePlan | None = None
    shared: _Share | None = None


class FlorenceCaptioner(TorchCaptioner[_Loaded]):
    """A Florence-2 model (PromptGen v2.0 by default) behind the :class:`Captioner` contract.

    ``bases`` is the server's pool of shared base models: captioners of one base that differ
    only by adapter load it once (see :mod:`vision_server.florence.shared_base`). None, or a
    compiled model, keeps a private copy with any adapter merged into it.
    """

    def __init__(
        self,
        model: str,
        *,
        cache_dir: Path,
        revision: str | None = None,
        adapter: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        default_options: GenerationOptions | None = None,
        max_batch_size: int | None = None,
        compile: bool = False,
        compile_on_cpu: bool = False,
        mover: DeviceMover | None = None,
        compile_buckets: tuple[int, ...] | None = None,
        bases: SharedBases | None = None,
    ) -> None:
        super().__init__(
            model, cache_dir=cache_dir, revision=revision, device=device, dtype=dtype, mover=mover
        )
        self.adapter = adapter
        self.default_options = default_options or GenerationOptions()
        self.max_batch_size = max_batch_size or self.preferred_batch_size
        self.compile = compile
        self.compile_on_cpu = compile_on_cpu  # tests only: exercise the compiled path without a GPU
        # Benchmarks only: compile just these batch sizes (each costs 10-25 s) instead of 1, 2, 4 ... max.
        self.compile_buckets = compile_buckets
        # Read from disk on first use, replaced by the loaded processor's own answer, kept across unloads.
        self._pixel_spec: PixelSpec | None = None
        self._key = self._base_key()
        self._bases = self._join(bases)
        self._adapter_size: int | None = None  # measured bytes of the adapter on a shared base
        self._positions: int | None = None  # the text decoder's, once known
        self._positions_read = False
        self._told_limit = False

    @classmethod
    def from_settings(
        cls: type[_Self],
        settings: Settings,
        spec: ModelSpec | None = None,
        *,
        bases: SharedBases | None = None,
    ) -> _Self:
        """The captioner for ``spec`` (default: the settings' default model)."""
        spec = spec if spec is not None else settings.default_model_spec
        return cls(
            spec.source,
            cache_dir=settings.cache_dir,
            revision=spec.revision,
            adapter=spec.adapter,
            device=settings.device,
            dtype=settings.dtype,
            default_options=settings.generation_defaults(),
            max_batch_size=settings.max_batch_size,
            compile=settings.compile,
            bases=bases,
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        return tasks_for_model(self._spec)

    @property
    def takes_prompt(self) -> bool:
        return False  # its prompts are task tokens; free text only picks one

    @property
    def max_new_tokens_limit(self) -> int | None:
        """The most tokens a caption can have: the text decoder's positions (it starts from one
        token; the prompt goes to the encoder). From ``config.json`` before any load (None for a
        test model or a hub id not downloaded yet), from the loaded model after."""
        if not self._positions_read:
            from vision_server.generic.config_files import model_config

            config = model_config(self._spec, revision=self.revision, fetch=False)
            if config is not None:
                self._positions = decoder_positions(config.get("text_config") or {})
                self._positions_read = True
        return self._positions

    @property
    def pixel_spec(self) -> PixelSpec:
        spec = self._pixel_spec
        if spec is None:
            spec = spec_before_load(self._spec, revision=self.revision, cache_dir=self.cache_dir)
            self._pixel_spec = spec
        return spec

    # --- sharing a base, and memory (vision_server.captioner.MemoryAware) -------------------------

    def _base_key(self) -> BaseKey | None:
        """Which weights this model's base is, where; None when the load is bound to fail."""
        if self._placement is None:
            return None
        device, dtype = self._placement
        source = footprint.source_label(self._spec)
        return BaseKey(source, self.revision, str(device), str(dtype).removeprefix("torch."))

    def _join(self, bases: SharedBases | None) -> SharedBases | None:
        if bases is None or self._key is None:
            return None
        if self.compile:
            log.info(
                "%s is compiled (--compile), so it keeps its own copy of the base model: "
                "compiled models do not share one",
                self._spec,
            )
            return None
        bases.register(self._key, self)
        return bases

    def _shares(self) -> bool:
        """Through the pool: always for the plain base; for an adapter when another captioner has
        the same base (a lone adapter merges, which costs nothing per token)."""
        if self._bases is None or self._key is None:
            return False
        return self.adapter is None or self._bases.sharers(self._key) >= 2

    @property
    def shares_base(self) -> bool:
        """Whether this model's base weights are (to be) loaded once for every captioner of them."""
        return self._shares()

    def memory_parts(self) -> dict[str, int]:
        """The base under a key every sharer uses, the adapter apart; a private copy (merged
        adapter included) under a key of its own. Estimated from the files until measured."""
        key = self._key
        if key is None:
            return {}
        if not self._shares():
            return self._private_parts(f"+{self._adapter_path}" if self.adapter else "")
        base = self._bases.size(key) if self._bases is not None else None
        base = base if base is not None else self._estimated_size
        if base is None:
            return {}
        if self.adapter is None:
            return {key.label: base}
        adapter = self._adapter_size if self._adapter_size is not None else self._estimated_adapter
        return (
            {} if adapter is None else {key.label: base, f"adapter:{self._adapter_path}+{key.label}": adapter}
        )

    @cached_property
    def _estimated_size(self) -> int | None:
        """The base's bytes (a merged adapter adds none)."""
        if self._placement is None:
            return None
        dtype = self._placement[1]
        return footprint.florence_bytes(
            self._spec, revision=self.revision, cache_dir=self.cache_dir, dtype=dtype
        )

    @cached_property
    def _estimated_adapter(self) -> int | None:
        return footprint.adapter_bytes(Path(self._adapter_path))

    @cached_property
    def _adapter_path(self) -> str:
        return adapter_identity(self.adapter) if self.adapter else ""

    # --- load / unload -------------------------------------------------------------------------

    def _load(self) -> _Loaded:
        from transformers.utils import logging as hf_logging

        device = pick_device(self.device)
        dtype = pick_dtype(self.dtype, device)
        if device.type == "cuda":
            # cuDNN attention builds a plan per new shape: ~10 s on the first call of each batch size.
            torch.backends.cuda.enable_cudnn_sdp(False)
        hf_logging.disable_progress_bar()  # a tqdm bar per load would clutter the server log
        loaded = self._load_shared(device, dtype) if self._shares() else self._load_own(device, dtype)
        if self._pixel_spec is not None and self._pixel_spec != loaded.pixels:
            log.warning(
                "the model wants %dx%d images, not the %dx%d assumed before loading; "
                "queued ones are resized again",
                loaded.pixels.width,
                loaded.pixels.height,
                self._pixel_spec.width,
                self._pixel_spec.height,
            )
        self._pixel_spec = loaded.pixels
        self._positions = decoder_positions(loaded.model.config.text_config.to_dict())
        self._positions_read = True
        self._tell_limit()
        if self.compile:
            self._compile(loaded)
        return loaded

    def _tell_limit(self) -> None:
        """Say once that the default --max-new-tokens is more than this model can generate."""
        limit, asked = self._positions, self.default_options.max_new_tokens
        if self._told_limit or limit is None or asked <= limit:
            return
        self._told_limit = True
        log.info(
            "%s generates at most %d tokens (its text decoder's positions): its captions stop "
            "there, not at --max-new-tokens %d",
            self._spec,
            limit,
            asked,
        )

    def _within_positions(self, options: GenerationOptions) -> GenerationOptions:
        """``options`` stopping where the text decoder's positions end (one token more and its
        position table has no row for it: an IndexError in transformers)."""
        return options if self._positions is None else options.capped(self._positions)

    def _read_base(self, dtype: torch.dtype) -> tuple[Any, Any]:
        """The base model (on the CPU) and its processor, converted first if need be."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from vision_server.florence.conversion_cache import ensure_native

        source = resolve_model_dir(self._spec, revision=self.revision, cache_dir=self.cache_dir)
        native = ensure_native(source, self.cache_dir / "converted")
        started = time.perf_counter()
        processor = AutoProcessor.from_pretrained(native)
        model = AutoModelForImageTextToText.from_pretrained(native, dtype=dtype, attn_implementation="sdpa")
        log.debug("weights loaded from %s in %.2f s", native, time.perf_counter() - started)
        return model, processor

    def _load_own(self, device: torch.device, dtype: torch.dtype) -> _Loaded:
        model, processor = self._read_base(dtype)
        model = self._apply_adapter(model).to(device).eval()
        self._own_size = module_bytes(model)
        return _Loaded(model, processor, device, dtype, pixel_spec(processor))

    def _load_shared(self, device: torch.device, dtype: torch.dtype) -> _Loaded:
        """The pool's base (loaded now if no sharer holds it), this model's adapter attached."""
        bases, key = self._bases, self._key
        assert bases is not None and key is not None

        def load_base() -> SharedBase:
            model, processor = self._read_base(dtype)
            model = model.to(device).eval()
            bases.remember_size(key, module_bytes(model))
            return SharedBase(model, processor, device)

        base = bases.acquire(key, self, load_base)
        try:
            base.to_device(self.mover)  # a sharer's warm tier may have parked it in host memory
            adapter_dir = self._native_adapter_dir() if self.adapter else None
            name = base.attach(adapter_dir, self) if adapter_dir is not None else None
            if name is not None:
                self._adapter_size = base.adapter_bytes(name)
        except BaseException:
            if bases.release(key, self):  # nobody else holds it: give its memory back now
                release_memory()
            raise
        share = _Share(base, adapter_dir, name)
        return _Loaded(base.model, base.processor, device, dtype, pixel_spec(base.processor), shared=share)

    def _compile(self, loaded: _Loaded) -> None:
        """Static cache + torch.compile for the default options, every bucket warmed up now."""
        if loaded.device.type != "cuda" and not self.compile_on_cpu:
            log.warning("--compile needs a CUDA device; running uncompiled on %s", loaded.device)
            return
        plan = CompilePlan.create(
            self._within_positions(self.default_options),
            self.max_batch_size,
            loaded.processor.num_image_tokens,
            self.compile_buckets,
        )
        if self.compile_on_cpu:
            from transformers.generation.configuration_utils import CompileConfig

            config = CompileConfig()
            config._compile_all_devices = True  # type: ignore[assignment]  # a private switch typed as None
            loaded.model.generation_config.compile_config = config
        loaded.plan = plan
        grey = Image.new("RGB", (loaded.pixels.width, loaded.pixels.height), (128, 128, 128))
        blank = fit_image(grey, loaded.pixels)
        for bucket in plan.buckets:
            started = time.perf_counter()
            self._caption_group(loaded, [CaptionItem(blank, self.tasks[0], self.default_options)] * bucket)
            log.info("compiled and warmed up batch size %d in %.1f s", bucket, time.perf_counter() - started)

    def _apply_adapter(self, model: Any) -> Any:
        """Merge a PEFT LoRA adapter into the weights (no per-token adapter cost afterwards)."""
        if not self.adapter:
            return model
        from peft import PeftModel

        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            return PeftModel.from_pretrained(model, self._native_adapter_dir()).merge_and_unload()

    def _native_adapter_dir(self) -> Path:
        """The adapter's directory with native key names (converted once into the cache)."""
        from vision_server.florence.conversion_cache import ensure_native_adapter

        adapter_dir = Path(str(self.adapter)).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelSourceError(
                f"Adapter directory {adapter_dir} has no adapter_config.json (not a PEFT adapter)."
            )
        return ensure_native_adapter(adapter_dir, self.cache_dir / "converted-adapters")

    def _module(self, held: _Loaded) -> Any:
        return held.model

    def _release(self, held: _Loaded) -> None:
        """On a shared base: this model's adapter and its hold on the base go."""
        share = held.shared
        if share is not None and self._bases is not None and self._key is not None:
            if share.adapter_dir is not None:
                share.base.detach(share.adapter_dir, self)
            self._bases.release(self._key, self)

    # --- the warm tier (vision_server.captioner.Offloadable) -------------------------------------

    def _may_park(self, held: _Loaded) -> bool:
        """Uncompiled (a compiled model's graphs are tied to where its weights live), and not while
        another loaded model captions with the same shared base."""
        return held.plan is None and (held.shared is None or held.shared.base.users == {self})

    def _park(self, held: _Loaded) -> bool:
        if held.shared is None:
            return super()._park(held)
        if held.shared.base.users != {self}:
            log.info("not offloading %s: another loaded model uses its base", self._spec)
            return False
        held.shared.base.to_host(self.mover)
        return True

    def _unpark(self, held: _Loaded) -> None:
        if held.shared is None:
            super()._unpark(held)
        else:  # a sharer's load may have brought it back already
            held.shared.base.to_device(self.mover)

    # --- captioning ----------------------------------------------------------------------------

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        """Caption a batch; items are grouped by generation options, results keep their order."""
        loaded = self._ready()
        results: list[Caption | None] = [None] * len(batch)
        with _adapter_chosen(loaded):
            for indices in _group_by_options(batch).values():
                captions = self._caption_group(loaded, [batch[i] for i in indices])
                for index, caption in zip(indices, captions, strict=True):
                    results[index] = caption
        return [caption for caption in results if caption is not None]

    def _caption_group(self, loaded: _Loaded, items: list[CaptionItem]) -> list[Caption]:
        """One generate call for items with equal options (padded to a bucket when compiled)."""
        options = self._within_positions(items[0].options.batch_key.for_generate(forced_tokens(loaded.model)))
        plan = loaded.plan if loaded.plan is not None and loaded.plan.accepts(options, len(items)) else None
        padded = plan.pad(items) if plan else items
        scored = any(item.options.with_confidence for item in items)

        def generate() -> tuple[dict[str, Any], torch.Tensor, list[float] | None]:
            with torch.inference_mode():
                inputs = self._prepare(loaded, padded, plan.prompt_length if plan else None)
                static = {"cache_implementation": "static"} if plan else {}
                streamer = self._streamer(loaded, items, options)
                sequences = loaded.model.generate(
                    **inputs,
                    **generate_kwargs(options),
                    **static,
                    **({"streamer": streamer} if streamer else {}),
                )
                scores = self._confidences(loaded, inputs, sequences) if scored else None
            return inputs, sequences, scores

        inputs, sequences, scores = generate_or_out_of_memory(generate, len(items))
        captions = self._decode(loaded, padded, inputs, sequences, options, scores)[: len(items)]
        return [
            caption if item.options.with_confidence else dataclasses.replace(caption, confidence=None)
            for caption, item in zip(captions, items, strict=True)
        ]

    @staticmethod
    def _streamer(
        loaded: _Loaded, items: list[CaptionItem], options: GenerationOptions
    ) -> RowStreamer | None:
        """A streamer for the items that want one (padding rows, past ``items``, get none)."""
        if not wants_stream(loaded.processor, items, options):
            return None
        sinks = [item.stream if streams(loaded.processor, item) else None for item in items]
        return RowStreamer(loaded.processor.tokenizer, sinks)

    def _prepare(
        self, loaded: _Loaded, items: list[CaptionItem], length: int | None = None
    ) -> dict[str, Any]:
        """Model inputs: the items' uint8 pixels normalised as one tensor, prompts tokenised and padded."""
        inputs = dict(prompt_ids(loaded.processor, [item.task for item in items], length))
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        batch = np.stack([_at_size(item, loaded.pixels) for item in items])
        inputs["pixel_values"] = pixel_values(batch, loaded.pixels, loaded.device).to(loaded.dtype)
        return inputs

    def _confidences(self, loaded: _Loaded, inputs: dict[str, Any], sequences: torch.Tensor) -> list[float]:
        """Geometric mean of the chosen tokens' probabilities, by one teacher-forced forward pass."""
        out = loaded.model(**inputs, decoder_input_ids=sequences[:, :-1])
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        chosen = logprobs.gather(-1, sequences[:, 1:, None]).squeeze(-1)
        mask = sequences[:, 1:] != loaded.processor.tokenizer.pad_token_id
        means = (chosen * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return [float(v) for v in means.exp().cpu()]

    def _decode(
        self,
        loaded: _Loaded,
        items: list[CaptionItem],
        inputs: dict[str, Any],
        sequences: torch.Tensor,
        options: GenerationOptions,
        scores: list[float] | None,
    ) -> list[Caption]:
        tokenizer = loaded.processor.tokenizer
        texts = loaded.processor.batch_decode(sequences, skip_special_tokens=False)
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        captions = []
        special = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
        for row, item in enumerate(items):
            generated = [t for t in sequences[row, 1:].tolist() if t != tokenizer.pad_token_id]
            # Florence forces EOS at the last allowed step, so a full budget means "cut off".
            length_hit = len(generated) >= options.max_new_tokens
            captions.append(
                Caption(
                    text=self._post_process(loaded, texts[row], item),
                    prompt_tokens=int(prompt_lengths[row]),
                    completion_tokens=sum(1 for t in generated if t not in special),
                    finish_reason="length" if length_hit else "stop",
                    confidence=scores[row] if scores else None,
                )
            )
        return captions

    @staticmethod
    def _post_process(loaded: _Loaded, text: str, item: CaptionItem) -> str:
        text = text.replace("<pad>", "")
        size = item.image.original_size  # boxes and points are reported in the uploaded image's pixels
        parsed = loaded.processor.post_process_generation(text, task=item.task, image_size=size)
        value = parsed.get(item.task, text) if isinstance(parsed, dict) else parsed
        if not isinstance(value, str):
            value = str(value)
        for token in _STRIP_TOKENS:
            value = value.replace(token, "")
        return value.strip()


@contextlib.contextmanager
def _adapter_chosen(loaded: _Loaded) -> Iterator[None]:
    """On a shared base: this model's adapter active (or none) for the whole batch."""
    if loaded.shared is None:
        yield
        return
    with loaded.shared.base.using(loaded.shared.adapter):
        yield


def _at_size(item: CaptionItem, spec: PixelSpec) -> np.ndarray:
    """The item's pixels, resized again if it was prepared for another input size (logged)."""
    pixels = item.image.pixels
    if pixels.shape[:2] == (spec.height, spec.width):
        return pixels
    height, width = pixels.shape[:2]
    log.info("resizing a queued %dx%d image to the model's %dx%d", width, height, spec.width, spec.height)
    return fit_image(Image.fromarray(pixels), spec).pixels


def decoder_positions(text_config: dict[str, Any]) -> int:
    """Positions of Florence-2's text decoder (BART-like: 1024 unless its config says otherwise)."""
    value = text_config.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1024


def _group_by_options(batch: list[CaptionItem]) -> dict[GenerationOptions, list[int]]:
    groups: dict[GenerationOptions, list[int]] = {}
    for index, item in enumerate(batch):
        groups.setdefault(item.options.batch_key, []).append(index)
    return groups
