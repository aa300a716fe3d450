"""``repo rekey``: rewrite key files with the current KDF, and optionally new passphrases.

Every encrypted key file under KEYS (``*.pem``, ``retired/``, ``rotating/``, and any file
the registry names) is planned first:
each is opened (with its new passphrase if it opens with that, else with its current one),
so a wrong passphrase for any role changes nothing. Then each file that needs it is
rewritten atomically (mode 0600) as scrypt PKCS#8 and read back before it replaces the old.

- A file that meets the current KDF and opens with its new passphrase is kept as is, so a
  second run changes nothing.
- A file stronger than the default keeps its own (higher) scrypt parameters: never a
  downgrade.
- The new passphrase must have the minimum length; the current one may be shorter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelward.publisher import _keyfile
from modelward.publisher._keyfile import (
    KdfInfo,
    KeyFileFormatError,
    ScryptParams,
    encrypt_scrypt,
    kdf_of,
)
from modelward.publisher._keys import (
    ENCFILE,
    SignerRegistry,
    check_new_passphrase,
    decrypt_key,
    is_inside,
    role_of_key_file,
)
from modelward.publisher._passphrases import PassphraseProvider
from modelward.publisher.errors import KeyError_
from modelward.trust._atomic import write_atomic


@dataclass(frozen=True)
class RekeyStep:
    """What ``repo rekey`` does with one key file.

    Attributes:
        path: the key file.
        role: the role or team whose passphrase opens it.
        before: its KDF as found.
        action: ``upgrade`` (KDF), ``new-passphrase`` (KDF kept or raised), or ``keep``.
        params: the scrypt parameters written, for ``upgrade`` and ``new-passphrase``.
    """

    path: Path
    role: str
    before: KdfInfo
    action: str
    params: ScryptParams | None = None


def key_files(keys_dir: Path) -> list[Path]:
    """The private key files of a key directory: ``*.pem``, ``retired/*.pem``,
    ``rotating/*.pem`` (the key of a parked rotation, about to take over) and every
    ``encfile:`` file the registry names inside KEYS (public keys and other files skipped;
    a damaged private key file is kept, so that rekeying it fails by name)."""
    out = []
    found = {*keys_dir.glob("*.pem"), *keys_dir.glob("retired/*.pem"),
             *keys_dir.glob("rotating/*.pem")}
    try:
        entries = SignerRegistry(keys_dir, b"").entries()
    except KeyError_:
        entries = {}
    for uri in entries.values():
        scheme, _, rest = uri.partition(":")
        if scheme == ENCFILE and is_inside(keys_dir / rest, keys_dir):
            found.add(keys_dir / rest)
    for path in sorted(found):
        if path.is_file() and not path.is_symlink() and is_inside(path, keys_dir):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if b"-----BEGIN PRIVATE KEY-----" in data or \
                    b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
                out.append(path)
    return out


def choose_action(before: KdfInfo, opens_with_new: bool) -> tuple[str, ScryptParams | None]:
    """The decision for one file: keep it, or rewrite it with which scrypt parameters."""
    if before.meets() and opens_with_new:
        return "keep", None
    params = _keyfile.DEFAULT_SCRYPT
    if before.kind == "scrypt" and before.scrypt is not None and before.meets():
        params = before.scrypt  # never weaker than what the file had
    return ("upgrade" if opens_with_new or not before.meets() else "new-passphrase"), params


def rekey(keys_dir: Path, current: PassphraseProvider, new: PassphraseProvider,
          roles: set[str] | None = None) -> list[RekeyStep]:
    """Re-encrypt the key files of ``roles`` (default all) under ``keys_dir``.

    Args:
        keys_dir: the key directory.
        current: the passphrases the files have now.
        new: the passphrases they get (often ``current``: only the KDF changes).
        roles: top-level roles and team names to rekey; None for every file.

    Returns:
        One step per key file, in the order done.

    Raises:
        KeyError_: a file opens with neither passphrase (nothing was rewritten), or a
            file's role cannot be told from its name.
        WeakPassphraseError: a new passphrase is shorter than the minimum.
    """
    planned: list[tuple[RekeyStep, ed25519.Ed25519PrivateKey, bytes]] = []
    for path in key_files(keys_dir):
        role = role_of_key_file(path)
        if roles is not None and role not in roles:
            continue
        data = path.read_bytes()
        try:
            before = kdf_of(data)
        except KeyFileFormatError as e:
            raise KeyError_(f"the {role} key {path} is damaged: {e}; nothing was rekeyed",
                            path=str(path)) from e
        fresh = new(role)
        check_new_passphrase(fresh, role)
        priv, opens_with_new = _open(data, before, fresh, current, role, path)
        action, params = choose_action(before, opens_with_new)
        planned.append((RekeyStep(path, role, before, action, params), priv, fresh))
    for step, priv, fresh in planned:
        if step.action == "keep" or step.params is None:
            continue
        pem = encrypt_scrypt(priv, fresh, step.params)
        back = decrypt_key(pem, fresh, step.role, step.path)
        if back.public_key().public_bytes_raw() != priv.public_key().public_bytes_raw():
            raise KeyError_(f"re-encrypting {step.path} did not round-trip; left unchanged",
                            path=str(step.path))
        write_atomic(step.path, pem, mode=0o600)
    return [step for step, _, _ in planned]


def _open(data: bytes, before: KdfInfo, fresh: bytes, current: PassphraseProvider,
          role: str, path: Path) -> tuple[ed25519.Ed25519PrivateKey, bool]:
    """(the key, whether it opened with the new passphrase)."""
    if before.kind == "unencrypted":
        priv = serialization.load_pem_private_key(data, password=None)
        if not isinstance(priv, ed25519.Ed25519PrivateKey):
            raise KeyError_(f"{path} is not an ed25519 key", path=str(path))
        return priv, False
    old = current(role)
    if fresh != old:
        try:
            return decrypt_key(data, fresh, role, path), True
        except KeyError_:
            pass  # not rekeyed yet: it opens with the current passphrase below
    return decrypt_key(data, old, role, path), fresh == old
