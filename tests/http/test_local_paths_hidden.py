"""A model served from a local directory never shows its path to a client.

``/v1/models``' ``source``, the web page's model list, ``GET /model``, ``/model_info`` and
``/v1/status`` gave the directory's path, telling every client the user's name and how the
server's disk is laid out. They now show the served name (a ``model`` id) or ``"local"`` (a
``source``); hub ids and ``test:tiny`` stay as they are.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import ClientResponse, ClientSession, FormData

from tests.support.api import tiny_cache_dir
from tests.support.images import b64, image_bytes
from tests.support.serving import client_for
from vision_server.settings import Settings

ADMIN = "admin-secret"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
# Every GET a client (or the web page) reads that names or describes a model.
READS = (
    "/model",
    "/model_info",
    "/model_info?model=florence",
    "/prompts",
    "/tasks",
    "/v1/models",
    "/models",
    "/v1/models/florence",
    "/v1/status",
    "/health",
    "/ready",
    "/metrics",
    "/api/modules",
    "/ui/api/info",
    "/ui/api/status",
)


@pytest.fixture
def private_dir(tiny_native_dir: Path, tmp_path: Path) -> Path:
    """The tiny model at a path that names a user and a disk layout a client must not learn."""
    folder = tmp_path / "home" / "private-user-4711" / "models" / "florence"
    folder.parent.mkdir(parents=True)
    folder.symlink_to(tiny_native_dir, target_is_directory=True)
    return folder


def _settings(tmp_path_factory: pytest.TempPathFactory, *models: str) -> Settings:
    return Settings(
        model=models,
        cache_dir=tiny_cache_dir(tmp_path_factory),
        idle_timeout=-1,
        max_new_tokens=4,
        admin_key=ADMIN,
    )


async def _body(response: ClientResponse) -> str:
    text = await response.text()
    assert response.status == 200, (response.url.path, text)
    return text


async def _read_all(session: ClientSession) -> dict[str, str]:
    bodies = {}
    for path in READS:
        async with session.get(path) as response:
            bodies[path] = await _body(response)
    return bodies


async def _caption_everywhere(session: ClientSession) -> dict[str, str]:
    """One caption through each family (which loads the model), and the admin routes' answers."""
    bodies = {}
    async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as response:
        bodies["/process_image"] = await _body(response)
    chat = {
        "model": "florence",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(2)}"}}],
            }
        ],
    }
    async with session.post("/v1/chat/completions", json=chat) as response:
        bodies["/v1/chat/completions"] = await _body(response)
    for path in ("/caption", "/ui/api/caption"):
        form = FormData()
        form.add_field("image", image_bytes(3), filename="a.png", content_type="image/png")
        async with session.post(path, data=form) as response:
            bodies[path] = await _body(response)
    for path in ("/v1/model/load", "/v1/model/unload"):
        async with session.post(path, headers=ADMIN_HEADERS) as response:
            bodies[path] = await _body(response)
    return bodies


async def test_no_reply_holds_the_local_directory_path(
    private_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory, str(private_dir), "test:tiny")
    async with client_for(settings) as session:
        before = await _read_all(session)
        captions = await _caption_everywhere(session)
        async with session.post("/v1/model/load", headers=ADMIN_HEADERS) as response:
            assert response.status == 200
        after = await _read_all(session)
    for when, bodies in (("unloaded", before), ("captioning", captions), ("loaded", after)):
        for path, body in bodies.items():
            assert "private-user-4711" not in body, f"{when}: {path} shows the model's path: {body}"


async def test_a_local_directory_shows_as_its_served_name_and_local_beside_a_test_model(
    private_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory, str(private_dir), "test:tiny")
    async with client_for(settings) as session:
        async with session.get("/model") as response:
            assert await response.json() == "florence"  # still a bare JSON string
        async with session.get("/v1/models") as response:
            listed = (await response.json())["data"]
        assert [(m["id"], m["source"]) for m in listed] == [("florence", "local"), ("test:tiny", "test:tiny")]
        async with session.get("/model_info") as response:
            assert (await response.json())["model"] == "florence"
        async with session.get("/model_info?model=test:tiny") as response:
            assert (await response.json())["model"] == "test:tiny"
        async with session.get("/v1/status") as response:
            status = await response.json()
        assert status["model"] == "florence"
        assert [(m["name"], m["source"]) for m in status["models"]] == [
            ("florence", "local"),
            ("test:tiny", "test:tiny"),
        ]
        async with session.get("/ui/api/info") as response:
            info = await response.json()
        assert info["model"] == "florence"
        assert [(m["name"], m["source"]) for m in info["models"]] == [
            ("florence", "local"),
            ("test:tiny", "test:tiny"),
        ]
        # the path still picks the model, as before
        body = {"image": b64(4), "prompt": "<CAPTION>", "model": str(private_dir)}
        async with session.post("/process_image", json=body) as response:
            assert response.status == 200 and response.headers["X-Model"] == "florence"


async def test_a_named_local_directory_shows_its_name(
    private_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory, f"fast={private_dir}")
    async with client_for(settings) as session:
        async with session.get("/model") as response:
            assert await response.json() == "fast"
        async with session.get("/v1/models/fast") as response:
            entry = await response.json()
        assert (entry["id"], entry["source"]) == ("fast", "local")


async def test_a_load_error_names_the_model_not_its_path(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A local model that fails to load: the 503 and the open status say why by its served name;
    the operator's log line keeps the path."""
    folder = tmp_path / "home" / "private-user-4711" / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "not-a-captioner"}')
    settings = _settings(tmp_path_factory, str(folder))
    async with client_for(settings) as session:
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as response:
            assert response.status == 503
            detail = (await response.json())["detail"]
        async with session.get("/v1/status") as response:
            status = await response.json()
    assert "private-user-4711" not in detail, detail
    assert detail.startswith("The model could not be loaded: broken: unsupported model"), detail
    for error in (status["last_error"], status["models"][0]["last_error"]):
        assert error.startswith("broken: unsupported model") and "private-user-4711" not in error, error
    assert any(str(folder) in record.getMessage() for record in caplog.records)  # the log keeps it
