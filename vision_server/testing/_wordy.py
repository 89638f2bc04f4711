"""The "wordy" nudge: make a random Florence-2 emit short captions of real words.

A randomly initialised model greedily repeats one token (usually ``<s>``), so every caption would be
empty. Two hidden dimensions of the text model are given a fixed meaning, and the rest stay random:

- the *word* dimension is set only in the embeddings of whole caption words, and the decoder's last
  LayerNorm outputs a constant there, so every word gets the same logit bonus (the output head is
  tied to the embeddings) and which word wins is decided by the random dimensions, i.e. by the
  image, the prompt, the previous words and any adapter;
- the *end* dimension is set only in the ``</s>`` embedding and in the decoder positions past a
  caption length, and no sublayer writes to it, so ``</s>`` wins after some words and generation
  stops on its own instead of running to ``max_new_tokens``.

Two more edits make the output depend on the input: the image projection drops the feature direction
that every image shares (random vision weights map all images to nearly the same vector), and
cross-attention is rescaled so the encoder (image + prompt) outweighs the previous token.
"""

from __future__ import annotations

import torch
from transformers import Florence2ForConditionalGeneration, PreTrainedTokenizerBase

from vision_server.testing._tokenizer import whole_word_ids

WORD_DIM, END_DIM = 0, 1
WORD_VALUE, WORD_BIAS = 0.1, 30.0  # every word's logit bonus is their product
END_VALUE = 2.0
CROSS_ATTENTION_GAIN = 2.0
CALIBRATION_IMAGES = 4
CALIBRATION_MAX_SIZE = 128  # the shared direction barely depends on resolution; 768 px costs minutes
FIRST_END_POSITION, FULL_END_POSITION = 6, 24  # the end signal ramps up between these decoder steps
END_POSITION_PEAK = 3.0
POSITION_OFFSET = 2  # BART's learned positions start at row 2


def apply(
    model: Florence2ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, image_size: int
) -> None:
    """Edit ``model`` in place (call under ``torch.no_grad()``)."""
    _remove_shared_image_direction(model, image_size)
    text = model.model.language_model
    _mark_embeddings(text.shared.weight, whole_word_ids(tokenizer), tokenizer.eos_token_id)
    decoder = text.decoder
    for layer in decoder.layers:
        for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
            linear.weight[END_DIM] = 0.0
            linear.bias[END_DIM] = 0.0
        _unit_gain(layer.encoder_attn.v_proj.weight)
        _unit_gain(layer.encoder_attn.out_proj.weight, CROSS_ATTENTION_GAIN)
    _discourage_repeats(decoder.layernorm_embedding.weight)
    final_norm = decoder.layers[-1].final_layer_norm
    final_norm.weight[WORD_DIM], final_norm.bias[WORD_DIM] = 0.0, WORD_BIAS
    final_norm.weight[END_DIM], final_norm.bias[END_DIM] = 1.0, 0.0
    _ramp_end_signal(decoder.embed_positions.weight)


def _discourage_repeats(norm_weight: torch.Tensor) -> None:
    """Negate the decoder's input embedding, so the previous token's own logit is pushed down."""
    norm_weight.copy_(-norm_weight.abs())
    norm_weight[END_DIM] = norm_weight[END_DIM].abs()


def _mark_embeddings(embeddings: torch.Tensor, words: list[int], eos_id: int) -> None:
    """Only words carry the word dimension; only ``</s>`` carries the end dimension."""
    embeddings[:, WORD_DIM] = 0.0
    embeddings[:, END_DIM] = 0.0
    embeddings[torch.tensor(words), WORD_DIM] = WORD_VALUE
    embeddings[eos_id, END_DIM] = END_VALUE


def _ramp_end_signal(positions: torch.Tensor) -> None:
    """Zero before the first end position, then a linear ramp that saturates at the full one."""
    steps = torch.arange(positions.shape[0], dtype=torch.float32) - POSITION_OFFSET
    ramp = ((steps - FIRST_END_POSITION) / (FULL_END_POSITION - FIRST_END_POSITION)).clamp(0.0, 1.0)
    scale = positions.std().item() * positions.shape[1] ** 0.5
    positions[:, END_DIM] = (ramp * END_POSITION_PEAK * scale).to(positions.dtype)


def _unit_gain(weight: torch.Tensor, gain: float = 1.0) -> None:
    """Rescale a square random matrix so it keeps a vector's length (times ``gain``)."""
    weight *= gain / (weight.std() * weight.shape[1] ** 0.5)


def _remove_shared_image_direction(model: Florence2ForConditionalGeneration, image_size: int) -> None:
    """Project out the mean vision feature of a few fixed noise images from the image projection."""
    captured: list[torch.Tensor] = []
    projection = model.model.multi_modal_projector.image_projection
    handle = projection.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    generator = torch.Generator().manual_seed(1234)
    size = min(image_size, CALIBRATION_MAX_SIZE)
    pixels = torch.randn(CALIBRATION_IMAGES, 3, size, size, generator=generator)
    try:
        model.model.get_image_features(pixel_values=pixels)
    finally:
        handle.remove()
    shared = _unit(captured[0].flatten(0, 1).mean(dim=0))
    projection.weight -= torch.outer(projection.weight @ shared, shared)


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()
