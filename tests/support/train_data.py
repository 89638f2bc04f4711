"""Small captioned datasets for the ``vision-server train`` tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.support.images import noise

# Whole words of the tiny tokenizer; "photo" in front, like a trigger word. No repeated trigram
# (the model's generation config forbids repeating one).
CAPTIONS = (
    "photo red cat sitting wooden table",
    "photo dog running snow",
    "photo bird flying dark river",
    "photo old man reading book garden",
    "photo woman walking city street",
)


def captioned_folder(root: Path, captions: tuple[str, ...] = CAPTIONS, ext: str = "txt") -> Path:
    """``img0.png`` + ``img0.<ext>`` ...: one seeded picture per caption (coarse blocks of colour:
    random vision weights tell such pictures apart better than pixel noise)."""
    root.mkdir(parents=True, exist_ok=True)
    for index, caption in enumerate(captions):
        noise(index, (6, 5)).resize((48, 40), Image.Resampling.BICUBIC).save(root / f"img{index}.png")
        (root / f"img{index}.{ext}").write_text(caption + "\n", encoding="utf-8")
    return root
