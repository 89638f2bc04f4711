"""The web page and the gallery routes over HTTP (real app on a port, fake captioner).

``/`` gives browsers the page and everybody else what they got before the page existed; the page
travels with a CSP that forbids inline script and other origins; every way of naming a path
outside the gallery root is a 404; saving is refused on a read-only gallery and atomic otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import io
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from PIL import Image
from yarl import URL

from tests.support import hidden_names
from tests.support.gallery_data import XSS, GalleryData, make_gallery
from tests.support.serving import running_server
from vision_server.api.gallery import gallery_from
from vision_server.captionfiles import A_FOLDER_NOT_A_CAPTION, printable
from vision_server.gallery.thumbs import make_thumbnail
from vision_server.settings import Settings, SettingsError
from vision_server.testing.fake import FakeCaptioner

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
KEY = "ui-route-test-key"


@pytest.fixture
def data(tmp_path: Path) -> GalleryData:
    return make_gallery(tmp_path)


def gallery_settings(data: GalleryData, tmp_path: Path, **overrides: object) -> Settings:
    base = Settings(
        cache_dir=tmp_path / "cache", gallery=data.root, gallery_jsonl=data.jsonl, gallery_page_size=3
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def session(data: GalleryData, tmp_path: Path) -> AsyncIterator[ClientSession]:
    settings = gallery_settings(data, tmp_path, gallery_writable=True)
    async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as client:
        yield client


# --- the page at / ---------------------------------------------------------------------------------


async def test_root_gives_browsers_the_page_with_a_strict_csp(tmp_path: Path) -> None:
    async with running_server(Settings(cache_dir=tmp_path), FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            async with client.get("/", headers=HTML) as response:
                assert response.status == 200 and response.content_type == "text/html"
                page = await response.text()
                csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert '<script type="module" src="/ui/app.js">' in page and "<script>" not in page
            for name in ("app.js", "api.js", "gallery.js", "app.css"):
                async with client.get(f"/ui/{name}") as response:
                    assert response.status == 200, name
                    assert response.headers["Content-Security-Policy"] == csp
            async with client.get("/ui/nope.js") as response:
                assert response.status == 404


@pytest.mark.parametrize("accept", [None, "application/json", "*/*"])
async def test_root_answers_other_clients_as_before(tmp_path: Path, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    replies = []
    for ui in (True, False):
        async with running_server(Settings(cache_dir=tmp_path, ui=ui), FakeCaptioner()) as url:
            async with ClientSession(url) as client, client.get("/", headers=headers) as response:
                replies.append((response.status, await response.json()))
    assert replies[0] == replies[1] == (404, {"detail": "Not Found"})


async def test_no_ui_serves_no_page(tmp_path: Path) -> None:
    async with running_server(Settings(cache_dir=tmp_path, ui=False), FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            for path in ("/", "/ui/app.js", "/ui/api/info"):
                async with client.get(path, headers=HTML) as response:
                    assert response.status == 404, path


async def test_with_a_key_the_page_loads_but_its_data_needs_the_key(tmp_path: Path) -> None:
    async with running_server(Settings(cache_dir=tmp_path, api_key=KEY), FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            async with client.get("/", headers=HTML) as response:
                assert response.status == 200
            async with client.get("/ui/app.js") as response:
                assert response.status == 200
            async with client.get("/", headers={"Accept": "application/json"}) as response:
                assert response.status == 401  # as before the page existed
            async with client.get("/ui/api/info") as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
            async with client.get("/ui/api/info", headers={"Authorization": f"Bearer {KEY}"}) as response:
                assert response.status == 200 and (await response.json())["gallery"] is None


# --- the gallery -----------------------------------------------------------------------------------


async def test_pages_search_and_sources(session: ClientSession, data: GalleryData) -> None:
    async with session.get("/ui/api/gallery") as response:
        first = await response.json()
    assert (first["total"], first["pages"], first["page_size"]) == (7, 3, 3)
    assert [item["path"] for item in first["items"]] == list(data.names[:3])
    async with session.get("/ui/api/gallery", params={"page": "3"}) as response:
        assert [item["path"] for item in (await response.json())["items"]] == list(data.names[6:])
    sources = {s["name"]: s for s in first["items"][0]["sources"]}
    assert sources[".txt"]["text"] == "a red cat on a sofa"
    assert sources["jsonl <CAPTION>"]["text"] == "jsonl says cat"
    assert {s["name"]: s["text"] for s in first["items"][1]["sources"]} == {
        ".txt": XSS,
        ".tags": f"tags {XSS}",
    }
    assert {s["name"] for s in first["items"][2]["sources"]} == {".txt", ".generate_tags.txt"}
    searches = {
        ("cat", "all", "any"): ["img00.png"],
        ("sub/", "name", "any"): ["sub/img05.png", "sub/img06.png"],
        ("sub/", "caption", "any"): [],
        ("TREE", "caption", "any"): ["img02.png"],
        ("", "all", "with"): ["img00.png", "img01.png"],
    }
    for (q, field, has), expected in searches.items():
        async with session.get("/ui/api/gallery", params={"q": q, "field": field, "has": has}) as response:
            found = await response.json()
        assert [item["path"] for item in found["items"]] == expected, (q, field, has)
    async with session.get("/ui/api/gallery", params={"field": "everywhere"}) as response:
        assert response.status == 400 and "field" in (await response.json())["error"]["message"]


async def test_save_writes_the_file_atomically(session: ClientSession, data: GalleryData) -> None:
    body = {"path": "img03.png", "source": ".txt", "text": "a new caption"}
    async with session.post("/ui/api/gallery/save", json=body) as response:
        assert response.status == 200
        item = await response.json()
    assert (data.root / "img03.txt").read_text(encoding="utf-8") == "a new caption"
    assert {s["name"]: s["text"] for s in item["sources"]}[".txt"] == "a new caption"
    assert not [p.name for p in data.root.iterdir() if p.name.startswith(".vision-caption")]
    bad = {"path": "img03.png", "source": ".png", "text": "x"}
    async with session.post("/ui/api/gallery/save", json=bad) as response:
        assert response.status == 400
    assert (data.root / "img03.png").read_bytes()[:4] == b"\x89PNG"


async def test_read_only_gallery_refuses_saves_with_a_message(data: GalleryData, tmp_path: Path) -> None:
    async with running_server(gallery_settings(data, tmp_path), FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            body = {"path": "img00.png", "source": ".txt", "text": "changed"}
            async with client.post("/ui/api/gallery/save", json=body) as response:
                assert response.status == 403
                assert "--gallery-writable" in (await response.json())["error"]["message"]
            recaption = {"paths": ["img00.png"], "task": "caption", "save": True}
            async with client.post("/ui/api/gallery/recaption", json=recaption) as response:
                assert response.status == 403
    assert (data.root / "img00.txt").read_text(encoding="utf-8") == "a red cat on a sofa"


async def test_recaption_and_export(session: ClientSession, data: GalleryData) -> None:
    body = {"paths": ["img03.png", "img04.png"], "task": "caption", "save": True}
    async with session.post("/ui/api/gallery/recaption", json=body) as response:
        assert response.status == 200, await response.text()
        reply = await response.json()
    captions = {r["path"]: r["caption"] for r in reply["results"]}
    assert set(captions) == {"img03.png", "img04.png"} and all(
        c.startswith("caption ") for c in captions.values()
    )
    assert (data.root / "img04.txt").read_text(encoding="utf-8") == captions["img04.png"]
    async with session.post("/ui/api/gallery/export", json={"paths": ["img04.png", "img00.png"]}) as response:
        assert response.status == 200 and "attachment" in response.headers["Content-Disposition"]
        rows = [json.loads(line) for line in (await response.text()).splitlines()]
    assert [row["file_name"] for row in rows] == ["img04.png", "img00.png"]
    assert (
        rows[0]["caption"] == captions["img04.png"]
        and rows[0]["sources"]["<CAPTION>"] == captions["img04.png"]
    )
    assert (
        rows[1]["caption"] == "a red cat on a sofa"
        and rows[1]["sources"]["jsonl <CAPTION>"] == "jsonl says cat"
    )


async def test_recaption_refuses_a_file_over_the_size_limit_unread(data: GalleryData, tmp_path: Path) -> None:
    """A dataset file larger than an upload may be (a video renamed .png) is refused by its size,
    named in its result, before it is read; the other images of the request are captioned."""
    limit = 1024 * 1024
    huge = data.root / "huge.png"
    with huge.open("wb") as file:
        file.truncate(3 * limit)  # sparse: no disk space taken
    settings = gallery_settings(data, tmp_path, max_request_bytes=limit)
    async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as client:
        body = {"paths": ["huge.png", "img03.png"], "task": "caption"}
        async with client.post("/ui/api/gallery/recaption", json=body) as response:
            assert response.status == 200, await response.text()
            results = {r["path"]: r for r in (await response.json())["results"]}
    error = results["huge.png"]["error"]
    assert "is 3.0 MiB" in error and "over the 1.0 MiB an image may be (--max-request-bytes)" in error
    assert results["img03.png"]["caption"].startswith("caption ")


async def test_thumbnails_are_made_and_cached(session: ClientSession, tmp_path: Path) -> None:
    async with session.get("/ui/api/gallery/thumb", params={"path": "sub/img05.png"}) as response:
        assert response.status == 200 and response.content_type == "image/jpeg"
        first = await response.read()
    cached = list((tmp_path / "cache" / "gallery-thumbs").rglob("*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    async with session.get("/ui/api/gallery/thumb", params={"path": "sub/img05.png"}) as response:
        assert await response.read() == first
    async with session.get("/ui/api/gallery/image", params={"path": "img00.png"}) as response:
        assert response.status == 200 and (await response.read())[:4] == b"\x89PNG"


async def test_a_caption_file_that_cannot_be_written_is_named(
    session: ClientSession, data: GalleryData
) -> None:
    """A folder where the caption file belongs (a read-only dataset, no permission fail alike)
    used to be a bare 'internal server error'; now the reply names the file and the reason."""
    (data.root / "img03.txt").mkdir()
    body = {"path": "img03.png", "source": ".txt", "text": "new caption"}
    async with session.post("/ui/api/gallery/save", json=body) as response:
        error = (await response.json())["error"]
    assert response.status == 500 and error["code"] == "caption_file_unwritable"
    assert "caption file img03.txt of img03.png" in error["message"], error
    recaption = {"paths": ["img03.png", "img04.png"], "task": "caption", "save": True}
    async with session.post("/ui/api/gallery/recaption", json=recaption) as response:
        assert response.status == 200, await response.text()
        results = {r["path"]: r for r in (await response.json())["results"]}
    assert "img03.txt" in results["img03.png"]["error"] and results["img03.png"]["caption"]
    assert "error" not in results["img04.png"]  # the others are saved as before
    assert (data.root / "img04.txt").read_text(encoding="utf-8") == results["img04.png"]["caption"]


async def test_dataset_files_are_never_sniffed_or_run(data: GalleryData, session: ClientSession) -> None:
    """A dataset file named like an image may hold anything (here HTML with a script): served
    from the page's own origin, it must never be taken for a document or run script."""
    (data.root / "trap.png").write_bytes(b"<html><script>alert(document.domain)</script></html>")
    for route in ("image", "thumb"):
        name = "trap.png" if route == "image" else "img00.png"
        async with session.get(f"/ui/api/gallery/{route}", params={"path": name}) as response:
            assert response.status == 200 and response.content_type.startswith("image/")
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "sandbox" in response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]


async def test_thumbnails_open_only_the_caption_formats(data: GalleryData, session: ClientSession) -> None:
    """A ``.png`` that holds another format (PCX here; EPS would run Ghostscript) is refused
    before any other Pillow plugin parses it, as a caption request's bytes are."""
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(picture, "PCX")
    (data.root / "other.png").write_bytes(picture.getvalue())
    async with session.get("/ui/api/gallery/thumb", params={"path": "other.png"}) as response:
        assert response.status == 400
        assert "not in a supported image format (PNG, JPEG" in (await response.json())["error"]["message"]


async def test_the_thumbnail_cache_stays_under_its_cap(data: GalleryData, tmp_path: Path) -> None:
    sizes = [len(make_thumbnail(data.root / name, 10**8)) for name in data.names]
    cap = sum(sizes) // 2
    settings = gallery_settings(data, tmp_path, thumbnail_cache_size=str(cap))
    async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as client:
        for name in data.names:
            async with client.get("/ui/api/gallery/thumb", params={"path": name}) as response:
                assert response.status == 200 and response.content_type == "image/jpeg"
    cached = list((tmp_path / "cache" / "gallery-thumbs").rglob("*.jpg"))
    assert 0 < len(cached) < len(data.names)
    assert sum(path.stat().st_size for path in cached) <= cap


TRAVERSALS = [
    "../secret.txt",
    "../secret.png",
    "sub/../../secret.png",
    "/etc/passwd",
    "//etc/passwd",
    "escape.png",  # a symlinked image leading out of the root
    "up/secret.png",  # through a symlinked folder leading out
    "up/dataset/img00.png",  # ... and back in: still not a listed path
    "..\\secret.png",
    "C:/Windows/win.ini",
    "./img00.png",
    "sub//img05.png",
    "img00.png\x00.txt",
    "%2e%2e/secret.png",  # arrives as this literal text (decoded once): no such image
    "notes.md",  # in the root, but not an image
    "missing.png",
]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_paths_outside_the_gallery_are_404(
    session: ClientSession, data: GalleryData, path: str
) -> None:
    for route in ("thumb", "image"):
        async with session.get(f"/ui/api/gallery/{route}", params={"path": path}) as response:
            assert response.status == 404, (route, path, await response.text())
    for route, body in (
        ("save", {"path": path, "source": ".txt", "text": "pwned"}),
        ("recaption", {"paths": [path], "task": "caption", "save": True}),
        ("export", {"paths": ["img00.png", path]}),
    ):
        async with session.post(f"/ui/api/gallery/{route}", json=body) as response:
            assert response.status == 404, (route, path, await response.text())
    assert data.outside.read_text(encoding="utf-8") == "outside the gallery"
    assert not (data.root.parent / "secret.txt.tmp").exists()


@pytest.mark.parametrize(
    "raw",
    [
        "/ui/api/gallery/thumb?path=..%2Fsecret.png",
        "/ui/api/gallery/thumb?path=%2E%2E%2Fsecret.png",
        "/ui/api/gallery/thumb?path=%252e%252e%252fsecret.png",
        "/ui/api/gallery/image?path=%2Fetc%2Fpasswd",
        "/ui/api/gallery/image?path=..%5Csecret.png",
        "/ui/api/gallery/image?path=sub%2F..%2F..%2Fsecret.png",
        "/ui/api/gallery/image?path=img00.png%00",
        "/ui/api/gallery/../../secret.png",
        "/ui/api/gallery/%2e%2e/%2e%2e/secret.png",
        "/ui/..%2f..%2fsecret.txt",
    ],
)
async def test_encoded_traversals_are_404(session: ClientSession, raw: str) -> None:
    async with session.get(URL(raw, encoded=True)) as response:
        assert response.status == 404, (raw, await response.text())


async def test_recaption_waits_in_the_bulk_lane(data: GalleryData, tmp_path: Path) -> None:
    settings = gallery_settings(data, tmp_path, max_batch_size=1)
    async with running_server(settings, FakeCaptioner(delay=0.2)) as url, ClientSession(url) as client:
        body = {"paths": list(data.names[:5]), "task": "caption"}
        request = asyncio.ensure_future(client.post("/ui/api/gallery/recaption", json=body))
        lanes: dict[str, int] = {}
        for _ in range(200):
            async with client.get("/v1/status") as response:
                lanes = (await response.json())["lane_depths"]
            if lanes["bulk"] or request.done():
                break
            await asyncio.sleep(0.01)
        async with await request as response:
            assert response.status == 200
        assert lanes["bulk"] >= 1 and lanes["interactive"] == 0, lanes


async def test_a_caption_file_linked_out_of_the_root_is_neither_read_nor_followed(
    session: ClientSession, data: GalleryData
) -> None:
    (data.root / "img04.txt").symlink_to(data.outside)
    async with session.get("/ui/api/gallery", params={"q": "img04", "field": "name"}) as response:
        (item,) = (await response.json())["items"]
    assert {s["name"]: s["text"] for s in item["sources"]} == {".txt": None}
    body = {"path": "img04.png", "source": ".txt", "text": "written in the dataset"}
    async with session.post("/ui/api/gallery/save", json=body) as response:
        assert response.status == 200
    assert not (data.root / "img04.txt").is_symlink()
    assert (data.root / "img04.txt").read_text(encoding="utf-8") == "written in the dataset"
    assert data.outside.read_text(encoding="utf-8") == "outside the gallery"


async def test_caption_files_the_gallery_writes_follow_the_dataset_rules(
    data: GalleryData, tmp_path: Path
) -> None:
    """A model's caption is saved on one line (every dataset tool's rule); the user's own text
    as typed (several lines are alternative captions to kohya-ss and OneTrainer); images that
    share a caption file (``a.jpg`` + ``a.png`` -> ``a.txt``) get none: a 409 or a per-image
    error naming the other image, and no file."""
    for name in ("twin.jpg", "twin.png"):
        (data.root / name).write_bytes((data.root / "img00.png").read_bytes())
    settings = gallery_settings(data, tmp_path, gallery_writable=True)
    multi = "A cat.\nIt sleeps on a red sofa.\r\n\r\nThe end.\rReally."
    async with running_server(settings, FakeCaptioner(text=multi)) as url, ClientSession(url) as client:
        body = {"paths": ["img03.png", "twin.png"], "task": "caption", "save": True}
        async with client.post("/ui/api/gallery/recaption", json=body) as response:
            assert response.status == 200, await response.text()
            results = {r["path"]: r for r in (await response.json())["results"]}
        assert results["img03.png"]["caption"] == multi  # the reply keeps it as the model wrote it
        one_line = "A cat. It sleeps on a red sofa.  The end. Really."
        assert (data.root / "img03.txt").read_text(encoding="utf-8") == one_line
        shared = "shares its caption file twin.txt with twin.jpg; neither is captioned, rename one of them"
        assert results["twin.png"] == {"path": "twin.png", "error": shared}

        typed = {"path": "img04.png", "source": ".txt", "text": "first caption\nsecond caption"}
        async with client.post("/ui/api/gallery/save", json=typed) as response:
            assert response.status == 200
        assert (data.root / "img04.txt").read_text(encoding="utf-8") == "first caption\nsecond caption"

        for source in (".txt", ".tags"):
            edit = {"path": "twin.jpg", "source": source, "text": "a cat"}
            async with client.post("/ui/api/gallery/save", json=edit) as response:
                assert response.status == 409
                message = (await response.json())["error"]["message"]
            assert message == f"twin.jpg shares its caption file twin{source} with twin.png; " + (
                "neither is captioned, rename one of them"
            )
    assert sorted(p.name for p in data.root.glob("twin.*")) == ["twin.jpg", "twin.png"]


async def test_a_full_disk_fails_the_save_alone_and_the_server_goes_on(tmp_path: Path) -> None:
    """The dataset's disk and the thumbnail cache's are full, for real (small tmpfs mounts): the
    save is a 500 that names the file and "No space left", with the request id; the old caption
    and no temp file stay; a thumbnail is still served (its cache only costs speed); the server
    keeps answering."""
    from tests.support.full_disk import fill, small_disk

    with small_disk(tmp_path / "data", "2m") as disk, small_disk(tmp_path / "cache", "256k") as cache:
        data = make_gallery(disk)
        fill(disk)
        fill(cache)
        settings = gallery_settings(data, tmp_path, cache_dir=cache, gallery_writable=True)
        async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as client:
            body = {"path": "img00.png", "source": ".txt", "text": "a new caption"}
            async with client.post("/ui/api/gallery/save", json=body) as response:
                error = (await response.json())["error"]
                request_id = response.headers["X-Request-ID"]
            async with client.get("/ui/api/gallery/thumb", params={"path": "img03.png"}) as thumb:
                assert thumb.status == 200 and thumb.content_type == "image/jpeg"
            async with client.get("/health") as health:
                assert health.status == 200
        assert response.status == 500 and error["code"] == "caption_file_unwritable"
        assert "img00.txt" in error["message"] and "No space left" in error["message"], error
        assert error["request_id"] == request_id
        assert (data.root / "img00.txt").read_text(encoding="utf-8") == "a red cat on a sofa"
        assert not [path for path in disk.rglob("*") if path.name.endswith(".tmp")]


async def test_hidden_files_and_folders_are_not_in_the_gallery(tmp_path: Path) -> None:
    """The gallery shows the images the dataset tools caption: no Jupyter checkpoint, thumbnail
    cache, trash or dot-named file among them, and none of those can be opened or saved by
    name either. The gallery's root may be hidden itself."""
    root = hidden_names.make_tree(tmp_path / ".data")
    settings = Settings(cache_dir=tmp_path / "cache", gallery=root, gallery_writable=True)
    async with running_server(settings, FakeCaptioner()) as url, ClientSession(url) as client:
        async with client.get("/ui/api/gallery") as response:
            listed = await response.json()
        assert [item["path"] for item in listed["items"]] == list(hidden_names.VISIBLE)
        for name in (*hidden_names.HIDDEN_IMAGES, ".link.png", "sub/.linked/b-thumb.png"):
            async with client.get("/ui/api/gallery/image", params={"path": name}) as response:
                assert response.status == 404, name
            body = {"path": name, "source": ".txt", "text": "a checkpoint copy"}
            async with client.post("/ui/api/gallery/save", json=body) as response:
                assert response.status == 404, name
    assert hidden_names.files_below(root) == {
        *hidden_names.VISIBLE, *hidden_names.HIDDEN_IMAGES, *hidden_names.HIDDEN_LINKS
    }  # fmt: skip


async def test_a_caption_file_is_named_relative_to_the_gallery_and_printable(
    data: GalleryData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An image in a sub-folder whose name holds a line break and a byte that is not UTF-8: the
    reply named its caption file by its bare name, and the server's log line held the raw path
    (the line break splits the line for any handler that does not escape it; the byte came out
    as ``\\udce9``). Both now name it as every report does (``\\n``, ``\\xe9``)."""
    stem = os.fsdecode(b"two\nlines caf\xe9")
    try:
        (data.root / "sub" / f"{stem}.png").write_bytes((data.root / "img00.png").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    (data.root / "sub" / f"{stem}.txt").mkdir()  # a folder where its caption file belongs
    shown = "sub/two\\nlines caf\\xe9"
    caplog.set_level(logging.WARNING, logger="vision_server")
    settings = gallery_settings(data, tmp_path, gallery_writable=True)
    async with running_server(settings, FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            body = {"path": f"sub/{stem}.png", "source": ".txt", "text": "new caption"}
            async with client.post("/ui/api/gallery/save", json=body) as response:
                error = (await response.json())["error"]
    assert response.status == 500 and error["code"] == "caption_file_unwritable"
    assert error["message"] == (
        f"Cannot write the caption file {shown}.txt of {shown}.png: {shown}.txt {A_FOLDER_NOT_A_CAPTION}."
    )
    (logged,) = [r.getMessage() for r in caplog.records if "cannot write the caption" in r.getMessage()]
    target = printable(str(data.root / "sub" / f"{stem}.txt"))
    why = f"two\\nlines caf\\xe9.txt {A_FOLDER_NOT_A_CAPTION}"
    assert logged == f"gallery: cannot write the caption file {target}: {why}"
    assert "\n" not in logged and logged.isprintable()


async def test_images_sharing_a_caption_file_in_a_sub_folder_are_named_from_the_root(
    data: GalleryData, tmp_path: Path
) -> None:
    """The image was ``sub/twin.jpg`` but its caption file and the other image bare names, as if
    they lay at the top of the gallery."""
    for name in ("twin.jpg", "twin.png"):
        (data.root / "sub" / name).write_bytes((data.root / "img00.png").read_bytes())
    settings = gallery_settings(data, tmp_path, gallery_writable=True)
    async with running_server(settings, FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            edit = {"path": "sub/twin.jpg", "source": ".txt", "text": "a cat"}
            async with client.post("/ui/api/gallery/save", json=edit) as response:
                assert response.status == 409
                message = (await response.json())["error"]["message"]
            body = {"paths": ["sub/twin.png"], "task": "caption", "save": True}
            async with client.post("/ui/api/gallery/recaption", json=body) as response:
                (result,) = (await response.json())["results"]
    rule = "neither is captioned, rename one of them"
    assert message == f"sub/twin.jpg shares its caption file sub/twin.txt with sub/twin.png; {rule}"
    assert result["error"] == f"shares its caption file sub/twin.txt with sub/twin.jpg; {rule}"


async def test_a_404_names_the_image_it_could_not_find(session: ClientSession) -> None:
    """A re-caption or export of many images said only "No such image in the gallery.", not
    which one; a path out of the root gets the same words as a missing file."""
    for missing, shown in (("sub/gone\n.png", "sub/gone\\n.png"), ("escape.png", "escape.png")):
        for route in ("recaption", "export"):
            body = {"paths": ["img03.png", missing], "task": "caption"}
            async with session.post(f"/ui/api/gallery/{route}", json=body) as response:
                assert response.status == 404
                error = (await response.json())["error"]
            assert error["message"] == f"No such image in the gallery: {shown}.", route
    async with session.get("/ui/api/gallery/thumb", params={"path": "x" * 500}) as response:
        assert (await response.json())["error"][
            "message"
        ] == f"No such image in the gallery: {'x' * 199}….", "a long path is cut"


async def test_a_jsonl_that_cannot_be_read_leaves_the_gallery_listing(
    data: GalleryData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``--gallery-jsonl`` file turned into a folder while the server ran: every page was a
    bare 500 and the log a traceback. Now the pages list without its captions, and the log
    names the file and the reason once."""
    caplog.set_level(logging.WARNING, logger="vision_server")
    async with running_server(gallery_settings(data, tmp_path), FakeCaptioner()) as url:
        async with ClientSession(url) as client:
            async with client.get("/ui/api/gallery") as response:
                first = await response.json()
            assert "jsonl <CAPTION>" in {s["name"] for s in first["items"][0]["sources"]}
            data.jsonl.unlink()
            data.jsonl.mkdir()
            for _ in range(2):
                async with client.get("/ui/api/gallery") as response:
                    assert response.status == 200, await response.text()
                    listed = await response.json()
                assert [s["name"] for s in listed["items"][0]["sources"]] == [".txt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"gallery: cannot read the --gallery-jsonl file {data.jsonl}: {os.strerror(errno.EISDIR)}; "
        "its captions are not shown"
    ]


def test_a_start_up_error_names_the_folder_on_one_line(tmp_path: Path) -> None:
    """A gallery path with a line break in it split the one line the start-up error is."""
    folder, jsonl = tmp_path / "two\nlines", tmp_path / "x\n.jsonl"
    for settings, said in (
        (Settings(cache_dir=tmp_path, gallery=folder), f"gallery {printable(str(folder))} is not a folder"),
        (
            Settings(cache_dir=tmp_path, gallery=tmp_path, gallery_jsonl=jsonl),
            f"gallery_jsonl {printable(str(jsonl))} is not a file",
        ),
    ):
        with pytest.raises(SettingsError) as refused:
            gallery_from(settings)
        assert str(refused.value) == said
        assert "\n" not in str(refused.value)
