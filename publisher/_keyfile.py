"""The key file format: PKCS#8 ``EncryptedPrivateKeyInfo``, PBES2 with scrypt (RFC 7914).

New files are PEM ``ENCRYPTED PRIVATE KEY`` blocks: PBES2 (RFC 8018) whose key derivation
is scrypt (RFC 7914 section 7, OID 1.3.6.1.4.1.11591.4.11) and whose cipher is AES-256-CBC.
That is what ``openssl pkcs8 -topk8 -scrypt`` writes, so OpenSSL, ``cryptography`` and any
PKCS#8 reader open it, and ``openssl asn1parse`` shows the parameters.

Why these parameters: N=2**14, r=8, p=5 is one of OWASP's scrypt settings (equal in cost to
N=2**17, r=8, p=1) and, at 16 MiB per lane, the largest of them that fits OpenSSL's default
32 MiB scrypt memory limit, so every OpenSSL-based tool still opens the file. One
derivation takes about 0.1 s here; a key is derived once per process (see ``_keys``).

Files written before (``cryptography``'s ``BestAvailableEncryption``: PBKDF2-HMAC-SHA256,
2,048 iterations) still load; :func:`kdf_of` tells them apart and ``repo rekey`` rewrites
them. This module only encodes and decodes bytes; it does no file I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MIN_PASSPHRASE_CHARS = 12  # new key files; loading an existing file accepts any length
PBKDF2_MIN_ITERATIONS = 600_000  # OWASP 2023 floor for PBKDF2-HMAC-SHA256
# Ceilings for what a key file may ask of the machine that opens it: a file that names
# scrypt N=2**24 makes the loader allocate 16 GiB and run for minutes (measured: 250 s).
# Memory is counted over every lane as OpenSSL allocates it: 128 * r * (N + p + 2) bytes
# (V, 128 * r * (N + 2), plus B, 128 * r * p); a file with a small N and a huge r * p
# otherwise passes a per-lane bound and takes gigabytes.
MAX_SCRYPT_LANE_BYTES = 256 << 20  # 128 * r * (N + p + 2): 256 MiB, 16x the default
MAX_SCRYPT_COST = 2**25  # N * r * p: about 50x the default (a few seconds)
MAX_PBKDF2_ITERATIONS = 10_000_000  # about 1 s of PBKDF2-HMAC-SHA256

_PBES2 = "1.2.840.113549.1.5.13"
_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_PBKDF2 = "1.2.840.113549.1.5.12"
_AES256_CBC = "2.16.840.1.101.3.4.1.42"
_HMAC_OIDS = {
    "1.2.840.113549.2.7": "hmacWithSHA1",  # PBKDF2's default PRF when none is named
    "1.2.840.113549.2.9": "hmacWithSHA256",
    "1.2.840.113549.2.10": "hmacWithSHA384",
    "1.2.840.113549.2.11": "hmacWithSHA512",
}
_PEM_ENCRYPTED = "ENCRYPTED PRIVATE KEY"
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.S)


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters (RFC 7914): memory per lane is 128 * r * n bytes."""

    n: int = 2**14
    r: int = 8
    p: int = 5

    def cost(self) -> int:
        """Work relative to other settings (the attacker's cost per guess): every lane
        runs N * r block operations."""
        return self.n * self.r * self.p

    def memory(self) -> int:
        """Bytes OpenSSL allocates to derive with these parameters (all lanes)."""
        return 128 * self.r * (self.n + self.p + 2)


DEFAULT_SCRYPT = ScryptParams()


@dataclass(frozen=True)
class KdfInfo:
    """How a key file's encryption key is derived, read from the file itself.

    Attributes:
        kind: ``scrypt``, ``pbkdf2``, ``unencrypted`` (a plain ``PRIVATE KEY``), or
            ``unknown`` (another PBE scheme, or not a private key at all).
        scrypt: the scrypt parameters, for ``scrypt``.
        iterations: PBKDF2's iteration count, for ``pbkdf2``.
        prf: PBKDF2's PRF, for ``pbkdf2``.
        cipher: the PBES2 cipher OID's name, or "".
    """

    kind: str
    scrypt: ScryptParams | None = None
    iterations: int = 0
    prf: str = ""
    cipher: str = ""

    def meets(self, floor: ScryptParams | None = None) -> bool:
        """Whether the file is protected at least as well as new files are: as much
        memory per lane (N) and as much work as ``floor`` (the default)."""
        floor = floor or DEFAULT_SCRYPT
        if self.kind == "scrypt" and self.scrypt is not None:
            return self.scrypt.cost() >= floor.cost() and self.scrypt.n >= floor.n
        return self.kind == "pbkdf2" and self.iterations >= PBKDF2_MIN_ITERATIONS and \
            self.prf in ("hmacWithSHA256", "hmacWithSHA512")

    def excess(self) -> str:
        """Why opening the file would cost more than a key file may ask, or ""."""
        if self.kind == "scrypt" and self.scrypt is not None:
            memory = self.scrypt.memory()
            if min(self.scrypt.n, self.scrypt.r, self.scrypt.p) < 1 or \
                    memory > MAX_SCRYPT_LANE_BYTES or self.scrypt.cost() > MAX_SCRYPT_COST:
                return f"{self.describe()} needs {memory >> 20} MiB and " \
                       f"{self.scrypt.cost()} block operations"
        if self.kind == "pbkdf2" and self.iterations > MAX_PBKDF2_ITERATIONS:
            return f"{self.describe()} is more than {MAX_PBKDF2_ITERATIONS}"
        if self.kind == "unknown":  # PBES1, PKCS#12 PBE, another KDF: cost unbounded here
            return "an encryption scheme other than PBES2 with scrypt or PBKDF2, whose cost " \
                   "cannot be bounded before it runs"
        return ""

    def describe(self) -> str:
        """One line for an operator: ``scrypt N=16384 r=8 p=5`` or ``PBKDF2 2048 ...``."""
        if self.kind == "scrypt" and self.scrypt is not None:
            return f"scrypt N={self.scrypt.n} r={self.scrypt.r} p={self.scrypt.p}"
        if self.kind == "pbkdf2":
            return f"PBKDF2 {self.prf} {self.iterations} iterations"
        return self.kind


class KeyFileFormatError(ValueError):
    """Bytes that are not a PKCS#8 structure this module understands (internal signal;
    callers convert it to a :class:`modelward.publisher.errors.KeyError_` naming the file)."""


# --- DER, the few types PKCS#8 needs ----------------------------------------


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _seq(*parts: bytes) -> bytes:
    return _tlv(0x30, b"".join(parts))


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _octets(value: bytes) -> bytes:
    return _tlv(0x04, value)


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _read(data: bytes, at: int = 0) -> tuple[int, bytes, int]:
    """(tag, body, offset after) of the DER element at ``at``."""
    try:
        tag, first = data[at], data[at + 1]
        at += 2
        if first & 0x80:
            width = first & 0x7F
            if not 1 <= width <= 4:
                raise KeyFileFormatError("unsupported DER length")
            length = int.from_bytes(data[at:at + width], "big")
            at += width
        else:
            length = first
    except IndexError as e:
        raise KeyFileFormatError("truncated DER") from e
    if at + length > len(data):
        raise KeyFileFormatError("truncated DER")
    return tag, data[at:at + length], at + length


def _items(body: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 0
    while at < len(body):
        tag, value, at = _read(body, at)
        out.append((tag, value))
    return out


def _oid_str(body: bytes) -> str:
    arcs, value = [], 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise KeyFileFormatError("empty OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _expect(item: tuple[int, bytes], tag: int, what: str) -> bytes:
    if item[0] != tag:
        raise KeyFileFormatError(f"{what}: unexpected DER tag {item[0]:#x}")
    return item[1]


# --- PEM and the parameters ----------------------------------------------------


def pem_blocks(pem: bytes) -> tuple[str, bytes]:
    """(label, DER) of the file's one PEM block.

    A key file holds exactly one block: the parameters read here must be those of the
    block ``cryptography`` decrypts, and OpenSSL's PEM reader skips blocks it does not
    want (a decoy block before the key would otherwise hide the key's KDF cost).

    Raises:
        KeyFileFormatError: no PEM block, more than one, or its base64 is broken.
    """
    begins = pem.count(b"-----BEGIN")
    if begins > 1:
        raise KeyFileFormatError(f"{begins} PEM blocks; a key file holds exactly one")
    m = _PEM_RE.search(pem)
    if m is None or begins != 1:
        raise KeyFileFormatError("no PEM block")
    try:
        return m.group(1).decode(), base64.b64decode(b"".join(m.group(2).split()),
                                                     validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyFileFormatError(f"broken PEM base64: {e}") from e


def kdf_of(pem: bytes) -> KdfInfo:
    """How the key in ``pem`` is protected, from its PKCS#8 structure.

    Raises:
        KeyFileFormatError: not a PEM block, or a malformed ``EncryptedPrivateKeyInfo``.
    """
    label, der = pem_blocks(pem)
    if label == "PRIVATE KEY":
        return KdfInfo("unencrypted")
    if label != _PEM_ENCRYPTED:  # any other block: cryptography might run its own KDF
        raise KeyFileFormatError(f"a {label} block, not a PKCS#8 private key")
    try:
        return _encrypted_kdf(der)
    except IndexError as e:  # a structure with fewer items than PKCS#8 has
        raise KeyFileFormatError("a truncated EncryptedPrivateKeyInfo") from e


def _encrypted_kdf(der: bytes) -> KdfInfo:
    info = _items(_expect(_read(der)[:2], 0x30, "EncryptedPrivateKeyInfo"))
    alg = _items(_expect(info[0], 0x30, "encryptionAlgorithm"))
    if _oid_str(_expect(alg[0], 0x06, "algorithm")) != _PBES2 or len(alg) < 2:
        return KdfInfo("unknown")
    pbes2 = _items(_expect(alg[1], 0x30, "PBES2-params"))
    kdf = _items(_expect(pbes2[0], 0x30, "keyDerivationFunc"))
    enc = _items(_expect(pbes2[1], 0x30, "encryptionScheme"))
    cipher = _oid_str(_expect(enc[0], 0x06, "cipher"))
    cipher = "aes-256-cbc" if cipher == _AES256_CBC else cipher
    kdf_oid = _oid_str(_expect(kdf[0], 0x06, "kdf"))
    params = _items(_expect(kdf[1], 0x30, "kdf params"))
    ints = [int.from_bytes(v, "big") for t, v in params if t == 0x02]
    if kdf_oid == _SCRYPT and len(ints) >= 3:
        return KdfInfo("scrypt", scrypt=ScryptParams(ints[0], ints[1], ints[2]),
                       cipher=cipher)
    if kdf_oid == _PBKDF2 and ints:
        prf = "hmacWithSHA1"
        for tag, value in params:
            if tag == 0x30:
                prf = _HMAC_OIDS.get(_oid_str(_expect(_items(value)[0], 0x06, "prf")), "?")
        return KdfInfo("pbkdf2", iterations=ints[0], prf=prf, cipher=cipher)
    return KdfInfo("unknown", cipher=cipher)


def encrypt_scrypt(priv: ed25519.Ed25519PrivateKey, passphrase: bytes,
                   params: ScryptParams | None = None) -> bytes:
    """PEM ``ENCRYPTED PRIVATE KEY`` of ``priv``: PBES2, scrypt ``params`` (default
    :data:`DEFAULT_SCRYPT`), AES-256-CBC.

    The caller checks the passphrase's length (:data:`MIN_PASSPHRASE_CHARS`).
    """
    params = params or DEFAULT_SCRYPT
    plain = priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    key = Scrypt(salt=salt, length=32, n=params.n, r=params.r, p=params.p).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(padder.update(plain) + padder.finalize()) + enc.finalize()
    der = _seq(
        _seq(_oid(_PBES2), _seq(
            _seq(_oid(_SCRYPT), _seq(_octets(salt), _int(params.n), _int(params.r),
                                     _int(params.p), _int(32))),
            _seq(_oid(_AES256_CBC), _octets(iv)),
        )),
        _octets(ciphertext),
    )
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {_PEM_ENCRYPTED}-----\n" + "\n".join(lines) +
            f"\n-----END {_PEM_ENCRYPTED}-----\n").encode()
