"""Role keys as passphrase-encrypted PKCS#8 files (ed25519) outside the served repository."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey

from modelward.publisher._keyfile import (
    MIN_PASSPHRASE_CHARS,
    KeyFileFormatError,
    encrypt_scrypt,
    kdf_of,
)
from modelward.publisher._passphrases import PASSPHRASE_ENV, Passphrase, as_provider, env_var
from modelward.publisher.errors import KeyError_
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import loads_bounded

ROLES = ("root", "targets", "snapshot", "timestamp")


class WeakPassphraseError(KeyError_):
    """A passphrase for a new key file (``repo init``, ``delegate``, ``rotate``,
    ``rekey``) is shorter than the minimum.

    Attributes:
        role: the role or team whose passphrase it is.
        length: its length in characters.
    """

    def __init__(self, role: str, length: int) -> None:
        super().__init__(
            f"the passphrase for the {role} key has {length} characters; new key files need "
            f"at least {MIN_PASSPHRASE_CHARS}", path=role,
            hint=f"set {_variables(role)} to a longer passphrase (several random words)")
        self.role, self.length = role, length


def key_path(keys_dir: Path, role: str) -> Path:
    """Where a role's private key lives."""
    return keys_dir / f"{role}.pem"


def generate_key(keys_dir: Path, role: str, passphrase: Passphrase) -> SSlibKey:
    """Create an encrypted ed25519 key file for ``role`` and return its public key.

    Raises:
        KeyError_: a key file for the role exists already (never overwritten).
        WeakPassphraseError: the role's passphrase is shorter than the minimum.
    """
    return generate_key_at(key_path(keys_dir, role), passphrase, role)


def role_of_key_file(path: Path) -> str:
    """The role whose passphrase opens ``path``, from the names this package gives files:
    ``ROLE.pem``, ``ROLE-N.pem``, ``ROLE.pem.new``, ``retired/ROLE-KEYID.pem`` and
    ``delegated-TEAM.pem``.

    Raises:
        KeyError_: a name that follows none of these.
    """
    name = path.name.removesuffix(".new")
    if name.startswith("delegated-") and name.endswith(".pem"):
        return name[len("delegated-"):-len(".pem")]
    head = re.split(r"[-.]", name, maxsplit=1)[0]
    if head in ROLES and name.endswith(".pem"):
        return head
    raise KeyError_(f"cannot tell which role the key file {path} belongs to", path=str(path))


def check_new_passphrase(passphrase: bytes, role: str) -> None:
    """Refuse a passphrase too short for a new key file (existing files load with any).

    Raises:
        WeakPassphraseError: fewer than :data:`MIN_PASSPHRASE_CHARS` characters.
    """
    chars = len(passphrase.decode("utf-8", errors="replace"))
    if chars < MIN_PASSPHRASE_CHARS:
        raise WeakPassphraseError(role, chars)


def generate_key_at(path: Path, passphrase: Passphrase, role: str = "") -> SSlibKey:
    """Create an encrypted ed25519 key file at ``path`` and return its public key.

    The file is PKCS#8 encrypted with scrypt (see ``modelward.publisher._keyfile``) under ``role``'s
    passphrase (``role`` defaults to the one the file name says).

    Raises:
        KeyError_: the file exists already (never overwritten).
        WeakPassphraseError: the passphrase is shorter than the minimum.
    """
    keys_dir = path.parent
    if path.exists():
        raise KeyError_(f"key file {path} exists already; refusing to overwrite", path=str(path))
    role = role or role_of_key_file(path)
    secret = as_provider(passphrase)(role)
    check_new_passphrase(secret, role)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = encrypt_scrypt(priv, secret)
    write_atomic(path, pem, mode=0o600)
    _remember(pem, secret, priv)
    return SSlibKey.from_crypto(priv.public_key())


def load_signer(keys_dir: Path, role: str, passphrase: Passphrase) -> CryptoSigner:
    """Signer for ``role`` from its encrypted key file.

    Raises:
        KeyError_: missing file, wrong passphrase or not an ed25519 key.
    """
    return load_signer_at(key_path(keys_dir, role), passphrase, role)


# A key file is decrypted once per process: a pure function of (file bytes, passphrase),
# so the cache can only ever return what decrypting again would. Bounded; in memory only.
_DECRYPTED: dict[tuple[bytes, bytes], ed25519.Ed25519PrivateKey] = {}
_DECRYPTED_MAX = 64


def _remember(pem: bytes, secret: bytes, priv: ed25519.Ed25519PrivateKey) -> None:
    if len(_DECRYPTED) >= _DECRYPTED_MAX:
        _DECRYPTED.pop(next(iter(_DECRYPTED)))
    _DECRYPTED[(pem, secret)] = priv


def decrypt_key(data: bytes, secret: bytes, role: str, path: Path) -> ed25519.Ed25519PrivateKey:
    """The ed25519 private key in the PEM ``data`` of the key file ``path``.

    Raises:
        KeyError_: wrong passphrase (one line naming the role and where its passphrase
            comes from), a damaged file, or not an ed25519 key.
    """
    cached = _DECRYPTED.get((data, secret))
    if cached is not None:
        return cached
    try:
        excess = kdf_of(data).excess()
    except KeyFileFormatError as e:
        raise KeyError_(f"the {role or 'signing'} key {path} is damaged: {e}",
                        path=str(path)) from e
    if excess:  # a damaged or planted file must not take the machine's memory and time
        raise KeyError_(f"refusing to open the {role or 'signing'} key {path}: {excess}",
                        path=str(path))
    try:
        priv = serialization.load_pem_private_key(data, password=secret)
    except (ValueError, TypeError) as e:
        raise KeyError_(
            f"cannot decrypt the {role or 'signing'} key {path}: wrong passphrase (from "
            f"{_variables(role)} or the prompt) or a damaged key file",
            path=str(path),
        ) from e
    if not isinstance(priv, ed25519.Ed25519PrivateKey):
        raise KeyError_(f"{path} is not an ed25519 key", path=str(path))
    _remember(data, secret, priv)
    return priv


def _variables(role: str) -> str:
    try:
        return f"{env_var(role)} / {PASSPHRASE_ENV}"
    except KeyError_:
        return PASSPHRASE_ENV


def load_signer_at(path: Path, passphrase: Passphrase, role: str = "") -> CryptoSigner:
    """Signer from an encrypted key file, opened with ``role``'s passphrase (``role``
    defaults to the one the file name says).

    Raises:
        KeyError_: missing file, wrong passphrase or not an ed25519 key.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyError_(f"cannot read the {role} key {path}: {e}", path=str(path)) from e
    role = role or role_of_key_file(path)
    priv = decrypt_key(data, as_provider(passphrase)(role), role, path)
    return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))


def _signer_from_pem(pem: bytes, passphrase: Callable[[], bytes], where: str) -> CryptoSigner:
    """A signer for a PEM private key, encrypted with ``passphrase()`` or not (asked for
    only when the key is encrypted)."""
    for password in (None, passphrase):
        try:
            priv = serialization.load_pem_private_key(
                pem, password=None if password is None else password())
            break
        except TypeError:  # encrypted and no password given, or the reverse
            continue
        except ValueError as e:
            raise KeyError_(f"{where} does not hold a usable private key", path=where) from e
    else:
        raise KeyError_(f"{where} does not hold a usable private key", path=where)
    return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))


def public_key_from_pem(pem: bytes) -> SSlibKey:
    """An SSlibKey for a PEM public key (ed25519, ECDSA, RSA).

    Raises:
        KeyError_: not a supported public key.
    """
    try:
        return SSlibKey.from_crypto(serialization.load_pem_public_key(pem))
    except (ValueError, TypeError) as e:
        raise KeyError_(f"not a usable public key: {e}", path="public key") from e


def is_inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or below it (after resolving links)."""
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip("/") + "/")


ENCFILE = "encfile"  # our scheme: a passphrase-encrypted PKCS#8 file under the key directory
ENVVAR = "envvar"  # our scheme: a PEM private key (encrypted or not) in an environment variable


class SignerRegistry:
    """Which private key signs for which public key: ``KEYS/signers.json``, keyid -> URI.

    URIs are ``encfile:<file in KEYS>`` or any scheme securesystemslib loads
    (``hsm:``, ``gcpkms:``, ``awskms:``, ``azurekms:``, ``hv:``, ...). Private material
    never enters the registry; a passphrase or PIN comes from ``secrets`` at signing time.

    Args:
        keys_dir: the key directory.
        passphrase: passphrases of ``encfile:`` keys per role (or one for all).
        secrets: answers securesystemslib's secret prompts (e.g. ``"pin"`` for an HSM).
    """

    def __init__(self, keys_dir: Path, passphrase: Passphrase,
                 secrets: Callable[[str], str] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.keys_dir = keys_dir
        self.path = keys_dir / "signers.json"
        self._passphrase = as_provider(passphrase)
        self._secrets = secrets
        self._environ = environ or {}

    def entries(self) -> dict[str, str]:
        """keyid -> URI (keys made before the registry existed map to ``<role>.pem``)."""
        try:
            doc = loads_bounded(self.path.read_bytes(), max_bytes=1 << 20, max_depth=1,
                                what=str(self.path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise KeyError_(f"cannot read the key registry {self.path}: {e}",
                            path=str(self.path)) from e
        if not isinstance(doc, dict):
            raise KeyError_(f"the key registry {self.path} is not a JSON object",
                            path=str(self.path))
        return {str(k): str(v) for k, v in doc.items()}

    def add(self, keyid: str, uri: str) -> None:
        """Register the private key of ``keyid``."""
        doc = self.entries()
        doc[keyid] = uri
        write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)

    def keyid_for(self, uri: str) -> str:
        """The keyid registered for ``uri``.

        Raises:
            KeyError_: no key with that URI.
        """
        for keyid, u in self.entries().items():
            if u == uri:
                return keyid
        raise KeyError_(f"no key with URI {uri!r} in {self.path}", path=str(self.path),
                        hint="`modelward repo status` lists the keys; add one with `repo add-key`")

    def signer(self, uri: str, public_key: Key, role: str = "") -> Signer:
        """Load the signer behind ``uri``.

        Raises:
            KeyError_: the key cannot be loaded (missing file, passphrase, PIN, device).
        """
        scheme, _, rest = uri.partition(":")
        if scheme == ENCFILE:
            path = self.keys_dir / rest
            if not is_inside(path, self.keys_dir):
                raise KeyError_(f"{uri} points outside {self.keys_dir}", path=str(path))
            return load_signer_at(path, self._passphrase, role)
        if scheme == ENVVAR:
            pem = self._environ.get(rest)
            if not pem:
                raise KeyError_(f"environment variable {rest} (key {uri}) is not set",
                                path=uri)
            return _signer_from_pem(pem.encode(), lambda: self._passphrase(role), uri)
        try:
            return Signer.from_priv_key_uri(uri, public_key, self._secrets)
        except (ValueError, OSError) as e:
            raise KeyError_(f"cannot use key {uri}: {e}", path=uri,
                            hint="for hsm: set PYKCS11LIB and MODELWARD_HSM_PIN") from e
