"""API key, key file, rate limit: refusals come in each family's own shape, probes stay open."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import tiny_settings
from tests.support.images import b64
from tests.support.serving import client_for
from vision_server.api.ratelimit import RateLimiter
from vision_server.app import create_app
from vision_server.settings import Settings, SettingsError, load_settings
from vision_server.testing.fake import FakeCaptioner

KEY = "s3cret-key"
GOOD = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory, api_key=KEY)


async def test_native_route_needs_the_key(keyed: Settings) -> None:
    body = {"image": b64(4), "prompt": "<CAPTION>"}
    async with client_for(keyed) as session:
        async with session.post("/process_image", json=body, headers={"X-Request-ID": "req-7"}) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="vision-server"'
            assert r.headers["X-Request-ID"] == "req-7"
            assert set(await r.json()) == {"detail"}  # the native family's shape
        wrong = {"Authorization": "Bearer nope"}
        async with session.post("/process_image", json=body, headers=wrong) as r:
            assert r.status == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
        async with session.post("/process_image", json=body, headers={"Authorization": KEY}) as r:
            assert r.status == 401  # the key without the Bearer scheme is not accepted
        async with session.post("/process_image", json=body, headers=GOOD) as r:
            assert r.status == 200 and (await r.json())["result"]  # a real caption


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "Missing API key: send the header 'Authorization: Bearer <api key>'."),
        ({"Authorization": KEY}, "lacks the 'Bearer ' before the key"),  # the key alone
        ({"Authorization": "Basic dXNlcjpzM2NyZXQ="}, "holds 'Basic' credentials"),
        ({"Authorization": "Bearer "}, "says 'Bearer' but holds no key"),  # SillyTavern, no key saved
        ({"X-API-Key": KEY}, "reads the key from Authorization, not X-API-Key"),
        ({"api-key": KEY}, "reads the key from Authorization, not Api-Key"),  # Azure OpenAI's header
    ],
)
async def test_a_key_sent_the_wrong_way_is_named(tmp_path: Path, headers: dict[str, str], says: str) -> None:
    """A key that is there but not as 'Authorization: Bearer KEY' was 'Missing API key', which
    sends the user looking for a key they already gave; the message now says what is wrong."""
    settings = Settings(cache_dir=tmp_path, api_key=KEY, admin_key="admin-key")
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.get("/v1/models", headers=headers) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="vision-server"'
            message = (await r.json())["error"]["message"]
        assert says in message and "'Authorization: Bearer <api key>'" in message
        assert KEY not in message  # never echoed
        async with session.post("/v1/model/unload", headers={"Authorization": "admin-key"}) as r:
            assert r.status == 401  # the admin key without its scheme: named the same way
            assert "lacks the 'Bearer ' before the key" in (await r.json())["error"]["message"]


async def test_each_family_answers_401_in_its_own_shape(keyed: Settings) -> None:
    async with client_for(keyed) as session:
        async with session.get("/v1/models") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            error = (await r.json())["error"]
            assert {"message", "type", "param", "code"} <= set(error)  # OpenAI SDKs read this
        async with session.get("/v1/status") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        async with session.get("/v1/models", headers=GOOD) as r:
            assert r.status == 200


async def test_a_path_that_is_no_route_answers_404_before_the_key_check(keyed: Settings) -> None:
    """A mistyped base URL got a 401 (native-shaped even under /v1/) that sent the user looking at
    the key; the 404 with the hint comes first, with or without a key, in the family's shape."""
    async with client_for(keyed) as session:
        for headers in ({}, GOOD, {"Authorization": "Bearer nope"}):
            async with session.post("/v1//chat/completions", json={}, headers=headers) as r:
                assert r.status == 404 and "WWW-Authenticate" not in r.headers
                error = (await r.json())["error"]
            assert (
                error["type"] == "not_found_error"
                and "did you mean /v1/chat/completions?" in error["message"]
            )
            async with session.get("/v1/nowhere", headers=headers) as r:
                assert r.status == 404 and (await r.json())["error"]["message"] == "Not Found"
            async with session.get("/nowhere", headers=headers) as r:
                assert r.status == 404 and await r.json() == {"detail": "Not Found"}
            async with session.put("/v1/chat/completions", headers=headers) as r:
                assert r.status == 405 and r.headers["Allow"]
        async with session.post("/v1/chat/completions", json={}) as r:  # a route: the key still counts
            assert r.status == 401 and set((await r.json())["error"]) >= {"message", "type", "code"}


async def test_probes_and_metrics_stay_open(keyed: Settings) -> None:
    async with client_for(keyed) as session:
        for path in ("/health", "/ready", "/metrics"):
            async with session.get(path) as r:
                assert r.status == 200, path


async def test_cors_preflight_passes_without_a_key(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, api_key=KEY, cors_origins=("http://127.0.0.1:8000",))
    headers = {"Origin": "http://127.0.0.1:8000", "Access-Control-Request-Method": "POST"}
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.options("/api/caption", headers=headers) as r:
            assert r.status == 204
            allowed = {h.strip() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
            # The lane and client headers of a browser client must pass the preflight too.
            assert {"Authorization", "X-Priority", "X-Client-Id"} <= allowed


async def test_cors_answers_expose_the_keep_alive_granted_and_the_model(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, cors_origins=("http://127.0.0.1:8000",))
    body = {"image": b64(5), "prompt": "<CAPTION>", "keep_alive": "10m"}
    origin = {"Origin": "http://127.0.0.1:8000"}
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.post("/process_image", json=body, headers=origin) as r:
            assert r.status == 200 and r.headers["X-Keep-Alive"] and r.headers["X-Model"]
            exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
            # A page on another origin reads which model captioned only when it is exposed.
            assert {"X-Keep-Alive", "X-Request-ID", "Retry-After", "X-Model"} <= exposed


async def test_key_file_and_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"{KEY}\nsecond line is ignored\n", encoding="utf-8")
    settings = load_settings(environ={"VISION_SERVER_API_KEY_FILE": str(key_file)}, config_path=None)
    settings = dataclasses.replace(settings, cache_dir=tmp_path)
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.get("/prompts") as r:
            assert r.status == 401
        async with session.get("/prompts", headers=GOOD) as r:
            assert r.status == 200


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_unusable_key_file_stops_the_start(tmp_path: Path, content: str | None) -> None:
    key_file = tmp_path / "key.txt"
    if content is not None:
        key_file.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError, match="api_key_file"):
        create_app(Settings(cache_dir=tmp_path, api_key_file=key_file), FakeCaptioner())


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, rate_limit=2)
    async with client_for(settings, FakeCaptioner()) as session:
        for _ in range(2):
            async with session.get("/prompts") as r:
                assert r.status == 200
        async with session.get("/prompts") as r:
            assert r.status == 429
            assert 1 <= int(r.headers["Retry-After"]) <= 30  # one token every 30 s
            assert "limit is 2 a minute" in (await r.json())["detail"]
        async with session.get("/v1/models") as r:
            assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
        async with session.get("/health") as r:
            assert r.status == 200  # probes are never limited
        async with session.get("/metrics") as r:
            text = await r.text()
    assert 'vision_server_requests_rejected_total{reason="rate_limited"} 2.0' in text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_and_stays_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(60, burst=2, max_clients=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)  # 60/min: the next token in one second
    clock.now = 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now = 1.0
    assert limiter.acquire("a") == 0.0
    for client in ("b", "c", "d", "e"):
        limiter.acquire(client)
    assert len(limiter) == 3  # the least recently seen clients were forgotten


def test_rate_limit_is_off_by_default(tmp_path: Path) -> None:
    from vision_server.api.ratelimit import RATE_LIMITER

    app: Any = create_app(Settings(cache_dir=tmp_path), FakeCaptioner())
    assert RATE_LIMITER not in app
