"""One real server with three names (tiny Florence-2, the same with a LoRA adapter, a tiny BLIP):
concurrent mixed requests through every API family get the captions single-model servers give;
a budget that fits two of the three evicts the least recently used; /v1/status shows it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, FormData

from tests.support.images import encode, noise, to_b64
from tests.support.processes import ServerProcess, cli_command, server_env

OPTIONS = ("--idle-timeout", "-1", "--num-beams", "1", "--max-new-tokens", "12", "--decode-threads", "2")
PROMPT = "a picture of"


@pytest.fixture(scope="module")
def model_dirs(
    tmp_path_factory: pytest.TempPathFactory, generic_model_dirs: dict[str, Path]
) -> dict[str, Path]:
    """Two tiny Florence-2 models, a LoRA adapter for the first, and a tiny BLIP, built once."""
    from vision_server.testing.tiny_model import build_test_adapter, build_test_model

    root = tmp_path_factory.mktemp("several-models")
    florence = build_test_model(root / "florence")
    return {
        "florence": florence,
        "other": build_test_model(root / "other", seed=1),
        "adapter": build_test_adapter(florence, root / "adapter"),
        "blip": generic_model_dirs["blip"],
    }


def specs(dirs: dict[str, Path]) -> dict[str, str]:
    return {
        "plain": str(dirs["florence"]),
        "styled": f"{dirs['florence']}+{dirs['adapter']}",
        "blip": str(dirs["blip"]),
    }


def serve(tmp_path: Path, name: str, *options: str) -> ServerProcess:
    command = [*cli_command(), "serve", "--cache-dir", str(tmp_path / "cache"), *OPTIONS, *options]
    env = server_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"  # four servers share a small machine
    return ServerProcess(command, env, tmp_path / f"{name}.log")


@pytest.fixture(scope="module")
def servers(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The three-model server under "all", and one single-model server per name."""
    tmp = tmp_path_factory.mktemp("several-models-servers")
    named = specs(model_dirs)
    processes = {
        "all": serve(
            tmp, "all", *(arg for name, spec in named.items() for arg in ("--model", f"{name}={spec}"))
        )
    }
    processes["plain"] = serve(tmp, "plain", "--model", named["plain"])
    processes["styled"] = serve(
        tmp, "styled", "--model", str(model_dirs["florence"]), "--adapter", str(model_dirs["adapter"])
    )
    processes["blip"] = serve(tmp, "blip", "--model", named["blip"])
    try:
        yield {name: process.wait_listening(timeout=180) for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.stop()
            process.close()


async def ask(session: ClientSession, family: str, model: str | None, seed: int) -> str:
    """One caption through ``family``, naming ``model`` (None: name none); the caption text."""
    image = encode(noise(seed))
    named = {} if model is None else {"model": model}
    if family == "native":
        body = {"image": to_b64(image), "prompt": "<CAPTION>", **named}
        async with session.post("/process_image", json=body) as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["result"])
    if family == "openai":
        content = [
            {"type": "text", "text": PROMPT},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + to_b64(image)}},
        ]
        body = {"model": model or "anything", "messages": [{"role": "user", "content": content}]}
        async with session.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["choices"][0]["message"]["content"])
    if family == "sillytavern":
        async with session.post("/api/caption", json={"image": to_b64(image), **named}) as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["caption"])
    form = FormData()
    form.add_field("image", image, filename="p.png", content_type="image/png")
    form.add_field("prompt", PROMPT)
    for key, value in named.items():
        form.add_field(key, value)
    async with session.post("/caption", data=form) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["caption"])


FAMILIES = ("native", "openai", "sillytavern", "multipart")
MODELS = ("plain", "styled", "blip")


async def test_mixed_concurrent_requests_get_each_single_model_servers_captions(
    servers: dict[str, str],
) -> None:
    cases = [(family, model, seed) for family in FAMILIES for model in MODELS for seed in (1, 2)]
    timeout = ClientTimeout(total=300)
    async with ClientSession(servers["all"], timeout=timeout) as session:
        got = await asyncio.gather(*(ask(session, family, model, seed) for family, model, seed in cases))
    expected = []
    for family, model, seed in cases:
        async with ClientSession(servers[model], timeout=timeout) as session:
            expected.append(await ask(session, family, None, seed))
    assert got == expected
    # The adapter matters (so "styled" really ran with it), and BLIP answered as BLIP.
    by_case = dict(zip(cases, got, strict=True))
    assert by_case[("native", "plain", 1)] != by_case[("native", "styled", 1)]
    assert by_case[("native", "blip", 1)] != by_case[("native", "plain", 1)]

    async with ClientSession(servers["all"], timeout=timeout) as session:
        async with session.get("/v1/status") as response:
            status = await response.json()
        async with session.get("/v1/models") as response:
            listed = await response.json()
    models = {model["name"]: model for model in status["models"]}
    assert set(models) == set(MODELS) and all(model["state"] == "ready" for model in models.values())
    assert models["plain"]["default"] and models["styled"]["adapter"]
    assert models["blip"]["family"] == "blip"
    assert [entry["id"] for entry in listed["data"]] == list(MODELS)


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
