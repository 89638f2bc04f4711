"""Free text → task: explicit tokens win, then the keyword table in order, then the default."""

from __future__ import annotations

import pytest

from vision_server.api.task_words import KEYWORD_TABLE, TASK_DESCRIPTIONS, default_task, task_from_text
from vision_server.errors import InvalidTask
from vision_server.tasks import FLORENCE_TASKS, PROMPTGEN_TASKS

DEFAULT = "<MORE_DETAILED_CAPTION>"


def pick(text: str | None, tasks: tuple[str, ...] = PROMPTGEN_TASKS, default: str = DEFAULT) -> str:
    return task_from_text(text, tasks, default)


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("<GENERATE_TAGS>", "<GENERATE_TAGS>"),
        ("Please describe in detail. <caption>", "<CAPTION>"),  # the token beats the keyword
        ("generate_tags for this one", "<GENERATE_TAGS>"),
        ("Use MIXED_CAPTION_PLUS", "<MIXED_CAPTION_PLUS>"),
        ("more_detailed_caption", "<MORE_DETAILED_CAPTION>"),  # not DETAILED_CAPTION inside it
        ("detailed_caption", "<DETAILED_CAPTION>"),
        ("<MIX_CAPTION> please", "<MIXED_CAPTION>"),  # the author's node spelling
        ("mix_caption_plus", "<MIXED_CAPTION_PLUS>"),
        ("ANALYZE this, then CAPTION it", "<ANALYZE>"),  # the earliest explicit name wins
        ("< CAPTION >", "<CAPTION>"),
    ],
)
def test_explicit_tasks_win(text: str, task: str) -> None:
    assert pick(text) == task


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("Give me booru tags", "<GENERATE_TAGS>"),
        ("danbooru style please", "<GENERATE_TAGS>"),
        ("Analyse the composition", "<ANALYZE>"),
        ("what is the composition like?", "<ANALYZE>"),
        ("A short caption", "<CAPTION>"),
        ("describe it in one line", "<CAPTION>"),
        ("Briefly, what is this?", "<CAPTION>"),
        ("Describe in detail", "<MORE_DETAILED_CAPTION>"),
        ("structured caption with positions", "<DETAILED_CAPTION>"),
        ("a mixed caption", "<MIXED_CAPTION>"),
        # order matters: the specific rows come first
        ("mixed caption with tags", "<MIXED_CAPTION>"),
        ("mixed caption plus analysis", "<MIXED_CAPTION_PLUS>"),
        ("a short caption, no details", "<CAPTION>"),
        ("tags, not a detailed description", "<GENERATE_TAGS>"),
    ],
)
def test_keyword_table(text: str, task: str) -> None:
    assert pick(text) == task


@pytest.mark.parametrize(
    "text", [None, "", "What's in this image?", "caption this", "Describe it.", "<b>hi</b>"]
)
def test_plain_words_get_the_default(text: str | None) -> None:
    assert pick(text) == DEFAULT
    assert pick(text, default="caption") == "<CAPTION>"  # the configured default, any spelling


def test_unknown_explicit_token_is_an_error_that_lists_the_tasks() -> None:
    with pytest.raises(InvalidTask) as caught:
        pick("<OD> please")
    assert all(task in caught.value.message for task in PROMPTGEN_TASKS)


def test_only_tasks_the_model_has() -> None:
    assert pick("tags please", FLORENCE_TASKS) == DEFAULT  # no tag task on base Florence-2: skip the row
    assert pick("generate_tags", FLORENCE_TASKS) == DEFAULT  # a bare name it lacks is just words
    with pytest.raises(InvalidTask):
        pick("<GENERATE_TAGS>", FLORENCE_TASKS)
    assert pick("<OCR>", FLORENCE_TASKS) == "<OCR>"
    assert default_task("<ANALYZE>", FLORENCE_TASKS) == FLORENCE_TASKS[0]


def test_every_table_task_is_a_promptgen_task_and_described() -> None:
    assert {task for _, task in KEYWORD_TABLE} <= set(PROMPTGEN_TASKS)
    assert set(PROMPTGEN_TASKS) <= set(TASK_DESCRIPTIONS)
