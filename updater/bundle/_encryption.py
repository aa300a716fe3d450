"""Encrypted bundles (issue 19): the format and its cryptography, pure.

A bundle's files but its manifest and the provenance files are encrypted with a content
key that belongs to the model (not to one release): the operator keeps it and rotates it
when the recipients change (``publisher._encrypt``).

Scheme ``modelward-siv-cdc/1``, per chunk of a file's plaintext, as FastCDC cuts it:

- ``iv = HMAC-SHA256(mac_key, plaintext)[:16]``; ``ciphertext = AES-256-CTR(enc_key, iv,
  plaintext)`` (the SIV construction of RFC 5297, with HMAC-SHA256 as its PRF).
- It is deterministic: an unchanged chunk encrypts to the same bytes in every release
  under the same content key, so the chunk index of the ciphertext matches the chunks a
  device holds and a delta between two encrypted releases moves only the changed chunks.
  What an observer learns from that: which chunks are equal in two releases (or repeat
  within one), their lengths, and so which parts of the model changed; nothing of their
  contents.
- It is length-preserving: the ciphertext of a file is as long as its plaintext, chunk for
  chunk, so the chunk index's offsets, the stage and the slot use one layout.
- It is authenticated: after decryption the device recomputes the iv from the plaintext
  and refuses the chunk if it differs (the ivs are in the signed table, and every
  ciphertext chunk was verified against the signed chunk index before it is decrypted).

The ivs and chunk lengths travel in the bundle's table member (``encryption.json``,
plaintext, listed in the manifest like any file). The manifest's ``encryption`` field
names the scheme, the key's id, the encrypted files, the table and the recipients: for
each, the content key wrapped for its P-256 public key (ephemeral ECDH, HKDF-SHA256,
AES-256-GCM). A device's key is its TPM-resident decryption key (``trust._deckey``); it
computes the ECDH shared point in the TPM and the rest in memory.

Every parser here is bounded and validating; nothing is used before TUF verified the
bytes (the manifest through the chunk index or the bundle target, the table through its
signed hashes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SCHEME = "modelward-siv-cdc/1"
TABLE_FORMAT = "modelward-encryption-table/1"
TABLE_NAME = "encryption.json"
KEY_BYTES = 64  # AES-256 key, then HMAC-SHA256 key
IV_BYTES = 16
WRAPPED_BYTES = KEY_BYTES + 16  # (AES-GCM tag)
POINT_BYTES = 65  # uncompressed P-256 point
MAX_RECIPIENTS = 2048  # (in the manifest, ~190 bytes each: a fleet group key beyond)
MAX_RECIPIENT_ID = 128
MAX_TABLE_BYTES = 32 << 20
MAX_CHUNK = 1 << 20  # (what a device accepts of any chunk: the chunk index's bound)
_ENTRY = struct.Struct(">I16s")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WRAP_INFO = b"modelward content key wrap v1\0"


class EncryptionFormatError(ValueError):
    """An encryption header or table is malformed (the message names the field)."""


class DecryptionError(ValueError):
    """A chunk or a wrapped key does not decrypt to what was signed."""


class ContentKey:
    """A model's content key (64 random bytes): AES-256-CTR key, then HMAC-SHA256 key."""

    __slots__ = ("_enc", "_mac", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a content key is {KEY_BYTES} bytes, not {len(secret)}")
        self._enc, self._mac = bytes(secret[:32]), bytes(secret[32:])
        self.key_id = key_id_of(secret)

    @classmethod
    def generate(cls) -> ContentKey:
        """A new random key."""
        return cls(os.urandom(KEY_BYTES))

    @property
    def secret(self) -> bytes:
        """The key's bytes (for the operator's key store and for wrapping only)."""
        return self._enc + self._mac

    def __repr__(self) -> str:  # (never the secret)
        return f"ContentKey(key_id={self.key_id!r})"

    def _ctr(self, iv: bytes, data: bytes | memoryview) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        c = Cipher(algorithms.AES(self._enc), modes.CTR(iv)).encryptor()
        return c.update(data) + c.finalize()

    def iv_of(self, plaintext: bytes | memoryview) -> bytes:
        """The synthetic iv of a plaintext chunk."""
        return hmac.new(self._mac, plaintext, hashlib.sha256).digest()[:IV_BYTES]

    def seal(self, plaintext: bytes | memoryview) -> tuple[bytes, bytes]:
        """(iv, ciphertext) of one plaintext chunk; the same for the same chunk, always."""
        iv = self.iv_of(plaintext)
        return iv, self._ctr(iv, plaintext)

    def open(self, iv: bytes, ciphertext: bytes | memoryview) -> bytes:
        """The plaintext of a chunk sealed with ``iv``.

        Raises:
            DecryptionError: it is not what this key sealed with that iv.
        """
        plaintext = self._ctr(iv, ciphertext)
        if not hmac.compare_digest(self.iv_of(plaintext), iv):
            raise DecryptionError("the chunk does not decrypt to what was sealed (another "
                                  "key, or altered)")
        return plaintext


def key_id_of(secret: bytes) -> str:
    """A content key's public id (a hash of it: says nothing of the key)."""
    return hashlib.sha256(b"modelward content key id v1\0" + secret).hexdigest()[:32]


@dataclass(frozen=True)
class Recipient:
    """The content key wrapped for one recipient's public key."""

    id: str
    epk: bytes  # the ephemeral public key (uncompressed point)
    wrapped: bytes  # AES-256-GCM of the content key

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "epk": _b64(self.epk), "wrapped": _b64(self.wrapped)}


@dataclass(frozen=True)
class Header:
    """The manifest's ``encryption`` field."""

    key_id: str
    files: tuple[str, ...]  # the encrypted files
    ciphertext_sha256: Mapping[str, str]  # of each encrypted file's bytes in the bundle
    table: str  # the table member's path
    recipients: tuple[Recipient, ...]

    def recipient(self, rid: str) -> Recipient | None:
        return next((r for r in self.recipients if r.id == rid), None)

    def to_json(self) -> dict[str, Any]:
        return {"scheme": SCHEME, "key_id": self.key_id,
                "files": [{"path": p, "sha256": self.ciphertext_sha256[p]} for p in self.files],
                "table": self.table, "recipients": [r.to_json() for r in self.recipients]}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(v: Any, what: str, size: int | None = None, *, limit: int = 1 << 10) -> bytes:
    if not isinstance(v, str) or len(v) > limit:
        raise EncryptionFormatError(f"{what} is not base64 text")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EncryptionFormatError(f"{what} is not base64") from e
    if size is not None and len(raw) != size:
        raise EncryptionFormatError(f"{what} is {len(raw)} bytes, not {size}")
    return raw


def _str(v: Any, what: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or not v or len(v) > limit:
        raise EncryptionFormatError(f"{what} is not a string")
    return v


def parse_header(d: Any, what: str = "encryption") -> Header:
    """Validate the manifest's ``encryption`` field (the manifest parser then checks its
    paths against the manifest's files).

    Raises:
        EncryptionFormatError: naming the field at fault.
    """
    if not isinstance(d, dict):
        raise EncryptionFormatError(f"{what} is not an object")
    if d.get("scheme") != SCHEME:
        raise EncryptionFormatError(f"{what}.scheme is {str(d.get('scheme'))[:40]!r}, not "
                                    f"{SCHEME!r}")
    kid = d.get("key_id")
    if not isinstance(kid, str) or not _HEX32.fullmatch(kid):
        raise EncryptionFormatError(f"{what}.key_id is not 32 hex digits")
    files = d.get("files")
    if not isinstance(files, list) or not files or len(files) > 10_000:
        raise EncryptionFormatError(f"{what}.files is not a list of paths")
    shas: dict[str, str] = {}
    for i, f in enumerate(files):
        if not isinstance(f, dict) or set(f) != {"path", "sha256"}:
            raise EncryptionFormatError(f"{what}.files[{i}] is not an object of path, sha256")
        sha = f["sha256"]
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise EncryptionFormatError(f"{what}.files[{i}].sha256 is not 64 hex digits")
        shas.setdefault(_str(f["path"], f"{what}.files[{i}].path"), sha)
    paths = tuple(str(f["path"]) for f in files)
    if len(set(paths)) != len(paths):
        raise EncryptionFormatError(f"{what}.files lists a path twice")
    table = _str(d.get("table"), f"{what}.table")
    if table in paths:
        raise EncryptionFormatError(f"{what}.table {table!r} is one of the encrypted files")
    recs = d.get("recipients")
    if not isinstance(recs, list) or not recs or len(recs) > MAX_RECIPIENTS:
        raise EncryptionFormatError(f"{what}.recipients is not a list of 1 to "
                                    f"{MAX_RECIPIENTS} recipients")
    out = []
    for i, r in enumerate(recs):
        w = f"{what}.recipients[{i}]"
        if not isinstance(r, dict) or set(r) != {"id", "epk", "wrapped"}:
            raise EncryptionFormatError(f"{w} is not an object of id, epk, wrapped")
        out.append(Recipient(_str(r["id"], f"{w}.id", MAX_RECIPIENT_ID),
                             _unb64(r["epk"], f"{w}.epk", POINT_BYTES),
                             _unb64(r["wrapped"], f"{w}.wrapped", WRAPPED_BYTES)))
    if len({r.id for r in out}) != len(out):
        raise EncryptionFormatError(f"{what}.recipients names a recipient twice")
    return Header(kid, paths, shas, table, tuple(out))


# -- wrapping ---------------------------------------------------------------------------


def on_curve(point: bytes) -> bool:
    """Whether ``point`` is an uncompressed point of P-256 (not the identity)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return False
    return len(point) == POINT_BYTES


def _kek(shared: bytes, epk: bytes, key_id: str, recipient: str, model: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = _WRAP_INFO + b"\0".join(s.encode() for s in (key_id, recipient, model))
    return HKDF(hashes.SHA256(), 32, salt=epk, info=info).derive(shared)


def _aad(key_id: str, recipient: str, model: str) -> bytes:
    return _WRAP_INFO + f"{model}\0{recipient}\0{key_id}".encode()


def wrap(key: ContentKey, public_key: Any, recipient: str, model: str) -> Recipient:
    """``key`` wrapped for ``recipient``'s P-256 ``public_key`` (a ``cryptography`` key)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
            not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError(f"the key of recipient {recipient!r} is not a P-256 public key")
    eph = ec.generate_private_key(ec.SECP256R1())
    shared = eph.exchange(ec.ECDH(), public_key)
    epk = eph.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    kek = _kek(shared, epk, key.key_id, recipient, model)
    # (a key-encryption key is used once: its ephemeral key is new, so a zero nonce is safe)
    wrapped = AESGCM(kek).encrypt(b"\0" * 12, key.secret, _aad(key.key_id, recipient, model))
    return Recipient(recipient, epk, wrapped)


def unwrap(rec: Recipient, key_id: str, model: str,
           shared_x: Callable[[bytes], bytes]) -> ContentKey:
    """The content key ``rec`` wraps; ``shared_x`` computes the ECDH shared x coordinate
    with the recipient's private key (in the TPM on a device).

    Raises:
        DecryptionError: it was wrapped for another key, or altered, or is another key.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kek = _kek(shared_x(rec.epk), rec.epk, key_id, rec.id, model)
    try:
        secret = AESGCM(kek).decrypt(b"\0" * 12, rec.wrapped, _aad(key_id, rec.id, model))
    except InvalidTag as e:
        raise DecryptionError(f"the content key wrapped for {rec.id!r} does not open with "
                              "its decryption key (wrapped for another key, or altered)") from e
    key = ContentKey(secret)
    if key.key_id != key_id:
        raise DecryptionError(f"the key wrapped for {rec.id!r} is not key {key_id}")
    return key


# -- the table ---------------------------------------------------------------------------

Table = Mapping[str, Sequence[tuple[int, bytes]]]  # path -> [(chunk length, iv)]
#: As the chunk index (``_chunkindex.MIN_CHUNK_BYTES``): every chunk of a file but its last
#: is at least this long, so a file of ``n`` bytes has at most ``n // MIN_CHUNK + 1``.
MIN_CHUNK = 16 * 1024


class Chunks(Sequence[tuple[int, bytes]]):
    """One file's table entries, kept packed (20 bytes each), unpacked when read."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw) // _ENTRY.size

    def __getitem__(self, i: int) -> tuple[int, bytes]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return _ENTRY.unpack_from(self._raw, (i % len(self)) * _ENTRY.size)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return _ENTRY.iter_unpack(self._raw)


def table_bytes(key_id: str, table: Table) -> bytes:
    """The table member's bytes."""
    import json

    files = {p: _b64(b"".join(_ENTRY.pack(n, iv) for n, iv in chunks))
             for p, chunks in sorted(table.items())}
    return json.dumps({"format": TABLE_FORMAT, "key_id": key_id, "files": files},
                      sort_keys=True, indent=1).encode() + b"\n"


def table_budget(sizes: Mapping[str, int], header: Header) -> int:
    """The most bytes a table of ``header``'s files (of ``sizes``) may have: what its
    entries take in base64 at the most chunks a file may have, and a fixed part."""
    entries = sum(sizes.get(p, 0) // MIN_CHUNK + 1 for p in header.files)
    return min(MAX_TABLE_BYTES, (64 << 10) + 300 * len(header.files)
               + (entries * _ENTRY.size * 4) // 3 + 4)


def parse_table(data: bytes, header: Header, sizes: Mapping[str, int],
                what: str = TABLE_NAME) -> dict[str, Chunks]:
    """The table of the encrypted files ``header`` names, each of the size ``sizes``
    gives (the manifest's): chunks that cover each file exactly, none empty or longer
    than :data:`MAX_CHUNK`, all but a file's last at least :data:`MIN_CHUNK` (so at most
    ``size // MIN_CHUNK + 1`` of them, as the chunk index allows). Bounded by
    :func:`table_budget` before it is parsed.

    Raises:
        EncryptionFormatError: naming what is at fault.
    """
    from modelward.trust._bounded import UntrustedJsonError, loads_bounded

    budget = table_budget(sizes, header)
    if len(data) > budget:
        raise EncryptionFormatError(f"{what} is {len(data)} bytes, over the {budget} its "
                                    "files can need")
    try:
        d = loads_bounded(data, max_bytes=budget, what=what, max_depth=4)
    except UntrustedJsonError as e:
        raise EncryptionFormatError(str(e)) from e
    if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
        raise EncryptionFormatError(f"{what} is not a {TABLE_FORMAT} document")
    if d.get("key_id") != header.key_id:
        raise EncryptionFormatError(f"{what} is for another content key than the manifest's")
    files = d.get("files")
    if not isinstance(files, dict) or set(files) != set(header.files):
        raise EncryptionFormatError(f"{what} does not list exactly the encrypted files")
    out: dict[str, Chunks] = {}
    for path in header.files:
        size = sizes.get(path)
        if size is None:
            raise EncryptionFormatError(f"{what}: {path} is not a file of the manifest")
        most = size // MIN_CHUNK + 1
        v = files[path]
        if isinstance(v, str) and len(v) > (most * _ENTRY.size * 4) // 3 + 4:
            raise EncryptionFormatError(f"{what}: {path}: more chunks than its {size} bytes "
                                        f"can have ({most})")
        raw = _unb64(v, f"{what}: {path}", limit=MAX_TABLE_BYTES)
        if len(raw) % _ENTRY.size:
            raise EncryptionFormatError(f"{what}: {path}: not whole entries")
        chunks = Chunks(raw)
        total, last = 0, len(chunks) - 1
        for i, (n, _) in enumerate(chunks):
            if not 0 < n <= MAX_CHUNK or (n < MIN_CHUNK and i != last):
                raise EncryptionFormatError(
                    f"{what}: {path}: chunk {i} is {n} bytes (each 1 to {MAX_CHUNK}, all "
                    f"but the last at least {MIN_CHUNK})")
            total += n
        if total != size:
            raise EncryptionFormatError(f"{what}: {path}: the chunks do not cover its "
                                        f"{size} bytes exactly")
        out[path] = chunks
    return out
