"""The device's half of encrypted bundles (issue 19; format: ``updater.bundle._encryption``).

:class:`Unlocker` opens a release's content key before anything of it is downloaded: from
the manifest (the chunk index carries it, verified by TUF), the device finds its own
recipient entry, asks its TPM for the ECDH shared point of its decryption key with the
entry's ephemeral key, and unwraps the content key in memory (never on disk). A device
that is not a recipient is refused there, before a chunk is fetched.

Downloads and resumes stay ciphertext in ``staging/``: the delta re-encrypts the plaintext
chunks the slots hold to find the ones the release shares (encryption is deterministic),
and writes ciphertext. Once every chunk matched its signed hash, :func:`decrypt_incoming`
decrypts the files in place (each chunk authenticated again by its synthetic iv), just
before the plaintext is fingerprinted and health-checked, and then moved into the slot,
where the inference app needs it in the clear.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modelward.updater.bundle._encryption import (
    MAX_TABLE_BYTES,
    Chunks,
    ContentKey,
    DecryptionError,
    EncryptionFormatError,
    on_curve,
    parse_table,
    unwrap,
)
from modelward.updater.errors import (
    BundleFormatError,
    EncryptionRefusedError,
    NotARecipientError,
    StagedFilesChangedError,
    StagingError,
)
from modelward.updater.install._statedir import open_at, open_root

if TYPE_CHECKING:
    from modelward.updater.bundle._bundle import Manifest

logger = logging.getLogger(__name__)


class Unlocker:
    """Opens the content keys of encrypted releases for ``device_id`` with
    ``shared_x`` (the TPM's ECDH of the device's decryption key with a point)."""

    def __init__(self, device_id: str, shared_x: Callable[[bytes], bytes]) -> None:
        self._id, self._shared_x = device_id, shared_x
        self._keys: dict[tuple[str, str, str], ContentKey] = {}

    def unlock(self, manifest: Manifest) -> ContentKey | None:
        """The content key of ``manifest``'s release (None: it is not encrypted).

        Raises:
            NotARecipientError: it is not encrypted for this device.
            EncryptionRefusedError: its key for this device does not open.
            TpmError: the TPM failed (or has no decryption key: run `agent provision`).
        """
        h = manifest.encryption
        if h is None:
            return None
        what = f"{manifest.name} {manifest.version}"
        rec = h.recipient(self._id)
        if rec is None:
            raise NotARecipientError(
                f"{what} is encrypted for {len(h.recipients)} other device(s), not for "
                f"{self._id}: the operator builds it with `bundle build --encrypt-for` "
                "naming this device", model=manifest.name, version=manifest.version)
        memo = (h.key_id, manifest.name, rec.epk.hex())
        if (key := self._keys.get(memo)) is not None:
            return key
        if not on_curve(rec.epk):  # (the TPM would refuse it too, but as its own fault)
            raise EncryptionRefusedError(
                f"{what}: the ephemeral key wrapped for {self._id} is not a P-256 point",
                model=manifest.name, version=manifest.version)
        try:
            key = unwrap(rec, h.key_id, manifest.name, self._shared_x)
        except DecryptionError as e:
            raise EncryptionRefusedError(f"{what}: {e}", model=manifest.name,
                                         version=manifest.version) from e
        self._keys[memo] = key
        logger.info("%s: content key %s unwrapped by the TPM", what, h.key_id)
        return key


def decrypt_incoming(state_dir: Path, incoming: Path, manifest: Manifest,
                     key: ContentKey) -> None:
    """Decrypt the encrypted files of ``manifest`` in ``incoming``, in place, chunk by
    chunk as its table says (every byte was verified against its signed hash before).

    Raises:
        BundleFormatError: the table is malformed.
        EncryptionRefusedError: a chunk does not decrypt to what was sealed.
        StagingError: a file cannot be read or written (never through a link).
    """
    h = manifest.encryption
    assert h is not None
    what = f"{manifest.name} {manifest.version}"
    sizes = {f.path: f.size for f in manifest.files}
    listed = {f.path: f for f in manifest.files}
    root = open_root(state_dir, incoming)
    try:
        data = _read_all(root, h.table, incoming, min(sizes.get(h.table, 0), MAX_TABLE_BYTES))
        # What is read back from the disk is checked against what was signed before a
        # failure is blamed on the release: the disk's changes are no rejection.
        if hashlib.sha256(data).hexdigest() != listed[h.table].sha256:
            raise _changed(incoming, h.table)
        try:
            table = parse_table(data, h, sizes, what=f"{what}: {h.table}")
        except EncryptionFormatError as e:
            raise BundleFormatError(str(e), bundle=what, member=h.table) from e
        for path in h.files:
            try:
                fd = open_at(root, path, os.O_RDWR, what=incoming / path)
            except OSError as e:
                raise StagingError(f"cannot open {incoming / path} to decrypt it: {e}") from e
            try:
                _decrypt_file(fd, table[path], key, incoming / path, h.ciphertext_sha256[path],
                              f"{what}: {path}", manifest)
            except OSError as e:
                raise StagingError(f"cannot decrypt {incoming / path}: {e}") from e
            finally:
                os.close(fd)
    finally:
        os.close(root)


def _changed(incoming: Path, path: str) -> StagedFilesChangedError:
    return StagedFilesChangedError(
        f"{incoming / path} changed on disk after it was verified (not decrypted)",
        path=str(incoming), expected="", actual="")


def _decrypt_file(fd: int, chunks: Chunks, key: ContentKey, where: Path, ct_sha256: str,
                  what: str, manifest: Manifest) -> None:
    """Decrypt one file in place. Its ciphertext is hashed as it is read: a chunk that does
    not decrypt is the release's fault only if the file is still the signed ciphertext."""
    sha = hashlib.sha256()
    off = 0
    for n, iv in chunks:
        ct = os.pread(fd, n, off)
        if len(ct) != n:
            raise StagingError(f"{where} is shorter than signed")
        sha.update(ct)
        try:
            pt = key.open(iv, ct)
        except DecryptionError as e:
            rest = off + n
            while piece := os.pread(fd, 1 << 20, rest):
                sha.update(piece)
                rest += len(piece)
            if sha.hexdigest() != ct_sha256:
                raise _changed(where.parent, where.name) from e
            raise EncryptionRefusedError(f"{what} at offset {off}: {e}", model=manifest.name,
                                         version=manifest.version) from e
        if os.pwrite(fd, pt, off) != n:
            raise StagingError(f"short write decrypting {where}")
        off += n


def _read_all(root: int, path: str, incoming: Path, limit: int) -> bytes:
    try:
        fd = open_at(root, path, os.O_RDONLY, what=incoming / path)
    except OSError as e:
        raise StagingError(f"cannot open {incoming / path}: {e}") from e
    try:
        data = os.pread(fd, limit + 1, 0)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise StagingError(f"{incoming / path} is longer than signed")
    return data
