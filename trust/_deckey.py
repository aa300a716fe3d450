"""The device's decryption key (issue 19, encrypted bundles).

An ECC P-256 key-agreement key under the SRK, persistent at :data:`DECRYPT_HANDLE`, with
the device's auth value: ``decrypt`` set, ``sign`` and ``restricted`` clear, fixedTPM and
fixedParent, made in the TPM (sensitiveDataOrigin). Its private part never leaves the
TPM. The operator wraps a bundle's content key for its public key (an ephemeral ECDH,
``updater.bundle._encryption``); the device asks the TPM for the shared point
(TPM2_ECDH_ZGen on the operator's ephemeral public key) and derives the key-encryption key
from it in memory. Nothing of it is written to disk.

It is enrolled with the other keys (``agent enroll``): the AK certifies it (TPM2_Certify),
so the operator knows it is this TPM's, not a key a compromised device made in software.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from modelward.trust.errors import TpmError

if TYPE_CHECKING:
    from modelward.trust._tpm import Tpm

DECRYPT_HANDLE = 0x81000105
#: P-256's base point (uncompressed): a TPM2_ECDH_ZGen with it proves the key takes the
#: auth value, and reveals only the key's public point.
_GENERATOR = bytes.fromhex(
    "04"
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")


def certify_qualifier(device_id: str) -> bytes:
    """The qualifying data of the AK's TPM2_Certify of the decryption key."""
    return hashlib.sha256(b"modelward enroll decrypt v1\0" + device_id.encode()).digest()


def decrypt_attributes() -> int:
    """The decryption key's object attributes (noDA: as the other keys, its auth value is
    256 random bits)."""
    from modelward.trust._tpmimport import import_tpm2_pytss

    A = import_tpm2_pytss().TPMA_OBJECT  # noqa: N806 - the library's name
    return int(A.FIXEDTPM | A.FIXEDPARENT | A.SENSITIVEDATAORIGIN | A.USERWITHAUTH
               | A.DECRYPT | A.NODA)


def provision_decrypt_key(tpm: Tpm, srk: Any) -> bool:
    """Create the decryption key under ``srk`` and persist it, unless it is there; True
    if created.

    Raises:
        TpmError: the handle holds another kind of object, or the TPM failed.
        TpmAuthError: the key at the handle does not take this device's auth value.
    """
    t = tpm._types()
    e = tpm._esys
    if tpm._exists(DECRYPT_HANDLE):
        check_decrypt_key(tpm)
        # (a key planted there by another TPM client has modelward's attributes but not
        # its auth value: the agent could never use it, its planter could)
        shared_x(tpm, _GENERATOR)
        return False
    tmpl = t.TPM2B_PUBLIC.parse("ecc256:ecdh", objectAttributes=decrypt_attributes())
    tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = t.TPM2_ALG.NULL
    tmpl.publicArea.parameters.eccDetail.scheme.scheme = t.TPM2_ALG.NULL
    priv, pub, *_ = tpm._call("create decryption key",
                              lambda: e.create(srk, tpm._sensitive(), tmpl))
    tpm._persist(srk, priv, pub, DECRYPT_HANDLE, "decryption key")
    tpm._handles.pop(DECRYPT_HANDLE, None)
    check_decrypt_key(tpm)
    return True


def check_decrypt_key(tpm: Tpm) -> Any:
    """The decryption key's TPM2B_PUBLIC, after checking it is modelward's.

    Raises:
        TpmError: the object at :data:`DECRYPT_HANDLE` is not an ECC P-256 decryption key
            with modelward's attributes.
    """
    t = tpm._types()
    pub, _, _ = tpm._call("read decryption key",
                          lambda: tpm._esys.read_public(tpm._obj(DECRYPT_HANDLE)))
    area = pub.publicArea
    attrs = int(area.objectAttributes)
    if (area.type != t.TPM2_ALG.ECC or attrs != decrypt_attributes()
            or area.parameters.eccDetail.curveID != t.TPM2_ECC.NIST_P256
            or area.nameAlg != t.TPM2_ALG.SHA256):
        raise TpmError(
            f"persistent handle {DECRYPT_HANDLE:#x} holds a key that is not modelward's "
            f"decryption key (type {int(area.type):#x}, attributes {attrs:#x})",
            tcti=tpm.tcti,
            hint=f"free the handle (tpm2_evictcontrol -C o -c {DECRYPT_HANDLE:#x}) and run "
            "`agent provision` again",
        )
    return pub


def shared_x(tpm: Tpm, point: bytes) -> bytes:
    """The x coordinate (32 bytes) of the decryption key's ECDH with ``point`` (an
    uncompressed P-256 point, 65 bytes), computed in the TPM (TPM2_ECDH_ZGen).

    Raises:
        TpmNotProvisionedError: no decryption key (run `agent provision`).
        TpmError: the point is not on the curve, or the TPM failed.
    """
    t = tpm._types()
    if len(point) != 65 or point[0] != 4:
        raise TpmError("the ephemeral key is not an uncompressed P-256 point", tcti=tpm.tcti)
    check_decrypt_key(tpm)
    inp = t.TPM2B_ECC_POINT(t.TPMS_ECC_POINT(x=point[1:33], y=point[33:]))
    out = tpm._call("ECDH with the decryption key",
                    lambda: tpm._esys.ecdh_zgen(tpm._obj(DECRYPT_HANDLE), inp))
    x = bytes(out.point.x)
    return x.rjust(32, b"\0")


def public_der(pub: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a TPM2B_PUBLIC (the decryption key's)."""
    return bytes(pub.to_der())
