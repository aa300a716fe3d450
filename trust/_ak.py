"""The attestation key (AK) and the device's half of enrollment (issue 18).

Layout and flow: docs/attestation.md. The AK is a restricted ECDSA P-256 signing key
under the SRK, persistent at :data:`AK_HANDLE`, with the device's auth value. Being
restricted, it signs only what the TPM itself generated (TPM2_Certify, TPM2_Quote,
TPM2_NV_Certify attestations, whose TPMS_ATTEST starts with TPM_GENERATED_VALUE), never an
outside digest that merely looks like one: so what it signs later (a quote or an NV
certification of the measurement register) is believable once the operator knows the AK
is in the same TPM as the EK.

:func:`enrollment` gathers what the operator needs; :func:`activate_credential` answers
the operator's MakeCredential challenge. Both run with a :class:`~modelward.trust._tpm.Tpm`
and use its plumbing (retries, error conversion, auth values).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelward.trust.errors import TpmError

if TYPE_CHECKING:
    from modelward.trust._tpm import Tpm

logger = logging.getLogger(__name__)

AK_HANDLE = 0x81000104
# TCG EK Credential Profile 2.0, section 2.2.1.4: the persistent EK (RSA 2048, low range)
# and the NV indexes of the EK certificates.
EK_RSA_HANDLE = 0x81010001
EK_RSA_CERT_INDEX = 0x01C00002
EK_ECC_CERT_INDEX = 0x01C0000A
# The endorsement hierarchy's password, when the TPM's owner set one (empty by default).
ENDORSEMENT_AUTH_ENV = "MODELWARD_TPM_ENDORSEMENT_AUTH"
ENROLLMENT_FORMAT = "modelward-enrollment/1"
CHALLENGE_FORMAT = "modelward-credential-challenge/1"
RESPONSE_FORMAT = "modelward-credential-response/1"
MAX_EK_CERT_BYTES = 4096  # bytes: a DER EK certificate (RSA ones are ~1.2 KiB)


def certify_qualifier(device_id: str) -> bytes:
    """The qualifying data of the identity key's TPM2_Certify: binds it to the device id.

    It is not fresh (enrollment has no nonce from the operator yet); the freshness of the
    enrollment comes from the credential challenge, which only this TPM can answer.
    """
    return hashlib.sha256(b"modelward enroll identity v1\0" + device_id.encode()).digest()


def ak_attributes() -> int:
    """The AK's object attributes: what docs/attestation.md lists, plus noDA.

    noDA for the same reason as the other keys (trust/_tpm.py ``_key_attrs``): the auth
    value is 256 random bits, so dictionary-attack counting would only let a local
    process lock the agent out.
    """
    from modelward.trust._tpmimport import import_tpm2_pytss

    A = import_tpm2_pytss().TPMA_OBJECT  # noqa: N806 - the library's name
    return int(A.FIXEDTPM | A.FIXEDPARENT | A.SENSITIVEDATAORIGIN | A.USERWITHAUTH
               | A.RESTRICTED | A.SIGN_ENCRYPT | A.NODA)


def provision_ak(tpm: Tpm, srk: Any) -> bool:
    """Create the AK under ``srk`` and persist it, unless it is there; True if created.

    Raises:
        TpmError: the handle holds another kind of object, or the TPM failed.
        TpmAuthError: the key at the handle does not take this device's auth value.
    """
    t = tpm._types()
    e = tpm._esys
    if tpm._exists(AK_HANDLE):
        check_ak(tpm)
        return False
    tmpl = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=ak_attributes())
    # A signing key has no symmetric algorithm (the parser gives restricted keys one).
    tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = t.TPM2_ALG.NULL
    priv, pub, *_ = tpm._call("create attestation key",
                              lambda: e.create(srk, tpm._sensitive(), tmpl))
    tpm._persist(srk, priv, pub, AK_HANDLE, "attestation key")
    tpm._handles.pop(AK_HANDLE, None)
    check_ak(tpm)
    return True


def check_ak(tpm: Tpm) -> Any:
    """The AK's TPM2B_PUBLIC, after checking it is modelward's AK and takes our auth value.

    Raises:
        TpmError: the object at :data:`AK_HANDLE` is not a restricted ECDSA P-256 signing
            key with modelward's attributes (never used then).
        TpmAuthError: it does not take this device's auth value.
    """
    t = tpm._types()
    e = tpm._esys
    pub, _, _ = tpm._call("read attestation key",
                          lambda: e.read_public(tpm._obj(AK_HANDLE)))
    area = pub.publicArea
    attrs = int(area.objectAttributes)
    if (area.type != t.TPM2_ALG.ECC or attrs != ak_attributes()
            or area.parameters.eccDetail.curveID != t.TPM2_ECC.NIST_P256
            or area.parameters.eccDetail.scheme.scheme != t.TPM2_ALG.ECDSA
            or area.nameAlg != t.TPM2_ALG.SHA256):
        raise TpmError(
            f"persistent handle {AK_HANDLE:#x} holds a key that is not modelward's "
            f"attestation key (type {int(area.type):#x}, attributes {attrs:#x})",
            tcti=tpm.tcti,
            hint=f"free the handle (tpm2_evictcontrol -C o -c {AK_HANDLE:#x}) and run "
            "`agent provision` again",
        )
    # Proves our auth value without signing anything outside: certify the AK by itself.
    _certify(tpm, AK_HANDLE, b"modelward AK check")
    return pub


def _certify(tpm: Tpm, handle: int, qualifier: bytes) -> tuple[Any, Any]:
    t = tpm._types()
    scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL)  # the AK's own (ECDSA-SHA256)
    attest, sig = tpm._call(
        f"certify {handle:#x} with the attestation key",
        lambda: tpm._esys.certify(tpm._obj(handle), tpm._obj(AK_HANDLE), qualifier, scheme),
    )
    return attest, sig


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class EkInfo:
    """The endorsement key a device enrolls with."""

    public: Any  # TPM2B_PUBLIC
    certificate: bytes | None  # DER, as read from its NV index


def _nv_read_public_size(tpm: Tpm, index: int) -> tuple[Any, int] | None:
    if not tpm._exists(index):
        return None
    e = tpm._esys
    nv = tpm._call(f"open NV index {index:#x}", lambda: e.tr_from_tpmpublic(index))
    pub, _ = tpm._call(f"read NV index {index:#x} public", lambda: e.nv_read_public(nv))
    return nv, int(pub.nvPublic.dataSize)


def _read_cert(tpm: Tpm, index: int) -> bytes | None:
    """The DER certificate in NV ``index`` (cut to its DER length), or None."""
    found = _nv_read_public_size(tpm, index)
    if found is None:
        return None
    nv, size = found
    if size > MAX_EK_CERT_BYTES:
        raise TpmError(f"EK certificate NV index {index:#x} holds {size} bytes, over "
                       f"{MAX_EK_CERT_BYTES}", tcti=tpm.tcti)
    e = tpm._esys
    # Reads of at most TPM2_PT_NV_BUFFER_MAX (1024 on most TPMs) at a time.
    out = b""
    for off in range(0, size, 512):
        n = min(512, size - off)
        chunk = tpm._call(f"read EK certificate {index:#x}",
                          lambda n=n, off=off: e.nv_read(nv, n, off, nv))  # type: ignore[misc]
        out += bytes(chunk)
    return _der_prefix(out)


def _der_prefix(data: bytes) -> bytes:
    """The first DER element of ``data`` (NV indexes may be padded after it)."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    n = first & 0x7F
    if n == 0 or n > 3 or len(data) < 2 + n:
        return data
    length = int.from_bytes(data[2 : 2 + n], "big")
    return data[: 2 + n + length]


def endorsement_key(tpm: Tpm) -> tuple[EkInfo, Any, bool]:
    """The EK (info, ESYS handle, whether the handle is transient and must be flushed).

    The persistent RSA EK at :data:`EK_RSA_HANDLE` when there is one (swtpm_setup and
    most firmware TPMs put it there); else the EK is made from the TCG default template
    (RSA 2048 low range if its certificate is in NV, else ECC P-256 if that certificate
    is, else RSA 2048), which yields the key the certificate certifies.
    """
    t = tpm._types()
    e = tpm._esys
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    if tpm._exists(EK_RSA_HANDLE):
        h = tpm._call("open EK", lambda: e.tr_from_tpmpublic(EK_RSA_HANDLE))
        pub, _, _ = tpm._call("read EK", lambda: e.read_public(h))
        return EkInfo(pub, _read_cert(tpm, EK_RSA_CERT_INDEX)), h, False
    kind = "EK-RSA2048"
    if not tpm._exists(EK_RSA_CERT_INDEX) and tpm._exists(EK_ECC_CERT_INDEX):
        kind = "EK-ECC256"
    _, template = create_ek_template(kind, NVReadEK(e, t.ESYS_TR.OWNER))
    _use_endorsement_auth(tpm)
    h, pub, *_ = tpm._call("create EK", lambda: e.create_primary(
        None, template, t.ESYS_TR.ENDORSEMENT))
    index = EK_RSA_CERT_INDEX if kind == "EK-RSA2048" else EK_ECC_CERT_INDEX
    try:
        cert = _read_cert(tpm, index)
    except TpmError:
        e.flush_context(h)
        raise
    return EkInfo(pub, cert), h, True


def _use_endorsement_auth(tpm: Tpm) -> None:
    auth = os.environ.get(ENDORSEMENT_AUTH_ENV)
    if auth:
        tpm._esys.tr_set_auth(tpm._types().ESYS_TR.ENDORSEMENT, auth.encode())


def enrollment(tpm: Tpm, device_id: str) -> dict[str, Any]:
    """What ``agent enroll --json`` prints: identity key, AK, EK (and its certificate),
    and a TPM2_Certify of the identity key by the AK (format in docs/attestation.md).

    Raises:
        TpmNotProvisionedError: no AK (run `agent provision`).
        TpmError: the AK is not modelward's, or the TPM failed.
    """
    from modelward.trust._tpm import IDENTITY_HANDLE

    ak_pub = check_ak(tpm)
    e = tpm._esys
    ident_pub, _, _ = tpm._call("read identity key",
                                lambda: e.read_public(tpm._obj(IDENTITY_HANDLE)))
    attest, sig = _certify(tpm, IDENTITY_HANDLE, certify_qualifier(device_id))
    ek, h, transient = endorsement_key(tpm)
    if transient:
        e.flush_context(h)
    from modelward.trust._deckey import DECRYPT_HANDLE, check_decrypt_key
    from modelward.trust._deckey import certify_qualifier as decrypt_qualifier

    decrypt: dict[str, Any] = {}
    if tpm._exists(DECRYPT_HANDLE):  # (a TPM provisioned before issue 19 has none)
        dpub = check_decrypt_key(tpm)
        dattest, dsig = _certify(tpm, DECRYPT_HANDLE, decrypt_qualifier(device_id))
        decrypt = {"decrypt_public": _b64(dpub.marshal()),
                   "decrypt_certify": {"attest": _b64(dattest.marshal()),
                                       "signature": _b64(dsig.marshal())}}
    return decrypt | {
        "format": ENROLLMENT_FORMAT,
        "device_id": device_id,
        "public_key": bytes(ident_pub.to_pem()).decode(),
        "identity_public": _b64(ident_pub.marshal()),
        "identity_certify": {"attest": _b64(attest.marshal()), "signature": _b64(sig.marshal())},
        "ak_public": _b64(ak_pub.marshal()),
        "ak_name": bytes(ak_pub.get_name().marshal())[2:].hex(),
        "ek_public": _b64(ek.public.marshal()),
        "ek_certificate": _b64(ek.certificate) if ek.certificate is not None else None,
    }


def activate_credential(tpm: Tpm, credential_blob: bytes, encrypted_secret: bytes,
                        ak_name: bytes) -> bytes:
    """TPM2_ActivateCredential with the AK and the EK: the secret the operator sealed.

    The TPM releases it only if the challenge was made for this TPM's EK *and* names a
    key loaded in it (the AK): the name enters the KDF of the credential's integrity key.

    Raises:
        TpmError: the challenge names another AK (``ak_name``), or the TPM refused it
            (made for another EK or AK, or altered).
    """
    t = tpm._types()
    e = tpm._esys
    ak_pub = check_ak(tpm)
    own = bytes(ak_pub.get_name().marshal())[2:]
    if own != ak_name:
        raise TpmError(
            f"the challenge is for attestation key {ak_name.hex()[:16]}..., not this TPM's "
            f"({own.hex()[:16]}...)",
            tcti=tpm.tcti,
            hint="the enrollment it answers came from another device or an older AK",
        )
    blob, _ = t.TPM2B_ID_OBJECT.unmarshal(credential_blob)
    secret, _ = t.TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
    _, ek_handle, transient = endorsement_key(tpm)
    try:
        _use_endorsement_auth(tpm)
        # The EK's authPolicy (TCG default, policy A) is PolicySecret(TPM_RH_ENDORSEMENT).
        session = tpm._call("start EK policy session", lambda: e.start_auth_session(
            t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.POLICY, None, t.TPM2_ALG.SHA256))
        try:
            tpm._call("EK policy (PolicySecret endorsement)",
                      lambda: e.policy_secret(t.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0))
            cert_info = tpm._call("activate credential", lambda: e.activate_credential(
                tpm._obj(AK_HANDLE), ek_handle, blob, secret,
                session1=t.ESYS_TR.PASSWORD, session2=session))
        finally:
            _flush_quietly(tpm, session)
    finally:
        if transient:
            e.flush_context(ek_handle)
    return bytes(cert_info)


def _flush_quietly(tpm: Tpm, handle: Any) -> None:
    """Flush a session the TPM may already have closed (a failed command ends it)."""
    try:
        tpm._esys.flush_context(handle)
    except tpm._exc as e:
        logger.debug("policy session already closed: %s", e)
