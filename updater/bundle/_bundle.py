"""Bundle format v1 (design.md "Bundle format"): manifest schema and safe, streaming extraction.

A bundle is an uncompressed POSIX tar, ``manifest.json`` first, then exactly the
files the manifest lists, as regular files. Extraction reads the tar as a stream
(``updater.bundle._tarstream``), so memory stays bounded whatever the bundle size and member
data is never copied in user space, and refuses anything else before a byte of it
reaches the disk.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelward.trust._bounded import loads_bounded
from modelward.trust._fingerprint import FileEntry, MerkleHasher
from modelward.updater.bundle._encryption import Header, parse_header, table_budget
from modelward.updater.bundle._names import check_model_name
from modelward.updater.bundle._semver import SemVer
from modelward.updater.bundle._tarstream import (
    Member,
    Readable,
    TarFormatError,
    TarStream,
    check_member_path,
)
from modelward.updater.errors import BundleFormatError
from modelward.updater.install._stage import StageWriter

FORMAT = "modelward-bundle/1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB
MAX_FILES = 256


@dataclass(frozen=True)
class BundleFile:
    """One file listed in the manifest."""

    path: str
    size: int
    sha256: str
    merkle_root: str


@dataclass(frozen=True)
class TensorSpec:
    """An ONNX graph input or output: name, numpy dtype name, shape (None = dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a v1 bundle."""

    name: str
    version: str
    created: str
    files: tuple[BundleFile, ...]
    model_path: str
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vectors: str
    rtol: float
    atol: float
    provenance: dict[str, Any] = field(default_factory=dict)
    requires: dict[str, Any] = field(default_factory=dict)
    model_signature: str = ""  # the listed file holding the model signature, if any
    provenance_attestation: str = ""  # ... the provenance attestation (DSSE), if any
    encryption: Header | None = None  # an encrypted bundle's header (issue 19)

    @property
    def signed_files(self) -> tuple[str, ...]:
        """The provenance files it lists: model signature, provenance attestation."""
        return tuple(f for f in (self.model_signature, self.provenance_attestation) if f)

    def to_json(self) -> dict[str, Any]:
        """The manifest document."""

        def spec(s: TensorSpec) -> dict[str, Any]:
            return {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}

        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "merkle_root": f.merkle_root}
                for f in self.files
            ],
            "model": {
                "path": self.model_path,
                "format": "onnx",
                "opset": self.opset,
                "inputs": [spec(s) for s in self.inputs],
                "outputs": [spec(s) for s in self.outputs],
            },
            "checks": {"vectors": self.vectors, "rtol": self.rtol, "atol": self.atol},
            "provenance": self.provenance,
            "requires": self.requires,
        } | ({"model_signature": self.model_signature} if self.model_signature else {}) | (
            {"provenance_attestation": self.provenance_attestation}
            if self.provenance_attestation else {}) | (
            {"encryption": self.encryption.to_json()} if self.encryption else {})

    def to_bytes(self) -> bytes:
        """Serialised manifest (sorted keys, so it is reproducible)."""
        return json.dumps(self.to_json(), sort_keys=True, indent=1).encode() + b"\n"


def _spec(d: Any) -> TensorSpec:
    shape = tuple(None if s is None else s for s in d["shape"])
    if not all(s is None or isinstance(s, int | str) for s in shape):
        raise TypeError(f"shape {d['shape']!r}")
    return TensorSpec(str(d["name"]), str(d["dtype"]), shape)


def _below_a_file(paths: list[str]) -> tuple[str, str] | None:
    """A path below another listed file (or ``manifest.json``), e.g. ``a/b`` with ``a``
    (sorted and bisected: linear in the manifest's size, whatever the paths' depth)."""
    ordered = sorted(paths)
    for f in (MANIFEST, *paths):
        i = bisect.bisect_left(ordered, f + "/")
        if i < len(ordered) and ordered[i].startswith(f + "/"):
            return ordered[i], f
    return None


def parse_manifest(data: bytes, bundle: str) -> Manifest:
    """Parse and validate a manifest.

    Raises:
        BundleFormatError: not a valid v1 manifest (names the field at fault).
    """
    try:
        d = loads_bounded(data, max_bytes=MAX_MANIFEST_BYTES, what=f"{bundle}: manifest.json")
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r} is not {FORMAT!r}")
        SemVer.parse(d["version"])
        files = []
        for f in d["files"]:
            size = f["size"]
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"size of {f.get('path')!r}")
            sha, mr = str(f["sha256"]), str(f["merkle_root"])
            if len(sha) != 64 or len(mr) != 64:
                raise ValueError(f"digests of {f.get('path')!r}")
            files.append(BundleFile(check_member_path(str(f["path"])), size, sha, mr))
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths) or MANIFEST in paths:
            raise ValueError("duplicate file paths")
        if (below := _below_a_file(paths)) is not None:  # (no directory tree holds both)
            raise ValueError(f"{below[0]!r} is below the file {below[1]!r}")
        if len(files) > MAX_FILES:
            raise ValueError(f"more than {MAX_FILES} files")
        model, checks = d["model"], d["checks"]
        if model.get("format") != "onnx":
            raise ValueError(f"model format {model.get('format')!r}")
        m = Manifest(
            name=check_model_name(d["name"]),  # (a path component of everything it names)
            version=str(d["version"]),
            created=str(d["created"]),
            files=tuple(files),
            model_path=str(model["path"]),
            opset=int(model["opset"]),
            inputs=tuple(_spec(s) for s in model["inputs"]),
            outputs=tuple(_spec(s) for s in model["outputs"]),
            vectors=str(checks["vectors"]),
            rtol=float(checks["rtol"]),
            atol=float(checks["atol"]),
            provenance=dict(d.get("provenance") or {}),
            requires=dict(d.get("requires") or {}),
            model_signature=str(d.get("model_signature") or ""),
            provenance_attestation=str(d.get("provenance_attestation") or ""),
            encryption=None if d.get("encryption") is None else parse_header(
                d["encryption"]),
        )
        for needed in (m.model_path, m.vectors, *m.signed_files):
            if needed not in paths:
                raise ValueError(f"{needed!r} is referenced but not listed in files")
        if m.encryption is not None:
            for needed in (m.encryption.table, *m.encryption.files):
                if needed not in paths:
                    raise ValueError(f"encryption names {needed!r}, not listed in files")
            if set(m.signed_files) & set(m.encryption.files):
                raise ValueError("the provenance files are never encrypted")
            sizes = {f.path: f.size for f in files}
            if sizes[m.encryption.table] > (budget := table_budget(sizes, m.encryption)):
                raise ValueError(f"the table {m.encryption.table!r} is "
                                 f"{sizes[m.encryption.table]} bytes, over the {budget} "
                                 "its files can need")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleFormatError(
            f"bundle {bundle}: invalid manifest: {e}", bundle=bundle, member=MANIFEST
        ) from e
    return m


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (before the trust record names it).

    Extraction does not fsync file by file while the download runs: the kernel writes
    back in the background meanwhile, and this catches up once, before the commit.
    """
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_member(
    tar: TarStream, member: Member, writer: StageWriter | None, expected: BundleFile,
    bundle: str, ciphertext_sha256: str | None = None,
) -> FileEntry:
    sha = hashlib.sha256()
    merkle = MerkleHasher()
    sink = writer.open(member) if writer is not None else None
    try:
        for chunk in tar.data():
            sha.update(chunk)
            merkle.update(chunk)
            if sink is not None:
                sink.write(chunk)
    finally:
        if sink is not None:
            sink.close()
    if ciphertext_sha256 is not None:  # (an encrypted file: its plaintext, the Merkle
        # root, is re-derived from disk once it is decrypted; here its ciphertext's sha256)
        if sha.hexdigest() != ciphertext_sha256:
            raise BundleFormatError(
                f"bundle {bundle}: {expected.path} does not match the sha256 of its "
                "ciphertext in the manifest", bundle=bundle, member=expected.path)
        return FileEntry(expected.path, expected.size, expected.merkle_root)
    if sha.hexdigest() != expected.sha256:
        raise BundleFormatError(
            f"bundle {bundle}: {expected.path} does not match its manifest sha256",
            bundle=bundle,
            member=expected.path,
        )
    root = merkle.hexdigest()
    if root != expected.merkle_root:
        raise BundleFormatError(
            f"bundle {bundle}: {expected.path} does not match its manifest merkle root",
            bundle=bundle,
            member=expected.path,
        )
    return FileEntry(expected.path, expected.size, root)


def extract_bundle(
    fileobj: Readable, dest: Path | None, bundle: str, *, writer: StageWriter | None = None,
    on_manifest: Callable[[Manifest], object] | None = None,
) -> tuple[Manifest, list[FileEntry]]:
    """Extract a bundle stream into the empty directory ``dest``, refusing anything unsafe.

    Args:
        fileobj: the bundle, read once from start to end (``read(n)`` may return any
            number of bytes up to ``n``; member data is never copied).
        dest: an existing, empty directory that nothing else writes to; None only
            verifies (the publisher checks a bundle this way before signing it).
        bundle: name for error messages.
        writer: how to write (the installer's stage: skeleton, index, resume); by
            default plain files in ``dest``.
        on_manifest: called with the manifest before any member is read (the installer
            refuses an encrypted release for another device there).

    Returns:
        The manifest and the entries (manifest.json included) for the slot fingerprint.

    Raises:
        BundleFormatError: bad tar, bad manifest, or a member that is not a listed
            regular file of the listed size and hashes. ``dest`` may then hold a
            partial extraction; the caller discards it.
        OSError: the disk refused a write.
    """

    def bad(msg: str, member: str = "") -> BundleFormatError:
        return BundleFormatError(f"bundle {bundle}: {msg}", bundle=bundle, member=member)

    if writer is None and dest is not None:
        writer = StageWriter(dest)
    tar = TarStream(fileobj, writer.skeleton if writer is not None else None)
    try:
        first = tar.next()
        if first is None or first.name != MANIFEST:
            raise bad(f"first member must be {MANIFEST}")
        if not first.isreg() or first.size > MAX_MANIFEST_BYTES:
            raise bad(f"{MANIFEST} must be a regular file under 1 MiB", MANIFEST)
        sink = writer.open(first) if writer is not None else None
        try:
            raw = b"".join(tar.data())
            if sink is not None:
                sink.write(memoryview(raw))
        finally:
            if sink is not None:
                sink.close()
        manifest = parse_manifest(raw, bundle)
        if on_manifest is not None:  # (what it raises ends the extraction, and the download)
            on_manifest(manifest)
        mf_merkle = MerkleHasher()
        mf_merkle.update(raw)
        entries = [FileEntry(MANIFEST, len(raw), mf_merkle.hexdigest())]
        listed = {f.path: f for f in manifest.files}
        encrypted = dict(manifest.encryption.ciphertext_sha256) if manifest.encryption else {}
        seen: set[str] = set()
        while (member := tar.next()) is not None:
            name = member.name
            try:
                check_member_path(name)
            except ValueError as e:
                raise bad(str(e), name) from e
            if not member.isreg():
                raise bad(f"member {name!r} is not a regular file (link or device)", name)
            if name in seen or name == MANIFEST:
                raise bad(f"duplicate member {name!r}", name)
            if name not in listed:
                raise bad(f"member {name!r} is not listed in the manifest", name)
            if member.size != listed[name].size:
                raise bad(f"member {name!r} has size {member.size}, manifest says "
                          f"{listed[name].size}", name)
            seen.add(name)
            entries.append(_copy_member(tar, member, writer, listed[name], bundle,
                                        encrypted.get(name)))
        if writer is not None:
            tar.drain()  # what follows the archive belongs to the skeleton too
    except TarFormatError as e:
        raise bad(f"corrupt tar archive ({e})" if tar.pos > 0 else f"not a tar archive ({e})",
                  e.member) from e
    finally:
        if writer is not None:
            writer.close()
    missing = sorted(set(listed) - seen)
    if missing:
        raise bad(f"members missing from the archive: {', '.join(missing)}")
    return manifest, entries
