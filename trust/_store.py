"""The device trust store: trust record, root anchor and their files (the I/O side).

Files under ``<state_dir>/trust/``:

* ``record.json`` - the MACed trust record; ``record.json.next`` during a commit;
* ``root.json`` - the root metadata whose sha256 is anchored in the TPM;
  ``root.json.next`` during a root rotation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from trust._atomic import rename_atomic, write_atomic
from trust._record import Resolution, TrustRecord, choose_record, encode_record
from trust._tpm import ProvisionReport, TpmInterface
from trust.errors import (
    OperatorInputError,
    RootAnchorError,
    TpmNotProvisionedError,
    TrustRecordError,
)

logger = logging.getLogger(__name__)


def _root_version(root_bytes: bytes, path: str) -> int:
    try:
        return int(json.loads(root_bytes)["signed"]["version"])
    except (ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(f"{path} is not TUF root metadata: {e}") from e


class TrustStore:
    """Trust record and root anchor of one device.

    Args:
        state_dir: the agent's state directory.
        tpm: the device TPM.
    """

    def __init__(self, state_dir: Path, tpm: TpmInterface) -> None:
        self.dir = state_dir / "trust"
        self.tpm = tpm
        self.record_path = self.dir / "record.json"
        self.pending_path = self.dir / "record.json.next"
        self.root_path = self.dir / "root.json"
        self.root_pending_path = self.dir / "root.json.next"

    # -- provisioning -------------------------------------------------------

    def provision(self, root_bytes: bytes, root_source: str) -> ProvisionReport:
        """Provision the TPM and anchor ``root_bytes``; idempotent.

        Raises:
            OperatorInputError: the device is already anchored to a different root.
            TpmError: the TPM failed.
        """
        version = _root_version(root_bytes, root_source)
        report = self.tpm.provision()
        digest = hashlib.sha256(root_bytes).digest()
        try:
            anchor: bytes | None = self.tpm.read_anchor()
        except TpmNotProvisionedError:
            anchor = None  # defined but never written
        if anchor is None:
            write_atomic(self.root_path, root_bytes)
            self.tpm.write_anchor(digest)
        elif anchor != digest:
            try:
                current = self.anchored_root()
            except RootAnchorError:
                current = b""
            if current != root_bytes:
                raise OperatorInputError(
                    f"this TPM is already anchored to another root than {root_source}",
                    hint="a provisioned device follows root rotations by itself; "
                    "to re-provision, clear the TPM owner hierarchy first",
                )
        elif not self.root_path.exists():
            write_atomic(self.root_path, root_bytes)
        if not self.record_path.exists() and not self.pending_path.exists():
            genesis = TrustRecord(
                counter=self.tpm.read_counter(),
                root_version=version,
                targets_version=0,
                active=None,
                previous=None,
            )
            write_atomic(self.record_path, encode_record(genesis, self.tpm.mac(genesis.digest())))
        else:
            self.load()  # provisioning again must not hide a broken record
        return report

    # -- trust record ---------------------------------------------------------

    def load(self) -> TrustRecord:
        """The authentic, current trust record (repairing a crash window).

        Raises:
            TrustRecordError: missing or altered record.
            TrustRecordRollbackError: an older record was put back.
            TpmError: the TPM failed.
        """
        current = _read_or_none(self.record_path)
        pending = _read_or_none(self.pending_path)
        record, action = choose_record(
            current,
            pending,
            self.tpm.read_counter(),
            self.tpm.mac_ok,
            current_path=str(self.record_path),
            pending_path=str(self.pending_path),
        )
        if action is Resolution.PROMOTE_PENDING:
            logger.warning("completing an interrupted commit of the trust record")
            rename_atomic(self.pending_path, self.record_path)
        elif pending is not None:
            self.pending_path.unlink()
        return record

    def commit(self, record: TrustRecord) -> None:
        """Make ``record`` the trusted one, bound to the next TPM counter value.

        Order (design.md): pending file with counter+1, NV increment, rename.

        Raises:
            TrustRecordError: ``record`` does not follow the counter.
            TpmError: the TPM failed; the old record stays in force.
        """
        nv = self.tpm.read_counter()
        if record.counter != nv + 1:
            raise TrustRecordError(
                f"record counter {record.counter} does not follow TPM counter {nv}",
                path=str(self.record_path),
            )
        write_atomic(self.pending_path, encode_record(record, self.tpm.mac(record.digest())))
        self.tpm.increment_counter()
        rename_atomic(self.pending_path, self.record_path)

    # -- root anchor ----------------------------------------------------------

    def anchored_root(self) -> bytes:
        """The root.json whose hash the TPM holds.

        Raises:
            RootAnchorError: neither root file matches the anchor.
            TpmError: the TPM failed.
        """
        anchor = self.tpm.read_anchor()
        data = _read_or_none(self.root_path)
        if data is not None and hashlib.sha256(data).digest() == anchor:
            return data
        pending = _read_or_none(self.root_pending_path)
        if pending is not None and hashlib.sha256(pending).digest() == anchor:
            logger.warning("completing an interrupted root rotation")
            rename_atomic(self.root_pending_path, self.root_path)
            return pending
        raise RootAnchorError(
            f"trusted root {self.root_path} does not match the root anchor in the TPM",
            path=str(self.root_path),
            hint="the device must be re-provisioned by its operator",
        )

    def rotate_root(self, new_root: bytes) -> None:
        """Anchor a newer root that TUF has already verified to chain from the anchored one.

        A crash between the steps leaves either the old anchor with the old file or
        the new anchor with ``root.json.next``; :meth:`anchored_root` resolves both.
        """
        if _read_or_none(self.root_path) == new_root:
            return
        write_atomic(self.root_pending_path, new_root)
        self.tpm.write_anchor(hashlib.sha256(new_root).digest())
        rename_atomic(self.root_pending_path, self.root_path)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TrustRecordError(f"cannot read {path}: {e}", path=str(path)) from e
