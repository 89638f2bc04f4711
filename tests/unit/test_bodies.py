"""JSON bodies: big ones are parsed without one long GIL-holding call, to the same value."""

from __future__ import annotations

import base64
import json
import random
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


def structural(text: bytes) -> int:
    """The commas and opening brackets outside strings, by walking the text a byte at a time."""
    count, inside, escaped = 0, False, False
    for byte in text:
        if inside:
            inside = escaped or byte != 0x22
            escaped = not escaped and byte == 0x5C
        elif byte == 0x22:
            inside = True
        elif byte in b",[{":
            count += 1
    return count


@pytest.mark.parametrize("seed", range(4))
def test_value_count_leaves_out_what_is_inside_strings(seed: int) -> None:
    """Strings of commas, brackets, quotes and backslashes in every order (an escaped backslash
    before a closing quote, an escaped quote before a comma): counted as the walk counts them."""
    rng = random.Random(seed)
    pieces = [",", "[", "{", '"', "\\", "a", " ", "\n"]
    strings = ["".join(rng.choices(pieces, k=rng.randrange(40))) for _ in range(20_000)]
    text = json.dumps({"messages": [{"role": "user", "content": s} for s in strings]}).encode()
    assert text.count(b",") + text.count(b"[") + text.count(b"{") > bodies.MAX_JSON_VALUES
    assert bodies.value_count(text) == structural(text) == 3 * len(strings) + 1


def test_value_count_of_a_bomb_stays_over_the_limit() -> None:
    for bomb in (b"[" + b"[]," * 200_000 + b"[]]", json.dumps(['"a", "b"'] * 200_000).encode()):
        assert bodies.value_count(bomb) > bodies.MAX_JSON_VALUES
        with pytest.raises(BadRequest, match="outside strings"):
            parse_json(bomb)
