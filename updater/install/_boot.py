"""The boot path (design.md "Boot"): verify the active slot against the trust record, else
roll an interrupted install forward, put swapped slots back or fall back to the previous
model.

This module is what ``agent boot-check`` runs before inference may start, so it imports
only what booting needs: the fingerprint, the record and its TPM-backed store, the slot
store and the journal. Nothing here reaches the network, TUF or the health check
(``tests/integration/test_i15_boot_imports.py`` holds it to that); ``updater.install._install``
uses the same functions after a commit.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from modelward.trust._fingerprint import (
    MAX_ENTRIES,
    FileEntry,
    directory_entries,
    slot_fingerprint,
    walk_tree,
)
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._store import TrustStore
from modelward.updater.errors import NothingTrustedError
from modelward.updater.install._journal import Journal
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._statedir import check_state_dirs
from modelward.updater.plan import boot_outcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootResult:
    """Result of :func:`boot_check`."""

    active: ModelRef
    fell_back: bool
    message: str


def _fields(ref: ModelRef) -> dict[str, str]:
    return {"model": ref.name, "version": ref.version, "fingerprint": ref.fingerprint}


def roll_forward(slots: SlotStore, active: ModelRef) -> bool:
    """Complete an install that crashed after its commit: move ``staging/incoming`` into place.

    Only when ``staging/incoming`` has exactly the fingerprint the trust record made active.
    """
    incoming = slots.incoming_dir()
    if incoming is None:
        return False
    if slot_fingerprint(directory_entries(incoming)) != active.fingerprint:
        return False
    logger.warning(
        "completing the interrupted install of %s %s into slot %s",
        active.name, active.version, active.slot, extra=_fields(active),
    )
    slots.install_incoming(active.slot)
    slots.activate(active.slot)
    return True


#: What :func:`tree_state` records of each directory and entry: everything the kernel
#: changes when a name, inode, mode, link count or byte of it changes (``st_ctime`` moves on
#: every write, chmod, link, unlink and rename and cannot be set back by a user).
_Stat = tuple[str, int, int, int, int, int, int, int]


def _stat_row(rel: str, st: os.stat_result) -> _Stat:
    return (rel, st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


def tree_state(slots_dir: Path, slot: str) -> tuple[_Stat, ...] | None:
    """The ``lstat`` of ``slots_dir``, of its ``slot`` and of everything below that, walked
    without following a link (``walk_tree``); None when it cannot all be read (missing,
    a link, more than a slot may hold): then nothing computed earlier is reused."""
    rows: list[_Stat] = []
    try:
        top = os.lstat(slots_dir)
        if not stat.S_ISDIR(top.st_mode):
            return None
        rows.append(_stat_row("", top))
        for rel, dirs, others, fd in walk_tree(slots_dir / slot, max_names=MAX_ENTRIES + 1):
            rows.append(_stat_row(rel, os.fstat(fd)))
            for name in dirs + others:
                rows.append(_stat_row(f"{rel}/{name}", os.lstat(name, dir_fd=fd)))
            if len(rows) > MAX_ENTRIES + 2:
                return None
    except OSError:
        return None
    return tuple(rows)


class EarlyFingerprint:
    """The files of the slot ``current`` names, hashed on a thread from the start of
    ``agent boot-check`` while the TPM library loads and the record and anchor are
    verified (issue 15: the interpreter's and the TPM's start-up hide behind the hashing).

    Nothing is trusted from it but what a hash at the time of use would give: the slot's
    tree (:func:`tree_state`: inodes, sizes, modes, link counts, mtimes and ctimes of
    ``slots/``, the slot and every entry below it, walked without following a link) is
    recorded before the files are hashed and compared when the entries are used; any
    difference, an error, or another slot than the record's makes :meth:`entries` return
    None and the slot is hashed again, as without it. The walk and the hashing are
    :func:`directory_entries`'s own (``O_NOFOLLOW``, bounded).
    """

    #: The interpreter's switch interval while the hashing thread runs: it needs the GIL
    #: for a moment per 256 KiB read, and the default 5 ms would starve it while the main
    #: thread imports (pure Python).
    SWITCH_INTERVAL = 0.0005

    def __init__(self, state_dir: Path) -> None:
        self._slots = SlotStore(state_dir)
        self._result: tuple[str, list[FileEntry], tuple[_Stat, ...]] | None = None
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, self.SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="early-fingerprint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            slot = self._slots.current_slot()
            if slot is None or self._slots.slot_dir(slot) is None:  # (no link followed)
                return
            before = tree_state(self._slots.root, slot)
            if before is None:
                return
            self._result = (slot, directory_entries(self._slots.root / slot), before)
        except Exception:  # noqa: BLE001 - only a lost head start: the check hashes again
            logger.debug("early fingerprint failed", exc_info=True)

    def close(self) -> None:
        """Wait for the thread (no file is read after this returns)."""
        self._thread.join()
        sys.setswitchinterval(self._interval)

    def entries(self, slot: str) -> list[FileEntry] | None:
        """The entries of ``slot`` as hashed early, if its tree has not changed since."""
        self.close()
        got = self._result
        if got is None or got[0] != slot or tree_state(self._slots.root, slot) != got[2]:
            return None
        return got[1]


def slot_matches(slots: SlotStore, ref: ModelRef,
                 early: EarlyFingerprint | None = None) -> tuple[bool, str]:
    """Whether the slot's files still have the recorded fingerprint (with ``early``: its
    entries if they still hold, see :class:`EarlyFingerprint`).

    A slot that is a symlink (to a copy, wherever) or not a directory never matches.

    Raises:
        StateDirError: ``slots`` itself is a symlink or not a directory.
    """
    path = slots.slot_dir(ref.slot)
    if path is None:
        return False, f"slot {ref.slot} is missing or not a plain directory"
    entries = early.entries(ref.slot) if early is not None else None
    if entries is None:
        entries = directory_entries(path)
    fp = slot_fingerprint(entries)
    return fp == ref.fingerprint, fp


def _relocated(slots: SlotStore, store: TrustStore, record: TrustRecord) -> TrustRecord | None:
    """The active model found intact in the other slot (slots swapped or renamed).

    A fingerprint covers every path and byte of a slot, so a slot with the active
    fingerprint holds exactly the trusted model, wherever it sits. The directories are
    put back where the record says by rename, and the record is left as it is: a disk
    that swaps the slots before every boot must not cost an NV write per boot. Only when
    they cannot be put back is the record re-committed with the slots as they are (one
    NV increment).
    """
    active = record.active
    assert active is not None
    other = SlotStore.other(active.slot)
    if not slot_matches(slots, replace(active, slot=other))[0]:
        return None
    try:
        slots.move_back(other, active.slot)
    except OSError as e:
        logger.warning("cannot move slot %s back to %s (%s): re-recording", other,
                       active.slot, e, extra=_fields(active))
    else:  # (a rename keeps every byte: the fingerprint just verified still holds)
        logger.warning(
            "active %s %s was intact but in slot %s, not %s (slots swapped?): moved back",
            active.name, active.version, other, active.slot, extra=_fields(active))
        slots.activate(active.slot)
        return record
    prev = record.previous
    if prev is not None:
        prev = replace(prev, slot=active.slot)
        if not slot_matches(slots, prev)[0]:
            prev = None
    new = record.successor(active=replace(active, slot=other), previous=prev)
    store.commit(new)
    slots.activate(other)
    return new


def reconcile(slots: SlotStore, store: TrustStore, record: TrustRecord,
              early: EarlyFingerprint | None = None) -> TrustRecord:
    """Make ``current`` agree with the trust record after an interruption.

    Rolls a committed install forward from ``staging/incoming``, else verifies the recorded
    active slot, else falls back to the previous one (committing that). Returns the
    record in force afterwards.

    Raises:
        NothingTrustedError: no slot matches the record.
    """
    active = record.active
    if active is None:
        slots.deactivate()  # whatever `current` names, nothing trusted is there
        raise NothingTrustedError("no model has been installed on this device yet")
    ok, fp = slot_matches(slots, active, early)
    if not ok:
        ok = roll_forward(slots, active)
    if ok:
        if slots.current_slot() != active.slot:
            slots.activate(active.slot)
        return record
    moved = _relocated(slots, store, record)
    if moved is not None:
        return moved
    logger.error(
        "active model %s %s (fingerprint %s) no longer matches: slot %s has %s",
        active.name, active.version, active.fingerprint, active.slot, fp,
        extra=_fields(active),
    )
    prev = record.previous
    if prev is not None and slot_matches(slots, prev)[0]:
        new = record.successor(active=prev, previous=None)
        store.commit(new)
        slots.activate(prev.slot)
        return new
    # Record that nothing is trusted any more (one NV increment, like a fallback, and
    # only once: the next boot finds active = None). Otherwise the record would keep
    # naming the altered model as active and the next update would see nothing to do.
    store.commit(record.successor(active=None, previous=None))
    slots.deactivate()  # the app finds no model rather than an untrusted one
    raise NothingTrustedError(
        f"active {active.name} {active.version} was altered and no trusted previous "
        "model is left; the next update installs the newest release again"
    )


def boot_check(state_dir: Path, store: TrustStore,
               early: EarlyFingerprint | None = None) -> BootResult:
    """design.md "Boot": verify record and anchor, then the active slot, else fall back
    (the active slot's entries from ``early`` if they still hold).

    Raises:
        NothingTrustedError: neither slot matches (or nothing was ever installed);
            ``current`` is removed then.
        StateDirError: ``slots`` or ``trust`` is a symlink or not a directory.
        TrustRecordError, RootAnchorError, TpmError: the trust store itself is broken.
    """
    # Boot needs only slots/ and trust/ (a symlinked one is refused, nothing followed); a
    # symlinked staging/ only means no roll-forward from it, so the model keeps serving.
    check_state_dirs(state_dir, ("slots", "trust"))
    slots = SlotStore(state_dir)
    record = store.load()
    store.anchored_root()
    after = reconcile(slots, store, record, early)
    active = after.active
    assert active is not None
    journal = Journal(state_dir / "journal.json")
    if journal.read().step not in ("active", "idle", "failed"):
        journal.enter("active", **_fields(active))  # an interrupted attempt is over
    fell_back, message = boot_outcome(record.active, active, moved=after is not record)
    return BootResult(active, fell_back, message)
