"""Issue 16, must show 1 (HTTPS): delta v1 -> v2 through real nginx and swtpm fetches only
the chunks the device lacks; the result passes its health check and the boot check."""

from __future__ import annotations

import json
import time

from modelward.updater.bundle._chunkindex import fetch_bytes
from modelward.updater.install._delta import coalesce, hint_path, index_fingerprint
from tests.conftest import World
from tests.integration._i16_delta import bundle_gets, publish


def _expected(v1, v2):  # type: ignore[no-untyped-def]
    """Chunk bytes and gap bytes of the ranges a device on v1 fetches for v2."""
    have = {c.sha256 for f in v1.files for c in f.chunks}
    seen: set[bytes] = set()
    spans = []
    for f in v2.files:
        for c in f.chunks:
            if c.sha256 not in have and c.sha256 not in seen:
                seen.add(c.sha256)
                spans.append((c.offset, c.length))
    ranges = coalesce(spans)
    return sum(n for _, n in spans), sum(r.gap_bytes for r in ranges), len(ranges)


def test_delta_v1_to_v2_over_https_fetches_only_missing_chunks(world: World) -> None:
    b1, ix1 = publish(world, "1.0.0")
    t0 = time.monotonic()
    world.update()  # a full install with an index: the same path, nothing held
    full_ms = (time.monotonic() - t0) * 1000
    assert world.active_version() == "1.0.0"
    full_gets = bundle_gets(world, "1.0.0")
    assert sum(n for _, n, _ in full_gets) >= ix1.data_bytes
    assert hint_path(world.state, index_fingerprint(ix1)).is_file()

    b2, ix2 = publish(world, "2.0.0", changed_rows=100)
    chunk_bytes, gap_bytes, nranges = _expected(ix1, ix2)
    assert chunk_bytes == fetch_bytes(ix2, {c.sha256 for f in ix1.files for c in f.chunks})
    assert 0 < chunk_bytes < b2.stat().st_size // 2  # most of v2 is v1's
    t0 = time.monotonic()
    world.update()
    delta_ms = (time.monotonic() - t0) * 1000
    assert world.active_version() == "2.0.0"
    gets = bundle_gets(world, "2.0.0")
    served = sum(n for _, n, _ in gets)
    assert served == chunk_bytes + gap_bytes, (gets, chunk_bytes, gap_bytes)
    assert len(gets) == nranges
    journal = json.loads((world.state / "journal.json").read_bytes())
    assert journal["step"] == "active"
    # the slot's files are v2's, and the boot check verifies them against the record
    assert (world.state / "current" / "model.onnx").read_bytes() == _model_bytes(b2)
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr
    print(f"\nfull v1 install: {sum(n for _, n, _ in full_gets)} bytes, {full_ms:.0f} ms; "
          f"delta v1->v2: {served} bytes served ({chunk_bytes} chunk + {gap_bytes} gap "
          f"in {nranges} ranges) of {b2.stat().st_size}, {delta_ms:.0f} ms")


def _model_bytes(bundle):  # type: ignore[no-untyped-def]
    import tarfile

    with tarfile.open(bundle) as t:
        f = t.extractfile("model.onnx")
        assert f is not None
        return f.read()


def test_delta_v1_to_v2_over_mqtt_fetches_only_missing_chunks(mqtt_world) -> None:  # type: ignore[no-untyped-def]
    w = mqtt_world
    _, ix1 = publish(w, "1.0.0")
    w.update()
    assert w.active_version() == "1.0.0"
    b2, ix2 = publish(w, "2.0.0", changed_rows=100)
    chunk_bytes, gap_bytes, nranges = _expected(ix1, ix2)
    before = w.served_bytes(b2.name)
    assert before == 0
    w.update()
    assert w.active_version() == "2.0.0"
    served = w.served_bytes(b2.name)
    assert served == chunk_bytes + gap_bytes, (served, chunk_bytes, gap_bytes)
    assert served < b2.stat().st_size // 2  # (the boot check: the HTTPS test above)
