"""Any supported transformers image-to-text model behind the :class:`Captioner` contract.

Images arrive prepared to the model's input size (:class:`~vision_server.images.PixelSpec` read
from its image processor config); they go through the model's own processor as PIL images made
from those pixels, so normalisation and prompt building are exactly the library's. That costs a
uint8 → PIL → float copy per image on the model thread (about 1 ms for a 384x384 image on a CPU;
resizing an image that is already the right size is a copy). Items with the same generation
options and prompt share one ``generate`` call.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from PIL import Image

from vision_server.captioner import Caption, CaptionItem, GenerationOptions
from vision_server.devices import generate_or_out_of_memory, pick_device, pick_dtype
from vision_server.errors import BadRequest, ModelLoadError
from vision_server.florence.footprint import model_dir_on_disk
from vision_server.florence.source import resolve_model_dir
from vision_server.florence.streaming import RowStreamer
from vision_server.florence.tiers import DeviceMover
from vision_server.generic.config_files import image_processor_config, model_config
from vision_server.generic.families import FAMILIES, FLORENCE, backend_of, describe, supported
from vision_server.generic.family import Family, Loaded, caption_room
from vision_server.images import PixelSpec
from vision_server.tasks import CAPTION_TASK
from vision_server.torch_captioner import TorchCaptioner, forced_tokens, generate_kwargs
from vision_server.weights import estimate_bytes, module_bytes, weight_files

if TYPE_CHECKING:
    from vision_server.model_specs import ModelSpec
    from vision_server.settings import Settings

log = logging.getLogger(__name__)

# from_settings returns the class it is called on (a test's subclass too); typing.Self is 3.11+.
_Self = TypeVar("_Self", bound="GenericCaptioner")


@dataclasses.dataclass
class _Ready:
    family: Family
    loaded: Loaded
    device: torch.device
    dtype: torch.dtype
    stops: set[int]
    positions: int | None  # the text decoder's, shared by the prompt and the caption


class GenericCaptioner(TorchCaptioner[_Ready]):
    """BLIP, GIT, vision-encoder-decoder or Idefics3 models: one ``<CAPTION>`` task, plus free
    text for the families that take a prompt.

    ``backend`` None means "read it from the config once the files are here" (a hub id that was
    not on disk at start); an architecture no family runs fails the load with the list of
    supported ones.
    """

    def __init__(
        self,
        model: str,
        *,
        backend: str | None,
        cache_dir: Path,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int | None = None,
        mover: DeviceMover | None = None,
        default_max_new_tokens: int | None = None,
    ) -> None:
        if backend is not None and backend not in FAMILIES:
            raise ValueError(f"unknown generic backend {backend!r}; choose one of {', '.join(FAMILIES)}")
        super().__init__(
            model, cache_dir=cache_dir, revision=revision, device=device, dtype=dtype, mover=mover
        )
        self.backend = backend
        self.max_batch_size = max_batch_size or self.preferred_batch_size
        self._pixel_spec: PixelSpec | None = None
        # The server's --max-new-tokens, only to say once when this model cannot reach it.
        self.default_max_new_tokens = default_max_new_tokens
        self._positions: int | None = None
        self._positions_read = False
        self._told_limit = False

    @classmethod
    def from_settings(
        cls: type[_Self], settings: Settings, backend: str | None, spec: ModelSpec | None = None
    ) -> _Self:
        """The captioner for ``spec`` (default: the settings' default model); it takes no adapter."""
        spec = spec if spec is not None else settings.default_model_spec
        return cls(
            spec.source,
            backend=backend,
            cache_dir=settings.cache_dir,
            revision=spec.revision,
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            default_max_new_tokens=settings.max_new_tokens,
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        return (CAPTION_TASK,)

    @property
    def family(self) -> str:
        """The backend's name (``model_type`` in multipart replies); ``unknown`` until one fits."""
        return self.backend or "unknown"

    @property
    def takes_prompt(self) -> bool:
        family = FAMILIES.get(self.backend or "")
        return family.takes_prompt if family is not None else False

    @property
    def pixel_spec(self) -> PixelSpec:
        spec = self._pixel_spec
        if spec is None:
            family = FAMILIES.get(self.backend or "")
            config = image_processor_config(self._spec, revision=self.revision)
            if family is None:
                return PixelSpec(height=224, width=224, mean=(0.5,) * 3, std=(0.5,) * 3)
            spec = family.pixel_spec(config) if config is not None else family.default_spec()
            self._pixel_spec = spec
        return spec

    @property
    def max_new_tokens_limit(self) -> int | None:
        """The most tokens a caption can have: the text decoder's positions, less the given tokens
        (its start token; a prompt takes more). From ``config.json`` before any load; None while
        neither the family nor the file is known."""
        if not self._positions_read:
            family = FAMILIES.get(self.backend or "")
            config = model_config(self._spec, revision=self.revision, fetch=False) if family else None
            if family is not None and config is not None:
                self._positions = family.text_positions(config)
                self._positions_read = True
        return None if self._positions is None else caption_room(self._positions, 1)

    @cached_property
    def _estimated_size(self) -> int | None:
        """From the weight files already on disk; None for a hub id that is not downloaded yet."""
        directory = model_dir_on_disk(self._spec, revision=self.revision, cache_dir=self.cache_dir)
        if directory is None or self._placement is None:
            return None
        return estimate_bytes(weight_files(directory), self._placement[1])

    # --- load ----------------------------------------------------------------------------------

    def _load(self) -> _Ready:
        from transformers.utils import logging as hf_logging

        device = pick_device(self.device)
        dtype = pick_dtype(self.dtype, device)
        directory = resolve_model_dir(self._spec, revision=self.revision, cache_dir=self.cache_dir)
        family = self._family(directory)
        hf_logging.disable_progress_bar()
        started = time.perf_counter()
        loaded = family.load(directory, dtype)
        loaded.model = loaded.model.to(device).eval()
        self._own_size = module_bytes(loaded.model)
        log.debug(
            "%s weights loaded from %s in %.2f s", family.name, directory, time.perf_counter() - started
        )
        config = image_processor_config(directory, revision=None)
        spec = family.pixel_spec(config) if config is not None else family.default_spec()
        if self._pixel_spec is not None and spec != self._pixel_spec:
            log.warning(
                "the model wants %dx%d images; queued ones are resized again", spec.width, spec.height
            )
        self._pixel_spec = spec
        positions = family.text_positions(loaded.model.config.to_dict())
        self._positions, self._positions_read = positions, True
        self._tell_limit(family)
        return _Ready(family, loaded, device, dtype, family.stop_ids(loaded), positions)

    def _tell_limit(self, family: Family) -> None:
        """Say once that the server-wide --max-new-tokens is more than this model can generate."""
        limit, asked = self.max_new_tokens_limit, self.default_max_new_tokens
        if self._told_limit or limit is None or asked is None or asked <= limit:
            return
        self._told_limit = True
        log.info(
            "%s (%s) generates at most %d tokens (its text decoder's positions, prompt included): "
            "its captions stop there, not at --max-new-tokens %d",
            self._spec,
            family.name,
            limit,
            asked,
        )

    def _family(self, directory: Path) -> Family:
        """The configured family, or the one the downloaded config names (clear error if none)."""
        config = model_config(str(directory), revision=None, fetch=False)
        if self.backend is not None:
            return self._forced(FAMILIES[self.backend], config)
        if config is None:
            raise ModelLoadError(
                f"{self._spec}: no config.json in {directory}; is this a transformers model?"
            )
        name = backend_of(config)
        if name == FLORENCE:
            raise ModelLoadError(
                f"{self._spec} is a Florence-2 model; start the server with --backend florence2 "
                "(or --backend auto now that its files are on disk)."
            )
        if name is None:
            raise ModelLoadError(
                f"{self._spec}: unsupported model ({describe(config)}). Supported: {supported()}. "
                "If it is one of these under another name, pass --backend."
            )
        self.backend = name
        return FAMILIES[name]

    def _forced(self, family: Family, config: dict[str, Any] | None) -> Family:
        """``--backend NAME``: only for a config of that family's model type. transformers
        would load another architecture's files into it with random weights and a warning."""
        model_type = (config or {}).get("model_type")
        if model_type is not None and model_type not in family.model_types:
            detected = backend_of(config or {})
            hint = f" (--backend {detected}, or auto)" if detected else ""
            raise ModelLoadError(
                f"{self._spec} is a {model_type!r} model ({describe(config or {})}); --backend "
                f"{family.name} runs {family.label} only. Pick the backend of its architecture{hint}."
            )
        return family

    def _module(self, held: _Ready) -> Any:
        return held.loaded.model

    # --- captioning ----------------------------------------------------------------------------

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        """Caption a batch; one generate call per (options, prompt) group, results in order."""
        ready = self._ready()
        groups: dict[tuple[GenerationOptions, str | None], list[int]] = {}
        for index, item in enumerate(batch):
            prompt = item.prompt if ready.family.takes_prompt else None
            groups.setdefault((item.options.batch_key, prompt), []).append(index)
        results: list[Caption | None] = [None] * len(batch)
        for (options, prompt), indices in groups.items():
            items = [batch[i] for i in indices]
            for index, caption in zip(
                indices, self._caption_group(ready, items, options, prompt), strict=True
            ):
                results[index] = caption
        return [caption for caption in results if caption is not None]

    def _caption_group(
        self, ready: _Ready, items: list[CaptionItem], options: GenerationOptions, prompt: str | None
    ) -> list[Caption]:
        scored = any(item.options.with_confidence for item in items)
        images = [Image.fromarray(item.image.pixels) for item in items]

        def generate() -> tuple[int, Any, list[float] | None]:
            with torch.inference_mode():
                inputs = self._inputs(ready, images, prompt)
                start = ready.family.prompt_length(inputs)
                forced = forced_tokens(ready.loaded.model)
                capped = self._within_positions(ready, options.for_generate(forced), start)
                streamer = _streamer(ready, items, capped, prompt)
                out = ready.loaded.model.generate(
                    **inputs,
                    **generate_kwargs(capped),
                    **({"streamer": streamer} if streamer else {}),
                    return_dict_in_generate=True,
                    output_scores=scored,
                )
                scores = _confidences(ready, out, capped) if scored else None
            return start, out, scores

        start, out, scores = generate_or_out_of_memory(generate, len(items))
        captions = [
            self._read_row(ready, row, start, scores[i] if scores else None)
            for i, row in enumerate(out.sequences.tolist())
        ]
        return [
            caption if item.options.with_confidence else dataclasses.replace(caption, confidence=None)
            for caption, item in zip(captions, items, strict=True)
        ]

    def _within_positions(self, ready: _Ready, options: GenerationOptions, start: int) -> GenerationOptions:
        """``options`` stopping where the prompt and the caption fill the text decoder: past that,
        its position table has no row for the next token (an IndexError in transformers)."""
        if ready.positions is None:
            return options
        room = caption_room(ready.positions, start)
        if room < 1:
            raise BadRequest(
                f"The prompt takes {start} tokens; {self._spec} ({ready.family.name}) holds "
                f"{ready.positions} in all, prompt and caption together. Send a shorter prompt."
            )
        return options.capped(room)

    def _inputs(self, ready: _Ready, images: list[Image.Image], prompt: str | None) -> dict[str, Any]:
        inputs = ready.family.inputs(ready.loaded, images, prompt)
        moved: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(ready.device)
                if value.is_floating_point():
                    value = value.to(ready.dtype)
            moved[key] = value
        return moved

    def _read_row(self, ready: _Ready, row: list[int], start: int, confidence: float | None) -> Caption:
        """Text, token counts and finish reason of one output row."""
        tokenizer = ready.loaded.tokenizer
        generated = row[start:]
        stop = next((i for i, token in enumerate(generated) if token in ready.stops), None)
        new_tokens = generated if stop is None else generated[:stop]
        pad = tokenizer.pad_token_id
        shown = row[: start + len(new_tokens)] if ready.family.keeps_prompt else new_tokens
        return Caption(
            text=tokenizer.decode(shown, skip_special_tokens=True).strip(),
            prompt_tokens=start,
            completion_tokens=sum(1 for token in new_tokens if token != pad),
            finish_reason="stop" if stop is not None else "length",
            confidence=confidence,
        )


def _streamer(
    ready: _Ready, items: list[CaptionItem], options: GenerationOptions, prompt: str | None
) -> RowStreamer | None:
    """Each item's caption so far, token by token, for the items that ask (one beam only).

    Not when the answer starts with the prompt (BLIP, GIT): the streamed pieces must add up to
    the final caption, and those would lack its first words; such a reply comes in one piece.
    """
    if options.num_beams != 1 or not any(item.stream for item in items):
        return None
    if prompt is not None and ready.family.keeps_prompt:
        return None
    return RowStreamer(ready.loaded.tokenizer, [item.stream for item in items])


def _confidences(ready: _Ready, out: Any, options: GenerationOptions) -> list[float]:
    """Geometric mean of the chosen tokens' probabilities, from generate's own scores.

    Up to and including the first stop token; beam search's scores are already log-probabilities.
    """
    scorer = getattr(
        ready.loaded.model, "text_decoder", ready.loaded.model
    )  # BLIP decodes with its text model
    beams = getattr(out, "beam_indices", None) if options.num_beams > 1 else None
    steps = scorer.compute_transition_scores(out.sequences, out.scores, beams, normalize_logits=beams is None)
    chosen = out.sequences[:, -steps.shape[1] :]
    values = []
    for row_scores, row_tokens in zip(steps.float().cpu(), chosen.tolist(), strict=True):
        stop = next((i for i, token in enumerate(row_tokens) if token in ready.stops), len(row_tokens) - 1)
        kept = row_scores[: stop + 1]
        kept = kept[torch.isfinite(kept)]
        values.append(float(kept.mean().exp()) if kept.numel() else 0.0)
    return values
