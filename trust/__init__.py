"""Device trust: TPM access, trust record, root anchor and the model fingerprint."""

from trust._atomic import fsync_dir, rename_atomic, symlink_atomic, write_atomic
from trust._fingerprint import (
    LEAF_SIZE,
    FileEntry,
    MerkleHasher,
    directory_entries,
    file_merkle_root,
    slot_fingerprint,
)
from trust._record import ModelRef, TrustRecord, choose_record, decode_record, encode_record
from trust._report import ReportSignatureError, sign_report, verify_report
from trust._store import TrustStore
from trust._tpm import ProvisionReport, Tpm, TpmInterface

__all__ = [
    "ReportSignatureError",
    "sign_report",
    "verify_report",
    "LEAF_SIZE",
    "FileEntry",
    "MerkleHasher",
    "ModelRef",
    "ProvisionReport",
    "Tpm",
    "TpmInterface",
    "TrustRecord",
    "TrustStore",
    "choose_record",
    "decode_record",
    "directory_entries",
    "encode_record",
    "file_merkle_root",
    "fsync_dir",
    "rename_atomic",
    "slot_fingerprint",
    "symlink_atomic",
    "write_atomic",
]
