"""Bundle format v1: safe, streaming extraction refuses every unsafe member."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from modelward.publisher._bundle_build import build_bundle
from modelward.simulator._models import make_linear_model
from modelward.trust._fingerprint import slot_fingerprint
from modelward.updater.bundle._bundle import MANIFEST, extract_bundle
from modelward.updater.errors import BundleFormatError


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("b")
    model = make_linear_model(d / "m.onnx", seed=1)
    (d / "notes.txt").write_text("provenance notes\n")
    out = d / "b.tar"
    build_bundle(model, "clf", "1.0.0", out, extra=[(d / "notes.txt", "docs/notes.txt")])
    return out


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as t:
        out = []
        for m in t.getmembers():
            f = t.extractfile(m)
            out.append((m, f.read() if f else b""))
        return out


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _info(
    name: str, size: int = 0, typ: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.size, i.type, i.linkname = size, typ, link
    return i


def test_good_bundle_extracts_with_fingerprint(good: Path, tmp_path: Path) -> None:
    with open(good, "rb") as f:
        manifest, entries = extract_bundle(f, tmp_path, "b")
    assert manifest.name == "clf" and manifest.version == "1.0.0"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) \
        == ["docs/notes.txt", MANIFEST, "model.onnx", "vectors.npz"]
    from modelward.trust._fingerprint import directory_entries

    assert slot_fingerprint(entries) == slot_fingerprint(directory_entries(tmp_path))


def test_verify_only_writes_nothing(good: Path, tmp_path: Path) -> None:
    with open(good, "rb") as f:
        extract_bundle(f, None, "b")
    assert list(tmp_path.iterdir()) == []


Mutate = Callable[[list[tuple[tarfile.TarInfo, bytes]]], list[tuple[tarfile.TarInfo, bytes]]]


def _add(extra: tuple[tarfile.TarInfo, bytes]) -> Mutate:
    return lambda ms: [*ms, extra]


def _rename(old: str, new: str) -> Mutate:
    def f(ms: list[tuple[tarfile.TarInfo, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
        for info, _ in ms:
            if info.name == old:
                info.name = new
        return ms
    return f


def _lie_about_manifest(key: str) -> Mutate:
    def f(ms: list[tuple[tarfile.TarInfo, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
        info, raw = ms[0]
        doc = json.loads(raw)
        entry = next(e for e in doc["files"] if e["path"] == "model.onnx")
        entry[key] = (entry[key] + 1) if key == "size" else "0" * 64
        new = json.dumps(doc).encode()
        info.size = len(new)
        return [(info, new), *ms[1:]]
    return f


def _corrupt(name: str) -> Mutate:
    def f(ms: list[tuple[tarfile.TarInfo, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
        out = []
        for info, data in ms:
            if info.name == name:
                data = bytes([data[0] ^ 1]) + data[1:]
            out.append((info, data))
        return out
    return f


CASES: dict[str, tuple[Mutate, str]] = {
    "path traversal": (_add((_info("../evil", 1), b"x")), "unsafe path"),
    "absolute path": (_add((_info("/etc/evil", 1), b"x")), "unsafe path"),
    "symlink": (_add((_info("link", 0, tarfile.SYMTYPE, "/etc/passwd"), b"")), "not a regular"),
    "hardlink": (_add((_info("hard", 0, tarfile.LNKTYPE, "model.onnx"), b"")), "not a regular"),
    "device": (_add((_info("dev", 0, tarfile.CHRTYPE), b"")), "not a regular"),
    "fifo": (_add((_info("fifo", 0, tarfile.FIFOTYPE), b"")), "not a regular"),
    "directory": (_add((_info("dir", 0, tarfile.DIRTYPE), b"")), "not a regular"),
    "duplicate": (lambda ms: [*ms, ms[1]], "duplicate"),
    "unlisted member": (_add((_info("extra.bin", 1), b"x")), "not listed"),
    "missing member": (lambda ms: ms[:-1], "missing from the archive"),
    "manifest not first": (lambda ms: [ms[1], ms[0], *ms[2:]], "first member"),
    "size lie": (_lie_about_manifest("size"), "has size"),
    "sha256 lie": (_lie_about_manifest("sha256"), "sha256"),
    "merkle lie": (_lie_about_manifest("merkle_root"), "merkle"),
    "corrupt content": (_corrupt("model.onnx"), "sha256"),
    "renamed to dotdot": (_rename("model.onnx", "a/../model.onnx"), "unsafe path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unsafe_bundle_is_refused(good: Path, tmp_path: Path, case: str) -> None:
    mutate, message = CASES[case]
    data = _tar(mutate(_members(good)))
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(BundleFormatError, match=message):
        extract_bundle(io.BytesIO(data), dest, "b")
    # nothing outside the extraction directory was touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot"]
    assert not list(dest.rglob("*link*")) and not list(dest.rglob("evil"))


@pytest.mark.parametrize(
    "raw", [b"", b"not a tar at all" * 100, b"\0" * 10240],
)
def test_garbage_is_refused(raw: bytes, tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError):
        extract_bundle(io.BytesIO(raw), tmp_path, "b")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("format", "other/1", "format"),
        ("version", "1.0", "semantic version"),
        ("files", [{"path": "../x", "size": 1, "sha256": "0" * 64, "merkle_root": "0" * 64}],
         "unsafe path"),
    ],
)
def test_bad_manifest_fields(good: Path, tmp_path: Path, field: str, value: object,
                             message: str) -> None:
    ms = _members(good)
    info, raw = ms[0]
    doc = json.loads(raw)
    doc[field] = value
    new = json.dumps(doc).encode()
    info.size = len(new)
    with pytest.raises(BundleFormatError, match=message) as ei:
        extract_bundle(io.BytesIO(_tar([(info, new), *ms[1:]])), tmp_path, "b")
    assert ei.value.member == MANIFEST
