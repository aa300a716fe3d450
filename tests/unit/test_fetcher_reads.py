"""HTTPS reads grow while the link keeps them full and shrink when it is slow."""

from __future__ import annotations

from typing import Any

import pytest

from modelward.updater._config import HttpsConfig
from modelward.updater.transport import _fetcher as fetcher_mod
from modelward.updater.transport._fetcher import RequestsFetcher


class _Raw:
    def __init__(self, total: int) -> None:
        self.left, self.sizes = total, []  # type: ignore[var-annotated]

    def read(self, n: int, decode_content: bool = False) -> bytes:
        self.sizes.append(n)
        got = min(n, self.left)
        self.left -= got
        return b"x" * got

    read1 = read  # what has arrived: here, all that was asked for


class _Resp:
    def __init__(self, total: int) -> None:
        self.raw = _Raw(total)

    def close(self) -> None:
        pass


def _sizes(total: int, monkeypatch: pytest.MonkeyPatch, read_seconds: float) -> list[int]:
    clock = [0.0]

    def monotonic() -> float:  # the clock moves on between any two looks at it
        clock[0] += read_seconds
        return clock[0]

    monkeypatch.setattr(fetcher_mod.time, "monotonic", monotonic)
    f = RequestsFetcher(HttpsConfig("https://o/m/", "https://o/t/", min_speed=0))
    resp: Any = _Resp(total)
    assert sum(len(c) for c in f._chunks(resp, "u")) == total  # noqa: SLF001
    return list(resp.raw.sizes)


def test_fast_link_reads_grow_to_the_largest(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _sizes(8 << 20, monkeypatch, read_seconds=0.001)
    assert sizes[:5] == [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]
    assert max(sizes) == HttpsConfig("h", "h").chunk_size == 1 << 20


def test_slow_link_reads_shrink(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _sizes(1 << 20, monkeypatch, read_seconds=2.0)
    assert sizes[:4] == [64 << 10, 32 << 10, 16 << 10, 16 << 10]
