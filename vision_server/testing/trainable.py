"""A tiny test model that LoRA training can teach: for the ``vision-server train`` tests.

The tiny model's tied embeddings are so short (norm ~0.1 at d_model 32) that its next-token
distribution is almost flat whatever the hidden state, and its 10 % dropout is loud noise in a
32-wide model: a few hundred LoRA steps cannot make it repeat a caption. This variant scales the
embeddings' free dimensions (not the two the "wordy" nudge uses) so logits can become confident,
and turns dropout off. It is still a random model; only its capacity to learn changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Florence2ForConditionalGeneration

from vision_server.testing import _wordy
from vision_server.testing._model_dir import make_readable
from vision_server.testing.tiny_model import build_test_model

EMBEDDING_GAIN = 8.0


def build_trainable_test_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """The tiny model in ``out_dir`` (native layout), made trainable as described above."""
    out = build_test_model(out_dir, seed=seed)
    model = Florence2ForConditionalGeneration.from_pretrained(out)
    free = max(_wordy.WORD_DIM, _wordy.END_DIM) + 1
    with torch.no_grad():
        embeddings: torch.Tensor = model.model.language_model.shared.weight  # tied to the output head
        embeddings[:, free:] *= EMBEDDING_GAIN
    text, vision = model.config.text_config, model.config.vision_config
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        setattr(text, name, 0.0)
    setattr(vision, "drop_path_rate", 0.0)  # noqa: B010  # the sub-config is typed loosely
    model.save_pretrained(out)
    make_readable(out)
    return out
