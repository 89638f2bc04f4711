"""Multipart uploads as ``curl -F`` sends them, on the real tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, FormData, MultipartWriter

from tests.support.api import native_caption
from tests.support.images import image_bytes
from tests.support.serving import client_for
from vision_server.settings import Settings
from vision_server.tasks import PROMPTGEN_TASKS
from vision_server.testing.fake import FakeCaptioner


def form(files: list[tuple[str, str, bytes]], **fields: str) -> FormData:
    """Like ``curl -F name=@filename -F key=value``."""
    data = FormData()
    for name, filename, content in files:
        data.add_field(name, content, filename=filename, content_type="application/octet-stream")
    for key, value in fields.items():
        data.add_field(key, value)
    return data


async def post(session: ClientSession, path: str, data: Any) -> tuple[int, Any]:
    async with session.post(path, data=data) as response:
        return response.status, await response.json()


async def test_caption_reply_shape_and_answer(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        expected, (status, reply), (again_status, again) = await asyncio.gather(
            native_caption(session, 31, "<CAPTION>"),
            post(session, "/caption", form([("image", "photo.png", image_bytes(31))])),
            post(session, "/caption", form([("file", "photo.jpg", image_bytes(31))])),
        )
        assert status == 200, reply
        assert set(reply) == {"caption", "confidence", "processing_time", "model_info"}
        assert reply["caption"] == expected
        assert 0 < reply["confidence"] <= 1 and reply["processing_time"] >= 0
        assert (
            reply["model_info"]["model_type"] == "florence-2" and reply["model_info"]["task"] == "<CAPTION>"
        )
        assert again_status == 200 and again["caption"] == expected
        assert again["confidence"] == pytest.approx(reply["confidence"], abs=1e-3)


async def test_task_prompt_generation_fields_and_detailed_caption(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        image = [("image", "a.png", image_bytes(32))]
        natives = asyncio.gather(
            native_caption(session, 32, "<GENERATE_TAGS>"),
            native_caption(session, 32, "<ANALYZE>"),
            native_caption(session, 32, "<MORE_DETAILED_CAPTION>"),
        )
        forms = asyncio.gather(
            post(session, "/caption", form(image, task="generate_tags")),
            post(session, "/caption", form(image, prompt="analyze the composition")),
            post(session, "/detailed_caption", form(image)),
            post(session, "/detailed_caption", form(image, max_length="3", num_beams="1")),
            post(session, "/caption", form(image, temperature="0.8", top_p="0.9", max_length="12")),
        )
        (tags, analysis, detailed), replies = await asyncio.gather(natives, forms)  # all at once
    assert all(status == 200 for status, _ in replies), replies
    by_task, by_prompt, by_route, short, sampled = (reply for _, reply in replies)
    assert by_task["caption"] == tags and by_prompt["caption"] == analysis and by_route["caption"] == detailed
    assert len(short["caption"]) < len(detailed) and sampled["caption"]


async def test_batch_echoes_filenames_and_survives_a_corrupt_file(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        first, third = await asyncio.gather(
            native_caption(session, 33, "<CAPTION>"), native_caption(session, 34, "<CAPTION>")
        )
        files = [
            ("images", "one.png", image_bytes(33)),
            ("images", "broken.jpg", b"\xff\xd8 definitely not a jpeg"),
            ("images", "three.webp", image_bytes(34, "WEBP")),
        ]
        status, reply = await post(session, "/batch_caption", form(files, batch_size="2"))
    assert status == 200 and set(reply) == {"results", "total_processing_time"}
    one, broken, three = reply["results"]
    assert one["filename"] == "one.png" and one["caption"] == first and 0 < one["confidence"] <= 1
    assert broken["filename"] == "broken.jpg" and "Invalid image data" in broken["error"]
    assert "caption" not in broken
    assert three["filename"] == "three.webp" and three["caption"] == third  # lossless WebP: same pixels


async def test_tasks_and_model_info(tiny: Settings) -> None:
    async with client_for(tiny, FakeCaptioner(model_id="test:tiny")) as session:
        async with session.get("/tasks") as response:
            tasks = await response.json()
        async with session.get("/model_info") as response:
            info = await response.json()
    assert [entry["task"] for entry in tasks["tasks"]] == list(PROMPTGEN_TASKS)
    assert all(entry["description"] for entry in tasks["tasks"]) and tasks["default"] == "<CAPTION>"
    assert info["model"] == "test:tiny" and info["model_type"] == "florence-2" and info["state"] == "unloaded"
    assert info["tasks"] == list(PROMPTGEN_TASKS)
    assert tiny.max_batch_size is None and info["max_batch_size"] == 16  # unset: the model's preferred size


async def test_model_info_reports_the_configured_batch_size(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path, max_batch_size=3), FakeCaptioner()) as session:
        async with session.get("/model_info") as response:
            assert (await response.json())["max_batch_size"] == 3


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "files", "fields", "words"),
    [
        ("/caption", [], {"prompt": "hi"}, "No image uploaded"),
        ("/caption", [("photo", "a.png", b"x")], {}, "'photo'"),
        ("/caption", [("image", "a.png", b"not an image")], {}, "Invalid image data"),
        # The client uploaded a file: the message speaks about that file, not about an image string.
        (
            "/caption",
            [("image", "a.png", b"")],
            {},
            "Invalid image data: the uploaded file is empty (0 bytes)",
        ),
        ("/batch_caption", [("images", "a.png", b"")], {}, "the uploaded file is empty (0 bytes)"),
        (
            "/caption",
            [("image", "a.png", b"text")],
            {},
            "the uploaded file is not a supported image format; send PNG",
        ),
        ("/caption", [("image", "a.png", b"x"), ("image", "b.png", b"y")], {}, "/batch_caption"),
        ("/caption", [("image", "a.png", b"x")], {"task": "<OD>"}, "<GENERATE_TAGS>"),
        ("/caption", [("image", "a.png", b"x")], {"num_beams": "99"}, "num_beams"),
        ("/caption", [("image", "a.png", b"x")], {"temperature": "warm"}, "temperature"),
        ("/caption", [("image", "a.png", b"x")], {"max_length": "0"}, "max_length"),
        ("/batch_caption", [], {}, "No image uploaded"),
    ],
)
async def test_errors_are_400_detail(
    tmp_path: Path, path: str, files: list[tuple[str, str, bytes]], fields: dict[str, str], words: str
) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        status, reply = await post(session, path, form(files, **fields))
    assert status == 400 and set(reply) == {"detail"} and words in reply["detail"], reply


async def test_not_multipart_malformed_and_too_large(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, max_request_bytes=100_000)
    async with client_for(settings, FakeCaptioner()) as session:
        status, reply = await post(session, "/caption", b'{"image": "x"}')
        assert status == 400 and "multipart/form-data" in reply["detail"]
        headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
        async with session.post("/caption", data=b"--xyz\r\ngarbage", headers=headers) as response:
            assert response.status == 400 and "detail" in await response.json()
        big = [("image", "big.png", b"\0" * 150_000)]
        status, reply = await post(session, "/caption", form(big))  # Content-Length over the limit
        assert status == 413 and "too large" in reply["detail"]
        writer = MultipartWriter("form-data")
        part = writer.append(b"\0" * 150_000)
        part.set_content_disposition("form-data", name="image", filename="big.png")
        async with session.post(
            "/batch_caption", data=writer, chunked=True
        ) as response:  # streamed, no length
            assert response.status == 413 and "too large" in (await response.json())["detail"]
        status, _ = await post(session, "/caption", form([("image", "ok.png", image_bytes(1))]))
        assert status == 200  # the server is fine afterwards


async def empty_fields(count: int, name_length: int) -> Any:
    """A chunked multipart body of ``count`` empty text fields, each with a long, unique name."""
    padding = "n" * name_length
    for start in range(0, count, 100):
        yield b"".join(
            f'--xyz\r\nContent-Disposition: form-data; name="f{i}{padding}"\r\n\r\n\r\n'.encode()
            for i in range(start, min(count, start + 100))
        )
    yield b"--xyz--\r\n"


@pytest.mark.parametrize("path", ["/caption", "/batch_caption", "/ui/api/caption"])
async def test_a_body_of_part_headers_counts_against_the_limit(tmp_path: Path, path: str) -> None:
    """Only the parts' contents used to count: 300 KB of empty fields passed a 100 KB limit, every
    name kept in memory, so a client could stream gigabytes of them into the server."""
    settings = Settings(cache_dir=tmp_path, max_request_bytes=100_000)
    async with client_for(settings, FakeCaptioner()) as session:
        headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
        async with session.post(path, data=empty_fields(300, 1000), headers=headers) as response:
            assert response.status == 413, await response.text()
            assert "too large" in await response.text()
        status, _ = await post(session, "/caption", form([("image", "ok.png", image_bytes(1))]))
        assert status == 200  # the server is fine afterwards


async def test_pixel_bomb_in_a_batch_is_413_in_its_slot(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path, max_image_pixels=10_000), FakeCaptioner()) as session:
        files = [
            ("images", "small.png", image_bytes(1)),
            ("images", "huge.png", image_bytes(2, size=(200, 200))),
        ]
        status, reply = await post(session, "/batch_caption", form(files))
    assert status == 200 and reply["results"][0]["caption"] and "200x200" in reply["results"][1]["error"]


async def test_batch_fails_whole_only_for_server_trouble(tmp_path: Path) -> None:
    fake = FakeCaptioner()
    fake.fail_load = "no weights here"
    async with client_for(Settings(cache_dir=tmp_path), fake) as session:
        files = [("images", "a.png", image_bytes(1)), ("images", "b.png", image_bytes(2))]
        async with session.post("/batch_caption", data=form(files)) as response:
            reply = await response.json()
            assert response.status == 503 and "Retry-After" in response.headers
            assert "no weights here" in reply["detail"]


async def test_a_missing_key_is_a_401_detail(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path, api_key="sekret"), FakeCaptioner()) as session:
        status, reply = await post(session, "/caption", form([("image", "a.png", image_bytes(1))]))
        assert status == 401 and set(reply) == {"detail"}
