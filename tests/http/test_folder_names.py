"""A local model directory served without ``NAME=`` is named after its folder, not its path.

Its path showed in ``/v1/models``, the ``X-Model`` header and SillyTavern's model list, telling
every client the user's name and the server's disk layout. The path still picks the model, so a
client or a script that sent it keeps working.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import ClientSession

from tests.support.images import b64
from tests.support.serving import client_for
from vision_server.settings import Settings, load_settings


@pytest.fixture
def two_finals(tiny_native_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model as two run folders both called ``final`` (as training runs leave them)."""
    finals = (tmp_path / "runs" / "a" / "final", tmp_path / "runs" / "b" / "final")
    for final in finals:
        final.parent.mkdir(parents=True)
        final.symlink_to(tiny_native_dir, target_is_directory=True)
    return finals


async def caption(session: ClientSession, model: str) -> tuple[int, str | None, dict[str, object]]:
    body = {"image": b64(1), "prompt": "<CAPTION>", "model": model}
    async with session.post("/process_image", json=body) as response:
        return response.status, response.headers.get("X-Model"), await response.json()


async def test_two_unnamed_folders_are_served_under_folder_names_and_still_taken_by_path(
    two_finals: tuple[Path, Path], tmp_path: Path
) -> None:
    first, second = two_finals
    settings = Settings(
        model=(str(first), str(second)), cache_dir=tmp_path / "cache", idle_timeout=-1, max_new_tokens=4
    )
    async with client_for(settings) as session:
        async with session.get("/v1/models") as response:
            listed = await response.json()
        assert [model["id"] for model in listed["data"]] == ["a/final", "b/final"]
        assert [model["default"] for model in listed["data"]] == [True, False]
        status, header, _ = await caption(session, "b/final")
        assert (status, header) == (200, "b/final")
        # the path, the name before folder names, still picks the model; the reply names it
        status, header, _ = await caption(session, str(second))
        assert (status, header) == (200, "b/final")
        async with session.get("/v1/models/" + quote(str(first), safe="")) as response:
            assert response.status == 200 and (await response.json())["id"] == "a/final"
        status, header, refusal = await caption(session, "final")
        assert status == 404 and header is None
        assert "Served: a/final, b/final" in str(refusal) and str(tmp_path) not in str(refusal)


async def test_one_unnamed_folder_is_named_after_it_everywhere_a_client_sees_its_name(
    two_finals: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = two_finals[0]
    (tmp_path / "config.toml").write_text("")
    flags = {"model": (str(folder),), "revision": (f"{folder}:main",), "default_model": str(folder)}
    settings = load_settings(flags, environ={}, config_path=tmp_path / "config.toml")
    # NAME:VALUE entries and --default-model by the path still name the model
    assert [(spec.name, spec.revision) for spec in settings.model_specs] == [("final", "main")]
    assert settings.default_model_name == "final"
    local = Settings(model=(str(folder),), cache_dir=tmp_path / "cache", idle_timeout=-1, max_new_tokens=4)
    async with client_for(local) as session:
        async with session.get("/v1/models") as response:
            assert [model["id"] for model in (await response.json())["data"]] == ["final"]
        status, header, _ = await caption(session, "gpt-4-turbo")  # one model: any name, as before
        assert (status, header) == (200, "final")
        async with session.get("/v1/status") as response:
            status_body = await response.json()
        assert [model["name"] for model in status_body["models"]] == ["final"]
        assert status_body["model"] == "final"  # the default model's served name: not its path
