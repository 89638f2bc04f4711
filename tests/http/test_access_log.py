"""One access line per request: id, route, status, duration, queue wait, batch size; never the image."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import make_mocked_request

from tests.support.api import tiny_settings
from tests.support.images import b64
from tests.support.serving import client_for, running_server
from vision_server.api.access import log_access
from vision_server.engine.models import NamedModel
from vision_server.engine.trace import JobTrace
from vision_server.logs import JsonFormatter, configure_logging
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner


async def test_access_lines_carry_the_engine_numbers(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    image = b64(9)
    caplog.set_level(logging.DEBUG, logger="vision_server.access")
    async with client_for(tiny_settings(tmp_path_factory)) as session:
        headers = {"X-Request-ID": "batch-42"}
        async with session.post(
            "/process_image", json={"image": image, "prompt": "caption"}, headers=headers
        ):
            pass
        async with session.get("/health"):
            pass
        async with session.get("/ui/api/status") as polled:  # an open web page, every second
            assert polled.status == 200
    records = [r for r in caplog.records if r.name == "vision_server.access"]
    caption = next(r for r in records if r.route == "native.process_image")  # type: ignore[attr-defined]
    assert caption.levelno == logging.INFO
    assert (caption.request_id, caption.status, caption.batch_size) == ("batch-42", 200, 1)  # type: ignore[attr-defined]
    assert caption.queue_wait >= 0 and caption.duration >= caption.queue_wait  # type: ignore[attr-defined]
    message = caption.getMessage()
    assert "route=native.process_image" in message and "id=batch-42" in message and "batch=1" in message
    probe = next(r for r in records if r.route == "ops.health")  # type: ignore[attr-defined]
    assert probe.levelno == logging.DEBUG and probe.queue_wait is None  # type: ignore[attr-defined]
    poll = next(r for r in records if r.route == "ui.status")  # type: ignore[attr-defined]
    assert poll.levelno == logging.DEBUG
    assert not any(image[:32] in r.getMessage() for r in caplog.records)
    line = json.loads(JsonFormatter().format(caption))
    assert line["route"] == "native.process_image" and line["request_id"] == "batch-42"


async def test_a_refused_scrape_is_logged_at_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Probes log at debug, but a Prometheus without the key ``--metrics-require-key`` asks for got
    401 at every scrape with nothing in the log at the default level."""
    caplog.set_level(logging.DEBUG, logger="vision_server.access")
    settings = Settings(cache_dir=tmp_path, api_key="k" * 16, metrics_require_key=True)
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.get("/metrics") as refused:
            assert refused.status == 401
        async with session.get("/metrics", headers={"Authorization": f"Bearer {'k' * 16}"}) as scraped:
            assert scraped.status == 200
    levels = [
        (r.status, r.levelno)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "vision_server.access" and r.route == "ops.metrics"  # type: ignore[attr-defined]
    ]
    assert levels == [(401, logging.INFO), (200, logging.DEBUG)]


async def test_error_lines_carry_the_request_id_as_a_json_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id a 500 reply names is a key of the error's own JSON log line (with its traceback),
    not only words in its message, so ``jq 'select(.request_id == ...)'`` finds the cause."""
    caplog.set_level(logging.INFO)
    fake = FakeCaptioner()
    fake.fail_caption = ZeroDivisionError("a bug in the model code")
    async with client_for(Settings(cache_dir=tmp_path), fake) as session:
        body = {"image": b64(3), "prompt": "<CAPTION>"}
        async with session.post("/process_image", json=body) as failed_batch:
            assert failed_batch.status == 500
            batch_id = failed_batch.headers["X-Request-ID"]

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug in a handler")

        monkeypatch.setattr("vision_server.api.native.job_labels", broken)
        async with session.post("/process_image", json=body) as failed_handler:
            assert failed_handler.status == 500
            handler_id = failed_handler.headers["X-Request-ID"]
            assert handler_id in (await failed_handler.json())["detail"]
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.levelno >= logging.ERROR]
    batch_line = next((line for line in lines if batch_id in line.get("request_ids", [])), None)
    assert batch_line and "ZeroDivisionError" in batch_line["exception"], lines
    handler_line = next((line for line in lines if line.get("request_id") == handler_id), None)
    assert handler_line and "RuntimeError: a bug in a handler" in handler_line["exception"], lines
    # Their access lines are warnings: --log-level warning keeps the server's failures.
    access = {r.request_id: r.levelno for r in caplog.records if r.name == "vision_server.access"}  # type: ignore[attr-defined]
    assert access == {batch_id: logging.WARNING, handler_id: logging.WARNING}


async def test_access_lines_name_the_model_and_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With several models, which one a request went to (and which one failed it) is in its line."""
    caplog.set_level(logging.INFO, logger="vision_server.access")
    models = [NamedModel("large", FakeCaptioner()), NamedModel("blip", FakeCaptioner())]
    async with (
        running_server(Settings(cache_dir=tmp_path, idle_timeout=-1), models=models) as url,
        ClientSession(url) as session,
    ):
        for model, request_id in (("blip", "to-blip"), (None, "to-default"), ("nope", "to-nobody")):
            body = {"image": b64(5), "prompt": "<CAPTION>", "model": model}
            async with session.post("/process_image", json=body, headers={"X-Request-ID": request_id}):
                pass
        not_an_image = {"image": "bm90IGFuIGltYWdl", "prompt": "<CAPTION>"}
        async with session.post("/process_image", json=not_an_image, headers={"X-Request-ID": "bad"}) as r:
            assert r.status == 400
    lines = {r.request_id: r for r in caplog.records if r.name == "vision_server.access"}  # type: ignore[attr-defined]
    assert [lines[i].model for i in ("to-blip", "to-default", "to-nobody")] == ["blip", "large", None]  # type: ignore[attr-defined]
    assert lines["to-blip"].getMessage().endswith(" batch=1 model=blip")
    assert "model=" not in lines["to-nobody"].getMessage()  # a 404: no model took it
    assert json.loads(JsonFormatter().format(lines["to-default"]))["model"] == "large"
    # Why a request failed, as the error's code: an operator sees what the 4xx were about.
    # error is the access log's extra= field, which LogRecord's type cannot know
    assert [lines[i].error for i in ("to-blip", "to-nobody", "bad")] == [  # type: ignore[attr-defined]
        None,
        "model_not_found",
        "invalid_image",
    ]
    assert lines["to-nobody"].getMessage().endswith(" error=model_not_found")
    assert "error=" not in lines["to-blip"].getMessage()


def test_log_file_in_json(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "server.jsonl"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("warning", "json", path)
        logging.getLogger("vision_server.test").warning("hello %s", "file", extra={"request_id": "r1"})
        logging.getLogger("vision_server.test").info("dropped at warning level")
        for handler in root.handlers:
            handler.flush()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert [(x["level"], x["message"], x["request_id"]) for x in lines] == [("warning", "hello file", "r1")]


async def test_a_path_cannot_forge_log_lines_or_reach_the_terminal(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """``%0A`` in a path decodes to a line break: written as it came, it started a log line of
    the client's own making, and ``ESC[`` sequences reached the terminal of whoever tails the log."""
    path = tmp_path / "server.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    forged = "2026-01-01 00:00:00,000 INFO    vision_server.access: POST /v1/model/unload 200"
    try:
        configure_logging("info", "text", path)
        async with client_for(tiny_settings(tmp_path_factory)) as session:
            async with session.get(f"/x%0A{forged}%0D%1B[2J", allow_redirects=False) as response:
                assert response.status == 404
        for handler in root.handlers:
            handler.flush()
        text = path.read_text(encoding="utf-8")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    ours = [line for line in text.splitlines() if "aiohttp.access" not in line]  # the test runner's own
    lines = [line for line in ours if "/x" in line or "unload" in line]
    assert len(lines) == 1 and "\x1b" not in text and "\r" not in text, text
    assert lines[0].startswith(tuple("0123456789")) and "GET /x\\n2026-01-01" in lines[0]


@pytest.mark.parametrize(
    ("route", "status", "level"),
    [
        ("ops.health", 200, logging.DEBUG),
        ("ui.status", 200, logging.DEBUG),
        ("ops.metrics", 401, logging.INFO),  # a scraper without the key: a misconfiguration
        ("ops.ready", 503, logging.INFO),  # starting or draining: the probe's answer, no failure
        ("ops.metrics", 500, logging.WARNING),  # a bug of ours, in a probe too
        ("ui.status", 500, logging.WARNING),
        ("native.process_image", 200, logging.INFO),
        ("native.process_image", 400, logging.INFO),
        ("native.process_image", 499, logging.INFO),  # the client hung up
        ("native.process_image", 503, logging.WARNING),
        ("native.process_image", 504, logging.WARNING),
    ],
)
def test_the_access_line_level_keeps_every_failure_of_ours_at_warning(
    route: str, status: int, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vision_server.access")
    log_access(make_mocked_request("GET", "/x"), route, status, 0.01, JobTrace())
    assert [r.levelno for r in caplog.records if r.name == "vision_server.access"] == [level]
