"""The streaming tar reader: same members as tarfile, data uncopied, and a skeleton that
rebuilds the stream byte for byte together with the member data."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelward.updater.bundle._tarstream import TarFormatError, TarStream, pax_records


class _Chunks:
    """A source that hands out ``data`` in the given chunk sizes (cycled)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos, self.i = data, sizes or [1 << 20], 0, 0

    def read(self, n: int = -1) -> bytes:
        size = min(n, self.sizes[self.i % len(self.sizes)])
        self.i += 1
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT,
         trailer: bytes = b"", **kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as t:  # type: ignore[call-overload]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue() + trailer


def _walk(raw: bytes, sizes: list[int]) -> tuple[list[tuple[str, bytes, int]], bytes]:
    """Members (name, data, data offset) and the stream rebuilt from skeleton + data."""
    rebuilt = bytearray(len(raw))
    seen = bytearray(len(raw))

    def skeleton(pos: int, view: memoryview) -> None:
        rebuilt[pos:pos + len(view)] = view
        seen[pos:pos + len(view)] = b"\1" * len(view)

    tar = TarStream(_Chunks(raw, sizes), skeleton)
    out = []
    while (m := tar.next()) is not None:
        assert m.isreg()
        data = bytearray()
        for view in tar.data():
            assert isinstance(view, memoryview)
            rebuilt[tar.pos - len(view):tar.pos] = view
            seen[tar.pos - len(view):tar.pos] = b"\1" * len(view)
            data += view
        out.append((m.name, bytes(data), m.data_offset))
    tar.drain()
    assert seen == b"\1" * len(raw)  # every byte went to exactly one place
    return out, bytes(rebuilt)


names = st.one_of(st.sampled_from(["manifest.json", "model.onnx", "a/b/c.bin"]),
                  st.text("abcdéz/", min_size=1, max_size=150).filter(
                      lambda s: not s.startswith("/") and not s.endswith("/")))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(names, st.binary(max_size=1500)), min_size=1, max_size=4),
       st.lists(st.integers(1, 2000), max_size=5), st.binary(max_size=700))
def test_members_match_tarfile_and_skeleton_rebuilds_the_stream(
    members: list[tuple[str, bytes]], sizes: list[int], trailer: bytes,
) -> None:
    raw = _tar(members, trailer=trailer)
    got, rebuilt = _walk(raw, sizes)
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        want = []
        for info in t.getmembers():
            f = t.extractfile(info)
            assert f is not None
            want.append((info.name, f.read(), info.offset_data))
    assert got == want
    assert rebuilt == raw


def test_pax_path_and_size_override_the_ustar_fields() -> None:
    long_name = "d/" + "x" * 200  # does not fit ustar: a pax header carries it
    raw = _tar([(long_name, b"payload")])
    got, _ = _walk(raw, [100])
    assert got[0][:2] == (long_name, b"payload")


@pytest.mark.parametrize("raw,message", [
    (_tar([("n" * 200, b"x")], fmt=tarfile.GNU_FORMAT), "GNU long name"),
    (_tar([("a", b"x")], pax_headers={"comment": "hi"}), "global pax header"),
    (_tar([("a", b"x" * 1000)])[:700], "unexpected end of data"),
    (_tar([("a", b"x")])[:300], "truncated header"),
    (b"", "empty file"),
    (b"\0" * 1024, "empty archive"),
    (b"not a tar" * 100, "bad header"),
])
def test_refused_streams(raw: bytes, message: str) -> None:
    tar = TarStream(_Chunks(raw, [64]))
    with pytest.raises(TarFormatError, match=message):
        while tar.next() is not None:
            for _ in tar.data():
                pass


@pytest.mark.parametrize("raw", [b"5 a=b", b"x a=b\n", b"3 a=b\n", b"6 ab\n\n", b"4 =\n",
                                 b"6 a=b\n\0x"])
def test_malformed_pax_records(raw: bytes) -> None:
    with pytest.raises(TarFormatError):
        pax_records(raw)


def test_pax_records() -> None:
    assert pax_records(b"12 path=a/b\n11 size=42\n\0\0") == {"path": "a/b", "size": "42"}


def _with_pax(records: dict[str, str], data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("a")
        info.size = len(data)
        info.pax_headers = records
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("size", ["\u00b2", "-1", "1e3", ""])
def test_pax_size_that_is_not_a_plain_number_is_refused(size: str) -> None:
    tar = TarStream(_Chunks(_with_pax({"size": size}), [512]))
    with pytest.raises(TarFormatError, match="pax size"):
        tar.next()


def test_negative_size_is_refused() -> None:
    raw = bytearray(_tar([("a", b"")]))
    raw[124:136] = b"\xff" * 12  # base-256 encoding of -1
    raw[148:156] = b"        "
    raw[148:155] = (b"%06o\0" % sum(raw[:512]))[:7]
    tar = TarStream(_Chunks(bytes(raw), [512]))
    with pytest.raises(TarFormatError, match="negative size"):
        tar.next()
