"""``X-Model`` names the model that captioned on every caption reply of every family.

Two served models, so the header has to follow the request's choice (a copy that named the
default, or only the native route, would fail); the names go through the CORS expose list so a
page on another origin can read them; error replies name no model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, FormData

from tests.support.gallery_data import make_gallery
from tests.support.images import b64, data_url, image_bytes
from tests.support.serving import running_app
from vision_server.engine.models import NamedModel
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

ORIGIN = "http://127.0.0.1:8000"


def two_models() -> list[NamedModel]:
    return [
        NamedModel("alpha", FakeCaptioner(model_id="fake-alpha")),
        # A served name a header cannot carry as is: it is percent-encoded.
        NamedModel("bêta model", FakeCaptioner(model_id="fake-beta")),
    ]


def chat(model: str | None, *, stream: bool = False) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "<CAPTION>"},
        {"type": "image_url", "image_url": {"url": data_url(2)}},
    ]
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}


def upload(model: str | None, field: str = "image", count: int = 1) -> FormData:
    form = FormData()
    for seed in range(count):
        form.add_field(field, image_bytes(seed + 2), filename=f"{seed}.png", content_type="image/png")
    if model is not None:
        form.add_field("model", model)
    return form


def with_model(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    return body if model is None else {**body, "model": model}


# Every route that captions: (method, path, request keyword arguments for a model name).
CAPTION_ROUTES: list[tuple[str, Callable[[str | None], dict[str, Any]]]] = [
    ("/process_image", lambda m: {"json": with_model({"image": b64(2), "prompt": "<CAPTION>"}, m)}),
    ("/v1/chat/completions", lambda m: {"json": chat(m)}),
    ("/chat/completions", lambda m: {"json": chat(m, stream=True)}),
    ("/api/caption", lambda m: {"json": with_model({"image": b64(2)}, m)}),
    ("/caption", lambda m: {"data": upload(m)}),
    ("/detailed_caption", lambda m: {"data": upload(m)}),
    ("/batch_caption", lambda m: {"data": upload(m, "images", count=2)}),
    ("/ui/api/caption", lambda m: {"data": upload(m)}),
    (
        "/ui/api/gallery/recaption",
        lambda m: {"json": with_model({"paths": ["img03.png"], "task": "caption"}, m)},
    ),
]


@pytest.mark.parametrize(("asked", "header"), [(None, "alpha"), ("bêta model", "b%C3%AAta model")])
async def test_every_caption_reply_names_its_model(tmp_path: Path, asked: str | None, header: str) -> None:
    gallery = make_gallery(tmp_path)
    settings = Settings(
        idle_timeout=-1, cache_dir=tmp_path / "cache", gallery=gallery.root, cors_origins=(ORIGIN,)
    )
    async with running_app(settings, models=two_models()) as (_, url), ClientSession(url) as session:
        for path, request in CAPTION_ROUTES:
            async with session.post(path, headers={"Origin": ORIGIN}, **request(asked)) as response:
                assert response.status == 200, (path, await response.text())
                assert response.headers.get("X-Model") == header, path
                exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
                assert "X-Model" in exposed, path


async def test_error_replies_name_no_model(tmp_path: Path) -> None:
    settings = Settings(idle_timeout=-1, cache_dir=tmp_path)
    async with running_app(settings, models=two_models()) as (_, url), ClientSession(url) as session:
        bad = {"image": b64(2)[:-8] + "!!!!", "prompt": "<CAPTION>", "model": "alpha"}
        async with session.post("/process_image", json=bad) as response:
            assert response.status == 400 and "X-Model" not in response.headers
        form = FormData()
        form.add_field("image", b"not an image", filename="a.png")
        async with session.post("/caption", data=form) as response:
            assert response.status == 400 and "X-Model" not in response.headers
