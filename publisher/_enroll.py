"""Enrollment by credential activation: the operator's half (issue 18, docs/attestation.md).

``fleet add-device --enrollment FILE --challenge OUT`` (:func:`begin_enrollment`) checks
the enrollment file a device printed (``agent enroll --json``), then seals a fresh secret
to its EK for its AK with TPM2_MakeCredential (computed here: no TPM needed) and keeps the
secret's hash pending in ``fleet_dir/pending/<id>.json``. Only the TPM that holds both
that EK and a key with that AK's name recovers the secret
(``agent activate-credential``); ``fleet add-device --response R``
(:func:`finish_enrollment`) then records the identity key and the AK.

The decisions (:func:`verify_enrollment`, :func:`check_response`) take bytes and the
time and return what to record; the two ``*_enrollment`` functions do the file work.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelward.publisher._broker_config import check_id
from modelward.publisher.errors import ChallengeError, EnrollmentError, OperatorInputError
from modelward.trust._ak import (
    CHALLENGE_FORMAT,
    ENROLLMENT_FORMAT,
    MAX_EK_CERT_BYTES,
    RESPONSE_FORMAT,
    certify_qualifier,
)
from modelward.trust._atomic import fsync_dir, write_atomic
from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.trust._tpmimport import import_tpm2_pytss

MAX_ENROLLMENT_BYTES = 32 * 1024  # an enrollment is ~3 KiB with an RSA EK certificate
MAX_RESPONSE_BYTES = 4096
MAX_PENDING_BYTES = 8192
CHALLENGE_TTL = 3600.0  # s a challenge may be answered in
PENDING_FORMAT = "modelward-pending-enrollment/1"
# Decoded sizes of each base64 field (bytes).
_LIMITS = {"identity_public": 512, "ak_public": 512, "decrypt_public": 512, "ek_public": 1024,
           "attest": 1024, "signature": 512, "ek_certificate": MAX_EK_CERT_BYTES,
           "credential_blob": 512, "encrypted_secret": 1024, "secret": 64}
_MAX_PEM = 1024


@dataclass(frozen=True)
class VerifiedEnrollment:
    """What a checked enrollment file establishes, short of the credential activation.

    Attributes:
        device_id: the device.
        identity_pem: its identity key (certified by the AK).
        ak_public: the AK's TPM2B_PUBLIC, marshalled.
        ak_name: the AK's name (nameAlg || digest).
        ek_public: the EK's TPM2B_PUBLIC, marshalled.
        ek_certified: whether the EK certificate chained to ``--ek-ca``.
    """

    device_id: str
    identity_pem: bytes
    ak_public: bytes
    ak_name: bytes
    ek_public: bytes
    ek_certified: bool
    decrypt_pem: bytes | None = None  # its TPM decryption key (certified by the AK)


def _bad(device: str, field: str, what: str) -> EnrollmentError:
    return EnrollmentError(f"enrollment of {device}: {field} {what}", device=device,
                           field=field, hint="give the file `agent enroll --json` printed "
                           "on that device, unchanged")


def _b64(doc: dict[str, Any], field: str, device: str, *, key: str | None = None) -> bytes:
    key = key or field
    value = doc.get(key)
    if not isinstance(value, str):
        raise _bad(device, field, "is missing or not a string")
    limit = _LIMITS[key]
    if len(value) > (limit + 2) // 3 * 4:
        raise _bad(device, field, f"is over {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(device, field, "is not base64") from e


def _unmarshal(cls: Any, data: bytes, field: str, device: str) -> Any:
    t = import_tpm2_pytss()
    try:
        obj, used = cls.unmarshal(data)
    except (t.TSS2_Exception, TypeError, ValueError) as e:
        raise _bad(device, field, f"is not a {cls.__name__}: {e}") from e
    if used != len(data):
        raise _bad(device, field, f"has {len(data) - used} bytes after its {cls.__name__}")
    return obj


def _has(attrs: int, *names: str) -> bool:
    A = import_tpm2_pytss().TPMA_OBJECT  # noqa: N806 - the library's name
    return all(attrs & int(getattr(A, n)) for n in names)


def _key_of(pub: Any, field: str, device: str) -> Any:
    try:
        return serialization.load_pem_public_key(bytes(pub.to_pem()))
    except (ValueError, TypeError) as e:
        raise _bad(device, field, f"holds no usable public key: {e}") from e


def _same_key(a: Any, b: Any) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(a.public_bytes(*fmt) == b.public_bytes(*fmt))


def _check_ak(pub: Any, device: str) -> None:
    t = import_tpm2_pytss()
    area = pub.publicArea
    attrs = int(area.objectAttributes)
    need = ("RESTRICTED", "SIGN_ENCRYPT", "FIXEDTPM", "FIXEDPARENT", "SENSITIVEDATAORIGIN")
    if not _has(attrs, *need) or _has(attrs, "DECRYPT"):
        raise _bad(device, "ak_public", f"has attributes {attrs:#x}, not a TPM-made "
                   "restricted signing key (restricted, sign, fixedTPM, fixedParent, "
                   "sensitiveDataOrigin; no decrypt)")
    if (area.type != t.TPM2_ALG.ECC or area.nameAlg != t.TPM2_ALG.SHA256
            or area.parameters.eccDetail.curveID != t.TPM2_ECC.NIST_P256
            or area.parameters.eccDetail.scheme.scheme != t.TPM2_ALG.ECDSA
            or area.parameters.eccDetail.scheme.details.anySig.hashAlg != t.TPM2_ALG.SHA256):
        raise _bad(device, "ak_public", "is not an ECDSA-SHA256 P-256 key with a SHA-256 name")


def _check_ek(pub: Any, device: str) -> None:
    t = import_tpm2_pytss()
    area = pub.publicArea
    attrs = int(area.objectAttributes)
    if not _has(attrs, "RESTRICTED", "DECRYPT", "FIXEDTPM", "FIXEDPARENT") \
            or _has(attrs, "SIGN_ENCRYPT"):
        raise _bad(device, "ek_public", f"has attributes {attrs:#x}, not an endorsement key "
                   "(restricted, decrypt, fixedTPM, fixedParent; no sign)")
    ok_type = (area.type == t.TPM2_ALG.RSA and area.parameters.rsaDetail.keyBits == 2048) or (
        area.type == t.TPM2_ALG.ECC
        and area.parameters.eccDetail.curveID == t.TPM2_ECC.NIST_P256)
    if not ok_type or area.nameAlg != t.TPM2_ALG.SHA256:
        raise _bad(device, "ek_public", "is not an RSA 2048 or ECC P-256 EK with a SHA-256 name")


def load_ek_ca(pem: bytes, source: str) -> list[x509.Certificate]:
    """The CA certificates of ``--ek-ca`` (every one is trusted to issue EK certificates).

    Raises:
        OperatorInputError: no certificate in it, or one that is not a CA.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise OperatorInputError(f"{source}: not PEM certificates: {e}") from e
    for c in certs:
        try:
            bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise OperatorInputError(f"{source}: certificate {c.subject.rfc4514_string()!r} "
                                     "is not a CA certificate")
    return certs


def _check_ek_cert(der: bytes, ek_key: Any, ca: list[x509.Certificate] | None,
                   device: str, now: float) -> bool:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise _bad(device, "ek_certificate", f"is not a DER X.509 certificate: {e}") from e
    if not _same_key(cert.public_key(), ek_key):
        raise _bad(device, "ek_certificate", "certifies another key than ek_public")
    if ca is None:
        return False
    when = now
    if not cert.not_valid_before_utc.timestamp() <= when <= cert.not_valid_after_utc.timestamp():
        raise _bad(device, "ek_certificate", "is not valid now")
    for issuer in ca:
        if issuer.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    raise _bad(device, "ek_certificate", "is not issued by any certificate in --ek-ca")


def _check_certify(doc: dict[str, Any], ident: Any, ak_key: Any, device: str, *,
                   name: str = "identity", qualifier: bytes | None = None) -> None:
    t = import_tpm2_pytss()
    cert = doc.get(f"{name}_certify")
    if not isinstance(cert, dict):
        raise _bad(device, f"{name}_certify", "is missing or not an object")
    field = f"{name}_certify.attest"
    attest2b = _unmarshal(t.TPM2B_ATTEST, _b64(cert, field, device, key="attest"),
                          field, device)
    attest_bytes = bytes(attest2b)
    attest = _unmarshal(t.TPMS_ATTEST, attest_bytes, field, device)
    sfield = f"{name}_certify.signature"
    sig = _unmarshal(t.TPMT_SIGNATURE, _b64(cert, sfield, device, key="signature"),
                     sfield, device)
    if sig.sigAlg != t.TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != t.TPM2_ALG.SHA256:
        raise _bad(device, sfield, "is not an ECDSA-SHA256 signature")
    der = encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                               int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))
    try:
        ak_key.verify(der, attest_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise _bad(device, sfield, "does not verify with ak_public") from e
    if attest.magic != t.TPM2_GENERATED.VALUE or attest.type != t.TPM2_ST.ATTEST_CERTIFY:
        raise _bad(device, field, "is not a TPM-generated certification")
    want = certify_qualifier(device) if qualifier is None else qualifier
    if not hmac.compare_digest(bytes(attest.extraData), want):
        raise _bad(device, field, "was made for another device id or key")
    if bytes(attest.attested.certify.name) != bytes(ident.get_name()):
        raise _bad(device, field, f"certifies another key than {name}_public")


def parse_json(data: bytes, what: str, limit: int, device: str) -> dict[str, Any]:
    try:
        doc = loads_bounded(data, max_bytes=limit, what=what, max_depth=4)
    except UntrustedJsonError as e:
        raise EnrollmentError(str(e), device=device, field="(document)") from e
    if not isinstance(doc, dict):
        raise EnrollmentError(f"{what} is not a JSON object", device=device,
                              field="(document)")
    return doc


def verify_enrollment(data: bytes, device_id: str, ek_ca: list[x509.Certificate] | None,
                      now: float) -> VerifiedEnrollment:
    """Check an ``agent enroll --json`` document for ``device_id``.

    Structure (sizes, base64, TPM structures with nothing after them), the device id, the
    AK's attributes and name, the EK's type, the EK certificate (its key is the EK, and
    it chains to ``ek_ca`` when given), and the AK's TPM2_Certify of the identity key.

    Raises:
        EnrollmentError: naming the field at fault.
    """
    t = import_tpm2_pytss()
    check_id("device id", device_id)
    doc = parse_json(data, f"enrollment of {device_id}", MAX_ENROLLMENT_BYTES, device_id)
    if doc.get("format") != ENROLLMENT_FORMAT:
        raise _bad(device_id, "format", f"is not {ENROLLMENT_FORMAT!r}")
    if doc.get("device_id") != device_id:
        raise _bad(device_id, "device_id", f"is {str(doc.get('device_id'))[:64]!r}, not "
                   f"{device_id!r}")
    ak_raw = _b64(doc, "ak_public", device_id)
    ak = _unmarshal(t.TPM2B_PUBLIC, ak_raw, "ak_public", device_id)
    _check_ak(ak, device_id)
    name = bytes(ak.get_name())
    if doc.get("ak_name") != name.hex():
        raise _bad(device_id, "ak_name", "is not the name of ak_public")
    ek_raw = _b64(doc, "ek_public", device_id)
    ek = _unmarshal(t.TPM2B_PUBLIC, ek_raw, "ek_public", device_id)
    _check_ek(ek, device_id)
    certified = False
    if doc.get("ek_certificate") is not None:
        der = _b64(doc, "ek_certificate", device_id)
        certified = _check_ek_cert(der, _key_of(ek, "ek_public", device_id), ek_ca,
                                   device_id, now)
    elif ek_ca is not None:
        raise _bad(device_id, "ek_certificate", "is missing (the TPM has none), so the EK "
                   "cannot be checked against --ek-ca")
    ident = _unmarshal(t.TPM2B_PUBLIC, _b64(doc, "identity_public", device_id),
                       "identity_public", device_id)
    iattrs = int(ident.publicArea.objectAttributes)
    if not _has(iattrs, "SIGN_ENCRYPT", "FIXEDTPM", "FIXEDPARENT", "SENSITIVEDATAORIGIN") \
            or ident.publicArea.type != t.TPM2_ALG.ECC:
        raise _bad(device_id, "identity_public", f"has attributes {iattrs:#x}, not a "
                   "TPM-made ECC signing key (sign, fixedTPM, fixedParent, "
                   "sensitiveDataOrigin)")
    ident_key = _key_of(ident, "identity_public", device_id)
    pem = doc.get("public_key")
    if not isinstance(pem, str) or len(pem) > _MAX_PEM:
        raise _bad(device_id, "public_key", "is missing or too long")
    try:
        stated = serialization.load_pem_public_key(pem.encode())
    except ValueError as e:
        raise _bad(device_id, "public_key", "is not a PEM public key") from e
    if not _same_key(stated, ident_key):
        raise _bad(device_id, "public_key", "is not the key in identity_public")
    _check_certify(doc, ident, _key_of(ak, "ak_public", device_id), device_id)
    identity_pem = ident_key.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    decrypt_pem = _decrypt_key(doc, _key_of(ak, "ak_public", device_id), device_id)
    return VerifiedEnrollment(device_id, identity_pem, ak_raw, name, ek_raw, certified,
                              decrypt_pem)


def _decrypt_key(doc: dict[str, Any], ak_key: Any, device_id: str) -> bytes | None:
    """The PEM of the device's TPM decryption key (issue 19), certified by the AK: a
    P-256 decryption-only key made in and bound to that TPM. None for a device whose TPM
    has none (provisioned before; not a recipient of encrypted bundles)."""
    from modelward.trust._deckey import certify_qualifier as decrypt_qualifier

    if doc.get("decrypt_public") is None:
        return None
    t = import_tpm2_pytss()
    pub = _unmarshal(t.TPM2B_PUBLIC, _b64(doc, "decrypt_public", device_id),
                     "decrypt_public", device_id)
    attrs = int(pub.publicArea.objectAttributes)
    if not _has(attrs, "DECRYPT", "FIXEDTPM", "FIXEDPARENT", "SENSITIVEDATAORIGIN") \
            or _has(attrs, "SIGN_ENCRYPT") or _has(attrs, "RESTRICTED") \
            or pub.publicArea.type != t.TPM2_ALG.ECC \
            or pub.publicArea.parameters.eccDetail.curveID != t.TPM2_ECC.NIST_P256:
        raise _bad(device_id, "decrypt_public", f"has attributes {attrs:#x}, not a TPM-made "
                   "P-256 decryption key (decrypt, fixedTPM, fixedParent, "
                   "sensitiveDataOrigin; not sign, not restricted)")
    _check_certify(doc, pub, ak_key, device_id, name="decrypt",
                   qualifier=decrypt_qualifier(device_id))
    key = _key_of(pub, "decrypt_public", device_id)
    return bytes(key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def make_challenge(enr: VerifiedEnrollment, now: float,
                   rand: Callable[[int], bytes] = os.urandom) -> tuple[bytes, bytes]:
    """The challenge for the device and the pending record for the fleet dir.

    The secret is sealed by TPM2_MakeCredential to the EK, for the AK's name; the pending
    record keeps only its SHA-256.
    """
    t = import_tpm2_pytss()
    from tpm2_pytss.utils import make_credential

    secret = rand(32)
    ek, _ = t.TPM2B_PUBLIC.unmarshal(enr.ek_public)
    blob, enc = make_credential(ek, secret, t.TPM2B_NAME(enr.ak_name))
    expires = now + CHALLENGE_TTL
    challenge = {"format": CHALLENGE_FORMAT, "device_id": enr.device_id,
                 "ak_name": enr.ak_name.hex(), "expires": int(expires),
                 "credential_blob": base64.b64encode(blob.marshal()).decode(),
                 "encrypted_secret": base64.b64encode(enc.marshal()).decode()}
    pending = {"format": PENDING_FORMAT, "device_id": enr.device_id,
               "ak_name": enr.ak_name.hex(), "expires": expires,
               "secret_sha256": hashlib.sha256(secret).hexdigest(),
               "identity_pem": enr.identity_pem.decode(),
               "ak_public": base64.b64encode(enr.ak_public).decode(),
               "ek_public_sha256": hashlib.sha256(enr.ek_public).hexdigest(),
               "ek_certified": enr.ek_certified,
               "decrypt_pem": enr.decrypt_pem.decode() if enr.decrypt_pem else None}
    return (json.dumps(challenge, indent=1).encode() + b"\n",
            json.dumps(pending, indent=1).encode() + b"\n")


def _refuse(device: str, reason: str, what: str) -> ChallengeError:
    return ChallengeError(f"credential response for {device} refused: {what}",
                          device=device, reason=reason,
                          hint="run `fleet add-device --enrollment ... --challenge OUT` "
                          "again and answer the new challenge on the device")


def check_response(pending: dict[str, Any], response: bytes, device_id: str,
                   now: float) -> dict[str, Any]:
    """The pending record, if ``response`` answers it in time; else a refusal.

    Raises:
        ChallengeError: expired, for another device or AK, malformed, or a wrong secret.
    """
    try:
        doc = loads_bounded(response, max_bytes=MAX_RESPONSE_BYTES,
                            what=f"credential response for {device_id}", max_depth=2)
    except UntrustedJsonError as e:
        raise _refuse(device_id, "malformed", str(e)) from e
    if not isinstance(doc, dict) or doc.get("format") != RESPONSE_FORMAT:
        raise _refuse(device_id, "malformed", f"not a {RESPONSE_FORMAT!r} document")
    if doc.get("device_id") != device_id or pending.get("device_id") != device_id:
        raise _refuse(device_id, "other-device",
                      f"it answers the challenge of {str(doc.get('device_id'))[:64]!r}")
    if doc.get("ak_name") != pending.get("ak_name"):
        raise _refuse(device_id, "other-ak", "it names another attestation key than the "
                      "pending challenge")
    expires = pending.get("expires")
    if not isinstance(expires, int | float) or now > expires:
        raise _refuse(device_id, "expired", "the challenge has expired")
    try:
        secret = _b64(doc, "secret", device_id)
    except EnrollmentError as e:
        raise _refuse(device_id, "malformed", "secret is not base64 of at most 64 bytes") \
            from e
    want = pending.get("secret_sha256")
    if not isinstance(want, str) or not hmac.compare_digest(
            hashlib.sha256(secret).hexdigest(), want):
        raise _refuse(device_id, "wrong-secret", "the secret is not the one sealed to the "
                      "device's EK for its AK (another TPM answered, or the challenge was "
                      "replaced)")
    return pending


def _pending_path(fleet_dir: Path, device_id: str) -> Path:
    return fleet_dir / "pending" / f"{device_id}.json"


def begin_enrollment(fleet_dir: Path, device_id: str, enrollment: bytes,
                     ek_ca: list[x509.Certificate] | None, challenge_out: Path,
                     now: float | None = None) -> VerifiedEnrollment:
    """Check the enrollment, write the challenge to ``challenge_out`` and keep it pending.

    A new challenge for a device replaces its pending one.

    Raises:
        EnrollmentError: the enrollment does not verify (nothing is written).
        OSError: a file cannot be written.
    """
    now = time.time() if now is None else now
    enr = verify_enrollment(enrollment, device_id, ek_ca, now)
    challenge, pending = make_challenge(enr, now)
    write_atomic(_pending_path(fleet_dir, device_id), pending, mode=0o600)
    write_atomic(challenge_out, challenge)
    return enr


def finish_enrollment(fleet_dir: Path, device_id: str, response: bytes,
                      now: float | None = None) -> tuple[Path, Path]:
    """Record the device whose TPM answered its challenge; the challenge is then used up.

    Writes ``devices/<id>.pem`` (identity key) and ``devices/<id>.ak.json`` (AK public, EK
    public hash). On a refusal nothing in ``fleet_dir`` changes.

    Raises:
        ChallengeError: no pending challenge, or :func:`check_response` refuses.
    """
    check_id("device id", device_id)
    now = time.time() if now is None else now
    path = _pending_path(fleet_dir, device_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise _refuse(device_id, "no-challenge", "no challenge is pending for it (answered "
                      "already, or never made)") from e
    try:
        pending = loads_bounded(raw, max_bytes=MAX_PENDING_BYTES, what=str(path))
    except UntrustedJsonError as e:
        raise _refuse(device_id, "no-challenge", f"{path} is unreadable: {e}") from e
    if not isinstance(pending, dict) or pending.get("format") != PENDING_FORMAT:
        raise _refuse(device_id, "no-challenge", f"{path} is not a pending enrollment")
    check_response(pending, response, device_id, now)
    devices = fleet_dir / "devices"
    ak_doc = {"device_id": device_id, "ak_public": pending["ak_public"],
              "ak_name": pending["ak_name"], "ek_public_sha256": pending["ek_public_sha256"],
              "ek_certified": pending["ek_certified"], "enrolled": int(now)}
    ak_path = devices / f"{device_id}.ak.json"
    pem_path = devices / f"{device_id}.pem"
    write_atomic(ak_path, json.dumps(ak_doc, indent=1).encode() + b"\n")
    write_atomic(pem_path, str(pending["identity_pem"]).encode())
    decrypt_path = devices / f"{device_id}.decrypt.pub"
    if isinstance(pending.get("decrypt_pem"), str):  # (a recipient of encrypted bundles)
        write_atomic(decrypt_path, str(pending["decrypt_pem"]).encode())
    else:  # (re-enrolled without one: an old key is no recipient any more)
        decrypt_path.unlink(missing_ok=True)
    path.unlink()  # used up: a replayed response finds nothing pending
    fsync_dir(path.parent)
    return pem_path, ak_path
