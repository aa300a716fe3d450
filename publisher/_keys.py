"""Role keys as passphrase-encrypted PKCS#8 files (ed25519) outside the served repository."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey

from publisher.errors import KeyError_
from trust import write_atomic

ROLES = ("root", "targets", "snapshot", "timestamp")


def key_path(keys_dir: Path, role: str) -> Path:
    """Where a role's private key lives."""
    return keys_dir / f"{role}.pem"


def generate_key(keys_dir: Path, role: str, passphrase: bytes) -> SSlibKey:
    """Create an encrypted ed25519 key file for ``role`` and return its public key.

    Raises:
        KeyError_: a key file for the role exists already (never overwritten).
    """
    return generate_key_at(key_path(keys_dir, role), passphrase)


def generate_key_at(path: Path, passphrase: bytes) -> SSlibKey:
    """Create an encrypted ed25519 key file at ``path`` and return its public key.

    Raises:
        KeyError_: the file exists already (never overwritten).
    """
    keys_dir = path.parent
    if path.exists():
        raise KeyError_(f"key file {path} exists already; refusing to overwrite", path=str(path))
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    write_atomic(path, pem, mode=0o600)
    return SSlibKey.from_crypto(priv.public_key())


def load_signer(keys_dir: Path, role: str, passphrase: bytes) -> CryptoSigner:
    """Signer for ``role`` from its encrypted key file.

    Raises:
        KeyError_: missing file, wrong passphrase or not an ed25519 key.
    """
    return load_signer_at(key_path(keys_dir, role), passphrase, role)


def load_signer_at(path: Path, passphrase: bytes, role: str = "") -> CryptoSigner:
    """Signer from an encrypted key file.

    Raises:
        KeyError_: missing file, wrong passphrase or not an ed25519 key.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyError_(f"cannot read the {role} key {path}: {e}", path=str(path)) from e
    try:
        priv = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as e:
        raise KeyError_(
            f"cannot decrypt the {role or 'signing'} key {path}: wrong passphrase or not a "
            "key file",
            path=str(path),
            hint="set MODELWARD_KEY_PASSPHRASE or type the passphrase used at `repo init`",
        ) from e
    if not isinstance(priv, ed25519.Ed25519PrivateKey):
        raise KeyError_(f"{path} is not an ed25519 key", path=str(path))
    return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))


def is_inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or below it (after resolving links)."""
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip("/") + "/")
