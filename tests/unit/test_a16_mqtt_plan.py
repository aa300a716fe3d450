"""Attack (issue 16, a team key holder): a range fetch over MQTT plans every
block of every range before it asks for the first (``_fetch_ranges``: ``plan`` and
``asked``, a tuple and a dict entry per block): the memory grows with the bytes asked, not
with the window in flight. A team signs a large target and an index whose chunks a device
does not hold; one range of 1 GiB at 4 KiB blocks is 256 Ki blocks planned at once (~40 MiB;
1 TiB at the default 1 MiB blocks: 1 Mi blocks, ~156 MiB)."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest

from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import MqttFetcher, block_header
from tests.unit.test_i16_ranges import BS, _FakeConn


class _Zeros:
    """A file of ``n`` zero bytes, without holding them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> bytes:
        return bytes(min(s.stop, self.n) - s.start)


def test_an_mqtt_range_fetch_plans_in_bounded_memory() -> None:
    size = 1 << 30
    c = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=BS,
                   span_blocks=1, window=4)
    f = MqttFetcher(c)
    conn: Any = _FakeConn(f, _Zeros(size), lambda r, corr, a: a)  # type: ignore[arg-type]
    f._conn = conn  # noqa: SLF001
    tracemalloc.start()
    try:
        it = f.fetch_ranges("mqtt://repo/targets/x", [(0, size)])
        off, piece = next(it)
        _, peak = tracemalloc.get_traced_memory()
        it.close()  # type: ignore[attr-defined]
    finally:
        tracemalloc.stop()
    assert off == 0 and len(piece) == BS
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB before the first block was handed on"


def _held_by_mqtt() -> int:
    """Bytes traced to allocations made by the MQTT transport (not by other threads a test
    before this one left running, which tracemalloc counts too)."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/updater/transport/_mqtt.py", all_frames=True)])
    return sum(t.size for t in snap.traces)


def test_a_bridge_busy_once_for_every_block_leaves_nothing_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the attacker tries next (a broker or a hostile bridge): answer "busy" once for
    every block. The per-block state of a block handed on is dropped with it: memory stays
    flat however many blocks are asked."""
    import modelward.updater.transport._mqtt as mqtt_mod

    monkeypatch.setattr(mqtt_mod, "busy_pause", lambda n: 0.0)
    # (a handler an earlier test left on a captured stream would grow with every line)
    monkeypatch.setattr(mqtt_mod.logger, "disabled", True)
    n = 2500
    size = n * BS
    c = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=BS,
                   span_blocks=1, window=4,
                   range_requests_per_s=1e9)
    f = MqttFetcher(c)
    refused: set[int] = set()  # (bounded: each offset is dropped on its second answer)

    def busy_once(req: dict[str, Any], corr: bytes, answers: list[bytes]) -> list[bytes]:
        conn.asked.clear()  # (the fake's own log)
        conn.corr.clear()
        if req["offset"] in refused:
            refused.discard(req["offset"])
            return answers
        refused.add(req["offset"])
        return [block_header(503, req["offset"], size)]

    conn: Any = _FakeConn(f, _Zeros(size), busy_once)  # type: ignore[arg-type]
    f._conn = conn  # noqa: SLF001
    it = f.fetch_ranges("mqtt://repo/targets/x", [(0, size)])
    tracemalloc.start(8)
    try:
        got, samples = 0, []
        for _, piece in it:
            got += len(piece)
            if got % (100 * BS) == 0:
                gc.collect()
                samples.append(_held_by_mqtt())
    finally:
        tracemalloc.stop()
    assert got == size
    grown = min(samples[-5:]) - min(samples[2:7])  # (the least held: transients aside)
    assert grown < 40_000, f"{grown} bytes more after {n - 700} more blocks"
