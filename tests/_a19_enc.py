"""Helpers of the issue-19 attack tests (encrypted bundles): software recipients, building
and taking apart encrypted bundles, re-signing what a thief of the targets key would
publish, and decrypting a bundle with a content key outside the agent."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._encrypt import Encryption, content_key, decrypt_key_path
from modelward.simulator._attacks import RepoAttacker
from modelward.trust._fingerprint import MerkleHasher, slot_fingerprint
from modelward.updater.bundle._bundle import MANIFEST, Manifest, extract_bundle
from modelward.updater.bundle._encryption import ContentKey, parse_table

Members = list[tuple[tarfile.TarInfo, bytes]]


def software_shared_x(priv: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    """What a device's TPM computes (TPM2_ECDH_ZGen), in software."""
    def shared(point: bytes) -> bytes:
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        return priv.exchange(ec.ECDH(), pub)
    return shared


def enroll_soft(fleet: Path, *ids: str) -> dict[str, ec.EllipticCurvePrivateKey]:
    """Software decryption keys for ``ids``, their public halves where `fleet enroll`
    keeps them (as another enrolled device's would be)."""
    keys = {}
    (fleet / "devices").mkdir(parents=True, exist_ok=True)
    for i in ids:
        keys[i] = ec.generate_private_key(ec.SECP256R1())
        pem = keys[i].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        decrypt_key_path(fleet, i).write_bytes(pem)
        (fleet / "devices" / f"{i}.pem").write_bytes(pem)  # (stands for its identity key)
    return keys


def build_enc(model: Path, out: Path, enc: Encryption, version: str = "1.0.0",
              name: str = "classifier", **kw: Any) -> Path:
    build_bundle(model, name, version, out, options=BuildOptions(encryption=enc), **kw)
    return out


def build_for(fleet: Path, model: Path, out: Path, devices: list[str],
              version: str = "1.0.0", name: str = "classifier", **kw: Any) -> Path:
    return build_enc(model, out, content_key(fleet, name, devices), version, name, **kw)


def members(bundle: Path | bytes) -> Members:
    raw = bundle if isinstance(bundle, bytes) else bundle.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        out = []
        for m in t.getmembers():
            f = t.extractfile(m)
            out.append((m, f.read() if f else b""))
        return out


def tar(ms: Members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in ms:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def merkle(data: bytes) -> str:
    m = MerkleHasher()
    m.update(data)
    return m.hexdigest()


def edit(bundle: Path | bytes, *, manifest: Callable[[dict[str, Any]], None] | None = None,
         files: dict[str, bytes] | None = None, fix_hashes: bool = True) -> bytes:
    """The bundle with its manifest edited by ``manifest`` and members replaced by
    ``files``; the manifest's size/sha256/merkle_root of a replaced plaintext member
    (the table, a provenance file) follow it (``fix_hashes``): what a thief who signs
    the result would publish."""
    ms = members(bundle)
    doc = json.loads(ms[0][1])
    files = files or {}
    for f in doc["files"]:
        if f["path"] in files and fix_hashes:
            data = files[f["path"]]
            f.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     merkle_root=merkle(data))
    if manifest is not None:
        manifest(doc)
    out: Members = [(ms[0][0], json.dumps(doc, sort_keys=True, indent=1).encode())]
    for info, data in ms[1:]:
        out.append((info, files.get(info.name, data)))
    return tar(out)


def fingerprint_of(data: bytes) -> str:
    """The slot fingerprint a bundle's manifest claims (what a thief signs)."""
    _, entries = extract_bundle(io.BytesIO(data), None, "raw")
    return slot_fingerprint(entries)


def claimed_fingerprint(data: bytes) -> str:
    """The slot fingerprint of the manifest's own entries, from its JSON (no member is
    checked, the manifest need not be valid): what a thief signs."""
    from modelward.trust._fingerprint import FileEntry

    raw = members(data)[0][1]
    doc = json.loads(raw)
    return slot_fingerprint([FileEntry(MANIFEST, len(raw), merkle(raw)),
                             *(FileEntry(f["path"], f["size"], f["merkle_root"])
                               for f in doc["files"])])


def sign_raw(repo_dir: Path, keys: Path, passphrase: bytes, data: bytes, version: str,
             *, fingerprint: str | None = None, index: bool = False,
             name: str = "classifier") -> str:
    """Sign ``data`` as release ``name version`` with the operator's (stolen) online
    keys; with ``index``, its chunk index too (cut by the real publisher code), so a
    device takes the delta path."""
    att = RepoAttacker(repo_dir, keys, passphrase)
    fp = fingerprint or claimed_fingerprint(data)
    target = att.sign_raw(data, name, version, fp)
    if index:
        from modelward.publisher._chunking import build_index
        from modelward.trust.errors import ModelwardError
        from modelward.updater.bundle._chunkindex import index_path

        sha = hashlib.sha256(data).hexdigest()
        served = repo_dir / "targets" / name / f"{sha}.{name}-{version}.tar"
        try:
            ix = build_index(served, sha).to_bytes()
        except ModelwardError:  # (the publisher's parser refuses it: so would a device's)
            return target
        ipath = index_path(target)
        itf = TargetFile(len(ix), {"sha256": hashlib.sha256(ix).hexdigest()}, ipath)
        itf.unrecognized_fields["custom"] = {"modelward-chunk-index": {"bundle": target}}
        att.serve(served.parent / f"{itf.hashes['sha256']}.{ipath.rpartition('/')[2]}", ix)
        att._sign_chain(itf, {r: att.stolen(r) for r in  # noqa: SLF001
                              ("targets", "snapshot", "timestamp")}, 1)
    return target


def open_bundle(bundle: Path | bytes, key: ContentKey) -> dict[str, bytes]:
    """Every encrypted file of ``bundle`` decrypted with ``key`` (what anyone holding the
    content key does with a bundle copied off the origin: no TPM, no agent)."""
    ms = {i.name: d for i, d in members(bundle)}
    from modelward.updater.bundle._bundle import parse_manifest

    m: Manifest = parse_manifest(ms[MANIFEST], "b")
    assert m.encryption is not None
    table = parse_table(ms[m.encryption.table], m.encryption, {f.path: f.size for f in m.files})
    out = {}
    for path, chunks in table.items():
        data, off, pt = ms[path], 0, []
        for n, iv in chunks:
            pt.append(key.open(iv, data[off:off + n]))
            off += n
        out[path] = b"".join(pt)
    return out


def table_doc(bundle: Path | bytes) -> dict[str, Any]:
    ms = {i.name: d for i, d in members(bundle)}
    doc: dict[str, Any] = json.loads(ms["encryption.json"])
    return doc


def entries_of(doc: dict[str, Any], path: str) -> list[tuple[int, bytes]]:
    import struct

    raw = base64.b64decode(doc["files"][path])
    return [(n, iv) for n, iv in struct.iter_unpack(">I16s", raw)]


def with_entries(doc: dict[str, Any], path: str, entries: list[tuple[int, bytes]]) -> bytes:
    import struct

    d = json.loads(json.dumps(doc))
    d["files"][path] = base64.b64encode(b"".join(struct.pack(">I16s", n, iv)
                                                 for n, iv in entries)).decode()
    return json.dumps(d, sort_keys=True, indent=1).encode() + b"\n"


def plain_pattern(seed: int = 1) -> bytes:
    """256 bytes of a weight row of :func:`tests.integration._i16_delta.big_model` (seed):
    found in a file only if it holds that model's plaintext."""
    import numpy as np

    from tests.integration._i16_delta import IN_DIM, OUT_DIM

    w = np.random.default_rng(seed).standard_normal((IN_DIM, OUT_DIM)).astype(np.float32)
    return bytes(w[IN_DIM // 2].tobytes()[:256])


def holds(root: Path, pattern: bytes) -> list[str]:
    """The regular files under ``root`` (links not followed) holding ``pattern``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and pattern in p.read_bytes()]


def trusted(w: Any) -> tuple[object, ...]:
    """What a rejection must leave as it was: record, counter, anchor, current, slots
    (``w``: a :class:`tests.conftest.World`)."""
    s = w.snapshot()
    return s.record, s.counter, s.anchor, s.current, s.slots
