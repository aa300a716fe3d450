"""``bundle build --encrypt-for``: content keys, recipients, encrypting a bundle's files.

Format and cryptography: ``updater.bundle._encryption``. This module is the operator's
half:

- **Content keys** are per model, kept in ``FLEET_DIR/content-keys/<model>.json`` (0600;
  a secret like the online keys: the machine that builds bundles holds it). The key is
  reused while the model's recipients stay the same (so a delta between two releases
  moves only the changed chunks) and replaced by a new one when they change (a device
  id, or the key a device id is enrolled with: a replaced device's old TPM is no
  recipient), so a device
  taken off the list cannot open the next release with the key it unwrapped before. The
  first release under a new key is a full download on every device.
- **Recipients** are enrolled devices: their TPM decryption key's public half
  (``FLEET_DIR/devices/<id>.decrypt.pub``, written by ``fleet add-device`` once the AK
  certified it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelward.publisher._broker_config import check_id
from modelward.publisher.errors import OperatorInputError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.trust.errors import ModelwardError
from modelward.updater.bundle._encryption import (
    ContentKey,
    Recipient,
    key_id_of,
    wrap,
)
from modelward.updater.bundle._names import check_model_name

if TYPE_CHECKING:
    from modelward.updater.bundle._bundle import Manifest

KEYS_DIR = "content-keys"
KEY_FORMAT = "modelward-content-key/1"


def decrypt_key_path(fleet_dir: Path, device_id: str) -> Path:
    """Where ``fleet add-device`` keeps a device's decryption public key."""
    return fleet_dir / "devices" / f"{device_id}.decrypt.pub"


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


def _public_key(fleet_dir: Path, device_id: str) -> tuple[object, str]:
    """A device's decryption public key and the sha256 of its PEM (the key's identity:
    a device re-enrolled under its id with another TPM is another recipient)."""
    from cryptography.hazmat.primitives import serialization

    identity = fleet_dir / "devices" / f"{device_id}.pem"
    if not identity.is_file():  # (a device taken out of the fleet by hand: no recipient)
        raise OperatorInputError(
            f"--encrypt-for {device_id}: the device is not enrolled in this fleet "
            f"({identity} does not exist)",
            hint="enroll it with `fleet add-device`; a leftover "
                 f"{decrypt_key_path(fleet_dir, device_id).name} alone makes no recipient")
    path = decrypt_key_path(fleet_dir, device_id)
    try:
        pem = path.read_bytes()[: 1 << 14]
    except FileNotFoundError as e:
        raise OperatorInputError(
            f"--encrypt-for {device_id}: {path} does not exist (the device is not enrolled "
            "in this fleet, or was enrolled before its TPM had a decryption key: run "
            "`agent provision`, then enroll it again)") from e
    except OSError as e:
        raise OperatorInputError(f"cannot read {path}: {e}") from e
    try:
        return serialization.load_pem_public_key(pem), hashlib.sha256(pem).hexdigest()
    except ValueError as e:
        raise OperatorInputError(f"{path} is not a PEM public key") from e


def _key_file(fleet_dir: Path, model: str) -> Path:
    return fleet_dir / KEYS_DIR / f"{model}.json"


def _read_secret(path: Path) -> bytes | None:
    """The key file's bytes: never through a link, refused if others may read it."""
    from modelward.trust._secret_file import foreign_owner, loose_mode

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:  # (ELOOP: a symlink)
        raise OperatorInputError(f"content key file {path} cannot be opened (a link or "
                                 f"unreadable): {e}") from e
    try:
        st = os.fstat(fd)
        why = (None if stat.S_ISREG(st.st_mode) else "is not a regular file") or \
            loose_mode(st) or foreign_owner(st, root_ok=True)
        if why:
            raise OperatorInputError(f"content key file {path} {why}")
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def _load_key(path: Path, model: str) -> tuple[ContentKey, list[list[str]]] | None:
    raw = _read_secret(path)
    if raw is None:
        return None
    try:
        d = loads_bounded(raw, max_bytes=1 << 20, what=str(path), max_depth=4)
        if not isinstance(d, dict) or d.get("format") != KEY_FORMAT:
            raise ValueError(f"not a {KEY_FORMAT} document")
        if d.get("model") != model:
            raise ValueError(f"it is the key of model {str(d.get('model'))[:64]!r}, not "
                             f"{model!r}")
        key = ContentKey(base64.b64decode(str(d["secret"]), validate=True))
        if key.key_id != d.get("key_id"):
            raise ValueError("its key_id is not its key's")
        recipients = d["recipients"]
        if not isinstance(recipients, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
                for r in recipients):
            raise ValueError("recipients is not a list of [device id, key sha256]")
    except (UntrustedJsonError, ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(f"content key file {path} is unreadable: {e}") from e
    return key, sorted(recipients)


def content_key(fleet_dir: Path, model: str, device_ids: Sequence[str]) -> Encryption:
    """The model's content key for ``device_ids`` (kept, or new when the recipients or
    any of their keys changed), wrapped for each device's decryption key.

    Raises:
        OperatorInputError: a bad model name, a device not enrolled here (no
            ``devices/<id>.pem``) or without a decryption key, or
            a key file that is unreadable, of another model, a link or readable by others.
    """
    try:
        check_model_name(model)  # (a path component: before anything is written)
    except ValueError as e:
        raise OperatorInputError(str(e)) from e
    ids = sorted(set(device_ids))
    if not ids:
        raise OperatorInputError("no recipient device given")
    publics = {i: _public_key(fleet_dir, i) for i in ids}  # (all checked before a write)
    who = [[i, publics[i][1]] for i in ids]
    path = _key_file(fleet_dir, model)
    found = _load_key(path, model)
    rotated = found is None or found[1] != who
    if found is not None and not rotated:
        key = found[0]
    else:
        key = ContentKey.generate()
        doc = {"format": KEY_FORMAT, "model": model, "key_id": key.key_id,
               "secret": base64.b64encode(key.secret).decode(), "recipients": who,
               "created": int(time.time())}
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
    try:
        recipients = tuple(wrap(key, publics[i][0], i, model) for i in ids)
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


class _ManifestRead(Exception):
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest


def served_encryption(bundle: Path) -> bool | None:
    """Whether the published bundle ``bundle`` (a file in the served directory) is
    encrypted, from its manifest (the tar's first member, nothing after it is read); None
    if it cannot be read as a bundle."""
    from modelward.updater.bundle._bundle import extract_bundle

    def stop(m: Manifest) -> None:
        raise _ManifestRead(m)

    try:
        with open(bundle, "rb") as f:
            extract_bundle(f, None, str(bundle), on_manifest=stop)
    except _ManifestRead as got:
        return got.manifest.encryption is not None
    except (OSError, ModelwardError):
        return None
    return None  # (not reached: a bundle has a manifest)


__all__ = ["Encryption", "content_key", "decrypt_key_path", "encrypt_file", "key_id_of",
           "recipients_of", "served_encryption"]
