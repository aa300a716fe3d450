"""Issue 16: the delta planner (pure), the hint reader and the assembler against fakes."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.bundle._chunkindex import (
    MAX_INDEX_BYTES,
    Chunk,
    ChunkIndex,
    IndexedFile,
    index_path,
)
from modelward.updater.errors import ChunkIndexError
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.install._delta import (
    Base,
    DeltaChunkError,
    Place,
    Range,
    check_usable,
    coalesce,
    plan_needs,
    read_hint,
    write_hint,
)
from modelward.updater.install._search import Found
from modelward.updater.install._tuf import _candidate
from tests.unit._delta_fakes import IndexSession as _Session


def _h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def _ix(files: dict[str, list[tuple[int, int]]], start: int = 512) -> ChunkIndex:
    """A hand-made index (not validated): file -> [(sha id, length)]."""
    out, pos = [], start
    for path, chunks in files.items():
        cs, off = [], pos
        for sid, n in chunks:
            cs.append(Chunk(off, n, _h(sid)))
            off += n
        out.append(IndexedFile(path, off - pos, "0" * 64, "0" * 64, pos, tuple(cs)))
        pos = off + 512
    return ChunkIndex(pos, "0" * 64, {}, 0, b"{}", None, tuple(out))  # type: ignore[arg-type]


# -- plan_needs -------------------------------------------------------------------------


def test_nothing_held_every_chunk_is_a_need_without_sources() -> None:
    needs = plan_needs(_ix({"m": [(1, 10), (2, 20)]}), {}, [])
    assert [(n.sha256, n.length, n.sources) for n in needs] == [(_h(1), 10, ()),
                                                                (_h(2), 20, ())]


def test_a_chunk_repeated_in_the_release_is_one_need_with_every_place() -> None:
    needs = plan_needs(_ix({"m": [(1, 10), (2, 20), (1, 10)], "v": [(1, 10)]}), {}, [])
    assert len(needs) == 2
    assert needs[0].dests == (Place("incoming", "m", 0), Place("incoming", "m", 30),
                              Place("incoming", "v", 0))


def test_in_place_incoming_comes_first_and_only_within_the_file() -> None:
    ix = _ix({"m": [(1, 10), (2, 20)]})
    needs = plan_needs(ix, {"m": 15}, [Base("active", {"m": 30})])
    assert needs[0].sources[0] == Place("incoming", "m", 0)
    assert Place("incoming", "m", 10) not in needs[1].sources  # the file ends at 15
    assert needs[1].sources == (Place("active", "m", 10),)


def test_without_a_hint_the_same_path_and_offset_of_each_base() -> None:
    ix = _ix({"m": [(1, 10)]})
    needs = plan_needs(ix, {}, [Base("active", {"m": 10}), Base("previous", {"m": 9})])
    assert needs[0].sources == (Place("active", "m", 0),)  # previous is too short


def test_with_a_hint_chunks_are_found_where_they_moved() -> None:
    old = _ix({"m": [(9, 5), (1, 10)]})  # the chunk was at offset 5 of m
    new = _ix({"m": [(1, 10)], "x": [(9, 5)]})
    needs = plan_needs(new, {}, [Base("active", {"m": 15}, old)])
    assert needs[0].sources == (Place("active", "m", 5),)
    assert needs[1].sources == (Place("active", "m", 0),)


def test_a_hint_claiming_beyond_the_file_is_not_used() -> None:
    old = _ix({"m": [(9, 5), (1, 10)]})
    needs = plan_needs(_ix({"m": [(1, 10)]}), {}, [Base("active", {"m": 12}, old)])
    assert needs[0].sources == ()


def test_a_hint_does_not_add_same_offset_guesses() -> None:
    old = _ix({"m": [(7, 10)]})
    needs = plan_needs(_ix({"m": [(1, 10)]}), {}, [Base("active", {"m": 10}, old)])
    assert needs[0].sources == ()  # the hint says the slot has no such chunk


def test_sources_are_bounded() -> None:
    new = _ix({f"f{i}": [(1, 10)] for i in range(10)})
    needs = plan_needs(new, {f"f{i}": 10 for i in range(10)}, [])
    assert len(needs[0].sources) == _delta.MAX_SOURCES


# -- coalesce ----------------------------------------------------------------------------


@pytest.mark.parametrize(("spans", "gap", "want"), [
    ([], 4096, []),
    ([(0, 10)], 0, [Range(0, 10)]),
    ([(0, 10), (10, 5)], 0, [Range(0, 15)]),  # adjacent
    ([(0, 10), (11, 5)], 0, [Range(0, 10), Range(11, 5)]),
    ([(0, 10), (11, 5)], 1, [Range(0, 16, 1)]),  # a counted gap
    ([(20, 5), (0, 10)], 4096, [Range(0, 25, 10)]),  # sorted first
    ([(0, 10), (5000, 10), (5010, 3)], 4096, [Range(0, 10), Range(5000, 13)]),
])
def test_coalesce(spans: list[tuple[int, int]], gap: int, want: list[Range]) -> None:
    assert coalesce(spans, gap) == want


def test_coalesce_refuses_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        coalesce([(0, 10), (5, 10)])


# -- a real bundle, its index, the hint and the assembler -------------------------------


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, ChunkIndex, TargetFile]:
    from tests.integration._i16_delta import big_model

    model = big_model(tmp_path / "m.onnx")
    out = tmp_path / "classifier-1.0.0.tar"
    build_bundle(model, "classifier", "1.0.0", out, options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/classifier-1.0.0.tar")
    return out, build_index(out, sha), tf


class _Fake:
    """A transport over the bundle's bytes that counts what it sends."""

    def __init__(self, data: bytes, native: bool = False) -> None:
        self.data, self.sent, self.calls = data, 0, 0
        if native:
            self.fetch_ranges = self._ranges

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        self.calls += 1

        def gen() -> Iterator[bytes]:
            for i in range(offset, len(self.data), 65536):
                piece = self.data[i:i + 65536]
                self.sent += len(piece)
                yield piece
        return gen(), offset

    def _ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[int, bytes]]:
        self.calls += 1
        for off, n in ranges:
            for i in range(off, off + n, 30000):
                piece = self.data[i:min(i + 30000, off + n)]
                self.sent += len(piece)
                yield i, piece


def _assemble(tmp: Path, ix: ChunkIndex, tf: TargetFile, fake: object,
              bases: list[tuple[Base, Path]] | None = None):  # type: ignore[no-untyped-def]
    staging = tmp / "state" / "staging"
    staging.parent.mkdir(exist_ok=True)
    return _delta.assemble(ix, tf, "https://o/x.tar", fake, staging,  # type: ignore[arg-type]
                           staging / "incoming", bases or [], Gate())


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("native", [False, True])
def test_full_install_fetches_everything_once(tmp_path: Path, release, native) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    fake = _Fake(bundle.read_bytes(), native)
    stage, manifest, entries, stats = _assemble(tmp_path, ix, tf, fake)
    assert stats.held_bytes == 0 and stats.fetched_bytes == ix.data_bytes
    assert _delta.slot_fingerprint(entries) == _delta.index_fingerprint(ix)
    from modelward.trust._fingerprint import directory_entries, slot_fingerprint

    assert slot_fingerprint(directory_entries(stage.incoming)) == _delta.index_fingerprint(ix)
    if native:
        assert fake.sent == stats.fetched_bytes + stats.gap_bytes
        assert fake.calls == 1


def test_a_mismatching_fetched_chunk_is_never_written(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    data = bytearray(bundle.read_bytes())
    bad = ix.files[0].chunks[2]
    data[bad.offset + 3] ^= 1
    with pytest.raises(DeltaChunkError) as e:
        _assemble(tmp_path, ix, tf, _Fake(bytes(data)))
    assert e.value.file == ix.files[0].path and e.value.chunk == 2
    assert "altered on the origin or in transit" in str(e.value)
    f = tmp_path / "state" / "staging" / "incoming" / ix.files[0].path
    got = f.read_bytes()[bad.offset - ix.files[0].data_offset:][:bad.length]
    assert got == b"\0" * bad.length  # nothing of it


def test_resume_hashes_in_place_and_a_link_in_incoming_is_not_followed(
        tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    _assemble(tmp_path, ix, tf, _Fake(bundle.read_bytes()))
    incoming = tmp_path / "state" / "staging" / "incoming"
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 100)
    other = ix.files[1].path
    (incoming / other).unlink()
    (incoming / other).symlink_to(victim)
    (incoming / "stray").write_bytes(b"planted")
    m = incoming / ix.files[0].path
    blob = bytearray(m.read_bytes())
    blob[ix.files[0].file_offset(ix.files[0].chunks[1]) + 1] ^= 1  # altered in the stage
    m.write_bytes(bytes(blob))
    fake = _Fake(bundle.read_bytes(), native=True)
    _, _, _, stats = _assemble(tmp_path, ix, tf, fake)
    assert victim.read_bytes() == b"x" * 100
    assert not (incoming / other).is_symlink() and not (incoming / "stray").exists()
    refetched = ix.files[0].chunks[1].length + ix.files[1].size
    assert stats.fetched_bytes == refetched
    assert stats.in_place_bytes == ix.data_bytes - refetched


def test_base_slot_chunks_are_rehashed_before_use(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    slot = tmp_path / "slot"
    slot.mkdir()
    data = bundle.read_bytes()
    for f in ix.files:
        (slot / f.path).write_bytes(data[f.data_offset:f.data_offset + f.size])
    c = ix.files[0].chunks[0]
    p = slot / ix.files[0].path
    b = bytearray(p.read_bytes())
    b[5] ^= 1
    p.write_bytes(bytes(b))
    base = Base("active", _delta.plain_sizes(slot), ix)
    fake = _Fake(data, native=True)
    _, _, _, stats = _assemble(tmp_path, ix, tf, fake, [(base, slot)])
    assert stats.fetched_bytes == c.length
    assert stats.held_bytes == ix.data_bytes - c.length


# -- hints -------------------------------------------------------------------------------


def test_hint_round_trip_and_pruning(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    _, ix, _ = release
    fp = _delta.index_fingerprint(ix)
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / ("a" * 64 + ".json")).write_bytes(b"old")
    write_hint(tmp_path, ix, [])
    assert read_hint(tmp_path, fp) == ix
    assert os.listdir(tmp_path / "chunks") == [f"{fp}.json"]
    assert (os.stat(tmp_path / "chunks" / f"{fp}.json").st_mode & 0o777) == 0o640


@pytest.mark.parametrize("plant", ["symlink", "garbage", "huge", "fifo", "other", "dirlink"])
def test_a_planted_hint_is_ignored(tmp_path: Path, release, plant: str) -> None:  # type: ignore[no-untyped-def]
    _, ix, _ = release
    fp = _delta.index_fingerprint(ix)
    d = tmp_path / "chunks"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{fp}.json").write_bytes(ix.to_bytes())
    if plant == "dirlink":
        d.symlink_to(outside)
    else:
        d.mkdir()
    h = d / f"{fp}.json"
    if plant == "symlink":
        h.symlink_to(outside / f"{fp}.json")
    elif plant == "garbage":
        h.write_bytes(b"\x00{not json")
    elif plant == "huge":
        with open(h, "wb") as f:
            f.truncate(MAX_INDEX_BYTES + 1)
    elif plant == "fifo":
        os.mkfifo(h)
    elif plant == "other":  # a valid index, but of another release
        other = ChunkIndex(ix.bundle_length, ix.bundle_sha256, ix.chunking,
                           ix.manifest_offset, ix.manifest_bytes, ix.manifest, ix.files[:1])
        h.write_bytes(other.to_bytes().replace(b"x", b"x"))
    assert read_hint(tmp_path, fp) is None


def test_check_usable_refuses_another_bundle_or_release(release) -> None:  # type: ignore[no-untyped-def]
    _, ix, tf = release
    fp = _delta.index_fingerprint(ix)
    check_usable(ix, tf, fp, "classifier", "1.0.0")
    for t, f, n, v in [(TargetFile(tf.length + 1, tf.hashes, tf.path), fp, "classifier",
                        "1.0.0"),
                       (TargetFile(tf.length, {"sha256": "0" * 64}, tf.path), fp,
                        "classifier", "1.0.0"),
                       (tf, "1" * 64, "classifier", "1.0.0"),
                       (tf, fp, "classifier", "2.0.0"), (tf, fp, "other", "1.0.0")]:
        with pytest.raises(ChunkIndexError):
            check_usable(ix, t, f, n, v)


def test_index_targets_are_no_candidates_and_not_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    path = index_path("classifier/classifier-1.0.0.tar")
    t = TargetFile(10, {"sha256": "0" * 64}, path)
    t.unrecognized_fields["custom"] = {"modelward-chunk-index": {"bundle": "x"}}
    with caplog.at_level(logging.DEBUG):
        assert _candidate(Found(path, t, "targets"), "classifier") is None
    assert not caplog.records


# -- transports that misbehave -------------------------------------------------------------


class _Liar(_Fake):
    """fetch_ranges that sends what ``shape`` makes of the honest pieces."""

    def __init__(self, data: bytes, shape: str) -> None:
        super().__init__(data, native=True)
        self.shape = shape

    def _ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[int, bytes]]:
        pieces = list(super()._ranges(url, ranges))
        if self.shape == "reordered":
            pieces[0], pieces[1] = pieces[1], pieces[0]
        elif self.shape == "outside":  # a byte before the range
            off, data = pieces[0]
            pieces[0] = (off - 1, self.data[off - 1:off] + data)
        elif self.shape == "short":
            pieces = pieces[:-1]
        elif self.shape == "overlong":
            off, data = pieces[-1]
            pieces[-1] = (off, data + b"x")
        yield from pieces


@pytest.mark.parametrize("shape", ["reordered", "outside", "short", "overlong"])
def test_a_transport_that_sends_other_bytes_is_refused(tmp_path: Path, release,  # type: ignore[no-untyped-def]
                                                       shape: str) -> None:
    from tuf.api import exceptions as tuf_exc

    bundle, ix, tf = release
    with pytest.raises(tuf_exc.DownloadError):
        _assemble(tmp_path, ix, tf, _Liar(bundle.read_bytes(), shape))


def test_an_origin_ignoring_range_is_no_delta(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release

    class _NoRange(_Fake):
        def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
            return super().fetch_from(url, 0)[0], 0

    with pytest.raises(_delta.DeltaUnavailable):
        _assemble(tmp_path, ix, tf, _NoRange(bundle.read_bytes()))


def test_a_fifo_or_link_in_the_base_slot_is_skipped(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    slot = tmp_path / "slot"
    slot.mkdir()
    os.mkfifo(slot / ix.files[0].path)  # nobody writes it: a read would block
    (slot / ix.files[1].path).symlink_to(bundle)
    sizes = {ix.files[0].path: 1 << 30, ix.files[1].path: 1 << 30}  # (as if measured)
    base = Base("active", sizes, None)
    _, _, _, stats = _assemble(tmp_path, ix, tf, _Fake(bundle.read_bytes(), native=True),
                               [(base, slot)])
    assert stats.held_bytes == 0 and stats.fetched_bytes == ix.data_bytes
    assert _delta.plain_sizes(slot) == {}


@pytest.mark.parametrize("plant", ["dirlink", "file"])
def test_a_planted_hint_directory_is_neither_written_through_nor_fatal(
        tmp_path: Path, release, plant: str) -> None:  # type: ignore[no-untyped-def]
    _, ix, _ = release
    outside = tmp_path / "outside"
    outside.mkdir()
    if plant == "dirlink":
        (tmp_path / "chunks").symlink_to(outside)
    else:
        (tmp_path / "chunks").write_bytes(b"x")
    write_hint(tmp_path, ix, [])  # logged, not raised: the install is committed already
    assert os.listdir(outside) == []
    assert read_hint(tmp_path, _delta.index_fingerprint(ix)) is None


# -- fetch_release: when the delta is used, and when the whole bundle comes -------------------


def _release(ix: ChunkIndex, tf: TargetFile, role: str = "targets") -> _delta.Release:
    return _delta.Release(tf, "classifier", "1.0.0", _delta.index_fingerprint(ix), role)


@pytest.mark.parametrize("case", ["no index", "other role", "garbage", "other release"])
def test_no_usable_index_takes_the_whole_bundle(tmp_path: Path, release, case: str) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    session = {"no index": _Session(None), "other role": _Session(ix, role="team-b"),
               "garbage": _Session(ix, data=b"{}"),
               "other release": _Session(ix)}[case]
    rel = _release(ix, tf)
    if case == "other release":
        rel = _delta.Release(tf, "classifier", "1.0.1", rel.fingerprint, rel.role)
    calls: list[int] = []

    def whole():  # type: ignore[no-untyped-def]
        calls.append(1)
        return "stage", "manifest", []

    st = tmp_path / "state"
    st.mkdir()
    out = _delta.fetch_release(session, _Fake(bundle.read_bytes()), rel, st,  # type: ignore[arg-type]
                               st / "staging", st / "staging" / "incoming", [], Gate(), whole)
    assert calls == [1] and out[3] is None and out[4] == ""


@pytest.mark.parametrize(("status", "resumes"), [(None, True), (503, True), (416, False),
                                                 (404, False)])
def test_a_failed_transfer_resumes_and_a_refused_range_takes_the_whole_bundle(
        tmp_path: Path, release, status: int | None, resumes: bool) -> None:  # type: ignore[no-untyped-def]
    from tuf.api import exceptions as tuf_exc

    from modelward.updater.errors import DownloadFailedError

    bundle, ix, tf = release

    class _Broken(_Fake):
        def _ranges(self, url, ranges):  # type: ignore[no-untyped-def]
            yield from list(super()._ranges(url, ranges))[:2]
            if status is None:
                raise tuf_exc.DownloadError("connection reset")
            raise tuf_exc.DownloadHTTPError("no", status)

    calls: list[int] = []
    st = tmp_path / "state"
    st.mkdir()

    def run():  # type: ignore[no-untyped-def]
        return _delta.fetch_release(
            _Session(ix), _Broken(bundle.read_bytes(), native=True), _release(ix, tf), st,
            st / "staging", st / "staging" / "incoming", [], Gate(),
            lambda: (calls.append(1), ("s", "m", []))[1])  # type: ignore[arg-type]

    if resumes:
        with pytest.raises(DownloadFailedError):
            run()
        assert calls == []
        assert (st / "staging" / "incoming" / "manifest.json").is_file()  # kept, to resume
    else:
        run()
        assert calls == [1]


@pytest.mark.parametrize("plant", ["hardlink", "incoming-link", "staging-junk"])
def test_the_stage_never_writes_into_what_the_disk_linked_there(
        tmp_path: Path, release, plant: str) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    slot = tmp_path / "slot"  # stands for the active slot
    slot.mkdir()
    victim = slot / ix.files[0].path
    victim.write_bytes(b"v" * 1000)
    staging = tmp_path / "state" / "staging"
    staging.mkdir(parents=True)
    incoming = staging / "incoming"
    if plant == "hardlink":  # the active slot's file, hard-linked into the stage
        incoming.mkdir()
        os.link(victim, incoming / ix.files[0].path)
    elif plant == "incoming-link":  # the stage itself a link to the slot
        incoming.symlink_to(slot)
    else:
        (staging / "x.part").symlink_to(victim)
        (staging / "junk").mkdir()
    _assemble(tmp_path, ix, tf, _Fake(bundle.read_bytes(), native=True))
    assert victim.read_bytes() == b"v" * 1000 and os.stat(victim).st_nlink == 1
    assert sorted(os.listdir(slot)) == [ix.files[0].path]
    assert os.listdir(staging) == ["incoming"] and not incoming.is_symlink()


def test_the_index_is_fetched_and_parsed_within_the_signed_bundles_budget(release) -> None:  # type: ignore[no-untyped-def]
    """A team's index target may be as long as MAX_INDEX_BYTES; a device reads at most
    what an index of the bundle it names can need, asked before any byte is fetched."""
    from modelward.updater.bundle._chunkindex import MAX_INDEX_BYTES, index_budget

    _, ix, tf = release
    asked: list[int] = []

    class Recording(_Session):
        def fetch_target_bytes(self, target: TargetFile, max_bytes: int) -> bytes:
            asked.append(max_bytes)
            return super().fetch_target_bytes(target, max_bytes)

    got = _delta.verified_index(Recording(ix), _release(ix, tf))
    assert got == ix
    assert asked == [min(MAX_INDEX_BYTES, index_budget(tf.length))]
    assert asked[0] < MAX_INDEX_BYTES  # (a few MiB bundle: far below the module's bound)
