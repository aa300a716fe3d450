"""Attacker review of issue 13 "bounded before verified": the bundle stream itself.

Hand-made tar streams go through ``extract_bundle`` (verify only, as the publisher and
the extraction thread parse them before the TUF hash is known): every refusal must be a
``BundleFormatError``. From the origin a refusal is then reported as a TargetHashError
(the hash is checked first); a signed bundle (one team key, a compromised pipeline, or
``publish`` checking a bundle) surfaces it as it is. What works is xfail.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from modelward.simulator._attacks import pax_record
from modelward.updater.bundle._bundle import extract_bundle
from modelward.updater.bundle._tarstream import BLOCK
from modelward.updater.errors import BundleFormatError


def _member(name: str, data: bytes, type_: bytes = tarfile.REGTYPE,
            pax: list[tuple[str, str]] | None = None) -> bytes:
    out = b""
    if pax is not None:
        recs = b"".join(pax_record(k, v) for k, v in pax)
        x = tarfile.TarInfo("././@PaxHeader")
        x.type, x.size = tarfile.XHDTYPE, len(recs)
        out += x.tobuf(tarfile.USTAR_FORMAT) + recs + b"\0" * (-len(recs) % BLOCK)
    info = tarfile.TarInfo(name[:99])
    info.type, info.size = type_, len(data)
    out += info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % BLOCK)
    return out


def _extract(stream: bytes) -> None:
    extract_bundle(io.BytesIO(stream), None, "b")


def test_a3_pax_size_of_5000_digits_is_a_bundle_format_error() -> None:
    stream = _member("manifest.json", b"{}", pax=[("size", "9" * 5000)]) + b"\0" * 1024
    with pytest.raises(BundleFormatError):
        _extract(stream)


def test_a3_deeply_nested_manifest_is_a_bundle_format_error() -> None:
    stream = _member("manifest.json", b"[" * 100_000) + b"\0" * 1024
    with pytest.raises(BundleFormatError):
        _extract(stream)


_MANIFEST_OK = b'{"format": "modelward-bundle/1"}'  # (rejected later, but parsed)


@pytest.mark.parametrize(("stream", "why"), [
    (_member("manifest.json", b"{}", tarfile.GNUTYPE_LONGNAME), "GNU long name"),
    (_member("manifest.json", b"{}", tarfile.GNUTYPE_SPARSE), "GNU sparse"),
    (_member("manifest.json", b"{}", tarfile.XGLTYPE), "global pax"),
    (_member("manifest.json", b"{}", pax=[("GNU.sparse.size", "1")]), "unknown pax key"),
    (_member("manifest.json", b"{}", pax=[("path", "x")] * 2), "given twice"),
    (_member("manifest.json", b"{}", pax=[("path", "a" * 9000)]), "extended header of"),
    (_member("manifest.json", b"{}", pax=[("size", "-1")]), "pax size"),
    (_member("manifest.json", b"{}", pax=[("size", "\u0663")]), "pax size"),
    (_member("manifest.json", b"x" * (2 << 20)), "under 1 MiB"),
    (_member("manifest.json", b"{}", tarfile.SYMTYPE), "regular file"),
    (_member("model.onnx", b"{}"), "first member"),
    (b"\0" * 1024, "empty archive"),
    (b"x" * 512, "bad header"),
])
def test_a3_refused_streams(stream: bytes, why: str) -> None:
    with pytest.raises(BundleFormatError, match=why):
        _extract(stream + b"\0" * 1024)


def test_a3_many_tiny_members_stop_at_the_first_unlisted() -> None:
    """Refused: members not in the manifest end the stream at the first of them."""
    man = (b'{"format":"modelward-bundle/1","version":"1.0.0","name":"m","created":"",'
           b'"files":[{"path":"m.onnx","size":0,"sha256":"' + b"0" * 64 + b'","merkle_root":"'
           + b"0" * 64 + b'"},{"path":"v.npz","size":0,"sha256":"' + b"0" * 64
           + b'","merkle_root":"' + b"0" * 64 + b'"}],"model":{"path":"m.onnx","format":'
           b'"onnx","opset":17,"inputs":[],"outputs":[]},"checks":{"vectors":"v.npz",'
           b'"rtol":0,"atol":0}}')
    stream = _member("manifest.json", man) + b"".join(
        _member(f"f{i}", b"") for i in range(10_000)) + b"\0" * 1024
    with pytest.raises(BundleFormatError, match="not listed"):
        _extract(stream)


def test_a3_long_pax_path_not_listed_is_refused() -> None:
    stream = (_member("manifest.json", _MANIFEST_OK)
              + _member("x", b"", pax=[("path", "d/" * 2000 + "f")]) + b"\0" * 1024)
    with pytest.raises(BundleFormatError):
        _extract(stream)
