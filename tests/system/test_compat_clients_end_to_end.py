"""The compatibility APIs with real clients on a real port: SDKs, replayed requests, docs examples.

- the official OpenAI SDK meets a full queue, waits the server's ``Retry-After`` and succeeds;
- SillyTavern's requests replayed byte for byte (Extras from the browser, with CORS preflights;
  Custom OpenAI-compatible from its server), reading what SillyTavern reads;
- the multipart seed's ``curl`` examples, run as ``curl`` subprocesses;
- the same four mistakes in every family, each answered in that family's error shape;
- the ``bash`` and ``python`` examples of the docs site's API pages, run as written.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import ClientResponse, ClientSession, MultipartWriter

from tests.support import paths
from tests.support.api import engine_status, json_documents
from tests.support.gated import GatedFake
from tests.support.images import b64, data_url, image_bytes
from tests.support.serving import running_server
from vision_server.settings import Settings

API_DOCS = paths.DOCS / "api"
API_PAGES = (
    "index.md",
    "native.md",
    "openai.md",
    "sillytavern.md",
    "multipart.md",
    "task-words.md",
    "scheduling.md",
)


def doc_text() -> str:
    """The docs site's API pages, one after another."""
    return "\n".join((API_DOCS / page).read_text(encoding="utf-8") for page in API_PAGES)


ST_ORIGIN = "http://127.0.0.1:8000"  # where SillyTavern's page is served from (its default port)
QUESTION = "What's in this image?"  # SillyTavern's default caption prompt
NOT_BASE64 = "@@@ this is not base64 @@@"
NOT_AN_IMAGE = b"just some words in a text file, not a picture"


def with_(settings: Settings, **changes: Any) -> Settings:
    return Settings(model=settings.model, cache_dir=settings.cache_dir, idle_timeout=-1, **changes)


def compact(body: object) -> bytes:
    """``JSON.stringify(body)``: what browsers and Node send."""
    return json.dumps(body, separators=(",", ":")).encode()


async def native_caption_of(session: ClientSession, data: bytes, task: str) -> str:
    body = {"image": base64.b64encode(data).decode(), "prompt": task}
    async with session.post("/process_image", json=body) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["result"])


# --- 1. the OpenAI SDK retries a full queue ------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP exchange as the SDK's HTTP client saw it."""

    sent_at: float
    status: int = 0
    answered_at: float = 0.0
    retry_after: str | None = None
    body: Any = None


async def test_openai_sdk_waits_retry_after_and_succeeds_once_the_queue_has_room(tmp_path: Path) -> None:
    """One worker busy, the one queue slot taken: the SDK's first try is refused with 503, it
    sleeps for the ``Retry-After`` the server sent (not its own shorter back-off), and its
    automatic retry gets the caption."""
    settings = Settings(cache_dir=tmp_path, max_queue=1, max_batch_size=1, max_batch_wait_ms=0)
    # The worker is held until the SDK's first try was refused: with a fixed 0.6 s job, a slow
    # machine's SDK start could come after the queue had room again, and get a 200 at once.
    fake = GatedFake()
    fake.gate.set()
    async with running_server(settings, fake) as url, ClientSession(url) as session:

        async def occupy(seed: int) -> Any:
            body = {"image": b64(seed), "prompt": "<CAPTION>"}
            async with session.post("/process_image", json=body) as response:
                return response.status

        async def until(field: str, value: int) -> None:
            for _ in range(300):
                status = await engine_status(session)
                if status[field] == value:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{field} never became {value}: {status}")

        assert await occupy(0) == 200  # the model is loaded; from here on jobs start at once
        fake.gate.clear()
        blockers = [asyncio.create_task(occupy(1))]
        await until("jobs_running", 1)  # the worker is busy ...
        blockers.append(asyncio.create_task(occupy(2)))
        await until("queue_depth", 1)  # ... and the one queue slot is taken

        exchanges: list[Exchange] = []

        def on_request(request: Any) -> None:
            exchanges.append(Exchange(sent_at=time.monotonic()))

        def on_response(response: Any) -> None:
            response.read()
            exchange = exchanges[-1]
            exchange.status, exchange.answered_at = response.status_code, time.monotonic()
            exchange.retry_after = response.headers.get("Retry-After")
            exchange.body = response.json()
            fake.gate.set()  # the queue has room again once the running job ends

        http_client = openai.DefaultHttpxClient(
            event_hooks={"request": [on_request], "response": [on_response]}
        )
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="sk-test", max_retries=3, http_client=http_client
        )
        started = time.monotonic()
        try:
            reply = await asyncio.to_thread(
                lambda: client.chat.completions.create(
                    model="gpt-4o",
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": QUESTION},
                                {"type": "image_url", "image_url": {"url": data_url(3)}},
                            ],
                        }
                    ],
                )
            )
        finally:
            fake.gate.set()  # however the SDK's call ended
        elapsed = time.monotonic() - started
        client.close()
        assert await asyncio.gather(*blockers) == [200, 200]
        async with session.get("/metrics") as response:
            metrics = await response.text()

    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    assert [exchange.status for exchange in exchanges] == [503, 200], exchanges
    refused, accepted = exchanges
    assert refused.body["error"]["code"] == "queue_full" and refused.body["error"]["type"] == "api_error"
    assert refused.retry_after is not None and refused.retry_after.isdigit()
    wait = int(refused.retry_after)
    assert 1 <= wait <= 120
    # Honoured: without the header the SDK would retry after at most 0.5 s.
    assert accepted.sent_at - refused.answered_at >= wait - 0.05
    assert elapsed < wait + 5
    assert re.search(r'^vision_server_requests_rejected_total\{reason="queue_full"\} 1\.0$', metrics, re.M)


# --- 2. SillyTavern, replayed ---------------------------------------------------------------------


def assert_preflight_lets_through(response: ClientResponse, method: str, headers: list[str]) -> None:
    """What a browser checks before it sends the real request (Fetch standard, CORS check)."""
    assert 200 <= response.status < 300, response.status
    assert response.headers.get("Access-Control-Allow-Origin") in (ST_ORIGIN, "*")
    methods = {m.strip().upper() for m in response.headers.get("Access-Control-Allow-Methods", "").split(",")}
    assert method in methods or method in ("GET", "HEAD", "POST")
    allowed = {h.strip().lower() for h in response.headers.get("Access-Control-Allow-Headers", "").split(",")}
    assert set(headers) <= allowed or "*" in allowed, (headers, allowed)


async def browser_fetch(
    session: ClientSession, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> Any:
    """A page's ``fetch()`` to another origin: preflight when needed, then the request; the
    page sees the JSON only if the reply allows its origin."""
    custom = sorted(name.lower() for name in headers if name.lower() != "content-type")
    if headers.get("Content-Type") == "application/json":
        custom = sorted([*custom, "content-type"])  # not a CORS-safelisted content type
    if custom or method not in ("GET", "HEAD", "POST"):
        preflight = {
            "Origin": ST_ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": ",".join(custom),  # as Chrome sends it
        }
        async with session.options(path, headers=preflight) as response:
            assert_preflight_lets_through(response, method, custom)
    async with session.request(method, path, headers={**headers, "Origin": ST_ORIGIN}, data=body) as response:
        assert response.status == 200, await response.text()
        assert response.headers.get("Access-Control-Allow-Origin") in (ST_ORIGIN, "*")
        return await response.json()


# doExtrasFetch() in public/scripts/extensions.js: older releases always add the (possibly empty)
# key and the tunnel header; newer ones add Authorization only when a key is stored.
EXTRAS_FETCH_HEADERS = {
    "older": {"Authorization": "Bearer ", "Bypass-Tunnel-Reminder": "bypass"},
    "newer": {},
}


@pytest.mark.parametrize("release", sorted(EXTRAS_FETCH_HEADERS))
async def test_sillytavern_extras_replay_from_the_browser(tiny: Settings, release: str) -> None:
    base_headers = EXTRAS_FETCH_HEADERS[release]
    image = image_bytes(41, "JPEG")
    async with running_server(with_(tiny, cors_origins=(ST_ORIGIN,))) as url, ClientSession(url) as session:
        # connectToApi(): GET {extrasUrl}/api/modules, then modules = data.modules
        data = await browser_fetch(session, "GET", "/api/modules", dict(base_headers))
        assert "caption" in data["modules"]  # captionExtras() refuses to run without it
        # captionExtras(): POST /api/caption, body JSON.stringify({ image: base64Img })
        headers = {"Content-Type": "application/json", "Bypass-Tunnel-Reminder": "bypass", **base_headers}
        body = compact({"image": base64.b64encode(image).decode()})
        data = await browser_fetch(session, "POST", "/api/caption", headers, body)
        expected = await native_caption_of(session, image, "<MORE_DETAILED_CAPTION>")
    assert isinstance(data["caption"], str) and data["caption"] == expected and expected


@pytest.mark.parametrize("system_prompt", [None, "You describe images for a chat."])
async def test_sillytavern_custom_openai_replay_from_its_server(
    tiny: Settings, system_prompt: str | None
) -> None:
    """src/endpoints/openai.js /caption-image with api 'custom': POST {server_url}/chat/completions,
    server_url being what the user typed (with /v1); the optional system message comes from
    config.yaml openai.captionSystemPrompt."""
    image = image_bytes(42, "JPEG")
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": QUESTION},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(image).decode()},
                },
            ],
        }
    ]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    body = compact({"model": "gpt-4-turbo", "messages": messages})
    headers = {"Content-Type": "application/json", "Authorization": "Bearer "}  # no key stored in ST
    async with running_server(tiny) as url, ClientSession() as session:
        server_url = f"{url}/v1"
        async with session.get(f"{server_url}/models", headers={"Authorization": "Bearer "}) as response:
            assert response.status == 200 and (await response.json())["data"][0]["id"] == "test:tiny"
        async with session.post(f"{server_url}/chat/completions", data=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            data = await response.json()
        async with ClientSession(url) as native:
            expected = await native_caption_of(native, image, "<MORE_DETAILED_CAPTION>")
    caption = data["choices"][0]["message"]["content"]  # data?.choices?.[0]?.message?.content
    assert isinstance(caption, str) and caption.strip() and caption.strip() == expected


# --- 3. the multipart seed's curl examples --------------------------------------------------------

SEED_HOST = "http://localhost:8000"
# From shared/seeds/001 (scripts/servers README), as printed there; only the host changes.
SEED_BASIC = 'curl -X POST -F "image=@image.jpg" http://localhost:8000/caption'
SEED_PARAMS = """curl -X POST \\
  -F "image=@photo.jpg" \\
  -F "max_length=256" \\
  -F "temperature=0.8" \\
  http://localhost:8000/caption"""
SEED_BATCH = """curl -X POST \\
  -F "images=@image1.jpg" \\
  -F "images=@image2.jpg" \\
  -F "batch_size=2" \\
  http://localhost:8000/batch_caption"""
SEED_AUTH = """curl -X POST \\
  -H "Authorization: Bearer your_secret_key" \\
  -F "image=@photo.jpg" \\
  http://localhost:8000/caption"""
SEED_CURL_PARAMS = """curl -X POST \\
  -F "image=@photo.jpg" \\
  -F "max_length=128" \\
  -F "do_sample=true" \\
  -F "temperature=0.7" \\
  http://localhost:8000/caption"""
SEED_CURL_BATCH = """curl -X POST \\
  -F "images=@img1.jpg" \\
  -F "images=@img2.jpg" \\
  -F "images=@img3.jpg" \\
  http://localhost:8000/batch_caption"""
SEED_HEALTH = "curl http://localhost:8000/health"
SEED_METRICS = "curl http://localhost:8000/metrics"


async def run_shell(command: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_seed(command: str, url: str, cwd: Path) -> Any:
    assert SEED_HOST in command
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no proxy variables: curl goes straight there
    code, out, err = await run_shell(command.replace(SEED_HOST, url), cwd, env)
    assert code == 0, err
    return json.loads(out) if not out.startswith("#") else out


def seed_files(folder: Path) -> dict[str, bytes]:
    files = {
        "image.jpg": image_bytes(51, "JPEG"),
        "photo.jpg": image_bytes(52, "JPEG"),
        "image1.jpg": image_bytes(53, "JPEG"),
        "image2.jpg": image_bytes(54, "JPEG"),
        "img1.jpg": image_bytes(55, "JPEG"),
        "img2.jpg": b"\xff\xd8\xff\xe0 a JPEG header and then nothing useful",  # corrupt, mid-batch
        "img3.jpg": image_bytes(56, "JPEG"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


async def test_the_seed_curl_examples_run_as_written(tiny: Settings, tmp_path: Path) -> None:
    files = seed_files(tmp_path)
    async with running_server(tiny) as url, ClientSession(url) as session:
        expected = {
            name: await native_caption_of(session, files[name], "<CAPTION>")
            for name in ("image.jpg", "image1.jpg", "image2.jpg", "img1.jpg", "img3.jpg")
        }
        basic, params, batch, curl_params, curl_batch, health = await asyncio.gather(
            *(
                run_seed(command, url, tmp_path)
                for command in (
                    SEED_BASIC,
                    SEED_PARAMS,
                    SEED_BATCH,
                    SEED_CURL_PARAMS,
                    SEED_CURL_BATCH,
                    SEED_HEALTH,
                )
            )
        )
        metrics = await run_seed(SEED_METRICS, url, tmp_path)

    assert {"caption", "confidence", "processing_time"} <= set(basic)
    assert basic["caption"] == expected["image.jpg"] and 0 < basic["confidence"] <= 1
    assert basic["processing_time"] >= 0 and basic["model_info"]["model_type"] == "florence-2"
    for sampled in (params, curl_params):  # temperature > 0: sampled, so only the shape is known
        assert isinstance(sampled["caption"], str) and sampled["caption"]
        assert 0 < sampled["confidence"] <= 1 and sampled["processing_time"] >= 0
    assert set(batch) == {"results", "total_processing_time"} and batch["total_processing_time"] >= 0
    assert [(r["filename"], r["caption"]) for r in batch["results"]] == [
        ("image1.jpg", expected["image1.jpg"]),
        ("image2.jpg", expected["image2.jpg"]),
    ]
    first, broken, third = curl_batch["results"]
    assert (first["filename"], first["caption"]) == ("img1.jpg", expected["img1.jpg"])
    assert broken["filename"] == "img2.jpg" and "Invalid image data" in broken["error"]
    assert "caption" not in broken
    assert (third["filename"], third["caption"]) == ("img3.jpg", expected["img3.jpg"])
    assert 0 < first["confidence"] <= 1 and 0 < third["confidence"] <= 1
    assert health["status"] in ("ok", "healthy") and "model_loaded" in health
    assert metrics.startswith("# HELP") and "vision_server_requests_rejected_total" in metrics


async def test_the_seed_authenticated_curl_example(tiny: Settings, tmp_path: Path) -> None:
    seed_files(tmp_path)
    async with running_server(with_(tiny, api_key="your_secret_key")) as url:
        reply = await run_seed(SEED_AUTH, url, tmp_path)
        refused = await run_seed(SEED_BASIC, url, tmp_path)  # the same server without the header
    assert reply["caption"] and 0 < reply["confidence"] <= 1
    assert set(refused) == {"detail"}


# --- 4. one mistake, four families, four shapes ---------------------------------------------------

MISTAKES = ("bad_base64", "not_an_image", "missing_image", "unknown_task")


def text_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def multipart(*parts: tuple[str, str | bytes, str | None]) -> MultipartWriter:
    """A real multipart/form-data body: (field name, value, filename or None for a text field)."""
    writer = MultipartWriter("form-data")
    for name, value, filename in parts:
        part = writer.append(value, {"Content-Type": "application/octet-stream"} if filename else None)
        params: dict[str, Any] = {"name": name, **({"filename": filename} if filename else {})}
        part.set_content_disposition("form-data", **params)
    return writer


def user_parts(text: str, url: str | None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def request_for(family: str, mistake: str) -> tuple[str, dict[str, Any]]:
    """The path and aiohttp ``post`` arguments that make ``mistake`` in ``family``."""
    good = b64(61)
    if family == "native":
        bodies = {
            "bad_base64": {"image": NOT_BASE64, "prompt": "<CAPTION>"},
            "not_an_image": {"image": text_b64(NOT_AN_IMAGE), "prompt": "<CAPTION>"},
            "missing_image": {"prompt": "<CAPTION>"},
            "unknown_task": {"image": good, "prompt": "<OD>"},
        }
        return "/process_image", {"json": bodies[mistake]}
    if family == "openai":
        messages = {
            "bad_base64": user_parts(QUESTION, f"data:image/png;base64,{NOT_BASE64}"),
            "not_an_image": user_parts(QUESTION, f"data:image/png;base64,{text_b64(NOT_AN_IMAGE)}"),
            "missing_image": {"role": "user", "content": QUESTION},
            "unknown_task": user_parts("<OD>", f"data:image/png;base64,{good}"),
        }
        return "/v1/chat/completions", {"json": {"model": "gpt-4o", "messages": [messages[mistake]]}}
    if family == "responses":
        image = {"png": f"data:image/png;base64,{good}", "bad_base64": f"data:image/png;base64,{NOT_BASE64}"}
        image["not_an_image"] = f"data:image/png;base64,{text_b64(NOT_AN_IMAGE)}"
        text = {"type": "input_text", "text": "<OD>" if mistake == "unknown_task" else QUESTION}
        parts = [text] + (
            []
            if mistake == "missing_image"
            else [{"type": "input_image", "image_url": image.get(mistake, image["png"])}]
        )
        return "/v1/responses", {"json": {"model": "gpt-4.1", "input": [{"role": "user", "content": parts}]}}
    if family == "extras":
        bodies = {
            "bad_base64": {"image": NOT_BASE64},
            "not_an_image": {"image": text_b64(NOT_AN_IMAGE)},
            "missing_image": {},
            "unknown_task": {"image": good, "prompt": "<OD>"},
        }
        return "/api/caption", {"json": bodies[mistake]}
    # Multipart carries files as raw bytes; "bad base64" is base64-looking text sent in the
    # image field (``curl -F image=...`` without the @), which is not an image either.
    forms = {
        "bad_base64": multipart(("image", NOT_BASE64, None)),
        "not_an_image": multipart(("image", NOT_AN_IMAGE, "notes.jpg")),
        "missing_image": multipart(("prompt", "a short caption", None)),
        "unknown_task": multipart(("image", image_bytes(61), "photo.png"), ("task", "OD", None)),
    }
    return "/caption", {"data": forms[mistake]}


# (status, words in the message) per family and mistake; OpenAI's (code, param) are below
EXPECTED: dict[tuple[str, str], tuple[int, str]] = {
    ("native", "bad_base64"): (400, "Invalid image data: not valid base64"),
    ("native", "not_an_image"): (400, "Invalid image data"),
    ("native", "missing_image"): (422, "Field required: 'image'"),
    ("native", "unknown_task"): (400, "Invalid prompt '<OD>'"),
    ("openai", "bad_base64"): (400, "Invalid image data: not valid base64"),
    ("openai", "not_an_image"): (400, "Invalid image data"),
    ("openai", "missing_image"): (400, "No image in the request"),
    ("openai", "unknown_task"): (400, "Unknown task <OD>"),
    ("responses", "bad_base64"): (400, "Invalid image data: not valid base64"),
    ("responses", "not_an_image"): (400, "Invalid image data"),
    ("responses", "missing_image"): (400, "No image in the request"),
    ("responses", "unknown_task"): (400, "Unknown task <OD>"),
    ("extras", "bad_base64"): (400, "Invalid image data: not valid base64"),
    ("extras", "not_an_image"): (400, "Invalid image data"),
    ("extras", "missing_image"): (400, '"image" is required'),
    ("extras", "unknown_task"): (400, "Unknown task <OD>"),
    ("multipart", "bad_base64"): (400, "Invalid image data"),
    ("multipart", "not_an_image"): (400, "Invalid image data"),
    ("multipart", "missing_image"): (400, "No image uploaded"),
    ("multipart", "unknown_task"): (400, "Invalid prompt 'OD'"),
}
OPENAI_CODES = {
    "bad_base64": ("invalid_image", "messages[0].content[1].image_url"),  # the image at fault
    "not_an_image": ("invalid_image", "messages[0].content[1].image_url"),
    "missing_image": ("invalid_request", "messages"),
    "unknown_task": ("invalid_task", None),
}
RESPONSES_PARAMS = {"bad_base64": "input[0].content[1].image_url", "missing_image": "input"}
RESPONSES_PARAMS["not_an_image"] = RESPONSES_PARAMS["bad_base64"]


def message_of(family: str, mistake: str, reply: Any) -> str:
    """Check ``reply`` has exactly the family's error shape; return its message."""
    assert isinstance(reply, dict)
    if family in ("native", "multipart"):
        assert set(reply) == {"detail"} and isinstance(reply["detail"], str)
        return str(reply["detail"])
    if family == "extras":
        assert set(reply) == {"error"} and isinstance(reply["error"], str)
        return str(reply["error"])
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)
    code, param = OPENAI_CODES[mistake]
    if family == "responses":
        param = RESPONSES_PARAMS.get(mistake)
    assert (error["code"], error["param"]) == (code, param)
    return str(error["message"])


@pytest.mark.parametrize("mistake", MISTAKES)
@pytest.mark.parametrize("family", ["native", "openai", "responses", "extras", "multipart"])
async def test_every_family_answers_each_mistake_in_its_own_shape(
    tiny: Settings, family: str, mistake: str
) -> None:
    path, arguments = request_for(family, mistake)
    async with running_server(tiny) as url, ClientSession(url) as session:
        async with session.post(path, **arguments) as response:
            status, content_type, reply = response.status, response.content_type, await response.json()
    expected_status, words = EXPECTED[(family, mistake)]
    assert (status, content_type) == (expected_status, "application/json"), reply
    message = message_of(family, mistake, reply)
    assert words in message, message


@pytest.mark.parametrize("family", ["native", "openai", "responses", "extras", "multipart"])
async def test_an_unknown_task_is_answered_with_the_valid_ones(tiny: Settings, family: str) -> None:
    path, arguments = request_for(family, "unknown_task")
    async with running_server(tiny) as url, ClientSession(url) as session:
        async with session.post(path, **arguments) as response:
            reply = await response.json()
    message = message_of(family, "unknown_task", reply)
    assert "<CAPTION>" in message and "<GENERATE_TAGS>" in message, message


# --- 5. the documentation's examples --------------------------------------------------------------


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", doc_text(), re.M | re.S)


def check_reply(value: Any) -> None:
    """A successful reply of any family: no error key, and the caption where one belongs."""
    if isinstance(value, dict):
        assert "detail" not in value and value.get("error") is None, value  # a response has "error": null
        if "choices" in value:
            assert value["choices"][0]["message"]["content"]
        if value.get("object") == "response":
            assert value["status"] == "completed" and value["output"][0]["content"][0]["text"]
        if "caption" in value:
            assert value["caption"]
        if "result" in value:
            assert value["result"]
        for result in value.get("results", []):
            assert result.get("caption") and "error" not in result, result


def check_events(text: str) -> None:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_the_docs_bash_and_python_examples_work(tiny: Settings, tmp_path: Path) -> None:
    bash_blocks, python_blocks = doc_blocks("bash"), doc_blocks("python")
    text = "".join(bash_blocks)
    for route in (
        "/process_image",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/models",
        "/api/modules",
        "/api/caption",
        "/caption",
        "/batch_caption",
    ):
        assert route in text, f"the API pages have no bash example for {route}"
    assert len(python_blocks) == 1 and "OpenAI(" in python_blocks[0]
    doc = doc_text()
    assert "--cors-origin " in doc and "--cors-origins" not in doc  # the flag is singular, repeatable

    (tmp_path / "photo.jpg").write_bytes(image_bytes(71, "JPEG"))
    (tmp_path / "second.png").write_bytes(image_bytes(72, "PNG"))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "IMAGE": str(tmp_path / "photo.jpg"),
        "IMAGE2": str(tmp_path / "second.png"),
    }
    async with running_server(tiny) as url:
        env["VISION_URL"] = url
        results = await asyncio.gather(
            *(run_shell(f"set -eo pipefail\n{block}", tmp_path, env) for block in bash_blocks)
        )
        script = tmp_path / "sdk_example.py"
        script.write_text(python_blocks[0], encoding="utf-8")
        python = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cwd=tmp_path,
            env={**env, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(python.communicate(), timeout=60)

    for block, (code, stdout, stderr) in zip(bash_blocks, results, strict=True):
        assert code == 0, f"{block}\n{stderr}"
        curls = len(re.findall(r"\bcurl\s", block))
        if '"stream": true' in block:
            check_events(stdout)
            continue
        values = json_documents(stdout)
        assert len(values) == curls, (block, stdout)
        for value in values:
            check_reply(value)
    assert python.returncode == 0, err.decode()
    caption, streamed, models, answered, answered_streamed = out.decode().splitlines()
    assert caption and streamed == caption and models == "['test:tiny']"
    assert answered == caption and answered_streamed == caption  # the Responses API, same caption
