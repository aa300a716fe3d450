"""``bundle build --encrypt-for``: content keys, recipients, encrypting a bundle's files.

Format and cryptography: ``updater.bundle._encryption``. This module is the operator's
half:

- **Content keys** are per model, kept in ``FLEET_DIR/content-keys/<model>.json`` (0600;
  a secret like the online keys: the machine that builds bundles holds it). The key is
  reused while the model's recipients stay the same (so a delta between two releases
  moves only the changed chunks) and replaced by a new one when they change, so a device
  taken off the list cannot open the next release with the key it unwrapped before. The
  first release under a new key is a full download on every device.
- **Recipients** are enrolled devices: their TPM decryption key's public half
  (``FLEET_DIR/devices/<id>.decrypt.pem``, written by ``fleet enroll`` once the AK
  certified it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from modelward.publisher._broker_config import check_id
from modelward.publisher.errors import OperatorInputError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.updater.bundle._encryption import (
    ContentKey,
    Recipient,
    key_id_of,
    wrap,
)

KEYS_DIR = "content-keys"
KEY_FORMAT = "modelward-content-key/1"


def decrypt_key_path(fleet_dir: Path, device_id: str) -> Path:
    """Where ``fleet enroll`` keeps a device's decryption public key."""
    return fleet_dir / "devices" / f"{device_id}.decrypt.pem"


@dataclass(frozen=True)
class Encryption:
    """What ``bundle build`` encrypts with: the model's key, wrapped for each recipient."""

    key: ContentKey
    recipients: tuple[Recipient, ...]
    rotated: bool  # a new key (first release, or the recipients changed)


def recipients_of(spec: str) -> list[str]:
    """The device ids of ``--encrypt-for`` (comma-separated), each checked, sorted."""
    ids = sorted({s.strip() for s in spec.split(",") if s.strip()})
    if not ids:
        raise OperatorInputError("--encrypt-for names no device")
    for i in ids:
        check_id("--encrypt-for device id", i)
    return ids


def _public_key(fleet_dir: Path, device_id: str) -> object:
    from cryptography.hazmat.primitives import serialization

    path = decrypt_key_path(fleet_dir, device_id)
    try:
        pem = path.read_bytes()[: 1 << 14]
    except FileNotFoundError as e:
        raise OperatorInputError(
            f"--encrypt-for {device_id}: {path} does not exist (the device is not enrolled "
            "in this fleet, or was enrolled before its TPM had a decryption key: run "
            "`agent provision`, then enroll it again)") from e
    try:
        return serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise OperatorInputError(f"{path} is not a PEM public key") from e


def _key_file(fleet_dir: Path, model: str) -> Path:
    return fleet_dir / KEYS_DIR / f"{model}.json"


def _load_key(path: Path) -> tuple[ContentKey, list[str]] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        d = loads_bounded(raw, max_bytes=1 << 20, what=str(path), max_depth=3)
        if not isinstance(d, dict) or d.get("format") != KEY_FORMAT:
            raise ValueError(f"not a {KEY_FORMAT} document")
        key = ContentKey(base64.b64decode(str(d["secret"]), validate=True))
        if key.key_id != d.get("key_id"):
            raise ValueError("its key_id is not its key's")
        recipients = d["recipients"]
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("recipients is not a list of device ids")
    except (UntrustedJsonError, ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(f"content key file {path} is unreadable: {e}") from e
    return key, sorted(recipients)


def content_key(fleet_dir: Path, model: str, device_ids: Sequence[str]) -> Encryption:
    """The model's content key for ``device_ids`` (kept, or new when they changed),
    wrapped for each device's decryption key.

    Raises:
        OperatorInputError: a device has no decryption key here, or the key file is bad.
    """
    ids = sorted(device_ids)
    publics = {i: _public_key(fleet_dir, i) for i in ids}  # (all checked before a write)
    path = _key_file(fleet_dir, model)
    found = _load_key(path)
    rotated = found is None or found[1] != ids
    if found is not None and not rotated:
        key = found[0]
    else:
        key = ContentKey.generate()
        doc = {"format": KEY_FORMAT, "model": model, "key_id": key.key_id,
               "secret": base64.b64encode(key.secret).decode(), "recipients": ids,
               "created": int(time.time())}
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
    try:
        recipients = tuple(wrap(key, publics[i], i, model) for i in ids)
    except ValueError as e:
        raise OperatorInputError(str(e)) from e
    return Encryption(key, recipients, rotated)


@dataclass(frozen=True)
class EncryptedFile:
    """One file encrypted: its ciphertext (a temporary file), chunks, ciphertext sha256."""

    path: Path
    chunks: list[tuple[int, bytes]]
    sha256: str


def encrypt_file(key: ContentKey, src: Path, out: Path) -> EncryptedFile:
    """Encrypt ``src`` into ``out``, chunk by chunk where FastCDC cuts its plaintext."""
    from modelward.publisher._chunking import cut
    from modelward.trust._fingerprint import hash_workers

    chunks: list[tuple[int, bytes]] = []
    sha = hashlib.sha256()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(src, "rb") as f, os.fdopen(fd, "wb") as w:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, \
                    ThreadPoolExecutor(hash_workers()) as pool:
                view = memoryview(m)
                try:
                    for c in cut(view, 0, pool):
                        iv, ct = key.seal(view[c.offset:c.offset + c.length])
                        chunks.append((c.length, iv))
                        sha.update(ct)
                        w.write(ct)
                finally:
                    view.release()
        if sum(n for n, _ in chunks) != size:
            raise OperatorInputError(f"{src} changed while it was being encrypted")
    return EncryptedFile(out, chunks, sha.hexdigest())


__all__ = ["Encryption", "content_key", "decrypt_key_path", "encrypt_file", "key_id_of",
           "recipients_of"]
