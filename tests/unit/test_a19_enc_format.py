"""Attacks on the encrypted-bundle format (issue 19) by a thief of the targets signing key
(attacker 4): any manifest, table or header it signs must be refused by a *typed* error
(never a traceback), parsed within bounds fixed before use, and decrypting must refuse
what was not sealed. An in-memory harness: the device's parsers (``parse_manifest``,
``parse_table``), its :class:`Unlocker` and ``decrypt_incoming`` on a staged directory,
with software recipient keys. The same cases through the real device:
test_a19_enc_device.py.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from modelward.publisher._encrypt import content_key
from modelward.updater.bundle._bundle import MANIFEST, extract_bundle, parse_manifest
from modelward.updater.bundle._chunkindex import MIN_CHUNK_BYTES
from modelward.updater.bundle._encryption import (
    MAX_RECIPIENTS,
    MAX_TABLE_BYTES,
    ContentKey,
    EncryptionFormatError,
    Header,
    parse_table,
    table_bytes,
    wrap,
)
from modelward.updater.errors import (
    BundleFormatError,
    EncryptionRefusedError,
    NotARecipientError,
    StagingError,
)
from modelward.updater.install._decrypt import Unlocker, decrypt_incoming
from tests._a19_enc import (
    build_for,
    edit,
    enroll_soft,
    entries_of,
    members,
    open_bundle,
    software_shared_x,
    table_doc,
    with_entries,
)
from tests.integration._i16_delta import big_model


@pytest.fixture(scope="module")
def enc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One encrypted bundle of a 2 MiB model for dev-1 (software key)."""
    tmp = tmp_path_factory.mktemp("enc")
    fleet = tmp / "fleet"
    keys = enroll_soft(fleet, "dev-1", "dev-2")
    model = big_model(tmp / "m.onnx")
    b = build_for(fleet, model, tmp / "b.tar", ["dev-1"])
    return {"tmp": tmp, "fleet": fleet, "keys": keys, "model": model, "bundle": b,
            "manifest": json.loads(members(b)[0][1])}


def _stage(tmp: Path, data: bytes) -> tuple[Path, Path, Any]:
    """``data`` extracted (ciphertext) as the installer stages it: state/staging/incoming."""
    import io

    state = tmp / f"state-{os.urandom(4).hex()}"
    incoming = state / "staging" / "incoming"
    incoming.mkdir(parents=True)
    manifest, _ = extract_bundle(io.BytesIO(data), incoming, "b")
    return state, incoming, manifest


def _key(enc: dict[str, Any], manifest: Any) -> ContentKey:
    key = Unlocker("dev-1", software_shared_x(enc["keys"]["dev-1"])).unlock(manifest)
    assert key is not None
    return key


# -- 4. malformed headers: typed, never a traceback ------------------------------------

def _mutations(h: dict[str, Any]) -> list[tuple[str, Any]]:
    rec = h["recipients"][0]
    big = [dict(rec, id=f"d{i}") for i in range(MAX_RECIPIENTS + 1)]
    return [
        ("not an object", []), ("a string", "x" * 10_000), ("scheme object",
                                                             h | {"scheme": {"a": [1] * 9}}),
        ("key_id int", h | {"key_id": 7}), ("key_id upper", h | {"key_id": "A" * 32}),
        ("files dict", h | {"files": {"model.onnx": "0" * 64}}),
        ("file extra key", h | {"files": [{"path": "model.onnx", "sha256": "0" * 64,
                                           "x": 1}]}),
        ("file path int", h | {"files": [{"path": 1, "sha256": "0" * 64}]}),
        ("file not in manifest", h | {"files": [{"path": "nope.bin", "sha256": "0" * 64}]}),
        ("file is the manifest", h | {"files": [{"path": MANIFEST, "sha256": "0" * 64}]}),
        ("duplicate path", h | {"files": h["files"] + h["files"][:1]}),
        ("table missing", {k: v for k, v in h.items() if k != "table"}),
        ("table not listed", h | {"table": "other.json"}),
        ("table encrypted", h | {"table": h["files"][0]["path"]}),
        ("no recipients", h | {"recipients": []}),
        ("too many recipients", h | {"recipients": big}),
        ("recipient list of str", h | {"recipients": ["dev-1"]}),
        ("epk non-ascii", h | {"recipients": [dict(rec, epk="é" * 88)]}),
        ("epk short", h | {"recipients": [dict(rec, epk=base64.b64encode(b"\4" * 33)
                                               .decode())]}),
        ("epk huge", h | {"recipients": [dict(rec, epk="A" * 900_000)]}),
        ("wrapped short", h | {"recipients": [dict(rec, wrapped="AAAA")]}),
        ("id int", h | {"recipients": [dict(rec, id=5)]}),
        ("id empty", h | {"recipients": [dict(rec, id="")]}),
        ("duplicate recipient", h | {"recipients": [rec, rec]}),
    ]


def test_a_malformed_encryption_header_is_a_bundle_format_error(enc: dict[str, Any]) -> None:
    """Every variant is refused by the manifest parser as BundleFormatError (what the
    device remembers as the release's own failure), nothing else escapes."""
    doc = enc["manifest"]
    failures = []
    for what, h in _mutations(doc["encryption"]):
        raw = json.dumps(doc | {"encryption": h}).encode()
        try:
            parse_manifest(raw, "b")
        except BundleFormatError:
            continue
        except Exception as e:  # noqa: BLE001 - what the attack looks for
            failures.append(f"{what}: {type(e).__name__}: {e}")
        else:
            failures.append(f"{what}: accepted")
    assert not failures, failures


def test_fuzzed_headers_and_tables_only_raise_typed_errors(enc: dict[str, Any]) -> None:
    """Random structural mutations of a real header and table (types swapped, fields
    dropped, values replaced): only BundleFormatError / EncryptionFormatError."""
    rnd = random.Random(19)
    doc = enc["manifest"]
    table = table_doc(enc["bundle"])
    values: list[Any] = [None, 0, -1, 2**70, 1.5, True, "", "x", "é", [], {}, [1], {"a": 1},
                         "A" * 44, "=" * 8, "0" * 32, "0" * 64]

    def mutate(v: Any, depth: int = 0) -> Any:
        v = copy.deepcopy(v)
        if isinstance(v, dict) and v and depth < 4:
            k = rnd.choice(sorted(v))
            r = rnd.random()
            if r < 0.2:
                del v[k]
            elif r < 0.5:
                v[k] = rnd.choice(values)
            else:
                v[k] = mutate(v[k], depth + 1)
        elif isinstance(v, list) and v and depth < 4:
            i = rnd.randrange(len(v))
            r = rnd.random()
            if r < 0.2:
                v.append(v[i])
            elif r < 0.4:
                del v[i]
            else:
                v[i] = mutate(v[i], depth + 1)
        else:
            v = rnd.choice(values)
        return v

    sizes = {f["path"]: f["size"] for f in doc["files"]}
    good = parse_manifest(json.dumps(doc).encode(), "b").encryption
    assert good is not None
    bad = []
    for _ in range(1500):
        h = mutate(doc["encryption"])
        try:
            parse_manifest(json.dumps(doc | {"encryption": h}).encode(), "b")
        except BundleFormatError:
            pass
        except Exception as e:  # noqa: BLE001
            bad.append(f"header {h!r:.200}: {type(e).__name__}: {e}")
        t = mutate(table)
        try:
            parse_table(json.dumps(t).encode(), good, sizes)
        except EncryptionFormatError:
            pass
        except Exception as e:  # noqa: BLE001
            bad.append(f"table {t!r:.200}: {type(e).__name__}: {e}")
    assert not bad, bad[:5]


# -- 4. tables that do not match what they describe --------------------------------------

def test_table_variants_are_refused_typed_at_decryption(enc: dict[str, Any]) -> None:
    """Signed tables that lie: chunk of length 0, of more than 1 MiB, lengths that do not
    add up, an iv changed, entries of another file, another key id, not JSON. Each is a
    typed refusal when the device decrypts (BundleFormatError or EncryptionRefusedError),
    and nothing of the staged ciphertext is turned into anything else."""
    doc = table_doc(enc["bundle"])
    path = "model.onnx"
    ent = entries_of(doc, path)
    size = sum(n for n, _ in ent)
    flip = bytes([ent[1][1][0] ^ 1]) + ent[1][1][1:]
    cases: dict[str, tuple[bytes, type[Exception]]] = {
        "zero-length chunk": (with_entries(doc, path, [(0, b"\0" * 16), *ent]),
                              BundleFormatError),
        "chunk over 1 MiB": (with_entries(doc, path, [(size, ent[0][1])])
                             if size > 1 << 20 else b"{}", BundleFormatError),
        "short of the file": (with_entries(doc, path, ent[:-1]), BundleFormatError),
        "iv changed": (with_entries(doc, path, [ent[0], (ent[1][0], flip), *ent[2:]]),
                       EncryptionRefusedError),
        "another file's entries": (with_entries(doc, path, entries_of(doc, "vectors.npz")),
                                   BundleFormatError),
        "another key id": (json.dumps(doc | {"key_id": "f" * 32}).encode(),
                           BundleFormatError),
        "not json": (b"\xff" * 100, BundleFormatError),
        "deep": (b"[" * 5000 + b"]" * 5000, BundleFormatError),
    }
    bad = []
    for what, (table, want) in cases.items():
        data = edit(enc["bundle"], files={"encryption.json": table})
        state, incoming, manifest = _stage(enc["tmp"], data)
        before = (incoming / path).read_bytes()
        try:
            decrypt_incoming(state, incoming, manifest, _key(enc, manifest))
        except want:
            pass
        except Exception as e:  # noqa: BLE001
            bad.append(f"{what}: {type(e).__name__}: {e}")
        else:
            bad.append(f"{what}: decrypted")
        if what != "iv changed":  # (refused before a chunk: nothing decrypted)
            assert (incoming / path).read_bytes() == before, what
    assert not bad, bad


def test_a_table_over_its_bound_is_refused_as_the_release_s_fault(
        enc: dict[str, Any]) -> None:
    """A signed table member longer than MAX_TABLE_BYTES (32 MiB): the manifest says so
    before anything is downloaded, and it is the release's own fault. The device must
    refuse it as a BundleFormatError (remembered: not downloaded again at every poll),
    best in parse_manifest, before a byte of the bundle is fetched."""
    doc = table_doc(enc["bundle"])
    padded = json.dumps(doc).encode()
    padded = padded[:-1] + b" " * (MAX_TABLE_BYTES + 10 - len(padded)) + b"}"
    data = edit(enc["bundle"], files={"encryption.json": padded})
    try:
        parse_manifest(members(data)[0][1], "b")
    except BundleFormatError:
        return  # (refused before a byte of the bundle is fetched: the fix)
    state, incoming, manifest = _stage(enc["tmp"], data)
    with pytest.raises(Exception) as ei:
        decrypt_incoming(state, incoming, manifest, _key(enc, manifest))
    assert isinstance(ei.value, BundleFormatError), (
        f"the manifest naming a 32 MiB+ table parses, and decrypt_incoming raises "
        f"{type(ei.value).__name__}: {ei.value} (a local-disk error: not remembered, the "
        "whole bundle is downloaded again at every poll)")


def test_a_table_of_one_byte_chunks_is_bounded_like_the_chunk_index(
        enc: dict[str, Any]) -> None:
    """The chunk index refuses chunks under MIN_CHUNK_BYTES (16 KiB) but a file's last,
    so its cost is bounded by the bundle's size. The table accepts chunks of 1 byte: a
    32 MiB table is 1.26 M entries, parsed into Python tuples (peak heap measured here),
    then 1.26 M AES/HMAC calls at decryption. The device should refuse a table with more
    entries than the index would allow for the file."""
    k = ContentKey.generate()
    rec = wrap(k, ec.generate_private_key(ec.SECP256R1()).public_key(), "d", "m")
    n = ((MAX_TABLE_BYTES - 200) * 3 // 4) // 20
    h = Header(k.key_id, ("model.onnx",), {"model.onnx": "0" * 64}, "encryption.json",
               (rec,))
    data = table_bytes(k.key_id, {"model.onnx": [(1, b"\0" * 16)] * n})
    assert len(data) <= MAX_TABLE_BYTES
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        parsed = None
        with contextlib.suppress(EncryptionFormatError):
            parsed = parse_table(data, h, {"model.onnx": n})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    took = time.monotonic() - t0
    allowed = n // MIN_CHUNK_BYTES + 1
    accepted = parsed is not None
    del parsed
    assert not accepted, (
        f"a table of {n} one-byte chunks for a {n}-byte file is accepted (the chunk index "
        f"allows {allowed}); parsing it took {took:.1f} s and a peak of "
        f"{peak / 2**20:.0f} MiB of heap (the agent's whole-update peak RSS is ~53 MiB)")


def test_swapped_chunks_with_swapped_table_entries_decrypt_but_do_not_install(
        enc: dict[str, Any]) -> None:
    """SIV binds a chunk to its plaintext, not to its place: two chunks of the same
    length swapped in the staged ciphertext (attacker 2), with their table entries
    swapped, decrypt without error. What stops them is the plaintext fingerprint
    afterwards (the manifest's Merkle roots): decryption alone does not authenticate
    order, so the fingerprint check after it must never be skipped."""
    from modelward.trust._fingerprint import directory_entries, slot_fingerprint

    tmp = enc["tmp"]
    blob = tmp / "blob.bin"  # four 256 KiB chunks (FastCDC's max), each different
    blob.write_bytes(b"".join(bytes([i + 1]) + b"\0" * (256 * 1024 - 1) for i in range(4)))
    b = build_for(enc["fleet"], enc["model"], tmp / "s.tar", ["dev-1"], version="1.0.2",
                  extra=[(blob, "extra/blob.bin")])
    doc = table_doc(b)
    path = "extra/blob.bin"
    ent = entries_of(doc, path)
    assert [n for n, _ in ent] == [256 * 1024] * 4
    table = with_entries(doc, path, [ent[1], ent[0], *ent[2:]])
    data = edit(b, files={"encryption.json": table})
    state, incoming, manifest = _stage(tmp, data)
    raw = (incoming / path).read_bytes()
    n = 256 * 1024
    (incoming / path).write_bytes(raw[n:2 * n] + raw[:n] + raw[2 * n:])
    decrypt_incoming(state, incoming, manifest, _key(enc, manifest))  # no error
    got = (incoming / path).read_bytes()
    assert got != blob.read_bytes() and sorted([got[:n], got[n:2 * n]]) == sorted(
        [blob.read_bytes()[:n], blob.read_bytes()[n:2 * n]])
    good = _stage(tmp, b.read_bytes())
    decrypt_incoming(good[0], good[1], good[2], _key(enc, good[2]))
    assert slot_fingerprint(directory_entries(incoming)) != slot_fingerprint(
        directory_entries(good[1]))  # (the installer's seal refuses it)


# -- 4. keys: wrapped for another key id, another model, another device -----------------

def test_wrapped_keys_that_do_not_belong_are_refused_typed(enc: dict[str, Any]) -> None:
    doc = enc["manifest"]
    other_key = content_key(enc["fleet"], "detector", ["dev-1"])  # another model's
    cases = {
        "another key id's entry": [other_key.recipients[0].to_json()],
        "another device's entry renamed": [dict(wrap(
            ContentKey.generate(), enc["keys"]["dev-2"].public_key(), "dev-2", "classifier"
        ).to_json(), id="dev-1")],
    }
    for recs in cases.values():
        m = parse_manifest(json.dumps(doc | {"encryption": doc["encryption"] | {
            "recipients": recs}}).encode(), "b")
        with pytest.raises(EncryptionRefusedError):
            Unlocker("dev-1", software_shared_x(enc["keys"]["dev-1"])).unlock(m)
    m = parse_manifest(json.dumps(doc).encode(), "b")
    with pytest.raises(NotARecipientError):
        Unlocker("dev-2", software_shared_x(enc["keys"]["dev-2"])).unlock(m)
    # dev-2 claiming dev-1's id: its own key does not open dev-1's entry
    with pytest.raises(EncryptionRefusedError):
        Unlocker("dev-1", software_shared_x(enc["keys"]["dev-2"])).unlock(m)


def test_a_zero_length_encrypted_file_round_trips(enc: dict[str, Any]) -> None:
    tmp = enc["tmp"]
    empty = tmp / "empty.bin"
    empty.write_bytes(b"")
    b = build_for(enc["fleet"], enc["model"], tmp / "z.tar", ["dev-1"], version="1.0.1",
                  extra=[(empty, "extra/empty.bin")])
    state, incoming, manifest = _stage(tmp, b.read_bytes())
    assert "extra/empty.bin" in manifest.encryption.files
    decrypt_incoming(state, incoming, manifest, _key(enc, manifest))
    assert (incoming / "extra" / "empty.bin").read_bytes() == b""
    assert (incoming / "model.onnx").read_bytes() == enc["model"].read_bytes()


def test_staged_file_swapped_for_a_link_is_a_staging_error(enc: dict[str, Any]) -> None:
    """Attacker 2 before or while decrypting: the staged file is a symlink, a hard link
    to a file outside staging, a FIFO or a directory; the table a symlink. Typed
    (StagingError, not a rejection); the link's target never written."""
    outside = enc["tmp"] / f"victim-{os.urandom(3).hex()}"
    outside.write_bytes(b"victim" * 1000)
    for how in ("symlink", "hardlink", "fifo", "dir", "table-symlink"):
        state, incoming, manifest = _stage(enc["tmp"], enc["bundle"].read_bytes())
        p = incoming / ("encryption.json" if how == "table-symlink" else "model.onnx")
        p.unlink()
        if how in ("symlink", "table-symlink"):
            p.symlink_to(outside)
        elif how == "hardlink":
            os.link(outside, p)
        elif how == "fifo":
            os.mkfifo(p)
        else:
            p.mkdir()
        with pytest.raises(StagingError):
            decrypt_incoming(state, incoming, manifest, _key(enc, manifest))
        assert outside.read_bytes() == b"victim" * 1000, how


def test_what_a_bundle_reveals_is_no_piece_of_the_model(enc: dict[str, Any]) -> None:
    """Origin view: the bundle, its manifest and table hold no 64-byte piece of the
    model or of its test vectors; the content key opens it exactly."""
    raw = enc["bundle"].read_bytes()
    plain = enc["model"].read_bytes()
    for i in range(0, len(plain) - 64, 4096):
        assert plain[i:i + 64] not in raw
    k = _key(enc, parse_manifest(members(raw)[0][1], "b"))
    assert open_bundle(raw, k)["model.onnx"] == plain


def test_the_publisher_reads_a_table_member_bounded(enc: dict[str, Any]) -> None:
    """``build_index`` (``publish``, ``bundle diff``) reads the table member whole into
    memory (``b"".join(stream.data())``) and cuts and hashes it before ``parse_table``
    refuses it for being over MAX_TABLE_BYTES: a 96 MiB table costs >= 96 MiB (a bundle
    handed to `publish` by a build pipeline is not the operator's own bytes)."""
    import hashlib

    from modelward.publisher._chunking import build_index
    from modelward.trust.errors import ModelwardError

    doc = table_doc(enc["bundle"])
    raw = json.dumps(doc).encode()
    big = raw[:-1] + b" " * (96 * 2**20 - len(raw)) + b"}"
    data = edit(enc["bundle"], files={"encryption.json": big})
    path = enc["tmp"] / "bigtable.tar"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    del data, big
    tracemalloc.start()
    try:
        with pytest.raises(ModelwardError):
            build_index(path, sha)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_TABLE_BYTES, f"peak heap {peak / 2**20:.0f} MiB for a 96 MiB table"
