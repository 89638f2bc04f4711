"""A real server process with three models under a memory budget that fits two of them: each new
model evicts the least recently used one, and /v1/status shows the states and the memory.

(The captions several models give through every API family are checked against one-model
servers in tests/http/test_model_choice.py; the never-evict-busy rule in
tests/unit/test_engine_models.py, where a batch can be held open.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.support.images import encode, noise, to_b64
from tests.support.processes import ServerProcess, cli_command, server_env

OPTIONS = ("--idle-timeout", "-1", "--num-beams", "1", "--max-new-tokens", "12", "--decode-threads", "2")


@pytest.fixture(scope="module")
def model_dirs(
    tmp_path_factory: pytest.TempPathFactory, generic_model_dirs: dict[str, Path]
) -> dict[str, Path]:
    """Two tiny Florence-2 models and a tiny BLIP, built once for the module."""
    from vision_server.testing.tiny_model import build_test_model

    root = tmp_path_factory.mktemp("several-models")
    return {
        "florence": build_test_model(root / "florence"),
        "other": build_test_model(root / "other", seed=1),
        "blip": generic_model_dirs["blip"],
    }


def serve(tmp_path: Path, name: str, *options: str) -> ServerProcess:
    command = [*cli_command(), "serve", "--cache-dir", str(tmp_path / "cache"), *OPTIONS, *options]
    env = server_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"  # two servers may share a small machine
    return ServerProcess(command, env, tmp_path / f"{name}.log")


async def post_native(session: ClientSession, model: str, seed: int) -> dict[str, Any]:
    body = {"image": to_b64(encode(noise(seed))), "prompt": "<CAPTION>", "model": model}
    async with session.post("/process_image", json=body) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_a_budget_for_two_of_three_evicts_the_least_recently_used(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    named = {
        "first": str(model_dirs["florence"]),
        "second": str(model_dirs["blip"]),
        "third": str(model_dirs["other"]),
    }
    # Each model's weights, from a server that loads them all (no budget).
    with serve(tmp_path, "sizes", *(a for n, s in named.items() for a in ("--model", f"{n}={s}"))) as probe:
        async with ClientSession(probe.wait_listening(timeout=120)) as session:
            for name in named:
                await post_native(session, name, 1)
            async with session.get("/v1/status") as response:
                sizes = {m["name"]: m["memory_bytes"] for m in (await response.json())["models"]}
        probe.stop()
    assert all(sizes.values()), sizes
    total, smallest = sum(sizes.values()), min(sizes.values())
    budget = total - smallest // 2  # the largest two fit (so any two do), all three never
    options = [a for n, s in named.items() for a in ("--model", f"{n}={s}")] + [
        "--memory-budget",
        str(budget),
    ]
    with serve(tmp_path, "budget", *options) as server:
        async with ClientSession(server.wait_listening(timeout=120)) as session:

            async def states() -> dict[str, str]:
                async with session.get("/v1/status") as response:
                    status = await response.json()
                assert status["memory_budget"] == budget and status["memory_used"] <= budget
                return {m["name"]: m["state"] for m in status["models"]}

            await post_native(session, "first", 1)
            await post_native(session, "second", 2)
            assert await states() == {"first": "ready", "second": "ready", "third": "unloaded"}
            await post_native(session, "first", 3)  # "second" is now the least recently used
            await post_native(session, "third", 4)
            assert await states() == {"first": "ready", "second": "unloaded", "third": "ready"}
            await post_native(session, "second", 5)  # "first" was used before "third"
            assert await states() == {"first": "unloaded", "second": "ready", "third": "ready"}
        server.stop()
    assert server.log_text().count("to make room for") == 2
