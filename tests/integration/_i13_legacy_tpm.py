"""Turn a provisioned test device into one provisioned the old way (before issue 13).

The old modelward defined the root anchor and the counter owner-writable with an empty
auth, persisted an identity key with an empty auth, and derived the record-MAC key from
a public label. This helper keeps those definitions so migration can be tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelward.trust._ak import AK_HANDLE
from modelward.trust._deckey import DECRYPT_HANDLE
from modelward.trust._measure import REGISTER_INDEX
from modelward.trust._record import encode_record
from modelward.trust._store import TrustStore
from modelward.trust._tpm import (
    ANCHOR_INDEX,
    COUNTER_INDEX,
    FLOOR_INDEX,
    IDENTITY_HANDLE,
    LEGACY_ANCHOR_INDEX,
    LEGACY_COUNTER_INDEX,
    LEGACY_IDENTITY_HANDLE,
    MAC_KEY_HANDLE,
    SRK_HANDLE,
    Tpm,
    legacy_mac_key_template,
)
from modelward.trust._tpmauth import AUTH_FILE, auth_dir_for


def _old_nv(e: Any, t: Any, index: int, size: int, *, counter: bool) -> Any:
    N = t.TPMA_NV
    attrs = N.OWNERWRITE | N.OWNERREAD | N.AUTHREAD | N.AUTHWRITE
    if counter:
        attrs |= t.TPM2_NT.COUNTER << N.TPM2_NT_SHIFT
    pub = t.TPM2B_NV_PUBLIC(nvPublic=t.TPMS_NV_PUBLIC(
        nvIndex=index, nameAlg=t.TPM2_ALG.SHA256, attributes=attrs, dataSize=size))
    return e.nv_define_space(None, pub, t.ESYS_TR.OWNER)


def old_mac(e: Any, t: Any, digest: bytes) -> bytes:
    h, *_ = e.create_primary(None, legacy_mac_key_template(), t.ESYS_TR.OWNER)
    try:
        return bytes(e.hmac(h, digest, t.TPM2_ALG.SHA256))
    finally:
        e.flush_context(h)


def make_legacy(tcti: str, state_dir: Path) -> int:
    """Re-provision the device at ``state_dir`` the old way, keeping its record's content.

    Returns:
        the old counter value the record is bound to.
    """
    import tpm2_pytss as t
    from tpm2_pytss import ESAPI

    store = TrustStore(state_dir, Tpm(tcti))
    record = store.load()
    anchor = store.tpm.read_anchor()
    store.tpm.close()
    e = ESAPI(tcti)
    try:
        for index in (ANCHOR_INDEX, COUNTER_INDEX):
            e.nv_undefine_space(e.tr_from_tpmpublic(index), t.ESYS_TR.OWNER)
        # (an old-style device never had the targets-floor index, nor the measurement
        # register of issue 18)
        for index in (FLOOR_INDEX, REGISTER_INDEX):
            e.nv_undefine_space(e.tr_from_tpmpublic(index), t.ESYS_TR.OWNER)
        # (no AK before issue 18, no decryption key before issue 19)
        for handle in (IDENTITY_HANDLE, MAC_KEY_HANDLE, AK_HANDLE, DECRYPT_HANDLE):
            e.evict_control(t.ESYS_TR.OWNER, e.tr_from_tpmpublic(handle), handle)
        nv = _old_nv(e, t, LEGACY_ANCHOR_INDEX, 32, counter=False)
        e.nv_write(nv, anchor, 0, t.ESYS_TR.OWNER)
        nv = _old_nv(e, t, LEGACY_COUNTER_INDEX, 8, counter=True)
        e.nv_increment(nv, t.ESYS_TR.OWNER)
        counter = int.from_bytes(bytes(e.nv_read(nv, 8, 0, t.ESYS_TR.OWNER)), "big")
        A = t.TPMA_OBJECT
        tmpl = t.TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256",
            objectAttributes=A.SIGN_ENCRYPT | A.FIXEDTPM | A.FIXEDPARENT
            | A.SENSITIVEDATAORIGIN | A.USERWITHAUTH)
        srk = e.tr_from_tpmpublic(SRK_HANDLE)
        priv, pub, *_ = e.create(srk, None, tmpl)
        h = e.load(srk, priv, pub)
        e.evict_control(t.ESYS_TR.OWNER, h, LEGACY_IDENTITY_HANDLE)
        e.flush_context(h)
        old = record.replace(counter=counter)
        (state_dir / "trust" / "record.json").write_bytes(
            encode_record(old, old_mac(e, t, old.digest())))
    finally:
        e.close()
    (auth_dir_for(state_dir) / AUTH_FILE).unlink()
    return counter
