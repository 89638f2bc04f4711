"""``/metrics`` on a real server with the tiny model: parsed as Prometheus parses it, moving with work."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Any

import pytest
from aiohttp import ClientSession
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gated import GatedFake, SlowToSize
from tests.support.images import b64
from tests.support.serving import client_for
from vision_server import __version__
from vision_server.app import create_app
from vision_server.engine.models import NamedModel
from vision_server.settings import Settings
from vision_server.testing.fake import FakeCaptioner

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def settings(tiny: Settings) -> Settings:
    return tiny


async def scrape(session: ClientSession) -> tuple[Samples, dict[str, str]]:
    """Every sample keyed by (name, sorted labels), and each family's type."""
    async with session.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_names_follow_prometheus_conventions(settings: Settings) -> None:
    async with client_for(settings) as session:
        samples, types = await scrape(session)
    ours = {name for name in types if name.startswith("vision_server_")}
    assert ours and all(name.startswith(("vision_server_", "process_")) for name in types)
    for name in ours:
        assert ":" not in name and re.fullmatch(r"[a-z0-9_]+", name)
        assert not name.endswith(("_milliseconds", "_ms", "_megabytes")), name
    counters = {name for name in ours if types[name] == "counter"}
    sampled = {sample[0] for sample in samples}
    assert counters and {name + "_total" for name in counters} <= sampled, counters
    expected = {
        "vision_server_queue_depth": "gauge",
        "vision_server_jobs_running": "gauge",
        "vision_server_model_state": "gauge",
        "vision_server_batch_size": "histogram",
        "vision_server_request_duration_seconds": "histogram",
        "vision_server_queue_wait_seconds": "histogram",
        "vision_server_inference_duration_seconds": "histogram",
        "vision_server_model_load_duration_seconds": "histogram",
        "vision_server_model_unload_duration_seconds": "histogram",
        "vision_server_model_loads": "counter",
        "vision_server_model_unloads": "counter",
        "vision_server_requests_rejected": "counter",
        "vision_server_build_info": "gauge",  # an Info metric, as the text format shows it
    }
    assert {name: types.get(name) for name in expected} == expected
    build = next(labels for (name, labels) in samples if name == "vision_server_build_info")
    assert dict(build)["version"] == __version__ and dict(build)["model"] == "test:tiny"
    assert value(samples, "vision_server_model_state", state="unloaded") == 1.0
    # exists before any load
    assert value(samples, "vision_server_model_loads_total", model="test:tiny", outcome="ok") == 0.0
    buckets = {dict(k[1])["le"] for k in samples if k[0] == "vision_server_inference_duration_seconds_bucket"}
    assert {"0.05", "600.0", "+Inf"} <= buckets  # long enough for a cold load plus a caption


async def test_counters_move_with_real_captions(settings: Settings) -> None:
    async with client_for(settings) as session:
        for seed in (1, 2):
            async with session.post("/process_image", json={"image": b64(seed), "prompt": "<CAPTION>"}) as r:
                assert r.status == 200
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<NOPE>"}) as r:
            assert r.status == 400
        async with session.get("/no/such/path") as r:
            assert r.status == 404
        samples, _ = await scrape(session)
        route = "native.process_image"
        duration = "vision_server_request_duration_seconds_count"
        assert value(samples, duration, route=route, status="200") == 2
        assert value(samples, duration, route=route, status="400") == 1
        assert value(samples, duration, route="unmatched", status="404") == 1
        tiny = {"model": "test:tiny"}
        assert value(samples, "vision_server_queue_wait_seconds_count", **tiny) == 2
        assert value(samples, "vision_server_batch_size_sum", **tiny) == 2
        assert value(samples, "vision_server_inference_duration_seconds_count", **tiny) >= 1
        assert value(samples, "vision_server_inference_duration_seconds_sum", **tiny) > 0
        assert value(samples, "vision_server_model_loads_total", **tiny, outcome="ok") == 1
        assert value(samples, "vision_server_model_load_duration_seconds_count", **tiny, outcome="ok") == 1
        assert value(samples, "vision_server_model_state", state="ready") == 1
        assert value(samples, "vision_server_model_state", state="unloaded") == 0
        assert value(samples, "vision_server_queue_depth") == 0
        assert value(samples, "vision_server_jobs_running") == 0

        async with session.post("/v1/model/unload") as r:
            assert r.status == 200
        samples, _ = await scrape(session)
        assert value(samples, "vision_server_model_unloads_total", **tiny, reason="admin") == 1
        for reason in ("idle", "shutdown", "evicted", "wake_failed"):  # every reason shows from the start
            assert value(samples, "vision_server_model_unloads_total", **tiny, reason=reason) == 0
        assert value(samples, "vision_server_model_unload_duration_seconds_count", **tiny) == 1
        assert value(samples, "vision_server_model_state", state="unloaded") == 1
        assert value(samples, "process_resident_memory_bytes") > 0


async def test_rejections_are_counted_by_reason(tmp_path: Any) -> None:
    settings = Settings(cache_dir=tmp_path, api_key="k", max_queue=1)
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.get("/prompts") as r:
            assert r.status == 401
        samples, _ = await scrape(session)  # /metrics is open by default, even with an API key
    assert value(samples, "vision_server_requests_rejected_total", reason="unauthorized") == 1
    assert value(samples, "vision_server_requests_rejected_total", reason="queue_full") == 0


async def test_status_and_metrics_answer_while_a_model_works_out_its_size(tmp_path: Any) -> None:
    slow = SlowToSize(model_id="slow", memory={"slow": 64})
    async with client_for(Settings(cache_dir=tmp_path), slow) as session:
        try:
            async with session.get("/v1/status") as response:
                assert response.status == 200
                (model,) = (await response.json())["models"]
            samples, _ = await scrape(session)
            assert model["memory_bytes"] is None  # not known yet, and nobody waited for it
            assert ("vision_server_served_model_memory_bytes", (("model", "slow"),)) not in samples
        finally:
            slow.sized.set()
        async with session.post("/process_image", json={"image": b64(1), "prompt": "<CAPTION>"}) as response:
            assert response.status == 200
        samples, _ = await scrape(session)
    assert value(samples, "vision_server_served_model_memory_bytes", model="slow") == 64
    assert slow.asked_on[0] is not slow.loop_thread


async def test_openmetrics_when_the_scraper_asks(tmp_path: Any) -> None:
    async with client_for(Settings(cache_dir=tmp_path), FakeCaptioner()) as session:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with session.get("/metrics", headers=headers) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            families = {family.name for family in parse_openmetrics(await response.text())}
    assert {"vision_server_model_loads", "vision_server_build", "vision_server_queue_depth"} <= families


async def test_metrics_can_require_the_key(tmp_path: Any) -> None:
    settings = Settings(cache_dir=tmp_path, api_key="k", metrics_require_key=True)
    async with client_for(settings, FakeCaptioner()) as session:
        async with session.get("/metrics") as response:
            assert response.status == 401
        async with session.get("/metrics", headers={"Authorization": "Bearer k"}) as response:
            assert response.status == 200


def test_each_app_has_its_own_registry(tmp_path: Any) -> None:
    first = create_app(Settings(cache_dir=tmp_path), FakeCaptioner())
    second = create_app(dataclasses.replace(Settings(cache_dir=tmp_path)), FakeCaptioner(model_id="other"))
    from vision_server.api.state import METRICS

    assert first[METRICS].registry is not second[METRICS].registry
    first[METRICS].request_rejected("draining")
    text = second[METRICS].render(None)[0].decode()
    assert 'vision_server_requests_rejected_total{reason="draining"} 0.0' in text


async def test_queue_and_running_jobs_per_served_model(tmp_path: Any) -> None:
    """With several models the totals do not say which one the work waits for."""
    held = GatedFake()
    models = [NamedModel("held", held), NamedModel("idle", FakeCaptioner())]
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, max_batch_size=1, max_batch_wait_ms=0)
    async with client_for(settings, models=models) as session:

        async def caption(seed: int) -> int:
            body = {"image": b64(seed), "prompt": "<CAPTION>", "model": "held"}
            async with session.post("/process_image", json=body) as response:
                return response.status

        first = asyncio.create_task(caption(1))
        assert await asyncio.to_thread(held.entered.wait, 30)  # the worker is inside its batch
        second = asyncio.create_task(caption(2))
        try:
            for _ in range(300):
                samples, types = await scrape(session)
                if value(samples, "vision_server_served_model_queue_depth", model="held") == 1:
                    break
                await asyncio.sleep(0.02)
        finally:
            held.gate.set()
        assert await asyncio.gather(first, second) == [200, 200]
    assert types["vision_server_served_model_queue_depth"] == "gauge"
    per_model = {
        (name, model): value(samples, f"vision_server_served_model_{name}", model=model)
        for name in ("queue_depth", "jobs_running")
        for model in ("held", "idle")
    }
    assert per_model == {
        ("queue_depth", "held"): 1,
        ("queue_depth", "idle"): 0,
        ("jobs_running", "held"): 1,
        ("jobs_running", "idle"): 0,
    }
    assert ("vision_server_served_model_queue_depth", (("model", "idle"),)) in samples  # 0, not absent


async def test_open_routes_show_served_names_and_no_local_paths(tmp_path: Any) -> None:
    """/metrics and /health answer without the key: they name models by their served names, and
    a directory served under its own path by its folder name, so no stranger reads the disk's
    layout (or the user's name) there. Requests still name the model as before."""
    models = [
        NamedModel("fast", FakeCaptioner(model_id="/home/me/private/fast-weights")),
        NamedModel("/home/me/models/promptgen", FakeCaptioner(model_id="/home/me/models/promptgen")),
    ]
    settings = Settings(cache_dir=tmp_path, api_key="k")
    async with client_for(settings, models=models) as session:
        keyed = {"Authorization": "Bearer k"}
        body = {"image": b64(1), "prompt": "<CAPTION>", "model": "/home/me/models/promptgen"}
        async with session.post("/process_image", json=body, headers=keyed) as response:
            assert response.status == 200 and response.headers["X-Model"] == "/home/me/models/promptgen"
        async with session.get("/metrics") as response:
            text = await response.text()
        async with session.get("/health") as response:
            health = await response.json()
    assert "/home/me" not in text and "/home/me" not in json.dumps(health)
    samples: Samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    build = next(dict(labels) for (name, labels) in samples if name == "vision_server_build_info")
    assert build["model"] == "fast"  # the default's served name, not its weights' path
    assert value(samples, "vision_server_served_model_state", model="promptgen", state="ready") == 1
    assert value(samples, "vision_server_served_model_state", model="fast", state="unloaded") == 1
    assert health["models_loaded"] == ["promptgen"]


async def test_what_each_model_did_is_labelled_with_it(tmp_path: Any) -> None:
    """Queue wait, batches, loads and unloads carry the model, so a server with several models
    tells which one is slow or keeps reloading (a directory served under its path shows its folder
    name, as everywhere anyone may read)."""
    models = [
        NamedModel("busy", FakeCaptioner(model_id="busy")),
        NamedModel("/home/me/models/quiet", FakeCaptioner(model_id="/home/me/models/quiet")),
    ]
    settings = Settings(cache_dir=tmp_path, idle_timeout=-1, max_batch_size=1, max_batch_wait_ms=0)
    async with client_for(settings, models=models) as session:
        for seed in (1, 2, 3):
            body = {"image": b64(seed), "prompt": "<CAPTION>", "model": "busy"}
            async with session.post("/process_image", json=body) as response:
                assert response.status == 200
        async with session.post("/v1/model/unload", json={"model": "busy"}) as response:
            assert response.status == 200
        samples, _ = await scrape(session)
    for name in ("queue_wait_seconds_count", "batch_size_count", "inference_duration_seconds_count"):
        assert value(samples, f"vision_server_{name}", model="busy") == 3, name
        assert value(samples, f"vision_server_{name}", model="quiet") == 0, name
    assert value(samples, "vision_server_model_loads_total", model="busy", outcome="ok") == 1
    assert value(samples, "vision_server_model_load_duration_seconds_count", model="busy", outcome="ok") == 1
    assert value(samples, "vision_server_model_unloads_total", model="busy", reason="admin") == 1
    assert value(samples, "vision_server_model_unload_duration_seconds_count", model="busy") == 1
    for name, reason in (("unloads", "admin"), ("loads", None)):  # the quiet model's zeros exist
        labels = {"model": "quiet", **({"reason": reason} if reason else {"outcome": "ok"})}
        assert (f"vision_server_model_{name}_total", tuple(sorted(labels.items()))) in samples
        assert value(samples, f"vision_server_model_{name}_total", **labels) == 0
    assert not any("/home/me" in str(labels) for _, labels in samples)
