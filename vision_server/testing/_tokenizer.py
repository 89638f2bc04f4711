"""A small byte-level BPE tokenizer with the Florence-2 token layout, trained on generated text.

The text is made from fixed word lists by a seeded generator, so the tokenizer is the same on every
build and every machine. Whole caption words become single tokens, which the "wordy" weight tweak
then favours.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AddedToken, BartTokenizer, PreTrainedTokenizerBase

from vision_server.florence.layout import FLORENCE_TOKENS, IMAGE_TOKEN

BPE_VOCAB_SIZE = 600
MODEL_MAX_LENGTH = 1024
BASE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

NOUNS = (
    "cat dog bird horse cow fish woman man girl boy child person tree house car boat train sky water grass "
    "table window street field mountain flower river lake beach forest city road building chair book cup "
    "plate hat dress shirt hair face hand sun cloud snow rain night room wall door garden bridge"
).split()
ADJECTIVES = (
    "red blue green yellow white black brown gray orange pink purple dark bright small large tall old "
    "young wooden metal soft sunny cloudy quiet busy empty colorful"
).split()
VERBS = (
    "sitting standing walking running lying holding looking smiling wearing playing reading flying"
).split()
STYLES = "photo painting drawing portrait landscape closeup cartoon sketch watercolor realistic".split()
CAPTION_WORDS: tuple[str, ...] = tuple(NOUNS + ADJECTIVES + VERBS + STYLES)

PROMPTS = (
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "<GENERATE_TAGS> <ANALYZE> <MIXED_CAPTION> <MIXED_CAPTION_PLUS> <CAPTION> <DETAILED_CAPTION>",
)
_TEMPLATES = (
    "a {adj} {noun} {verb} near the {adj} {noun}",
    "the {noun} is {verb} on a {adj} {noun} in the {noun}",
    "{style}, {adj} {noun}, {noun}, {adj} {noun}",
    "a {style} of a {noun} and an {adj} {noun} with a {noun}",
    "{noun} {verb} under the {noun} behind a {adj} {noun}",
)


def corpus(sentences: int = 1500) -> list[str]:
    """Generated caption-like sentences plus the processor's fixed prompts."""
    rng = random.Random(20241122)
    lines = [_sentence(rng) for _ in range(sentences)]
    lines += [" ".join(CAPTION_WORDS[i::7]) for i in range(7)]
    return lines + list(PROMPTS) * 20


def _sentence(rng: random.Random) -> str:
    """Fill one template; each placeholder draws a fresh word."""
    text = rng.choice(_TEMPLATES)
    pools = {"{adj}": ADJECTIVES, "{noun}": NOUNS, "{verb}": VERBS, "{style}": STYLES}
    for slot, pool in pools.items():
        while slot in text:
            text = text.replace(slot, rng.choice(pool), 1)
    return text


def train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges (a fresh copy of the cached result)."""
    vocab, merges = _train_bpe_cached()
    return dict(vocab), list(merges)


@functools.cache
def _train_bpe_cached(vocab_size: int = BPE_VOCAB_SIZE) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Train the BPE model; ids 0-3 are <s> <pad> </s> <unk> and <mask> comes last, as in BART."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=list(BASE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<mask>"] = len(vocab)
    return vocab, tuple((left, right) for left, right in model["merges"])


def build_tokenizer(*, with_image: bool) -> PreTrainedTokenizerBase:
    """BART tokenizer with the 1024 Florence tokens and, for the native layout, a named `<image>`."""
    vocab, merges = train_bpe()
    # transformers annotates merges as strings; the tokenizers BPE it builds takes these (a, b) pairs.
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)  # type: ignore[arg-type]
    tokenizer.add_tokens([_special(token) for token in FLORENCE_TOKENS], special_tokens=True)
    if not with_image:
        return tokenizer
    tokenizer.add_tokens([_special(IMAGE_TOKEN)], special_tokens=True)
    # The model-specific `image_token` attribute is only set up through from_pretrained.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return BartTokenizer.from_pretrained(tmp, image_token=IMAGE_TOKEN)


def _special(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False)


def whole_word_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of tokens that are a complete caption word preceded by a space (``Ġcat``)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab["Ġ" + word] for word in CAPTION_WORDS if "Ġ" + word in vocab)


def clean_saved_config(directory: Path) -> None:
    """Drop the load-time flags that `from_pretrained` leaves in tokenizer_config.json."""
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
