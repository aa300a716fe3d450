"""Issue 19, encrypted bundles: the scheme (deterministic, authenticated, length-preserving
chunks), key wrapping, the format's bounded parsers, the operator's content-key store
(kept while the recipients stay, new when they change: a revoked device cannot open the
next release) and what an encrypted bundle and its chunk index reveal.

The device's half through a real TPM: tests/integration/test_i19_encrypted.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.publisher._encrypt import content_key, decrypt_key_path, recipients_of
from modelward.trust.errors import OperatorInputError
from modelward.updater.bundle._bundle import extract_bundle, parse_manifest
from modelward.updater.bundle._chunkindex import fetch_bytes
from modelward.updater.bundle._encryption import (
    MAX_RECIPIENTS,
    ContentKey,
    DecryptionError,
    EncryptionFormatError,
    Header,
    parse_header,
    parse_table,
    table_bytes,
    unwrap,
    wrap,
)
from modelward.updater.errors import BundleFormatError


def _software_shared_x(priv: ec.EllipticCurvePrivateKey):  # type: ignore[no-untyped-def]
    def shared(point: bytes) -> bytes:
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        return priv.exchange(ec.ECDH(), pub)
    return shared


def test_chunks_are_deterministic_authenticated_and_length_preserving() -> None:
    k = ContentKey.generate()
    pt = os.urandom(70_000)
    iv, ct = k.seal(pt)
    assert k.seal(pt) == (iv, ct)  # deterministic: an unchanged chunk is the same bytes
    assert len(ct) == len(pt) and ct != pt
    assert k.open(iv, ct) == pt
    flipped = bytes([ct[0] ^ 1]) + ct[1:]
    with pytest.raises(DecryptionError):
        k.open(iv, flipped)
    with pytest.raises(DecryptionError):  # another key
        ContentKey.generate().open(iv, ct)
    assert ContentKey.generate().seal(pt)[1] != ct
    assert k.secret.hex() not in repr(k)


def test_wrapped_key_opens_only_with_its_recipients_key_for_its_model() -> None:
    k = ContentKey.generate()
    dev, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    rec = wrap(k, dev.public_key(), "dev-1", "classifier")
    assert unwrap(rec, k.key_id, "classifier", _software_shared_x(dev)).secret == k.secret
    with pytest.raises(DecryptionError, match="dev-1"):
        unwrap(rec, k.key_id, "classifier", _software_shared_x(other))
    with pytest.raises(DecryptionError):  # bound to the model name
        unwrap(rec, k.key_id, "detector", _software_shared_x(dev))
    with pytest.raises(DecryptionError):  # and to the key id
        unwrap(rec, ContentKey.generate().key_id, "classifier", _software_shared_x(dev))
    moved = type(rec)("dev-2", rec.epk, rec.wrapped)  # another device's entry, renamed
    with pytest.raises(DecryptionError):
        unwrap(moved, k.key_id, "classifier", _software_shared_x(dev))
    with pytest.raises(ValueError, match="P-256"):
        wrap(k, ec.generate_private_key(ec.SECP384R1()).public_key(), "d", "classifier")


def _header(n: int = 1) -> dict[str, Any]:
    k = ContentKey.generate()
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    recs = [wrap(k, pub, f"dev-{i}", "m").to_json() for i in range(n)]
    return {"scheme": "modelward-siv-cdc/1", "key_id": k.key_id,
            "files": [{"path": "model.onnx", "sha256": "0" * 64}],
            "table": "encryption.json", "recipients": recs}


@pytest.mark.parametrize("change,field", [
    ({"scheme": "aes-ecb"}, "scheme"),
    ({"key_id": "XYZ"}, "key_id"),
    ({"files": []}, "files"),
    ({"files": ["model.onnx"]}, "files[0]"),
    ({"files": [{"path": "model.onnx", "sha256": "00"}]}, "sha256"),
    ({"files": [{"path": "a", "sha256": "0" * 64}, {"path": "a", "sha256": "1" * 64}]},
     "twice"),
    ({"table": "model.onnx"}, "table"),
    ({"recipients": []}, "recipients"),
    ({"recipients": [{"id": "d", "epk": "AAAA", "wrapped": "AAAA"}]}, "epk"),
    ({"recipients": [{"id": "d", "epk": "!!", "wrapped": "x"}]}, "epk"),
    ({"recipients": [{"id": "x" * 200, "epk": "", "wrapped": ""}]}, "id"),
    ({"recipients": [{"id": "d"}]}, "recipients[0]"),
])
def test_a_malformed_header_is_refused_naming_the_field(change: dict[str, Any],
                                                        field: str) -> None:
    d = _header() | change
    with pytest.raises(EncryptionFormatError, match=field.replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_header(d)


def test_header_bounds_and_duplicate_recipients() -> None:
    d = _header(2)
    d["recipients"][1]["id"] = d["recipients"][0]["id"]
    with pytest.raises(EncryptionFormatError, match="twice"):
        parse_header(d)
    d = _header(1)
    d["recipients"] = d["recipients"] * (MAX_RECIPIENTS + 1)
    with pytest.raises(EncryptionFormatError, match="recipients"):
        parse_header(d)


def _table_header(files: dict[str, int]) -> Header:
    k = ContentKey.generate()
    rec = wrap(k, ec.generate_private_key(ec.SECP256R1()).public_key(), "d", "m")
    return Header(k.key_id, tuple(files), {p: "0" * 64 for p in files}, "encryption.json",
                  (rec,))


def test_the_table_must_cover_each_encrypted_file_exactly() -> None:
    size = 100_000
    h = _table_header({"model.onnx": size})
    sizes = {"model.onnx": size}
    good = table_bytes(h.key_id, {"model.onnx": [(60_000, b"\0" * 16), (40_000, b"\1" * 16)]})
    assert [n for n, _ in parse_table(good, h, sizes)["model.onnx"]] == [60_000, 40_000]
    for chunks, why in (([(60_000, b"\0" * 16)], "cover"),
                        ([(0, b"\0" * 16), (size, b"\0" * 16)], "chunk 0"),
                        ([(10, b"\0" * 16), (size - 10, b"\0" * 16)], "at least"),
                        ([(size + (1 << 20), b"\0" * 16)], "chunk 0"),
                        ([(1, b"\0" * 16)] * 100, "more chunks"),
                        ([(1, b"\0" * 16)] * size, "over the")):
        with pytest.raises(EncryptionFormatError, match=why):
            parse_table(table_bytes(h.key_id, {"model.onnx": chunks}), h, sizes)
    with pytest.raises(EncryptionFormatError, match="another content key"):
        parse_table(table_bytes("f" * 32, {"model.onnx": [(size, b"\0" * 16)]}), h, sizes)
    with pytest.raises(EncryptionFormatError, match="exactly the encrypted files"):
        parse_table(table_bytes(h.key_id, {"other": [(size, b"\0" * 16)]}), h, sizes)
    doc = json.loads(good)
    doc["files"]["model.onnx"] = base64.b64encode(b"\0" * 7).decode()
    with pytest.raises(EncryptionFormatError, match="whole entries"):
        parse_table(json.dumps(doc).encode(), h, sizes)
    with pytest.raises(EncryptionFormatError):
        parse_table(b"[" * 100_000, h, sizes)


def _enrolled(fleet: Path, *ids: str) -> dict[str, ec.EllipticCurvePrivateKey]:
    keys = {}
    (fleet / "devices").mkdir(parents=True, exist_ok=True)
    for i in ids:
        keys[i] = ec.generate_private_key(ec.SECP256R1())
        pem = keys[i].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        decrypt_key_path(fleet, i).write_bytes(pem)
        (fleet / "devices" / f"{i}.pem").write_bytes(pem)  # (stands for its identity key)
    return keys


def test_content_key_is_kept_for_the_same_recipients_and_replaced_when_they_change(
        tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    keys = _enrolled(fleet, "dev-1", "dev-2")
    a = content_key(fleet, "classifier", ["dev-2", "dev-1"])
    assert a.rotated and [r.id for r in a.recipients] == ["dev-1", "dev-2"]
    path = fleet / "content-keys" / "classifier.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = content_key(fleet, "classifier", ["dev-1", "dev-2"])
    assert not b.rotated and b.key.key_id == a.key.key_id
    # dev-2 is revoked: a new key, and what dev-2 unwrapped before opens nothing new
    c = content_key(fleet, "classifier", ["dev-1"])
    assert c.rotated and c.key.key_id != a.key.key_id
    old = unwrap(a.recipients[1], a.key.key_id, "classifier", _software_shared_x(keys["dev-2"]))
    iv, ct = c.key.seal(b"new weights" * 100)
    with pytest.raises(DecryptionError):
        old.open(iv, ct)
    assert [r.id for r in c.recipients] == ["dev-1"]
    with pytest.raises(OperatorInputError, match="dev-9"):
        content_key(fleet, "classifier", ["dev-1", "dev-9"])
    assert json.loads(path.read_bytes())["key_id"] == c.key.key_id  # (nothing written)
    path.write_text("garbage")
    with pytest.raises(OperatorInputError, match="unreadable"):
        content_key(fleet, "classifier", ["dev-1"])
    with pytest.raises(OperatorInputError):
        recipients_of(" , ")
    with pytest.raises(OperatorInputError):
        recipients_of("dev-1,dev/2")


def test_an_encrypted_bundle_hides_the_model_and_its_index_finds_unchanged_chunks(
        tmp_path: Path) -> None:
    from tests.integration._i16_delta import big_model

    fleet = tmp_path / "fleet"
    _enrolled(fleet, "dev-1")
    enc = content_key(fleet, "classifier", ["dev-1"])
    out = []
    for version, rows in (("1.0.0", 0), ("1.1.0", 16)):
        model = big_model(tmp_path / f"m{version}.onnx", changed_rows=rows)
        b = tmp_path / f"c{version}.tar"
        build_bundle(model, "classifier", version, b, options=BuildOptions(encryption=enc))
        out.append((model, b))
    (m1, b1), (_, b2) = out
    plain = m1.read_bytes()
    raw = b1.read_bytes()
    for i in range(0, len(plain) - 64, len(plain) // 16):  # no piece of the model shows
        assert plain[i:i + 64] not in raw
    manifest, _ = extract_bundle(io.BytesIO(raw), None, "b1")  # its hashes verify
    assert manifest.encryption is not None
    assert set(manifest.encryption.files) == {"model.onnx", "vectors.npz"}
    assert manifest.files[0].path == "encryption.json"
    import hashlib

    ix1 = build_index(b1, hashlib.sha256(raw).hexdigest())
    ix2 = build_index(b2, hashlib.sha256(b2.read_bytes()).hexdigest())
    held = [c.sha256 for f in ix1.files for c in f.chunks]
    # an unchanged plaintext chunk is the same ciphertext chunk: only the changed ones move
    assert fetch_bytes(ix2, held) < 200_000 < ix2.data_bytes
    raw_index = ix1.to_bytes()
    assert plain[1000:1064] not in raw_index
    # a bundle whose ciphertext was altered is refused by its own hashes
    bad = bytearray(raw)
    bad[-20_000] ^= 1
    with pytest.raises(BundleFormatError, match="ciphertext"):
        extract_bundle(io.BytesIO(bytes(bad)), None, "bad")


def test_provenance_files_are_never_encrypted_and_the_table_is_listed() -> None:
    h = _header()
    base = {"format": "modelward-bundle/1", "name": "m", "version": "1.0.0", "created": "x",
            "files": [{"path": p, "size": 1, "sha256": "0" * 64, "merkle_root": "0" * 64}
                      for p in ("encryption.json", "model.onnx", "v.npz", "model.sig")],
            "model": {"path": "model.onnx", "format": "onnx", "opset": 17, "inputs": [],
                      "outputs": []},
            "checks": {"vectors": "v.npz", "rtol": 0.1, "atol": 0.1},
            "model_signature": "model.sig", "encryption": h}
    parse_manifest(json.dumps(base).encode(), "b")
    h2 = dict(h, files=[{"path": "model.sig", "sha256": "0" * 64}])
    with pytest.raises(BundleFormatError, match="never encrypted"):
        parse_manifest(json.dumps(base | {"encryption": h2}).encode(), "b")
    h3 = dict(h, table="missing.json")
    with pytest.raises(BundleFormatError, match="missing.json"):
        parse_manifest(json.dumps(base | {"encryption": h3}).encode(), "b")
