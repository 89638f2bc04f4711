"""JSON bodies: big ones are parsed without one long GIL-holding call, to the same value."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from vision_server.api import bodies
from vision_server.api.bodies import LIFT_MIN, parse_json
from vision_server.errors import BadRequest

BIG = base64.b64encode(bytes(range(256)) * 40_000).decode()  # 13.6 MB of base64


@pytest.mark.parametrize(
    "value",
    [
        {"image": BIG, "prompt": 'a "quoted" <CAPTION>'},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": BIG}}]}]},
        [BIG[: LIFT_MIN + 1], {"nested": [[BIG]]}, "é" * 10],
    ],
    ids=["native", "openai", "nested"],
)
def test_long_strings_are_lifted_out_before_json_parses_the_rest(
    value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = json.loads

    def spy(data: Any, **kwargs: Any) -> Any:
        sizes.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(bodies.json, "loads", spy)
    for raw in (json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()):
        assert parse_json(raw) == value
    assert sizes and max(sizes) < LIFT_MIN  # json.loads only ever saw the small remainder


def test_escaped_big_strings_and_broken_bodies_still_parse_or_fail_as_before() -> None:
    escaped = json.dumps({"image": BIG}).replace("/", "\\/").encode()  # PHP's json_encode style
    assert parse_json(escaped) == {"image": BIG}
    for broken in (b'{"image": "' + BIG.encode(), b'{"image": "' + BIG.encode() + b'" "x": 1}'):
        with pytest.raises(BadRequest) as ours:
            parse_json(broken)
        with pytest.raises(json.JSONDecodeError) as plain:
            json.loads(broken)
        assert str(plain.value) in str(ours.value)
