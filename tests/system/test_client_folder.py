"""Folder captioning in-process: discovery, modes, resume, failures and safe writes.

Most tests use a scripted stand-in server that counts requests and rejects non-PNG bytes the way
the real one does, so they are fast and can count exactly what was sent. The last test runs the
whole thing against the real ``vision-server`` with the tiny test model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from tests.support import hidden_names
from vision_server.captionfiles import Mode, write_atomic
from vision_server.client import AsyncVisionClient, RetryPolicy, VisionClient, caption_folder, find_images
from vision_server.client.folder import ImageResult
from vision_server.client.jsonl import JsonlWriter

PNG_MAGIC = b"\x89PNG"


class StubServer:
    """Captions a PNG as ``caption-<size>``; answers 400 for anything else, like the real server."""

    def __init__(self, delay: float = 0.0, names_model: bool = True, together: int = 0) -> None:
        self.delay = delay
        self.together = together  # hold each request until this many were in flight (30 s at most)
        self.arrived = asyncio.Condition()
        self.names_model = names_model  # as vision-server does; florence2-visionapi does not
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.priorities: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        self.prompts.append(body["prompt"])
        self.priorities.append(body.get("priority"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self.arrived:
                self.arrived.notify_all()
                try:
                    await asyncio.wait_for(
                        self.arrived.wait_for(lambda: self.max_in_flight >= self.together), 30
                    )
                except asyncio.TimeoutError:
                    self.together = 0  # never came: the rest need not wait too
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        data = base64.b64decode(body["image"])
        if not data.startswith(PNG_MAGIC):
            return web.json_response({"detail": "Invalid image data: cannot identify image file"}, status=400)
        headers = {"X-Model": body.get("model") or "stub-default"} if self.names_model else {}
        return web.json_response({"result": f"caption-{len(data)}"}, headers=headers)

    async def tasks(self, request: web.Request) -> web.Response:
        """``GET /prompts``, which a run naming its model asks first (this stub has any model)."""
        return web.json_response(["<CAPTION>"])


@pytest.fixture
async def stub(aiohttp_server) -> AsyncIterator[tuple[StubServer, AsyncVisionClient]]:
    server = StubServer()
    app = web.Application()
    app.router.add_post("/process_image", server.handle)
    running = await aiohttp_server(app)
    client = AsyncVisionClient(str(running.make_url("")), retry_policy=RetryPolicy(retries=0))
    yield server, client
    await client.close()


def make_png(path: Path, size: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format="PNG")
    return path


def expected(path: Path) -> str:
    return f"caption-{path.stat().st_size}"


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Discovery


def test_find_images_any_case_recursive(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.gif", "e.bmp", "f.tif", "g.TIFF", "h.webp", "sub/deep/i.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for name in ("notes.txt", "._a.png", "model.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == [
        "a.JPG",
        "b.jpeg",
        "c.Png",
        "d.gif",
        "e.bmp",
        "f.tif",
        "g.TIFF",
        "h.webp",
        "sub/deep/i.png",
    ]
    flat = [p.name for p in find_images(tmp_path, recursive=False)]
    assert "i.png" not in flat
    assert len(flat) == 8


# ---------------------------------------------------------------------------------------------
# Modes, prefix and suffix


async def test_skip_mode_captions_only_missing_or_empty(stub, tmp_path: Path) -> None:
    server, client = stub
    _, b, c = (make_png(tmp_path / f"{n}.png", size=8 + i) for i, n in enumerate("abc"))
    (tmp_path / "a.txt").write_text("kept caption", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  \n", encoding="utf-8")  # what broken tools leave behind
    make_png(tmp_path / "d.png")
    (tmp_path / "d.txt").write_bytes("café, latin-1".encode("latin-1"))  # not UTF-8, still a caption
    summary = await caption_folder(client, tmp_path, task="caption")
    assert (summary.done, summary.skipped, summary.failed) == (2, 2, [])
    assert server.requests == 2
    assert server.prompts == ["<CAPTION>", "<CAPTION>"]
    assert server.priorities == ["bulk", "bulk"]  # folder runs let single requests go first
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "kept caption"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == expected(b)
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == expected(c)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("mode", "result"),
    [
        ("overwrite", "ohwx, {new}."),
        ("append", "old words | ohwx, {new}."),
        ("prepend", "ohwx, {new}. | old words"),
    ],
)
async def test_modes_with_prefix_and_suffix(stub, tmp_path: Path, mode: Mode, result: str) -> None:
    _, client = stub
    image = make_png(tmp_path / "img.png")
    (tmp_path / "img.caption").write_text("old words\n", encoding="utf-8")
    summary = await caption_folder(
        client, tmp_path, ext=".caption", mode=mode, prefix="ohwx, ", suffix=".", separator=" | "
    )
    assert summary.done == 1
    assert (tmp_path / "img.caption").read_text(encoding="utf-8") == result.format(new=expected(image))


async def test_append_without_existing_caption_is_just_the_caption(stub, tmp_path: Path) -> None:
    _, client = stub
    image = make_png(tmp_path / "img.png")
    await caption_folder(client, tmp_path, mode="append")
    assert (tmp_path / "img.txt").read_text(encoding="utf-8") == expected(image)


async def test_weird_file_names(stub, tmp_path: Path) -> None:
    _, client = stub
    names = [
        "with space.png",
        'quote\'s "double".png',
        "ünïcødé 猫.png",
        "-starts-with-dash.png",
        "semi;colon $HOME `x`.png",
        "dots.in.name.png",
    ]
    for i, name in enumerate(names):
        make_png(tmp_path / "sub dir" / name, size=8 + i)
    summary = await caption_folder(client, tmp_path)
    assert (summary.done, summary.failed) == (len(names), [])
    for name in names:
        image = tmp_path / "sub dir" / name
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == expected(image)


async def test_not_recursive(stub, tmp_path: Path) -> None:
    _, client = stub
    make_png(tmp_path / "top.png")
    make_png(tmp_path / "sub" / "deep.png")
    summary = await caption_folder(client, tmp_path, recursive=False)
    assert (summary.total, summary.done) == (1, 1)
    assert not (tmp_path / "sub" / "deep.txt").exists()


async def test_hidden_names_are_left_out_with_and_without_subfolders(stub, tmp_path: Path) -> None:
    """No hidden file is captioned and no hidden folder entered below the folder, which may be
    hidden itself; the dry run and the counts see the same images."""
    _, client = stub
    root = hidden_names.make_tree(tmp_path / ".data")
    before = hidden_names.files_below(root)
    planned = await caption_folder(client, root, dry_run=True)
    assert [path.relative_to(root).as_posix() for path in planned.planned] == list(hidden_names.VISIBLE)
    flat = await caption_folder(client, root, recursive=False)
    assert (flat.total, flat.done) == (1, 1)
    assert hidden_names.files_below(root) == before | {"a.txt"}
    deep = await caption_folder(client, root)
    assert (deep.total, deep.done, deep.skipped) == (2, 1, 1)
    assert hidden_names.files_below(root) == before | {"a.txt", "sub/b.txt"}


# ---------------------------------------------------------------------------------------------
# Failures


async def test_corrupt_image_does_not_stop_the_others(stub, tmp_path: Path) -> None:
    _, client = stub
    good = [make_png(tmp_path / f"good{i}.png", size=8 + i) for i in range(4)]
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    seen: list[ImageResult] = []
    summary = await caption_folder(client, tmp_path, concurrency=2, on_result=seen.append)
    assert summary.done == 4
    assert [f.path.name for f in summary.failed] == ["broken.jpg"]
    assert "Invalid image data" in summary.failed[0].reason
    assert "400" in summary.failed[0].reason
    assert not (tmp_path / "broken.txt").exists()
    assert all(image.with_suffix(".txt").exists() for image in good)
    assert sorted(r.outcome for r in seen) == ["done"] * 4 + ["failed"]
    assert not summary.ok


async def test_images_sharing_a_caption_file_are_reported(stub, tmp_path: Path) -> None:
    _, client = stub
    make_png(tmp_path / "same.png")
    (tmp_path / "same.webp").write_bytes(b"RIFF....WEBP")
    summary = await caption_folder(client, tmp_path)
    assert summary.done == 0  # neither: a trainer would pair same.txt with both
    rule = "neither is captioned, rename one of them"
    assert [(f.path.name, f.reason) for f in summary.failed] == [
        ("same.png", f"shares its caption file same.txt with same.webp; {rule}"),
        ("same.webp", f"shares its caption file same.txt with same.png; {rule}"),
    ]
    assert not (tmp_path / "same.txt").exists()


async def test_stems_equal_in_any_case_share_a_caption_file_where_the_file_system_folds_case(
    stub, tmp_path: Path
) -> None:
    """b.png + B.png (and sub/Cat.png + sub/CAT.png): one caption file on macOS or Windows, two
    here. ``case_probe`` answers for the folder's file system; by default it asks this one."""
    _, client = stub
    for name, size in (("b.png", 8), ("B.png", 9), ("c.png", 10), ("sub/Cat.png", 11), ("sub/CAT.png", 12)):
        make_png(tmp_path / name, size)
    asked: list[Path] = []

    def folds(folder: Path) -> bool:
        asked.append(folder)
        return True

    summary = await caption_folder(client, tmp_path, case_probe=folds)
    rule = "neither is captioned, rename one of them"
    assert [(f.path.relative_to(tmp_path).as_posix(), f.reason) for f in summary.failed] == [
        ("B.png", f"shares its caption file B.txt with b.png; {rule}"),
        ("b.png", f"shares its caption file b.txt with B.png; {rule}"),
        ("sub/CAT.png", f"shares its caption file CAT.txt with Cat.png; {rule}"),
        ("sub/Cat.png", f"shares its caption file Cat.txt with CAT.png; {rule}"),
    ]
    assert summary.done == 1 and sorted(p.name for p in tmp_path.rglob("*.txt")) == ["c.txt"]
    assert sorted(asked) == [tmp_path, tmp_path / "sub"]  # once per folder
    summary = await caption_folder(client, tmp_path)  # this disk keeps case apart: five captions
    assert summary.ok and summary.done == 4 and summary.skipped == 1
    for image in ("b.png", "B.png", "sub/Cat.png", "sub/CAT.png"):
        assert (tmp_path / image).with_suffix(".txt").read_text(encoding="utf-8") == expected(
            tmp_path / image
        )


async def test_unreachable_server_stops_the_run(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for i in range(5):
        make_png(tmp_path / f"{i}.png")
    async with AsyncVisionClient(f"http://127.0.0.1:{port}", retry_policy=RetryPolicy(retries=0)) as client:
        summary = await caption_folder(client, tmp_path, concurrency=1)
    assert summary.aborted is not None and "cannot reach" in summary.aborted
    # The image that met the stop is not attempted, not failed (as the folder scripts count it).
    assert (len(summary.failed), summary.not_attempted) == (0, 5)
    assert summary.stop_status == summary.exit_status == 3
    assert list(tmp_path.glob("*.txt")) == []


async def test_an_image_that_keeps_breaking_the_connection_fails_alone(
    aiohttp_server, tmp_path: Path
) -> None:
    """A server that drops the connection on one image (as one that crashes on it and restarts):
    with a wait window that image is sent again a few times, then fails; the run goes on."""
    stub = StubServer()
    poison = make_png(tmp_path / "poison.png", size=11)
    broken = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal broken
        body = await request.json()
        if len(base64.b64decode(body["image"])) == poison.stat().st_size:
            broken += 1
            assert request.transport is not None
            request.transport.abort()  # the client sees the connection break mid-request
            return web.Response()
        return await stub.handle(request)

    app = web.Application()
    app.router.add_post("/process_image", handle)  # no /health: its 404 is an answer too
    running = await aiohttp_server(app)
    good = [make_png(tmp_path / f"good{i}.png", size=8 + i) for i in range(3)]
    notes: list[str] = []
    url = str(running.make_url(""))
    async with AsyncVisionClient(url, retries=0, wait_for_server=30, on_server_wait=notes.append) as client:
        summary = await caption_folder(client, tmp_path, concurrency=2)
    assert summary.aborted is None and summary.done == len(good)
    assert [f.path for f in summary.failed] == [poison]
    assert "broke 6 times" in summary.failed[0].reason
    assert broken == 6
    assert notes == []  # the server answered every probe at once: no outage to report
    assert all(image.with_suffix(".txt").read_text(encoding="utf-8") == expected(image) for image in good)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ext": "png"}, "image extension"),
        ({"mode": "append", "jsonl": "x.jsonl"}, "skip or overwrite"),
        ({"mode": "replace"}, "mode must be"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
async def test_bad_options_are_refused_before_any_work(
    stub, tmp_path: Path, options: dict, message: str
) -> None:
    server, client = stub
    make_png(tmp_path / "a.png")
    with pytest.raises(ValueError, match=message):
        await caption_folder(client, tmp_path, **options)
    assert server.requests == 0


# ---------------------------------------------------------------------------------------------
# Concurrency, JSONL and resume


async def test_requests_run_in_parallel_up_to_concurrency(aiohttp_server, tmp_path: Path) -> None:
    # The first requests are held until three are in: one at a time, the first would wait 30 s
    # alone; the short delay after lets a fourth arrive if the cap were not kept.
    server = StubServer(delay=0.05, together=3)
    app = web.Application()
    app.router.add_post("/process_image", server.handle)
    running = await aiohttp_server(app)
    for i in range(9):
        make_png(tmp_path / f"{i}.png", size=8 + i)
    async with AsyncVisionClient(str(running.make_url(""))) as client:
        summary = await caption_folder(client, tmp_path, concurrency=3)
    assert summary.done == 9
    assert server.max_in_flight == 3


async def test_jsonl_output_and_resume(stub, tmp_path: Path) -> None:
    server, client = stub
    data = tmp_path / "data"
    images = [make_png(data / name, size=8 + i) for i, name in enumerate(["a.png", "sub/b é.png"])]
    out = tmp_path / "out" / "captions.jsonl"
    out.parent.mkdir()  # refused, not made, when missing

    first = await caption_folder(client, data, task="GENERATE_TAGS", jsonl=out)
    assert first.done == 2
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(records, key=lambda r: r["file"]) == [
        {"file": "a.png", "task": "<GENERATE_TAGS>", "caption": expected(images[0]), "model": "stub-default"},
        {
            "file": "sub/b é.png",
            "task": "<GENERATE_TAGS>",
            "caption": expected(images[1]),
            "model": "stub-default",
        },
    ]
    assert list(data.rglob("*.txt")) == []  # the JSONL replaces the caption files

    again = await caption_folder(client, data, task="<generate_tags>", jsonl=out)
    assert (again.done, again.skipped) == (0, 2)
    assert server.requests == 2  # nothing was sent the second time

    other_task = await caption_folder(client, data, task="CAPTION", jsonl=out)
    assert other_task.done == 2
    forced = await caption_folder(client, data, task="GENERATE_TAGS", jsonl=out, mode="overwrite")
    assert forced.done == 2
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6


async def test_jsonl_resume_with_a_model_counts_only_that_models_rows(aiohttp_server, tmp_path: Path) -> None:
    """A second model into the same JSONL captions everything again; each model resumes its own."""
    server = StubServer()
    app = web.Application()
    app.router.add_post("/process_image", server.handle)
    app.router.add_get("/prompts", server.tasks)
    url = str((await aiohttp_server(app)).make_url(""))
    data = tmp_path / "data"
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        make_png(data / name, size=8 + i)
    out = tmp_path / "captions.jsonl"
    # A row of the same task from a server that did not name its model: not "done" for a model.
    out.write_text(
        '{"file": "c.png", "task": "<CAPTION>", "caption": "old", "model": null}\n', encoding="utf-8"
    )

    async def run(model: str | None) -> tuple[int, int]:
        async with AsyncVisionClient(url, model=model, retries=0) as client:
            summary = await caption_folder(client, data, task="caption", jsonl=out)
        return summary.done, summary.skipped

    assert await run("first") == (3, 0)
    assert await run("second") == (3, 0)  # another model's rows do not count for it
    assert await run("first") == (0, 3)  # each model resumes from its own rows
    assert await run("second") == (0, 3)
    assert await run(None) == (0, 3)  # without a model: any row of the task counts, as before
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted((row["model"], row["file"]) for row in rows[1:]) == [
        (model, name) for model in ("first", "second") for name in ("a.png", "b.png", "c.png")
    ]
    assert server.requests == 6


async def test_jsonl_rows_say_null_when_the_server_names_no_model(aiohttp_server, tmp_path: Path) -> None:
    """An original florence2-visionapi server sends no X-Model: the row says so rather than guess."""
    server = StubServer(names_model=False)
    app = web.Application()
    app.router.add_post("/process_image", server.handle)
    app.router.add_get("/prompts", server.tasks)
    running = await aiohttp_server(app)
    image = make_png(tmp_path / "data" / "a.png")
    out = tmp_path / "captions.jsonl"
    async with AsyncVisionClient(str(running.make_url("")), model="asked-for", retries=0) as client:
        summary = await caption_folder(client, tmp_path / "data", jsonl=out)
    assert summary.done == 1
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row == {
        "file": "a.png",
        "task": "<MORE_DETAILED_CAPTION>",
        "caption": expected(image),
        "model": None,
    }


async def test_jsonl_resume_survives_a_torn_last_line(stub, tmp_path: Path) -> None:
    _, client = stub
    make_png(tmp_path / "a.png")
    make_png(tmp_path / "b.png", size=9)
    out = tmp_path / "log.jsonl"
    out.write_text(
        '{"file": "a.png", "task": "<CAPTION>", "caption": "done before"}\n{"file": "b.p', encoding="utf-8"
    )
    summary = await caption_folder(client, tmp_path, task="caption", jsonl=out)
    assert (summary.done, summary.skipped) == (1, 1)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[-1])["file"] == "b.png"  # written on its own line after the torn one


async def test_jsonl_in_a_missing_folder_is_refused_as_the_cli_refuses_it(stub, tmp_path: Path) -> None:
    """The API and ``vision-client folder`` agree: a missing --jsonl folder is a usage error
    (``ValueError``, exit 2 in the CLI) in the same words, not a folder made for a typo."""
    server, client = stub
    make_png(tmp_path / "data" / "a.png")
    out = tmp_path / "typo" / "log.jsonl"
    with pytest.raises(ValueError) as refused:
        await caption_folder(client, tmp_path / "data", task="caption", jsonl=out)
    said = f"folder {out.parent} does not exist; create it first (mkdir -p {out.parent})"
    assert str(refused.value) == f"cannot write the output: {said}"
    assert not out.parent.exists() and server.requests == 0


def test_the_jsonl_writer_makes_no_folder_either(tmp_path: Path) -> None:
    # It made a missing parent folder itself, which caption_folder's refusal above now leaves
    # to the user: one rule, in one place, and no folder made for a typo by any caller.
    out = tmp_path / "typo" / "log.jsonl"
    with pytest.raises(FileNotFoundError):
        JsonlWriter(out)
    assert not out.parent.exists()


# ---------------------------------------------------------------------------------------------
# Safe writes


def test_write_atomic_keeps_the_old_file_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old", encoding="utf-8")

    def interrupted(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new caption")
    assert target.read_text(encoding="utf-8") == "old"
    assert list(tmp_path.iterdir()) == [target]


async def test_cancelled_run_leaves_no_partial_files(aiohttp_server, tmp_path: Path) -> None:
    server = StubServer(delay=0.05)
    app = web.Application()
    app.router.add_post("/process_image", server.handle)
    running = await aiohttp_server(app)
    images = [make_png(tmp_path / f"{i:02}.png", size=8 + i) for i in range(20)]
    async with AsyncVisionClient(str(running.make_url(""))) as client:
        run = asyncio.ensure_future(caption_folder(client, tmp_path, concurrency=2))
        # Cancelled once the first caption is written (a fixed 0.3 s could pass before any on a
        # loaded machine); the other 19 need nine more rounds of 0.05 s at least.
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob("*.txt")):
            assert not run.done() and time.monotonic() < deadline, run
            await asyncio.sleep(0.005)
        run.cancel()  # what Ctrl+C does to the CLI's main task
        with pytest.raises(asyncio.CancelledError):
            await run
        written = list(tmp_path.glob("*.txt"))
        assert 0 < len(written) < len(images)
        assert all(p.read_text(encoding="utf-8") == expected(p.with_suffix(".png")) for p in written)
        assert leftovers(tmp_path) == []

        resumed = await caption_folder(client, tmp_path, concurrency=4)
    assert (resumed.done, resumed.skipped) == (len(images) - len(written), len(written))


async def test_blocking_client_captions_a_folder(aiohttp_server, tmp_path: Path) -> None:
    server = StubServer()
    app = web.Application()
    app.router.add_post("/process_image", server.handle)
    running = await aiohttp_server(app)
    image = make_png(tmp_path / "a.png")

    def run() -> int:
        with VisionClient(str(running.make_url(""))) as client:
            return client.caption_folder(tmp_path, task="caption").done

    assert await asyncio.to_thread(run) == 1
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == expected(image)


# ---------------------------------------------------------------------------------------------
# End to end against the real server


@pytest.fixture(scope="module")
def real_server(tiny_server_url: str) -> str:
    """The module's real ``vision-server serve --model test:tiny`` (see conftest)."""
    return tiny_server_url


async def test_folder_against_real_server(real_server: str, tmp_path: Path) -> None:
    colors = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (240, 240, 240)]
    for i, color in enumerate(colors):
        make_png(tmp_path / f"img {i}.png", size=32, color=color)
    (tmp_path / "corrupt.png").write_bytes(PNG_MAGIC + b"\r\n\x1a\n truncated")
    out = tmp_path / "tags.jsonl"
    quick = RetryPolicy(retries=1, max_retry_after=1.0)  # a broken server fails the test fast
    async with AsyncVisionClient(real_server, retry_policy=quick) as client:
        summary = await caption_folder(client, tmp_path, task="caption", prefix="ohwx, ")
        assert summary.done == len(colors)
        assert [f.path.name for f in summary.failed] == ["corrupt.png"]
        assert "Invalid image data" in summary.failed[0].reason
        for i in range(len(colors)):
            text = (tmp_path / f"img {i}.txt").read_text(encoding="utf-8")
            assert text.startswith("ohwx, ") and len(text) > len("ohwx, ")
        assert not (tmp_path / "corrupt.txt").exists()

        again = await caption_folder(client, tmp_path, task="caption")
        assert (again.done, again.skipped, len(again.failed)) == (0, len(colors), 1)

        tags = await caption_folder(client, tmp_path, task="generate_tags", jsonl=out)
        resumed = await caption_folder(client, tmp_path, task="<GENERATE_TAGS>", jsonl=out)
    assert tags.done == len(colors)
    assert (resumed.done, resumed.skipped) == (0, len(colors))
    assert leftovers(tmp_path) == []


async def test_a_task_the_server_refuses_stops_the_run(real_server: str, tmp_path: Path) -> None:
    # The same 400 would come back for every image: a typo in --task must not send ten thousand
    # requests and list ten thousand failures (the shell script stops too, with exit 7).
    for i in range(12):
        make_png(tmp_path / f"{i:02d}.png", size=16 + i)
    async with AsyncVisionClient(real_server, retry_policy=RetryPolicy(retries=0)) as client:
        summary = await caption_folder(client, tmp_path, task="paint_me_a_picture", concurrency=2)
    assert summary.aborted is not None and "refused the task" in summary.aborted
    assert "Invalid prompt" in summary.aborted and "<CAPTION>" in summary.aborted  # the valid ones
    assert (len(summary.failed), summary.not_attempted, summary.done) == (0, 12, 0)
    assert summary.exit_status == 7
    assert list(tmp_path.glob("*.txt")) == []


async def test_an_api_key_the_server_refuses_stops_the_run(aiohttp_server, tmp_path: Path) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"detail": "Invalid or missing API key"}, status=401)

    app = web.Application()
    app.router.add_post("/process_image", refuse)
    running = await aiohttp_server(app)
    for i in range(6):
        make_png(tmp_path / f"{i}.png")
    async with AsyncVisionClient(str(running.make_url("")), retry_policy=RetryPolicy(retries=0)) as client:
        summary = await caption_folder(client, tmp_path, concurrency=1)
    assert summary.aborted is not None and "refused the API key" in summary.aborted
    assert (len(summary.failed), summary.not_attempted) == (0, 6)
    assert summary.exit_status == 6


async def test_a_server_still_busy_after_the_retries_stops_the_run(aiohttp_server, tmp_path: Path) -> None:
    """Queue full (503 with Retry-After) through every retry: so would every other image be; the
    run stops with exit status 5, as the folder scripts do (it failed each image in turn)."""

    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"detail": "Queue full"}, status=503, headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_post("/process_image", busy)
    running = await aiohttp_server(app)
    for i in range(4):
        make_png(tmp_path / f"{i}.png")
    async with AsyncVisionClient(str(running.make_url("")), retry_policy=RetryPolicy(retries=0)) as client:
        summary = await caption_folder(client, tmp_path, concurrency=1)
    assert summary.aborted == "the server stays busy or unavailable (HTTP 503: Queue full)"
    assert (len(summary.failed), summary.not_attempted, summary.exit_status) == (0, 4, 5)


async def test_a_404_without_a_model_points_to_the_url_only(aiohttp_server, tmp_path: Path) -> None:
    """No vision-server at --url (a path in it, another service): every image would get the same
    404, so the run stops with exit status 2; with no --model given, only --url can be wrong."""
    running = await aiohttp_server(web.Application())  # answers 404 to every route
    for i in range(3):
        make_png(tmp_path / f"{i}.png")
    async with AsyncVisionClient(str(running.make_url("")), retry_policy=RetryPolicy(retries=0)) as client:
        summary = await caption_folder(client, tmp_path, concurrency=1)
    assert summary.aborted is not None and summary.aborted.endswith(
        ": check --url (the server's base address)"
    ), summary.aborted
    assert summary.aborted.startswith("HTTP 404") and ".:" not in summary.aborted
    assert (len(summary.failed), summary.not_attempted, summary.exit_status) == (0, 3, 2)


# ---------------------------------------------------------------------------------------------
# Empty captions and long names


async def test_whitespace_only_caption_is_a_failure(aiohttp_server, tmp_path: Path) -> None:
    """A server that answers ``{"result": "   "}`` must not produce a caption file or exit 0."""

    async def blank(request: web.Request) -> web.Response:
        body = await request.json()
        size = len(base64.b64decode(body["image"]))
        return web.json_response({"result": " \n\t " if size % 2 else f"caption-{size}"})

    app = web.Application()
    app.router.add_post("/process_image", blank)
    running = await aiohttp_server(app)
    images = [make_png(tmp_path / f"{i}.png", size=8 + i) for i in range(6)]
    blanks = [image for image in images if image.stat().st_size % 2]
    assert blanks and len(blanks) < len(images)
    for prefix in ("", "ohwx, "):  # a trigger word alone is no caption either
        async with AsyncVisionClient(str(running.make_url(""))) as client:
            summary = await caption_folder(client, tmp_path, mode="overwrite", prefix=prefix)
        assert sorted(f.path for f in summary.failed) == sorted(blanks)
        assert all("empty caption" in f.reason for f in summary.failed)
        assert not summary.ok and summary.done == len(images) - len(blanks)
        assert all(not image.with_suffix(".txt").exists() for image in blanks)


@pytest.mark.parametrize("stem", ["a" * 248, "é" * 124], ids=["ascii", "two-byte"])
async def test_caption_name_near_name_max(stub, tmp_path: Path, stem: str) -> None:
    """A 248-byte stem: the caption name has 252 bytes, within NAME_MAX, so its temp name must be too."""
    _, client = stub
    assert len(os.fsencode(stem)) == 248
    image = make_png(tmp_path / f"{stem}.png")
    summary = await caption_folder(client, tmp_path)
    assert summary.ok and summary.done == 1, summary.failed
    assert image.with_suffix(".txt").read_text(encoding="utf-8") == expected(image)
    assert leftovers(tmp_path) == []
    write_atomic(image.with_suffix(".txt"), "again")  # and the helper itself, over an existing file
    assert image.with_suffix(".txt").read_text(encoding="utf-8") == "again"


async def test_a_caption_name_too_long_for_the_file_system_fails_that_image(stub, tmp_path: Path) -> None:
    """``--ext caption`` beside a 248-byte stem names a 256-byte file, which no file system
    holds: that image fails with what to do (it is not sent), the others are captioned."""
    server, client = stub
    long_one = make_png(tmp_path / f"{'a' * 248}.png")
    short = make_png(tmp_path / "b.png", size=9)
    summary = await caption_folder(client, tmp_path, ext="caption")
    assert [f.path for f in summary.failed] == [long_one]
    assert "too long for the file system; rename the image to a shorter name" in summary.failed[0].reason
    assert summary.done == 1 and short.with_suffix(".caption").read_text(encoding="utf-8") == expected(short)
    assert server.requests == 1 and leftovers(tmp_path) == []
