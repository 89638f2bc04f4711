"""Token streaming for ``stream: true`` on the real tiny model, also inside a shared batch."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import ClientResponse, ClientSession

from tests.support.api import native_caption
from tests.support.images import data_url
from tests.support.serving import running_app, running_server
from vision_server.api import openai_stream
from vision_server.api.state import ENGINE
from vision_server.captioner import Caption, CaptionItem
from vision_server.errors import InvalidImage
from vision_server.florence.captioner import FlorenceCaptioner
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

PAUSE_AFTER = 3  # updates each stream gets before the model thread pauses


class PausingCaptioner(FlorenceCaptioner):
    """The real captioner, with two pauses the test controls from outside the model thread.

    The first batch waits for ``go`` (so the next requests queue up and share one batch); in a
    batch with streams, generation pauses, mid-``generate``, once every stream has had
    ``PAUSE_AFTER`` updates, until ``resume``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go, self.resume, self.entered = threading.Event(), threading.Event(), threading.Event()
        self.batch_sizes: list[int] = []

    def caption(self, batch: list[CaptionItem]) -> list[Caption]:
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) == 1:
            self.entered.set()
            assert self.go.wait(60), "the test never let the first batch go"
        counts = {index: 0 for index, item in enumerate(batch) if item.stream is not None}

        def pausing(index: int, sink: Callable[[str], None]) -> Callable[[str], None]:
            def stream(text: str) -> None:
                sink(text)
                counts[index] += 1
                if counts[index] == PAUSE_AFTER and all(n >= PAUSE_AFTER for n in counts.values()):
                    assert self.resume.wait(60), "the test never resumed generation"

            return stream

        wrapped = [
            dataclasses.replace(item, stream=pausing(index, item.stream)) if item.stream else item
            for index, item in enumerate(batch)
        ]
        return super().caption(wrapped)


def chat(seed: int, **extra: Any) -> dict[str, Any]:
    part = {"type": "image_url", "image_url": {"url": data_url(seed)}}
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "<CAPTION>"}, part]}], **extra}


async def events(response: ClientResponse, wanted: int | None = None) -> list[Any]:
    """Read events until ``wanted`` content chunks came (or to the end): the parsed events."""
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    seen: list[Any] = []
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        seen.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
        if wanted is not None and len(content_chunks(seen)) >= wanted:
            break
    return seen


def content_chunks(seen: list[Any]) -> list[str]:
    return [
        event["choices"][0]["delta"]["content"]
        for event in seen
        if isinstance(event, dict) and event.get("choices") and event["choices"][0]["delta"].get("content")
    ]


@pytest.fixture
def greedy(tiny: Settings) -> Settings:
    return dataclasses.replace(tiny, num_beams=1, max_new_tokens=64)


async def test_streams_arrive_while_the_shared_batch_still_generates(greedy: Settings) -> None:
    captioner = PausingCaptioner.from_settings(greedy)
    async with running_app(greedy, captioner) as (app, url), ClientSession(url) as session:
        engine = app[ENGINE]
        first = asyncio.create_task(
            session.post("/process_image", json={"image": data_url(10), "prompt": "<CAPTION>"})
        )
        assert await asyncio.to_thread(captioner.entered.wait, 60)
        streamed = [
            asyncio.create_task(session.post("/v1/chat/completions", json=chat(seed, stream=True)))
            for seed in (11, 12)
        ]
        plain = asyncio.create_task(session.post("/v1/chat/completions", json=chat(13)))
        while engine.status().queue_depth < 3:
            await asyncio.sleep(0.01)
        captioner.go.set()  # the three queued requests now share one batch

        early = [await events(await task, wanted=PAUSE_AFTER) for task in streamed]
        assert engine.status().jobs_running == 3  # the batch is still generating
        assert all(len(content_chunks(seen)) == PAUSE_AFTER for seen in early)
        captioner.resume.set()
        texts = []
        for task, seen in zip(streamed, early, strict=True):
            response = await task
            rest = await events(response)
            assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "stop"
            assert seen[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert len({event["id"] for event in seen + rest[:-1]}) == 1
            texts.append("".join(content_chunks(seen + rest)))
        async with await plain as response:
            plain_text = (await response.json())["choices"][0]["message"]["content"]
        async with await first as response:
            assert response.status == 200
        assert captioner.batch_sizes[:2] == [1, 3]
        expected = [await native_caption(session, seed, "<CAPTION>") for seed in (11, 12, 13)]
    assert texts == expected[:2] and plain_text == expected[2]
    assert all(text.count(" ") >= PAUSE_AFTER for text in texts)


async def test_sampled_generation_streams_token_by_token(greedy: Settings) -> None:
    async with running_app(greedy) as (_, url), ClientSession(url) as session:
        body = chat(14, stream=True, temperature=0.9, stream_options={"include_usage": True})
        async with session.post("/v1/chat/completions", json=body) as response:
            seen = await events(response)
    pieces = content_chunks(seen)
    usage = seen[-2]["usage"]
    assert len(pieces) > 1 and "".join(pieces).strip() and seen[-1] == "[DONE]"
    assert usage["completion_tokens"] >= len(pieces)


async def test_beam_search_streams_the_caption_in_one_chunk(tiny: Settings) -> None:
    beams = dataclasses.replace(tiny, max_new_tokens=64)
    assert beams.num_beams > 1
    async with running_app(beams) as (_, url), ClientSession(url) as session:
        async with session.post("/v1/chat/completions", json=chat(15, stream=True)) as response:
            pieces = content_chunks(await events(response))
        assert pieces == [await native_caption(session, 15, "<CAPTION>")]


async def test_a_failure_after_the_stream_began_ends_it_with_an_error_event(tmp_path: Path) -> None:
    """The status (200) and some text are already sent: the stream ends with OpenAI's error event
    (then ``[DONE]``), and the SDK raises instead of returning the half caption as if it were whole."""
    captioner = FakeCaptioner(text="a dog on")
    captioner.fail_caption = RuntimeError("the model broke")
    async with running_server(Settings(cache_dir=tmp_path, num_beams=1), captioner) as url:
        async with ClientSession(url) as session:
            async with session.post("/v1/chat/completions", json=chat(15, stream=True)) as response:
                seen = await events(response)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-anything", max_retries=0)
        got: list[str] = []
        with pytest.raises(openai.APIError, match="request id"):
            async for chunk in await client.chat.completions.create(
                model="any", messages=chat(16)["messages"], stream=True
            ):
                got += [choice.delta.content or "" for choice in chunk.choices]
        await client.close()
    assert content_chunks(seen) == ["a dog on"] and seen[-1] == "[DONE]"
    error = seen[-2]["error"]
    assert error["code"] == "caption_failed" and "request id" in error["message"]
    assert "".join(got) == "a dog on"


async def test_a_caption_that_fails_as_the_client_leaves_is_not_logged_as_never_retrieved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The soak found it: the job failed (a bad image) in the same loop step in which the client
    left, so the cancelled handler never read the failure and asyncio logged it as an error."""

    release = asyncio.Event()

    async def failing_caption(*_: Any, **__: Any) -> Caption:
        await release.wait()
        raise InvalidImage("Invalid image data: not a supported image format")

    monkeypatch.setattr(openai_stream, "caption_base64", failing_caption)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    default_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        handler = asyncio.ensure_future(
            openai_stream._stream_caption(None, None, "x", "<CAPTION>", None, None, None, "m")  # type: ignore[arg-type]
        )
        for _ in range(5):  # the handler starts the job and waits on it
            await asyncio.sleep(0)
        release.set()  # the job fails on the next step ...
        handler.cancel()  # ... the step in which the handler hears that its client left
        with pytest.raises(asyncio.CancelledError):
            await handler
        del handler
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(default_handler)
    assert [context.get("message") for context in reported] == []
