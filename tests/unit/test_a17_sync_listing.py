"""Attack on ``repo sync`` (issue 17): an S3-compatible endpoint whose listing never ends
(a new continuation token on every page) must not keep the sync running without bound
(publisher/_sync_dest.py, ``S3Destination.existing``)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from modelward.publisher import _sync_dest
from modelward.publisher._sync_dest import S3Destination, parse_s3_url
from modelward.publisher.errors import SyncTransportError


class _Endless:
    """A client whose listing pages never end; counts them."""

    def __init__(self, contents: list[dict[str, Any]]) -> None:
        self.pages = 0
        self.contents = contents

    def get_paginator(self, _name: str) -> Any:
        client = self

        class P:
            def paginate(self, **_kw: Any) -> Iterator[dict[str, Any]]:
                for _ in itertools.count():
                    client.pages += 1
                    assert client.pages <= 1000, "the sync went on listing"
                    yield {"Contents": client.contents if client.pages == 1 else [],
                           "IsTruncated": True}
        return P()

    def head_object(self, **_kw: Any) -> dict[str, Any]:
        return {"Metadata": {"sha256": "0" * 64}, "CacheControl": "no-cache"}


def test_an_endless_listing_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sync_dest, "MAX_LIST_PAGES", 50)
    client = _Endless([])
    dest = S3Destination(parse_s3_url("s3://bucket/p"), client)
    with pytest.raises(SyncTransportError, match="listing goes on"):
        dest.existing(["metadata/timestamp.json"])
    assert client.pages == 50


def test_the_listing_ends_once_every_key_is_seen() -> None:
    client = _Endless([{"Key": "p/metadata/timestamp.json", "Size": 3}])
    dest = S3Destination(parse_s3_url("s3://bucket/p"), client)
    assert dest.existing(["metadata/timestamp.json"])["metadata/timestamp.json"].size == 3
    assert client.pages == 1
