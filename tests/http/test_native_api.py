"""The florence2-visionapi routes on a real port, with the real tiny Florence-2 (fake only for timing)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession
from PIL import Image

from tests.support.gated import GatedFake
from tests.support.images import b64
from tests.support.serving import client_for, running_server
from vision_server.settings import Settings
from vision_server.tasks import PROMPTGEN_TASKS
from vision_server.testing.fake import FakeCaptioner


async def post(session: ClientSession, body: object) -> tuple[int, object]:
    async with session.post("/process_image", json=body) as response:
        return response.status, await response.json()


# --- exact bodies ---------------------------------------------------------------------------------


async def test_routes_answer_exactly_like_florence2_visionapi(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        async with session.get("/prompts") as response:
            assert response.status == 200 and await response.json() == list(PROMPTGEN_TASKS)
        async with session.get("/model") as response:
            assert await response.text() == '"test:tiny"'
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as response:
            status, body = response.status, await response.json()
            assert response.headers["X-Model"] == "test:tiny"  # beside the body, which stays as it was
        assert status == 200 and list(body) == ["result"]
        assert isinstance(body["result"], str) and body["result"].strip()


async def test_prompt_spellings_and_data_urls_are_accepted(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        answers = set()
        for prompt, image in [
            ("<CAPTION>", b64(2)),
            ("caption", b64(2)),
            ("<Caption>", "data:image/png;base64," + b64(2)),
        ]:
            status, body = await post(session, {"image": image, "prompt": prompt})
            assert status == 200
            answers.add(body["result"])  # type: ignore[index]
        assert len(answers) == 1
        status, _ = await post(session, {"image": b64(2), "prompt": "MIX_CAPTION"})
        assert status == 200


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"prompt": "<CAPTION>"}, 422, "Field required: 'image'"),
        ({"image": "abc"}, 422, "Field required: 'prompt'"),
        ({"image": 5, "prompt": "<CAPTION>"}, 400, "Field 'image' must be a string"),
        ([1, 2], 400, "must be a JSON object"),
        ({"image": "@@@", "prompt": "<CAPTION>"}, 400, "Invalid image data: not valid base64"),
        (
            {"image": base64.b64encode(b"plain text").decode(), "prompt": "<CAPTION>"},
            400,
            "Invalid image data: not a",
        ),
        ({"image": b64(3)[:200], "prompt": "<CAPTION>"}, 400, "Invalid image data"),
    ],
)
async def test_client_errors_have_statuses_and_details(
    tiny: Settings, body: object, status: int, detail: str
) -> None:
    async with client_for(tiny, FakeCaptioner()) as session:
        got_status, got = await post(session, body)
        assert got_status == status and detail in got["detail"]  # type: ignore[index]


async def test_invalid_prompt_lists_the_valid_ones(tiny: Settings) -> None:
    async with client_for(tiny, FakeCaptioner()) as session:
        status, body = await post(session, {"image": b64(1), "prompt": "<OD>"})
        assert status == 400 and all(task in body["detail"] for task in PROMPTGEN_TASKS)  # type: ignore[index]


async def test_body_not_json_is_400(tiny: Settings) -> None:
    async with client_for(tiny, FakeCaptioner()) as session:
        async with session.post(
            "/process_image", data=b"{nope", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400 and "not valid JSON" in (await r.json())["detail"]


async def test_too_large_body_and_too_many_pixels_are_413(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, max_request_bytes=50_000, max_image_pixels=100_000)
    async with client_for(settings, FakeCaptioner()) as session:
        status, body = await post(session, {"image": "A" * 60_000, "prompt": "<CAPTION>"})
        assert status == 413 and "too large" in body["detail"]  # type: ignore[index]
        assert "50000 exceeded (--max-request-bytes). Send" in body["detail"]  # type: ignore[index]
        flat = io.BytesIO()
        Image.new("RGB", (400, 400), "white").save(flat, "PNG")  # small file, many pixels
        status, body = await post(
            session, {"image": base64.b64encode(flat.getvalue()).decode(), "prompt": "<CAPTION>"}
        )
        assert status == 413 and "400x400" in body["detail"]  # type: ignore[index]


async def test_unexpected_failure_is_500_with_request_id_and_server_keeps_serving(tmp_path: Path) -> None:
    fake = FakeCaptioner()
    fake.fail_caption = ZeroDivisionError("bug")
    async with client_for(Settings(cache_dir=tmp_path), fake) as session:
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as r:
            body = await r.json()
            assert r.status == 500 and r.headers["X-Request-ID"] in body["detail"]
            assert "Traceback" not in body["detail"]
        fake.fail_caption = None
        assert (await post(session, {"image": b64(1), "prompt": "<CAPTION>"}))[0] == 200


async def test_request_id_is_echoed(tmp_path: Path) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        async with session.get("/prompts", headers={"X-Request-ID": "trace-42"}) as r:
            assert r.headers["X-Request-ID"] == "trace-42"


# --- lifecycle over HTTP --------------------------------------------------------------------------


async def status_of(session: ClientSession) -> dict[str, object]:
    async with session.get("/v1/status") as response:
        return await response.json()


async def test_lazy_load_then_ready(tiny: Settings) -> None:
    async with client_for(tiny) as session:
        before = await status_of(session)
        assert before["state"] == "unloaded" and before["model"] == "test:tiny" and before["device"] is None
        await post(session, {"image": b64(5), "prompt": "<CAPTION>"})
        after = await status_of(session)
        assert after["state"] == "ready" and after["device"] == "cpu" and after["dtype"] == "float32"
        assert after["loaded_since"] and after["expires_at"] is None  # idle_timeout -1


async def test_idle_unload_over_http(tiny: Settings) -> None:
    settings = Settings(model=tiny.model, cache_dir=tiny.cache_dir, idle_timeout=1)
    async with client_for(settings) as session:
        await post(session, {"image": b64(6), "prompt": "<CAPTION>"})
        status = await status_of(session)
        assert status["state"] == "ready" and status["expires_at"]
        started = time.monotonic()
        # Poll instead of one fixed sleep: on a loaded machine the unload itself takes a while.
        while (await status_of(session))["state"] != "unloaded":
            assert time.monotonic() - started < 15, "the model never unloaded after the idle timeout"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started >= 0.5  # not (much) before the idle timeout of 1 s


async def test_metadata_routes_answer_while_generate_runs(tmp_path: Path) -> None:
    fake = GatedFake()  # the caption is held until the routes below have answered
    async with client_for(Settings(cache_dir=tmp_path), fake) as session:
        job = asyncio.create_task(post(session, {"image": b64(1), "prompt": "<CAPTION>"}))
        assert await asyncio.to_thread(fake.entered.wait, 30), "the caption never started"
        for path in ("/prompts", "/model", "/v1/status"):
            # A generate that blocked the event loop would hold these until its gate gave up
            # (30 s), and the caption would then fail.
            async with session.get(path) as response:
                assert response.status == 200
        assert (await status_of(session))["jobs_running"] == 1
        fake.gate.set()
        assert (await job)[0] == 200


async def test_load_failure_is_503_with_reason_then_recovers(tmp_path: Path) -> None:
    missing = tmp_path / "model-not-here-yet"
    settings = Settings(model=(str(missing),), cache_dir=tmp_path / "cache")
    async with client_for(settings) as session:
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as r:
            body = await r.json()
            assert r.status == 503 and "Retry-After" in r.headers
            # named as clients know it (its folder's name); the path is for the operator's log
            assert (
                "model-not-here-yet does not exist" in body["detail"] and str(missing) not in body["detail"]
            )
        status = await status_of(session)
        assert status["state"] == "failed" and "does not exist" in status["last_error"]  # type: ignore[operator]
        async with session.get("/prompts") as r:
            assert r.status == 200
        from vision_server.florence.source import test_model_dir

        test_model_dir("tiny", tmp_path / "cache").rename(missing)  # the operator fixes the cause
        status_code, body = await post(session, {"image": b64(1), "prompt": "<CAPTION>"})
        assert status_code == 200 and body["result"]  # type: ignore[index]


async def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, max_queue=2, max_batch_size=1)
    fake = GatedFake()  # the first job holds the worker until the end: the next two wait
    async with client_for(settings, fake) as session:
        running = [asyncio.create_task(post(session, {"image": b64(n), "prompt": "<CAPTION>"})) for n in (1,)]
        await until_status(session, jobs_running=1)
        running += [
            asyncio.create_task(post(session, {"image": b64(n), "prompt": "<CAPTION>"})) for n in (2, 3)
        ]
        await until_status(session, queue_depth=2)
        async with session.post("/process_image", json={"image": b64(4), "prompt": "<CAPTION>"}) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
            assert "queue is full" in (await r.json())["detail"]
        fake.gate.set()
        assert [status for status, _ in await asyncio.gather(*running)] == [200, 200, 200]


async def test_disconnected_clients_queued_job_never_runs(tmp_path: Path) -> None:
    fake = GatedFake()  # the first job holds the worker until the other has left the queue
    settings = Settings(cache_dir=tmp_path, max_batch_size=1)
    async with running_server(settings, fake) as url, ClientSession(url) as session:
        first = asyncio.create_task(post(session, {"image": b64(1), "prompt": "<CAPTION>"}))
        await until_status(session, jobs_running=1)
        async with ClientSession(url) as impatient:
            leaving = asyncio.create_task(post(impatient, {"image": b64(2), "prompt": "<CAPTION>"}))
            await until_status(session, queue_depth=1)
            leaving.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await leaving
        await until_status(session, queue_depth=0)  # it left the queue while the worker was busy
        fake.gate.set()
        assert (await first)[0] == 200
        assert fake.batch_sizes == [1]
        assert (await status_of(session))["jobs_done"] == 1


async def until_status(session: ClientSession, **expected: int) -> None:
    """Wait until ``/v1/status`` shows ``expected`` (a loaded machine is slow, not stuck)."""
    deadline = time.monotonic() + 60
    while True:
        status = await status_of(session)
        if all(status[key] == value for key, value in expected.items()):
            return
        assert time.monotonic() < deadline, (expected, status)
        await asyncio.sleep(0.01)


# --- batching with the real model -----------------------------------------------------------------


async def test_concurrent_requests_batch_and_match_single_answers(tiny: Settings) -> None:
    requests = [{"image": b64(100 + n), "prompt": PROMPTGEN_TASKS[n % 7]} for n in range(32)]
    settings = Settings(model=tiny.model, cache_dir=tiny.cache_dir, idle_timeout=-1, max_batch_wait_ms=20)
    async with client_for(settings) as session:
        alone = [(await post(session, body))[1] for body in requests]
        batches_before = (await status_of(session))["batches_run"]
        together = await asyncio.gather(*(post(session, body) for body in requests))
        status = await status_of(session)
    assert [body for _, body in together] == alone
    assert len({answer["result"] for answer in alone}) > 1  # type: ignore[index]
    assert status["batches_run"] - batches_before < 32  # type: ignore[operator]


async def test_out_of_memory_on_one_image_is_503_and_the_server_keeps_serving(tmp_path: Path) -> None:
    from vision_server.errors import OutOfMemory

    fake = FakeCaptioner()
    fake.fail_caption = OutOfMemory("Out of GPU memory on a batch of 1.", retry_after=5)
    async with client_for(Settings(cache_dir=tmp_path), fake) as session:
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert "Out of GPU memory" in (await r.json())["detail"]
        fake.fail_caption = None
        assert (await post(session, {"image": b64(1), "prompt": "<CAPTION>"}))[0] == 200
