"""The progress output both long commands share: bar on a terminal, timed plain lines elsewhere."""

from __future__ import annotations

import io

from vision_server.bulk.pipeline import Summary
from vision_server.bulk.progress import Progress as CaptionProgress
from vision_server.bulk.progress import format_load_failure
from vision_server.progress_output import ProgressOutput
from vision_server.train.reporting import Progress as TrainProgress


def test_a_log_gets_plain_lines_only_when_one_is_due() -> None:
    stream = io.StringIO()  # not a terminal: no bar
    quiet = ProgressOutput(stream, interval=3600)
    assert not quiet.line_due()
    eager = ProgressOutput(stream, interval=0)
    assert eager.line_due() and eager.line_due()
    eager.write("one line")
    eager.close()
    assert stream.getvalue() == "one line\n"


def test_with_a_bar_lines_are_never_due_and_text_goes_above_it() -> None:
    stream = io.StringIO()
    output = ProgressOutput(stream, interval=0, bar=True, total=3)
    assert not output.line_due()
    output.write("a message")
    output.close()
    assert "a message\n" in stream.getvalue()


def test_both_commands_build_on_it() -> None:
    stream = io.StringIO()
    caption = CaptionProgress(stream, interval=0)
    train = TrainProgress(total=4, stream=stream, interval=0)
    assert isinstance(caption, ProgressOutput) and isinstance(train, ProgressOutput)
    train.update(4, loss=0.5, lr=1e-4)
    assert stream.getvalue().startswith("step 4/4  loss 0.5000  lr 1.00e-04")


def test_a_failed_load_says_how_many_are_left_only_when_they_were_counted() -> None:
    summary = Summary(skipped=3, failed=1)
    counted = format_load_failure(summary, "no config.json", 10)
    assert counted.splitlines() == [
        "error: the model could not be loaded: no config.json",
        "6 of the 10 images are not captioned yet: run the same command again once the model loads "
        "(what is done is skipped)",
    ]
    uncounted = format_load_failure(summary, "no config.json", None)
    assert uncounted.splitlines()[1] == (
        "the images not captioned yet are captioned when you run the same command again once the "
        "model loads (what is done is skipped)"
    )


def test_the_plain_line_s_rate_and_eta_count_from_the_first_caption() -> None:
    # A resume: 100 s of model load and skipping what is done (900 of 1000 images), then one
    # caption a second. The line's rate counted the 100 s in (11 captions / 110 s = 0.1 img/s,
    # ETA 14:50 for the 89 left); it is the pace since the first caption (1.0 img/s, ETA 1:29).
    now = [0.0]
    progress = CaptionProgress(io.StringIO(), interval=3600, clock=lambda: now[0])
    progress.set_total(1000)
    summary = Summary(started=0.0)
    for _ in range(900):
        summary.record("skipped", "done.png", None)
        progress.report(summary, "skipped", "done.png", None)
    now[0] = 100.0
    for _ in range(11):
        summary.record("captioned", "new.png", None)
        progress.report(summary, "captioned", "new.png", None)
        now[0] += 1.0
    now[0] -= 1.0
    assert progress.line(summary) == (
        "911/1000 images (captioned 11, skipped 900, failed 0), 1.0 img/s, ETA 1:29"
    )


def test_before_a_second_caption_the_line_gives_no_rate_and_no_eta() -> None:
    # 10 s of start-up (imports, the model's load) then one caption: a rate counted from the
    # start said 0.1 img/s and an ETA of 40 s for 4 images a model captions in one.
    now = [10.0]
    progress = CaptionProgress(io.StringIO(), interval=3600, clock=lambda: now[0])
    progress.set_total(5)
    summary = Summary(started=0.0)
    summary.record("captioned", "a.png", None)
    progress.report(summary, "captioned", "a.png", None)
    assert progress.line(summary) == "1/5 images (captioned 1, skipped 0, failed 0)"
    summary.record("skipped", "b.png", None)
    now[0] = 12.0
    assert progress.line(summary) == "2/5 images (captioned 1, skipped 1, failed 0)"
    summary.record("captioned", "c.png", None)
    now[0] = 12.5
    assert progress.line(summary) == "3/5 images (captioned 2, skipped 1, failed 0), 0.4 img/s, ETA 5.0 s"
