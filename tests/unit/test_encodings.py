"""Decoding a compressed request body: every form clients send is read, nothing short of whole is."""

from __future__ import annotations

import gzip
import zlib

import pytest

from vision_server.api.encodings import MAX_MEMBERS, decode
from vision_server.errors import BadRequest, PayloadTooLarge

TEXT = b'{"image": "' + b"QUJD" * 5000 + b'"}'


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def test_gzip_deflate_raw_deflate_and_gzip_members_are_read() -> None:
    assert decode(gzip.compress(TEXT), "gzip", len(TEXT), "gzip") == TEXT
    assert decode(zlib.compress(TEXT), "deflate", len(TEXT), "deflate") == TEXT
    assert decode(raw_deflate(TEXT), "deflate", len(TEXT), "deflate") == TEXT
    halves = gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:])  # cat a.gz b.gz
    assert decode(halves, "gzip", len(TEXT), "gzip") == TEXT


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_every_cut_is_the_same_400(coding: str) -> None:
    packed = gzip.compress(TEXT) if coding == "gzip" else zlib.compress(TEXT)
    messages = set()
    for cut in range(1, len(packed)):
        with pytest.raises(BadRequest) as refused:
            decode(packed[:cut], coding, len(TEXT), coding)
        messages.add(refused.value.message)
    assert len(messages) == 1 and f"not complete {coding}" in messages.pop()


def test_bytes_after_the_end_and_too_many_members_are_refused() -> None:
    with pytest.raises(BadRequest, match="5 bytes follow the end of its gzip data"):
        decode(gzip.compress(TEXT) + b"junk!", "gzip", len(TEXT), "gzip")
    with pytest.raises(BadRequest, match="2 bytes follow the end of its deflate data"):
        decode(zlib.compress(TEXT) + zlib.compress(b"")[:2], "deflate", len(TEXT), "deflate")
    members = gzip.compress(b"") * (MAX_MEMBERS + 1)
    with pytest.raises(BadRequest, match=f"more than {MAX_MEMBERS} gzip members"):
        decode(members, "gzip", 10, "gzip")


def test_output_past_the_limit_is_a_413_at_any_member() -> None:
    with pytest.raises(PayloadTooLarge):
        decode(gzip.compress(TEXT), "gzip", len(TEXT) - 1, "gzip")
    with pytest.raises(PayloadTooLarge):
        decode(gzip.compress(TEXT) * 2, "gzip", len(TEXT) + 1, "gzip")
