"""The server builds its models from the settings (``--model NAME=SOURCE[+ADAPTER]``,
``--default-model``, ``--idle-timeout NAME:SECONDS``, ``--memory-budget``) and serves each by name."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.api import tiny_cache_dir
from tests.support.images import b64
from tests.support.serving import client_for, running_app
from vision_server.api.state import ENGINE
from vision_server.app import create_app
from vision_server.engine.models import NamedModel
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner
from vision_server.train.metadata import write_metadata


async def _json(session: ClientSession, path: str) -> Any:
    async with session.get(path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _caption(session: ClientSession, seed: int = 3, model: str | None = None) -> str:
    body = {"image": b64(seed), "prompt": "<CAPTION>", **({"model": model} if model else {})}
    async with session.post("/process_image", json=body) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["result"])


async def test_the_configured_models_are_served_by_name(
    tmp_path_factory: pytest.TempPathFactory, tiny_adapter_dir: Path
) -> None:
    """Names, sources, the adapter, the default, per-model idle timeouts and the budget reach the
    engine and /v1/status; each name captions as a one-model server of its source does."""
    cache = tiny_cache_dir(tmp_path_factory)
    settings = Settings(
        model=("plain=test:tiny", f"styled=test:tiny+{tiny_adapter_dir}"),
        default_model="styled",
        cache_dir=cache,
        idle_timeout=-1,
        model_idle_timeouts=(("plain", 120.0),),
        memory_budget="1GiB",
        max_new_tokens=12,
        num_beams=1,
    )
    async with running_app(settings) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]
        assert (engine.model_names, engine.default_model) == (("plain", "styled"), "styled")
        assert engine.config.memory_budget == 1024**3
        status = await _json(session, "/v1/status")
        assert status["memory_budget"] == 1024**3
        models = {model["name"]: model for model in status["models"]}
        assert {
            name: (m["source"], m["adapter"], m["default"], m["idle_timeout"]) for name, m in models.items()
        } == {
            "plain": ("test:tiny", None, False, 120.0),
            "styled": ("test:tiny", tiny_adapter_dir.name, True, -1.0),  # by folder name, not path
        }
        assert status["adapter"]["name"] == tiny_adapter_dir.name  # the top level: the default model's
        assert status["model"] == "styled"  # by its served name, as /v1/models lists it; not "test:tiny"
        plain, styled = await _caption(session, model="plain"), await _caption(session, model="styled")
        assert await _caption(session) == styled  # a request that names none: the default model
    one = Settings(model=("test:tiny",), cache_dir=cache, idle_timeout=-1, max_new_tokens=12, num_beams=1)
    async with client_for(one) as session:
        assert plain == await _caption(session)
    adapted = Settings(
        model=("test:tiny",),
        adapter=str(tiny_adapter_dir),
        cache_dir=cache,
        idle_timeout=-1,
        max_new_tokens=12,
        num_beams=1,
    )
    async with client_for(adapted) as session:
        assert styled == await _caption(session)
    assert plain != styled  # the adapter changes the captions, so the comparison above means something


async def test_tests_and_embedders_can_pass_models() -> None:
    models = [
        NamedModel("x", FakeCaptioner(model_id="fake-x")),
        NamedModel("y", FakeCaptioner(model_id="fake-y"), idle_timeout=5.0),
    ]
    settings = Settings(model=("x=test:tiny", "y=test:tiny"), default_model="y", idle_timeout=-1)
    async with running_app(settings, models=models) as (app, url):
        assert (app[ENGINE].model_names, app[ENGINE].default_model) == (("x", "y"), "y")
        async with ClientSession(url) as session:
            assert await _json(session, "/model") == "fake-y"  # the default model answers GET /model
            status = await _json(session, "/v1/status")
            assert [(m["name"], m["idle_timeout"]) for m in status["models"]] == [("x", -1.0), ("y", 5.0)]
    with pytest.raises(TypeError, match="captioner or models"):
        create_app(Settings(), FakeCaptioner(), models=models)


async def test_status_shows_every_models_adapter_by_name_and_how_it_was_trained(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_adapter_dir: Path
) -> None:
    """Only the default model's adapter was shown, and with paths: the adapter's, and those of
    the run that trained it. Now each model has its own, by folder name; the top-level field stays
    the default model's."""
    home = tmp_path / "home" / "someone"  # no client may learn this
    adapter = home / "styles" / "my-style"
    shutil.copytree(tiny_adapter_dir, adapter)
    options = {"dataset": str(home / "photos"), "output": str(adapter), "cache_dir": str(home / ".cache"),
               "resume": None, "model": str(home / "models" / "tiny"), "rank": 4}  # fmt: skip
    run = {"base_model": str(home / "models" / "tiny"), "revision": None, "task": "<CAPTION>", "steps": 12,
           "epochs": 2.0, "final_train_loss": 1.5, "final_val_loss": None, "options": options}  # fmt: skip
    write_metadata(adapter, run)
    settings = Settings(
        model=("plain=test:tiny", f"styled=test:tiny+{adapter}"),
        cache_dir=tiny_cache_dir(tmp_path_factory),
        idle_timeout=-1,
    )
    async with running_app(settings) as (_app, url), ClientSession(url) as session:
        for route in ("/v1/status", "/model_info?model=styled", "/v1/models", "/ui/api/status"):
            async with session.get(route) as response:
                assert response.status == 200 and str(home) not in await response.text(), route
        status = await _json(session, "/v1/status")
        assert status["adapter"] is None  # the default model, plain, has none: as before
        models = {model["name"]: model for model in status["models"]}
        assert (models["plain"]["adapter"], models["plain"]["training"]) == (None, None)
        styled = models["styled"]
        assert styled["adapter"] == "my-style"
        assert styled["training"] == {
            "base_model": "tiny", "revision": None, "task": "<CAPTION>", "steps": 12, "epochs": 2.0,
            "final_train_loss": 1.5, "final_val_loss": None,
            "options": {"dataset": "photos", "output": "my-style", "cache_dir": ".cache", "resume": None,
                        "model": "tiny", "rank": 4},
        }  # fmt: skip
        info = await _json(session, "/model_info?model=styled")
        assert info["adapter"] == {"name": "my-style", "training": styled["training"]}


async def test_admin_routes_answer_the_status_as_v1_status_shows_it(
    tmp_path_factory: pytest.TempPathFactory, tiny_adapter_dir: Path
) -> None:
    """The admin routes' answers are ``/v1/status`` (docs/operations/index.md): they named each
    model's adapter by its full path on the server's disk and lacked ``tasks``, ``adapter`` and
    each model's ``training``."""
    settings = Settings(
        model=("plain=test:tiny", f"styled=test:tiny+{tiny_adapter_dir}"),
        cache_dir=tiny_cache_dir(tmp_path_factory),
        idle_timeout=-1,
        max_new_tokens=12,
        num_beams=1,
    )
    async with running_app(settings) as (_app, url), ClientSession(url) as session:
        for route in ("load", "unload"):
            async with session.post(f"/v1/model/{route}?model=styled") as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
            status = await _json(session, "/v1/status")
            assert sorted(answer) == sorted(status)
            assert [sorted(m) for m in answer["models"]] == [sorted(m) for m in status["models"]]
            assert [m["adapter"] for m in answer["models"]] == [None, tiny_adapter_dir.name]
            assert str(tiny_adapter_dir) not in await response.text()
