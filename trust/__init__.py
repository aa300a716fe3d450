"""Device trust: TPM access, trust record, root anchor and the model fingerprint.

Exports load on first use (PEP 562), so a process imports only what it touches: the
idle agent daemon stays free of the TUF, TPM and HTTPS stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trust._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "FileEntry": "trust._fingerprint",
    "LEAF_SIZE": "trust._fingerprint",
    "MerkleHasher": "trust._fingerprint",
    "ModelRef": "trust._record",
    "ProvisionReport": "trust._tpm",
    "ReportSignatureError": "trust._report",
    "Tpm": "trust._tpm",
    "TpmInterface": "trust._tpm",
    "TrustRecord": "trust._record",
    "TrustStore": "trust._store",
    "choose_record": "trust._record",
    "decode_record": "trust._record",
    "directory_entries": "trust._fingerprint",
    "encode_record": "trust._record",
    "file_merkle_root": "trust._fingerprint",
    "fsync_dir": "trust._atomic",
    "rename_atomic": "trust._atomic",
    "sign_report": "trust._report",
    "slot_fingerprint": "trust._fingerprint",
    "symlink_atomic": "trust._atomic",
    "verify_report": "trust._report",
    "write_atomic": "trust._atomic",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:
    from trust._atomic import (
        fsync_dir as fsync_dir,
    )
    from trust._atomic import (
        rename_atomic as rename_atomic,
    )
    from trust._atomic import (
        symlink_atomic as symlink_atomic,
    )
    from trust._atomic import (
        write_atomic as write_atomic,
    )
    from trust._fingerprint import (
        LEAF_SIZE as LEAF_SIZE,
    )
    from trust._fingerprint import (
        FileEntry as FileEntry,
    )
    from trust._fingerprint import (
        MerkleHasher as MerkleHasher,
    )
    from trust._fingerprint import (
        directory_entries as directory_entries,
    )
    from trust._fingerprint import (
        file_merkle_root as file_merkle_root,
    )
    from trust._fingerprint import (
        slot_fingerprint as slot_fingerprint,
    )
    from trust._record import (
        ModelRef as ModelRef,
    )
    from trust._record import (
        TrustRecord as TrustRecord,
    )
    from trust._record import (
        choose_record as choose_record,
    )
    from trust._record import (
        decode_record as decode_record,
    )
    from trust._record import (
        encode_record as encode_record,
    )
    from trust._report import (
        ReportSignatureError as ReportSignatureError,
    )
    from trust._report import (
        sign_report as sign_report,
    )
    from trust._report import (
        verify_report as verify_report,
    )
    from trust._store import (
        TrustStore as TrustStore,
    )
    from trust._tpm import (
        ProvisionReport as ProvisionReport,
    )
    from trust._tpm import (
        Tpm as Tpm,
    )
    from trust._tpm import (
        TpmInterface as TpmInterface,
    )
