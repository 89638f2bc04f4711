"""Pick a Florence-2 task from the free text a client sends (OpenAI messages, Extras, form prompts).

Chat clients cannot send task tokens on purpose: SillyTavern's caption prompt defaults to
"What's in this image?". So a prompt is read in three steps, and the first that gives an
answer wins:

1. **An explicit task anywhere in the text.** A bracketed token in any case (``<GENERATE_TAGS>``,
   ``<mix_caption>``), or a bare task name that is unmistakably one: a name with an underscore
   in any case (``generate_tags``, ``MIXED_CAPTION_PLUS``) or a one-word name written in
   capitals (``CAPTION``, ``ANALYZE``). The earliest one in the text wins. A bracketed token in
   capitals that this model does not have (``<OD>`` on PromptGen) is a mistake the client should
   hear about: :class:`~vision_server.errors.InvalidTask`, listing the valid tasks. Bare words
   that name no task of this model are just words.
2. **The keyword table** below, checked top to bottom on whole words, case-insensitive; the
   first row that matches decides. The order matters: specific rows come before general ones,
   so "mixed caption with tags" is a mixed caption rather than tags, and "a short caption,
   no details" is a one-line caption. Rows whose task the model lacks are skipped.

   ====================================================================  =========================
   words                                                                 task
   ====================================================================  =========================
   mix / mixed ... plus / analysis / analyze                             ``<MIXED_CAPTION_PLUS>``
   mix / mixed                                                           ``<MIXED_CAPTION>``
   tag / tags / tagging / booru / danbooru                               ``<GENERATE_TAGS>``
   analyse / analyze / analysis / composition                            ``<ANALYZE>``
   structured / position(s) / layout                                     ``<DETAILED_CAPTION>``
   short / brief / briefly / one line / one sentence / concise / summary ``<CAPTION>``
   detail / detailed / details / thorough / in depth / paragraph         ``<MORE_DETAILED_CAPTION>``
   ====================================================================  =========================

3. **The default task** (``--default-task``, ``<MORE_DETAILED_CAPTION>`` unless configured),
   which is what "What's in this image?" deserves.

Models that read free text (BLIP, GIT, Idefics3/SmolVLM: ``Captioner.takes_prompt``) get it
instead (:func:`read_prompt`): a text that is a task name alone (``caption``, ``<CAPTION>``)
asks for that task; any other text goes to the model as written, with the model's one task.
"""

from __future__ import annotations

import re

from vision_server.errors import BadRequest, InvalidTask
from vision_server.tasks import ALIASES, normalize_task

KEYWORD_TABLE: tuple[tuple[str, str], ...] = (
    # "mix" and, later, "plus"/"analysis". The lookahead fixes on the first "mix" (a lookahead
    # is never re-entered), so a text of many "mix" words costs one scan, not one per word.
    (r"^(?=(.*?\bmix(?:ed)?\b))\1.*\b(?:plus|analy[sz]e|analysis)\b", "<MIXED_CAPTION_PLUS>"),
    (r"\bmix(?:ed)?\b", "<MIXED_CAPTION>"),
    (r"\b(?:tags?|tagging|booru|danbooru)\b", "<GENERATE_TAGS>"),
    (r"\b(?:analy[sz]e|analysis|composition)\b", "<ANALYZE>"),
    (r"\b(?:structured|positions?|layout)\b", "<DETAILED_CAPTION>"),
    (r"\b(?:short|brief|briefly|(?:one|single)[- ]line|one[- ]sentence|concise|summar\w*)\b", "<CAPTION>"),
    (r"\b(?:detail|detailed|details|thorough|thoroughly|in[- ]depth|paragraph)\b", "<MORE_DETAILED_CAPTION>"),
)
_KEYWORDS = tuple((re.compile(pattern, re.IGNORECASE | re.DOTALL), task) for pattern, task in KEYWORD_TABLE)
# Longest free-text prompt read. Reading runs on the event loop and costs about 0.7 ms per KiB
# of adversarial text, so the bound keeps one request's share of the loop to a few ms; a prompt
# only picks the task, and real ones are a sentence.
MAX_PROMPT_CHARS = 8 * 1024
_BRACKETED = re.compile(r"<\s*([A-Za-z][A-Za-z_]*)\s*>")
# Task names are words made of letters and underscores; ``\b`` treats "_" as a word character,
# so DETAILED_CAPTION never matches inside MORE_DETAILED_CAPTION.
_BARE = re.compile(r"\b([A-Za-z]+(?:_[A-Za-z]+)*)\b")


_LONE_TOKEN = re.compile(r"<\s*[A-Za-z][A-Za-z_]*\s*>")


def read_prompt(
    text: str | None, tasks: tuple[str, ...], default: str, *, free_text: bool
) -> tuple[str, str | None]:
    """The task ``text`` asks for and the free text the model gets (None: the task alone).

    Without ``free_text`` the text only picks a task (:func:`task_from_text`). With it, a text
    that is exactly a task name picks that task, a lone unknown ``<TOKEN>`` is a 400 (a task
    name gone wrong, not a question), and anything else reaches the model unchanged (stripped).
    """
    if not free_text:
        return task_from_text(text, tasks, default), None
    stripped = (text or "").strip()
    if not stripped:
        return default_task(default, tasks), None
    _check_length(stripped, "It is passed to the model as written: keep it to a question or a sentence.")
    try:
        return normalize_task(stripped, tasks), None
    except InvalidTask:
        if _LONE_TOKEN.fullmatch(stripped):
            raise
    return default_task(default, tasks), stripped


def _check_length(text: str, hint: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise BadRequest(
            f"The prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}. {hint}"
        )


def task_from_text(text: str | None, tasks: tuple[str, ...], default: str) -> str:
    """The task ``text`` asks for, among ``tasks``; ``default`` when it names none."""
    if text:
        _check_length(text, "It only picks the task: say what kind of caption you want in a few words.")
    if text:
        explicit = explicit_task(text, tasks)
        if explicit is not None:
            return explicit
        for pattern, task in _KEYWORDS:
            if task in tasks and pattern.search(text):
                return task
    return default_task(default, tasks)


def explicit_task(text: str, tasks: tuple[str, ...]) -> str | None:
    """The earliest task token or task name in ``text`` (see the module docs), else None."""
    found: list[tuple[int, str]] = []
    for match in _BRACKETED.finditer(text):
        name = match.group(1)
        task = _known(name, tasks)
        if task is not None:
            found.append((match.start(), task))
        elif name.isupper():
            raise InvalidTask(f"Unknown task <{name}> in the prompt. Valid tasks: {', '.join(tasks)}")
    for match in _BARE.finditer(text):
        name = match.group(1)
        if "_" in name or name.isupper():
            task = _known(name, tasks)
            if task is not None:
                found.append((match.start(), task))
    return min(found)[1] if found else None


def default_task(configured: str, tasks: tuple[str, ...]) -> str:
    """The configured default, or the model's first task when the model lacks it."""
    task = _known(configured.strip().strip("<>"), tasks)
    return task if task is not None else tasks[0]


def _known(name: str, tasks: tuple[str, ...]) -> str | None:
    token = f"<{name.upper()}>"
    token = ALIASES.get(token, token)
    return token if token in tasks else None


# What each task gives, in the model card's words (shown by GET /tasks).
TASK_DESCRIPTIONS: dict[str, str] = {
    "<GENERATE_TAGS>": "danbooru-style tags, comma-separated",
    "<CAPTION>": "a one-line caption",
    "<DETAILED_CAPTION>": "a structured caption that places the subjects in the image",
    "<MORE_DETAILED_CAPTION>": "a very detailed description",
    "<ANALYZE>": "an analysis of the image's composition",
    "<MIXED_CAPTION>": "a detailed caption followed by tags (for T5XXL + CLIP_L)",
    "<MIXED_CAPTION_PLUS>": "a mixed caption combined with the composition analysis",
    "<OCR>": "the text read from the image",
}
