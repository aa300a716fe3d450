"""The device trust store: trust record, root anchor and their files (the I/O side).

Files under ``<state_dir>/trust/``:

* ``record.json`` - the MACed trust record; ``record.json.next`` during a commit;
* ``root.json`` - the root metadata whose sha256 is anchored in the TPM;
  ``root.json.next`` during a root rotation;

The auth value of the TPM objects lives outside the state directory, in
``<state_dir>-tpm/tpm.auth`` (mode 0600, trust/_tpmauth.py): a state directory deleted or
put back from a copy must not take the TPM objects' authorization with it, or the device
could not heal (it would need a field visit).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from trust._atomic import rename_atomic, write_atomic
from trust._record import Resolution, TrustRecord, choose_record, encode_record
from trust._tpm import LegacyObjects, ProvisionReport, TpmInterface
from trust._tpmauth import auth_dir_for, ensure_auth
from trust.errors import (
    OperatorInputError,
    RootAnchorError,
    TpmError,
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
        auth_dir: where the TPM objects' auth value is kept; default
            :func:`~trust._tpmauth.auth_dir_for` ``(state_dir)``.
    """

    def __init__(self, state_dir: Path, tpm: TpmInterface, auth_dir: Path | None = None) -> None:
        self.dir = state_dir / "trust"
        self.auth_dir = auth_dir if auth_dir is not None else auth_dir_for(state_dir)
        self.tpm = tpm
        self.record_path = self.dir / "record.json"
        self.pending_path = self.dir / "record.json.next"
        self.root_path = self.dir / "root.json"
        self.root_pending_path = self.dir / "root.json.next"
        tpm.use_auth_dir(self.auth_dir)

    # -- provisioning -------------------------------------------------------

    def provision(self, root_bytes: bytes, root_source: str, *,
                  keep_identity: bool = False) -> ProvisionReport:
        """Provision the TPM and anchor ``root_bytes``; idempotent.

        On a device provisioned before the TPM objects had an auth value, this migrates
        it (docs/notes.md "TPM authorization"): the record is verified under the old
        MAC key and counter, the new objects are created beside the old ones, the old
        anchor value is carried over, the record is re-MACed under the new key with the
        new counter, and only then are the old objects removed. Each step can be re-run
        after a crash. The old identity key is replaced by a new one (re-enrol the device)
        unless ``keep_identity``.

        Raises:
            OperatorInputError: the device is already anchored to a different root.
            TpmAuthFileError: the auth file is unsafe (a link, not 0600, not ours).
            TrustRecordError: the old record does not verify, so it cannot be migrated.
            TpmError: the TPM failed.
        """
        version = _root_version(root_bytes, root_source)
        secret, _ = ensure_auth(self.auth_dir)
        self.tpm.set_auth(secret)
        legacy = self.tpm.legacy()
        old_record = self._legacy_record(legacy) if legacy is not None else None
        report = self.tpm.provision(keep_identity=keep_identity)
        digest = hashlib.sha256(root_bytes).digest()
        try:
            anchor: bytes | None = self.tpm.read_anchor()
        except TpmNotProvisionedError:
            anchor = None  # defined but never written
        if anchor is None and legacy is not None:
            anchor = legacy.read_anchor()
            if anchor is not None:
                self.tpm.write_anchor(anchor)  # the old anchor, perhaps of a rotated root
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
        if old_record is not None:
            self._remac(old_record)
        elif not self.record_path.exists() and not self.pending_path.exists():
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
        if legacy is not None:
            self.tpm.retire_legacy()
        return report

    def _legacy_record(self, legacy: LegacyObjects) -> TrustRecord | None:
        """The record as the old objects vouch for it; None if already re-MACed."""
        current = _read_or_none(self.record_path)
        pending = _read_or_none(self.pending_path)
        if current is None and pending is None:
            return None
        try:
            record, _ = choose_record(
                current, pending, legacy.read_counter(), legacy.mac_ok,
                current_path=str(self.record_path), pending_path=str(self.pending_path),
            )
        except TrustRecordError as e:
            try:
                self.tpm.read_counter()
            except TpmError:
                # No new objects yet: the old record is the only one, and it is bad.
                raise TrustRecordError(
                    f"cannot migrate: {e}", path=e.path,
                    hint="the record was altered or rolled back; re-provision the device "
                    "from a clean state",
                ) from e
            return None  # an earlier run re-MACed it already; load() checks it
        return record

    def _remac(self, old: TrustRecord) -> None:
        """Bind the migrated record to the new counter and MAC key."""
        counter = self.tpm.read_counter()
        record = replace(old, counter=counter)
        write_atomic(self.record_path, encode_record(record, self.tpm.mac(record.digest())))
        self.pending_path.unlink(missing_ok=True)
        logger.warning("trust record migrated to the authorized TPM objects (counter %d -> %d)",
                       old.counter, counter)

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
