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
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from modelward.trust._atomic import rename_atomic, write_atomic
from modelward.trust._bounded import UnsafeFileError, loads_bounded, read_bounded
from modelward.trust._record import (
    HEAL_HINT,
    RECORD_MAX_BYTES,
    Heal,
    Resolution,
    RootResolution,
    TrustRecord,
    UseRecord,
    choose_record,
    choose_root,
    encode_record,
    genesis,
    plan_record,
)
from modelward.trust._tpm import LegacyObjects, TpmInterface
from modelward.trust._tpmauth import auth_dir_for, ensure_auth
from modelward.trust.errors import (
    OperatorInputError,
    RootAnchorError,
    TpmNotProvisionedError,
    TrustFileUnreadableError,
    TrustRecordError,
)

if TYPE_CHECKING:
    from modelward.trust._provision import ProvisionReport

logger = logging.getLogger(__name__)


def _root_version(root_bytes: bytes, path: str) -> int:
    try:
        return int(loads_bounded(root_bytes, max_bytes=_ROOT_MAX, what=path)
                   ["signed"]["version"])
    except (ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(f"{path} is not TUF root metadata: {e}") from e


class TrustStore:
    """Trust record and root anchor of one device.

    Args:
        state_dir: the agent's state directory.
        tpm: the device TPM.
        auth_dir: where the TPM objects' auth value is kept; default
            :func:`~modelward.trust._tpmauth.auth_dir_for` ``(state_dir)``.
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
            TrustRecordError: the record (of a device not being migrated) is broken.
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
            anchor = self._legacy_anchor(legacy, digest)
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
        elif legacy is not None and (self.record_path.exists() or self.pending_path.exists()):
            try:
                self.load()  # re-MACed by an earlier, interrupted run
            except TrustRecordError as e:
                # Altered or rolled back before migration: not carried over. The device
                # heals on its next update, from the anchored root (finding 7).
                logger.warning("migration: the trust record is not believable (%s); the "
                               "next update heals it", e)
                from dataclasses import replace  # (provisioning's report; not at boot)

                report = replace(report, record_heals=True)
        elif not self.record_path.exists() and not self.pending_path.exists():
            first = TrustRecord(
                counter=self.tpm.read_counter(),
                root_version=version,
                targets_version=0,
                active=None,
                previous=None,
            )
            write_atomic(self.record_path, encode_record(first, self.tpm.mac(first.digest())))
        else:
            self.load()  # provisioning again must not hide a broken record
        if legacy is not None:
            self.tpm.retire_legacy()
        if not report.record_heals:  # (an existing device: its floor starts at its record)
            try:
                self.raise_targets_floor(self.load().targets_version)
            except TrustRecordError as e:
                logger.warning("targets floor not seeded, the record is not believable: %s", e)
        return report

    def _legacy_record(self, legacy: LegacyObjects) -> TrustRecord | None:
        """The record as the old objects vouch for it, or None (none, or not believable:
        altered, rolled back, or re-MACed by an earlier run)."""
        current, _ = _read_file(self.dir, self.record_path.name, _RECORD_MAX)
        pending, _ = _read_file(self.dir, self.pending_path.name, _RECORD_MAX)
        if current is None and pending is None:
            return None
        try:
            record, _ = choose_record(
                current, pending, legacy.read_counter(), legacy.mac_ok,
                current_path=str(self.record_path), pending_path=str(self.pending_path),
            )
        except TrustRecordError as e:
            logger.warning("migration: the record does not verify under the old objects: %s",
                           e)
            return None
        return record

    def _legacy_anchor(self, legacy: LegacyObjects, root_digest: bytes) -> bytes | None:
        """The old anchor, if it agrees with the device's root or the operator's.

        Any TPM client could write the old anchor, so it is carried over only when it is
        the hash of the operator's root or of the root.json the device holds; otherwise
        the operator's root is anchored.
        """
        old = legacy.read_anchor()
        if old is None or old == root_digest:
            return old
        on_disk, _ = _read_file(self.dir, self.root_path.name, _ROOT_MAX)
        if on_disk is not None and hashlib.sha256(on_disk).digest() == old:
            return old
        logger.warning("migration: the old root anchor matches no root on the device; "
                       "anchoring the root given to provisioning")
        return None

    def _remac(self, old: TrustRecord) -> None:
        """Bind the migrated record to the new counter and MAC key."""
        counter = self.tpm.read_counter()
        record = old.replace(counter=counter)
        write_atomic(self.record_path, encode_record(record, self.tpm.mac(record.digest())))
        self.pending_path.unlink(missing_ok=True)
        logger.warning("trust record migrated to the authorized TPM objects (counter %d -> %d)",
                       old.counter, counter)

    # -- trust record ---------------------------------------------------------

    def load(self, *, repair: bool = True) -> TrustRecord:
        """The authentic, current trust record (repairing a crash window; not with
        ``repair`` false, see :meth:`plan`).

        Raises:
            TrustRecordError: missing or altered record.
            TrustRecordRollbackError: an older record was put back.
            TpmError: the TPM failed.
        """
        plan = self.plan(repair=repair)
        if isinstance(plan, Heal):
            raise plan.reason
        return plan.record

    def plan(self, *, repair: bool = True) -> UseRecord | Heal:
        """Read the record files and the counter and decide (``plan_record``).

        A :class:`UseRecord` plan is carried out at once (a crash window repaired); a
        :class:`Heal` plan changes nothing: :meth:`heal` carries it out.

        With ``repair`` false nothing is renamed or deleted (``agent status``, which holds
        no device lock: a pending record may be a running update's commit, between its
        write and its NV increment, or between the increment and its rename); the plan's
        record is the one in force all the same.

        Raises:
            TrustFileUnreadableError: a record file exists but cannot be read.
            TpmError: the TPM failed.
        """
        if repair:  # (under the device lock: no commit runs beside this read)
            current, bad = _read_file(self.dir, self.record_path.name, _RECORD_MAX)
            pending, bad_pending = _read_file(self.dir, self.pending_path.name, _RECORD_MAX)
            counter = self.tpm.read_counter()
        else:
            current, bad, pending, bad_pending, counter = self._read_consistent()
        plan = plan_record(
            current,
            pending,
            counter,
            self.tpm.mac_ok,
            current_path=str(self.record_path),
            pending_path=str(self.pending_path),
        )
        if isinstance(plan, Heal):
            if bad:
                reason = TrustRecordError(f"trust record {self.record_path} {bad}",
                                          path=str(self.record_path), hint=HEAL_HINT)
                return Heal(reason, plan.targets_floor)
            return plan
        if not repair:
            return plan
        if bad or bad_pending:
            self._writable_dir()  # else the next commit's renames could not land
        if plan.resolution is Resolution.PROMOTE_PENDING:
            logger.warning("completing an interrupted commit of the trust record")
            rename_atomic(self.pending_path, self.record_path)
        elif pending is not None:
            self.pending_path.unlink()
        return plan

    def _read_consistent(self) -> tuple[bytes | None, str, bytes | None, str, int]:
        """The record files and the counter as of one moment, without the device lock.

        A commit beside this read writes the pending file, increments the counter, then
        renames: reading the pending file before the record, between two reads of the
        counter that agree, sees either the commit's start (pending, old counter), its
        middle (pending, new counter) or its end (the new record), never the old record
        with the new counter (which would look like a rolled-back record)."""
        for _ in range(_CONSISTENT_TRIES):
            before = self.tpm.read_counter()
            pending, bad_pending = _read_file(self.dir, self.pending_path.name, _RECORD_MAX)
            current, bad = _read_file(self.dir, self.record_path.name, _RECORD_MAX)
            counter = self.tpm.read_counter()
            if counter == before:
                break
        return current, bad, pending, bad_pending, counter

    def heal(self, plan: Heal, root_version: int) -> TrustRecord:
        """Discard the record that cannot be believed: commit a genesis record.

        The old record is not re-MACed and nothing in it is kept but the rollback floor
        of an authentic copy (``plan.targets_floor``). Call only once :meth:`anchored_root`
        succeeds (``root_version`` is its version). A crash at any step leaves a state
        that plans a heal again, or the committed genesis record.

        Raises:
            TrustRecordError: the trust directory cannot be written.
            TpmError: the TPM failed.
        """
        # The floor of an authentic older copy is not enough: the TPM keeps the highest
        # targets version ever installed (an origin may replay that copy's metadata).
        floor = max(plan.targets_floor, self.targets_floor())
        record = genesis(self.tpm.read_counter(), root_version, floor)
        logger.warning(
            "healing the trust store (%s): a genesis record at counter %d, targets floor %d; "
            "the next install comes from the TPM-anchored root", plan.reason, record.counter,
            record.targets_version,
        )
        try:
            self._writable_dir()
            self.commit(record)
        except OSError as e:
            raise TrustRecordError(f"cannot write the trust record {self.record_path}: {e}",
                                   path=str(self.record_path)) from e
        return record

    def targets_floor(self) -> int:
        """The highest top-level targets version this device installed (TPM-kept).

        Raises:
            TpmError: the TPM failed, or the floor index does not take the auth value.
        """
        return self.tpm.read_targets_floor()

    def raise_targets_floor(self, version: int) -> None:
        """Raise the TPM-kept floor to ``version``; an NV write only when it rises.

        Raises:
            TpmError: the TPM failed.
        """
        if version > self.tpm.read_targets_floor():
            self.tpm.write_targets_floor(version)

    def commit(self, record: TrustRecord) -> None:
        """Make ``record`` the trusted one, bound to the next TPM counter value.

        Order (design.md): pending file with counter+1, NV increment, rename.

        Raises:
            TrustRecordError: ``record`` does not follow the counter.
            TpmError: the TPM failed; the old record stays in force.
        """
        nv = self.tpm.read_counter()
        if record.counter != nv + 1:
            moved = record.counter <= nv
            raise TrustRecordError(
                f"trust record not committed: it was made for TPM update counter value "
                f"{record.counter}, but the counter is at {nv} "
                + ("(another commit moved it since this one read it; nothing was changed)"
                   if moved else "(the record skips counter values; nothing was changed)"),
                path=str(self.record_path),
                hint="run the command again: it starts from the record now in force",
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
        root_file, bad = _read_file(self.dir, self.root_path.name, _ROOT_MAX)
        pending, bad_pending = _read_file(self.dir, self.root_pending_path.name, _ROOT_MAX)
        try:
            root, action = choose_root(root_file, pending, self.tpm.read_anchor(),
                                       root_path=str(self.root_path))
        except RootAnchorError as e:
            if not bad:
                raise
            raise RootAnchorError(f"trusted root {self.root_path} {bad}",
                                  path=str(self.root_path), hint=e.hint) from e
        if bad_pending:
            self._writable_dir()  # else a root rotation could not land
        if action is RootResolution.PROMOTE_PENDING:
            logger.warning("completing an interrupted root rotation")
            if bad:
                self._writable_dir()
            rename_atomic(self.root_pending_path, self.root_path)
        return root

    def restore_root(self, root_bytes: bytes) -> None:
        """Put back the anchored root.json, recovered from anywhere: only the bytes whose
        sha256 the TPM anchors are written.

        Raises:
            RootAnchorError: ``root_bytes`` are not the anchored root.
            TrustRecordError: the trust directory cannot be written.
            TpmError: the TPM failed.
        """
        if hashlib.sha256(root_bytes).digest() != self.tpm.read_anchor():
            raise RootAnchorError(
                f"recovered root metadata does not match the root anchor in the TPM "
                f"(sha256 {hashlib.sha256(root_bytes).hexdigest()})", path=str(self.root_path))
        try:
            self._writable_dir()
            write_atomic(self.root_path, root_bytes)
            self.root_pending_path.unlink(missing_ok=True)
        except OSError as e:
            raise TrustRecordError(f"cannot write {self.root_path}: {e}",
                                   path=str(self.root_path)) from e
        logger.warning("restored the TPM-anchored root %s", self.root_path)

    def rotate_root(self, new_root: bytes) -> bool:
        """Anchor a newer root that TUF has already verified to chain from the anchored one;
        whether it was not anchored already (the record names the root version only from
        the next commit on, so an attempt that installs nothing finds it anchored).

        A crash between the steps leaves either the old anchor with the old file or
        the new anchor with ``root.json.next``; :meth:`anchored_root` resolves both.
        """
        if _read_file(self.dir, self.root_path.name, _ROOT_MAX)[0] == new_root:
            return False
        write_atomic(self.root_pending_path, new_root)
        self.tpm.write_anchor(hashlib.sha256(new_root).digest())
        rename_atomic(self.root_pending_path, self.root_path)
        return True


    def _writable_dir(self) -> None:
        """Make the trust directory a real directory whose store file names hold nothing but
        regular files: a symlink, directory or FIFO planted there is removed (never
        followed), so that the atomic renames of a heal or a repair can land.

        Raises:
            OSError: it cannot be made so.
        """
        try:
            st: os.stat_result | None = os.lstat(self.dir)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            logger.warning("removing %s: not a directory", self.dir)
            os.unlink(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        for path in (self.record_path, self.pending_path, self.root_path,
                     self.root_pending_path):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode):
                continue
            logger.warning("removing %s: not a regular file", path)
            if stat.S_ISDIR(mode):
                import shutil  # (3 ms: only here, not on the boot path, issue 15)

                shutil.rmtree(path)  # does not follow links inside
            else:
                path.unlink()


_RECORD_MAX = RECORD_MAX_BYTES
_ROOT_MAX = 512_000  # bytes, as ngclient's root_max_length


_CONSISTENT_TRIES = 5  # commits beside a lock-free read (each one is a TPM NV increment)


def _read_file(directory: Path, name: str, limit: int) -> tuple[bytes | None, str]:
    """Read ``directory/name`` without following a symlink at either, at most ``limit``
    bytes.

    Returns:
        The bytes (None if missing or not believable), and "" or what is wrong with the
        entry: a symlink, not a regular file, too large. Such an entry was planted (the
        agent writes only regular files): the caller treats it as not believable.

    Raises:
        TrustFileUnreadableError: an I/O or permission error.
    """
    path = directory / name
    try:
        return read_bounded(path, limit, parent_nofollow=True), ""
    except UnsafeFileError as e:
        return None, e.reason
    except OSError as e:
        raise TrustFileUnreadableError(f"cannot read {path}: {e}", path=str(path)) from e
