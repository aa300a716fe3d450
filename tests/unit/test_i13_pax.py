"""Issue 13, finding 4 (pax part): tar pax headers are bounded before anything is verified.

One extended header per member, at most ``MAX_PAX_BYTES`` and ``MAX_PAX_RECORDS``, known
keys only, none twice; a stream made of pax headers is refused at once with a typed error
naming the member, and the reader's memory does not grow with the stream.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.simulator._attacks import pax_record
from modelward.updater.bundle._bundle import extract_bundle
from modelward.updater.bundle._tarstream import (
    BLOCK,
    MAX_PAX_BYTES,
    PAX_KEYS,
    TarFormatError,
    TarStream,
    pax_records,
)
from modelward.updater.errors import BundleFormatError


def _xheader(records: bytes, name: str = "././@PaxHeader") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % BLOCK)


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % BLOCK)


def _pax_only(length: int, header_bytes: int = 60 * 1024) -> bytes:
    """``length`` bytes of back-to-back pax headers of about ``header_bytes`` each: small
    distinct records (what drove the reader to ~11x the bundle size before the bound), or
    with a small ``header_bytes`` one known record each."""
    out = bytearray()
    i = 0
    while len(out) < length:
        recs = bytearray()
        if header_bytes < 1024:
            recs += pax_record("path", f"p{i}")
            i += 1
        while len(recs) < header_bytes and header_bytes >= 1024:
            recs += pax_record(f"k{i:016d}", "v")
            i += 1
        out += _xheader(bytes(recs))
    return bytes(out[:length - length % BLOCK])


class _Source:
    """A stream generated on the fly: ``head`` then the same chunk again and again."""

    def __init__(self, head: bytes, chunk: bytes, total: int) -> None:
        self.head, self.chunk, self.left, self.read_bytes = head, chunk, total, 0

    def read(self, n: int = -1) -> bytes:
        data = self.head or self.chunk
        self.head = b""
        data = data[:min(n, self.left)]
        self.left -= len(data)
        self.read_bytes += len(data)
        return data


def _walk(tar: TarStream) -> Iterator[str]:
    while (m := tar.next()) is not None:
        for _ in tar.data():
            pass
        yield m.name


@pytest.mark.parametrize(("header_bytes", "message"), [
    (60 * 1024, r"extended header of \d+ bytes"), (32, "second extended header")])
def test_a_stream_of_pax_headers_is_refused_at_once_with_bounded_memory(
    header_bytes: int, message: str,
) -> None:
    raw = _pax_only(4 << 20, header_bytes)
    src = _Source(b"", raw, len(raw))
    tracemalloc.start()
    try:
        with pytest.raises(TarFormatError, match=message) as ei:
            list(_walk(TarStream(src)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ei.value.member.startswith("<extended header at offset ") or \
        ei.value.member == "p0"
    assert src.read_bytes <= 2 << 20  # refused within the first read, not at the end
    assert peak < 4 << 20  # one read buffer; the old reader held ~11x the stream here


def test_a_big_pax_header_is_refused_before_it_is_read() -> None:
    recs = pax_record("path", "a" * (MAX_PAX_BYTES + 10))
    raw = _xheader(recs) + _member("a" * 10, b"x") + b"\0" * 1024
    with pytest.raises(TarFormatError, match=r"extended header of \d+ bytes") as ei:
        list(_walk(TarStream(io.BytesIO(raw))))
    assert "offset 0" in ei.value.member


@pytest.mark.parametrize("key", ["comment", "atime", "ctime", "GNU.sparse.map", "GNU.sparse.size",
                                 "SCHILY.xattr.user.x", "LIBARCHIVE.xattr.y", "hdrcharset",
                                 "charset", "k0", "PATH", "path "])
def test_unknown_pax_keys_are_refused_naming_the_member(key: str) -> None:
    recs = pax_record("path", "model.onnx") + pax_record(key, "1")
    raw = _xheader(recs) + _member("model.onnx", b"x") + b"\0" * 1024
    with pytest.raises(TarFormatError, match="unknown pax key") as ei:
        list(_walk(TarStream(io.BytesIO(raw))))
    assert ei.value.member == "model.onnx"


def test_a_repeated_pax_key_is_refused() -> None:
    recs = pax_record("path", "a.bin") + pax_record("path", "b.bin")
    with pytest.raises(TarFormatError, match="given twice") as ei:
        pax_records(recs)
    assert ei.value.member == "a.bin"


def test_two_extended_headers_for_one_member_are_refused() -> None:
    raw = (_xheader(pax_record("path", "a.bin")) + _xheader(pax_record("mtime", "1"))
           + _member("a.bin", b"x") + b"\0" * 1024)
    with pytest.raises(TarFormatError, match="second extended header") as ei:
        list(_walk(TarStream(io.BytesIO(raw))))
    assert ei.value.member == "a.bin"


def test_what_tarfiles_pax_writer_emits_is_accepted() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("d/" + "x" * 3000)  # path
        info.size, info.mtime, info.uid, info.gid = 3, 1.5, 1 << 30, 1 << 30  # mtime/uid/gid
        info.uname, info.gname = "ü" * 40, "é" * 40  # uname/gname
        t.addfile(info, io.BytesIO(b"abc"))
    tar = TarStream(io.BytesIO(buf.getvalue()))
    assert list(_walk(tar)) == ["d/" + "x" * 3000]
    raw = buf.getvalue()
    size = tarfile.TarInfo.frombuf(raw[:BLOCK], "utf-8", "strict").size
    records = set(pax_records(raw[BLOCK:BLOCK + size]))
    assert records == {"path", "mtime", "uid", "gid", "uname", "gname"} <= PAX_KEYS


def test_a_pax_bundle_is_a_bundle_format_error_naming_the_member(tmp_path: Path) -> None:
    dest = tmp_path / "x"
    dest.mkdir()
    with pytest.raises(BundleFormatError, match="second extended header") as ei:
        extract_bundle(io.BytesIO(_pax_only(2 << 20, 32)), dest, "classifier/x.tar")
    assert ei.value.member == "p0"
    assert ei.value.bundle == "classifier/x.tar"
    assert list(dest.iterdir()) == []
