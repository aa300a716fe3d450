"""fixorg: the delta's plan is capped at the whole bundle's requests; refused deltas are
remembered per release; a whole download in progress is resumed, not lost to the delta."""

from __future__ import annotations

import json
import random

import pytest

from modelward.updater._config import MqttConfig
from modelward.updater.install import _delta
from modelward.updater.install._delta import Range, cap_requests, coalesce


def _requests(ranges: list[Range], unit: int = _delta.REQUEST_BYTES) -> int:
    return sum(-(-r.length // unit) for r in ranges)


def test_the_request_unit_is_the_mqtt_block() -> None:
    assert MqttConfig.block_size == _delta.REQUEST_BYTES


def test_a_contiguous_fine_tune_is_not_merged() -> None:
    """(Goal (a): one range of the changed bytes stays that range.)"""
    r = coalesce([(100 << 20, 20 << 20)])
    assert cap_requests(r, 200 << 20) == r


@pytest.mark.parametrize("seed", range(30))
def test_capped_ranges_cover_the_spans_within_the_whole_bundles_requests(seed: int) -> None:
    rnd = random.Random(seed)
    length = rnd.randrange(1, 40) << 20
    unit = rnd.choice([1 << 16, 1 << 20])
    spans, pos = [], rnd.randrange(0, 1 << 14)
    while True:
        n = rnd.randrange(1 << 14, 1 << 18)
        if pos + n > length:
            break
        spans.append((pos, n))
        pos += n + rnd.choice([0, 100, _delta.MAX_GAP + 1, 1 << 16, 1 << 20])
    if not spans:
        return
    ranges = coalesce(spans)
    out = cap_requests(ranges, length, unit)
    if _requests(ranges, unit) <= -(-length // unit):
        assert out == ranges
    else:
        assert _requests(out, unit) <= -(-length // unit)
    ends = 0
    for r in out:  # sorted, disjoint, inside the bundle
        assert r.offset >= ends and r.offset + r.length <= length
        ends = r.offset + r.length
    for off, n in spans:  # every span inside one range
        assert any(r.offset <= off and off + n <= r.offset + r.length for r in out)
    assert sum(r.length - r.gap_bytes for r in out) == sum(n for _, n in spans)
    assert sum(r.length for r in out) <= length


def test_merging_keeps_the_largest_gaps() -> None:
    """Three ranges, limit two requests: the smallest gap is merged, the big one kept."""
    u = 1 << 20
    r = [Range(0, 1000), Range(2000, 1000), Range(10 * u, 1000)]
    out = cap_requests(r, 11 * u, 6 * u)  # (a bundle of 2 units: 2 requests)
    assert out == [Range(0, 3000, 1000), Range(10 * u, 1000)]


# -- the refused delta, remembered per release -----------------------------------------------


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import hashlib

    from tuf.api.metadata import TargetFile

    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.publisher._chunking import build_index
    from tests.integration._i16_delta import big_model

    tmp = tmp_path_factory.mktemp("rel")
    out = tmp / "classifier-1.0.0.tar"
    build_bundle(big_model(tmp / "m.onnx"), "classifier", "1.0.0", out,
                 options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return data, build_index(out, sha), TargetFile(len(data), {"sha256": sha},
                                                   "classifier/classifier-1.0.0.tar")


class _Memory:
    def __init__(self) -> None:
        self.noted: list[str] = []
        self.stalls = 0

    def delta_refused(self, target):  # type: ignore[no-untyped-def]
        return self.noted[-1] if self.noted else None

    def note_delta_refused(self, target, model, version, why):  # type: ignore[no-untyped-def]
        self.noted.append(why)

    def delta_stalls(self, target):  # type: ignore[no-untyped-def]
        return self.stalls

    def note_delta_stalls(self, target, model, version, n, why):  # type: ignore[no-untyped-def]
        self.stalls = n


def _session(ix, fail_index: int | None = -1):  # type: ignore[no-untyped-def]
    import hashlib

    from tuf.api import exceptions as tuf_exc
    from tuf.api.metadata import TargetFile

    from modelward.updater.install._tuf import convert_tuf_error

    class _S:
        index_fetches = 0

        def find_target(self, model, path):  # type: ignore[no-untyped-def]
            data = ix.to_bytes()
            return TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()},
                              path), "targets"

        def fetch_target_bytes(self, target, max_bytes):  # type: ignore[no-untyped-def]
            self.index_fetches += 1
            if fail_index != -1:
                e = (tuf_exc.DownloadError("reset") if fail_index is None
                     else tuf_exc.DownloadHTTPError("no", fail_index))
                raise convert_tuf_error(e, "index")
            return ix.to_bytes()

        def target_url(self, target):  # type: ignore[no-untyped-def]
            return "https://o/" + target.path
    return _S()


class _Origin:
    """Answers every range request with ``error`` (a forged 4xx, a garbled answer...)."""

    def __init__(self, data: bytes, error: BaseException | None) -> None:
        self.data, self.error, self.range_bytes, self.range_calls = data, error, 0, 0

    def fetch_ranges(self, url, ranges):  # type: ignore[no-untyped-def]
        self.range_calls += 1
        off, n = ranges[0]
        self.range_bytes += n
        yield off, self.data[off:off + n]
        if self.error is not None:
            raise self.error
        for off, n in ranges[1:]:
            self.range_bytes += n
            yield off, self.data[off:off + n]

    def fetch_from(self, url, offset):  # type: ignore[no-untyped-def]
        return iter([self.data[offset:]]), offset


def _poll(tmp, data, ix, tf, origin, memory, session=None):  # type: ignore[no-untyped-def]
    from modelward.updater.idle import Gate

    st = tmp / "state"
    st.mkdir(exist_ok=True)
    wholes: list[int] = []
    r = _delta.Release(tf, "classifier", "1.0.0", _delta.index_fingerprint(ix), "targets")
    out = _delta.fetch_release(session or _session(ix), origin, r, st, st / "staging",
                               st / "staging" / "incoming", [], Gate(),
                               lambda: (wholes.append(1), ("s", "m", []))[1],  # type: ignore[arg-type, return-value]
                               memory=memory)
    return out, wholes


def _errors():  # type: ignore[no-untyped-def]
    from tuf.api import exceptions as tuf_exc

    from modelward.updater.transport._ranges import RangeAnswerError
    return {"403": tuf_exc.DownloadHTTPError("forbidden", 403),
            "416": tuf_exc.DownloadHTTPError("unsatisfiable", 416),
            "garbled": RangeAnswerError("a part out of order", "u")}


@pytest.mark.parametrize("kind", ["403", "416", "garbled"])
def test_a_forged_refusal_costs_the_delta_once_per_release(tmp_path, rel, kind) -> None:  # type: ignore[no-untyped-def]
    """The broker/origin forging a 4xx (or garbling the ranges) at every poll: the first
    poll pays the delta's bytes up to the refusal and the whole bundle, later polls the
    whole bundle only (no index fetch, no range request)."""
    data, ix, tf = rel
    memory = _Memory()
    origin = _Origin(data, _errors()[kind])
    _, wholes = _poll(tmp_path, data, ix, tf, origin, memory)
    assert wholes == [1] and len(memory.noted) == 1 and origin.range_calls == 1
    session = _session(ix)
    for _ in range(3):
        out, wholes = _poll(tmp_path, data, ix, tf, origin, memory, session)
        assert wholes == [1] and out[3] is None
    assert origin.range_calls == 1 and session.index_fetches == 0


def test_a_transfer_failure_is_not_remembered(tmp_path, rel) -> None:  # type: ignore[no-untyped-def]
    from tuf.api import exceptions as tuf_exc

    from modelward.updater.errors import DownloadFailedError

    data, ix, tf = rel
    memory = _Memory()
    for i, e in enumerate((tuf_exc.DownloadError("connection reset"),
                           tuf_exc.DownloadHTTPError("busy", 503))):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(DownloadFailedError):
            _poll(tmp_path / str(i), data, ix, tf, _Origin(data, e), memory)
    assert memory.noted == []
    out, wholes = _poll(tmp_path / "0", data, ix, tf, _Origin(data, None), memory)
    assert wholes == [] and out[4].startswith("delta:")


@pytest.mark.parametrize(("status", "raises"), [(None, True), (503, True), (404, False)])
def test_an_index_that_does_not_come_for_now_is_tried_again(tmp_path, rel, status,  # type: ignore[no-untyped-def]
                                                             raises) -> None:
    """(Next attack: a broker dropping the index's download once would otherwise make
    the device start the whole bundle, then continue it rather than take the delta.)"""
    from modelward.updater.errors import DownloadFailedError

    data, ix, tf = rel
    session = _session(ix, fail_index=status)
    if raises:
        with pytest.raises(DownloadFailedError):
            _poll(tmp_path, data, ix, tf, _Origin(data, None), None, session)
    else:
        _, wholes = _poll(tmp_path, data, ix, tf, _Origin(data, None), None, session)
        assert wholes == [1]


def test_an_index_that_never_comes_takes_the_whole_bundle_after_a_few_polls(  # type: ignore[no-untyped-def]
        tmp_path, rel) -> None:
    """(A CDN that answers 503 for the index files only, a careless operator's or an
    attacker's: bounded like ranges that break off, then the whole bundle.)"""
    from modelward.updater.errors import DownloadFailedError

    data, ix, tf = rel
    memory, session = _Memory(), _session(ix, fail_index=503)
    for _ in range(1, _delta.MAX_DELTA_STALLS):
        with pytest.raises(DownloadFailedError):
            _poll(tmp_path, data, ix, tf, _Origin(data, None), memory, session)
    _, wholes = _poll(tmp_path, data, ix, tf, _Origin(data, None), memory, session)
    assert wholes == [1] and len(memory.noted) == 1
    assert session.index_fetches == _delta.MAX_DELTA_STALLS


def test_a_planted_whole_stage_only_costs_the_whole_bundle(tmp_path, rel) -> None:  # type: ignore[no-untyped-def]
    """(The disk attacker plants a skeleton of the target's key: the whole bundle is
    taken, which verifies every byte; a link or an empty file is not a stage.)"""
    data, ix, tf = rel
    staging = tmp_path / "state" / "staging"
    staging.mkdir(parents=True)
    key = tf.hashes["sha256"]
    (staging / f"{key}.part").symlink_to(tmp_path / "elsewhere")
    out, wholes = _poll(tmp_path, data, ix, tf, _Origin(data, None), None)
    assert wholes == [] and out[4].startswith("delta:")
    (staging / f"{key}.part").write_bytes(b"x" * 4096)
    _, wholes = _poll(tmp_path, data, ix, tf, _Origin(data, None), None)
    assert wholes == [1]


def test_the_store_remembers_a_refused_delta_without_rejecting_the_release(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from modelward.updater.install._rejections import DELTA_REFUSED, RejectionStore
    from tests.unit.test_i13_rejections import NOW, FakeTpm, cand, health

    tpm = FakeTpm()
    s = RejectionStore(tmp_path, tpm, clock=lambda: NOW)
    v2 = cand("2.0.0")
    assert s.delta_refused(v2.target) is None
    s.note_delta_refused(v2.target, "classifier", "2.0.0", "ChunkIndex\x00lied")
    again = RejectionStore(tmp_path, tpm, clock=lambda: NOW + 5)
    hit = again.delta_refused(v2.target)
    assert hit is not None and hit.reason == DELTA_REFUSED and "\x00" not in hit.detail
    choice = again.choose([v2], "dev-1", "stable")  # still a candidate
    assert choice is not None and choice.release is v2
    assert again.delta_refused(cand("2.0.0", digest="ab" * 32).target) is None
    again.note_failure(v2.target, "classifier", "2.0.0", health())  # both kept
    assert {r.reason for r in again.load()} == {DELTA_REFUSED, "HealthCheckError"}
    assert again.choose([v2], "dev-1", "stable") is None
    later = RejectionStore(tmp_path, tpm, clock=lambda: NOW + 25 * 3600)
    assert later.delta_refused(v2.target) is None  # (a day at most)
    tampered = json.loads((tmp_path / "rejections.json").read_text())
    tampered["rejections"][0]["reason"] = "HealthCheckError"
    (tmp_path / "rejections.json").write_text(json.dumps(tampered))
    assert RejectionStore(tmp_path, tpm, clock=lambda: NOW).entries() == ()


class _Resetting(_Origin):
    """Breaks off every range request after ``good`` bytes (a network error, not a
    protocol one): an origin or broker that resets only the delta's requests."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data, None)
        self.good = good

    def fetch_ranges(self, url, ranges):  # type: ignore[no-untyped-def]
        from tuf.api import exceptions as tuf_exc

        self.range_calls += 1
        sent = 0
        for off, n in ranges:
            for i in range(off, off + n, 4096):
                if sent >= self.good:
                    raise tuf_exc.DownloadError("connection reset by peer")
                piece = self.data[i:min(i + 4096, off + n)]
                sent += len(piece)
                yield i, piece
        if sent >= self.good:
            raise tuf_exc.DownloadError("connection reset by peer")


def test_ranges_that_always_break_off_before_a_chunk_take_the_whole_bundle(tmp_path,  # type: ignore[no-untyped-def]
                                                                         rel) -> None:
    from modelward.updater.errors import DownloadFailedError

    data, ix, tf = rel
    memory = _Memory()
    origin = _Resetting(data, 1000)  # (less than any chunk)
    for i in range(1, _delta.MAX_DELTA_STALLS):
        with pytest.raises(DownloadFailedError):
            _poll(tmp_path, data, ix, tf, origin, memory)
        assert memory.stalls == i and memory.noted == []
    _, wholes = _poll(tmp_path, data, ix, tf, origin, memory)
    assert wholes == [1] and len(memory.noted) == 1 and "brought no chunk" in memory.noted[0]
    _, wholes = _poll(tmp_path, data, ix, tf, origin, memory)
    assert wholes == [1] and origin.range_calls == _delta.MAX_DELTA_STALLS


def test_a_delta_that_progresses_between_breaks_is_kept(tmp_path, rel) -> None:  # type: ignore[no-untyped-def]
    """(A link that drops now and then: every attempt brings chunks, the count starts
    again, and the delta completes; no whole bundle.)"""
    data, ix, tf = rel
    memory = _Memory()
    memory.stalls = _delta.MAX_DELTA_STALLS - 1
    origin = _Resetting(data, 600 << 10)
    polls = 0
    while True:
        polls += 1
        assert polls < 30
        try:
            out, wholes = _poll(tmp_path, data, ix, tf, origin, memory)
        except Exception:  # noqa: BLE001, S112 - DownloadFailedError: poll again
            assert memory.stalls == 0
            continue
        break
    assert wholes == [] and out[4].startswith("delta:") and memory.noted == []
    assert polls >= 3 and memory.stalls == 0, polls


def test_the_store_counts_stalls_and_forgets_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from modelward.updater.install._rejections import DELTA_STALLED, RejectionStore
    from tests.unit.test_i13_rejections import NOW, FakeTpm, cand

    tpm = FakeTpm()
    s = RejectionStore(tmp_path, tpm, clock=lambda: NOW)
    v2 = cand("2.0.0")
    assert s.delta_stalls(v2.target) == 0
    s.note_delta_stalls(v2.target, "classifier", "2.0.0", 2, "reset")
    again = RejectionStore(tmp_path, tpm, clock=lambda: NOW + 5)
    assert again.delta_stalls(v2.target) == 2 and again.delta_refused(v2.target) is None
    assert [r.reason for r in again.load()] == [DELTA_STALLED]
    assert again.choose([v2], "dev-1", "stable") is not None  # not a rejection
    again.note_delta_refused(v2.target, "classifier", "2.0.0", "then refused")
    assert again.delta_refused(v2.target) is not None and again.delta_stalls(v2.target) == 0
    again.note_delta_stalls(v2.target, "classifier", "2.0.0", 0, "")
    assert again.delta_refused(v2.target) is not None  # (clearing stalls keeps that)
