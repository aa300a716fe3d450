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
from pathlib import Path

from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.trust._plain import Frozen
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._store import TrustStore
from modelward.updater.errors import NothingTrustedError
from modelward.updater.install._journal import Journal
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._statedir import check_state_dirs
from modelward.updater.plan import boot_outcome

logger = logging.getLogger(__name__)


class BootResult(Frozen):
    """Result of :func:`boot_check`."""

    __slots__ = ("active", "fell_back", "message")
    active: ModelRef
    fell_back: bool
    message: str

    def __init__(self, active: ModelRef, fell_back: bool, message: str) -> None:
        self._set(active, fell_back, message)


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


def slot_matches(slots: SlotStore, ref: ModelRef) -> tuple[bool, str]:
    """Whether the slot's files still have the recorded fingerprint.

    A slot that is a symlink (to a copy, wherever) or not a directory never matches.

    Raises:
        StateDirError: ``slots`` itself is a symlink or not a directory.
    """
    path = slots.slot_dir(ref.slot)
    if path is None:
        return False, f"slot {ref.slot} is missing or not a plain directory"
    fp = slot_fingerprint(directory_entries(path))
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
    if not slot_matches(slots, active.replace(slot=other))[0]:
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
        prev = prev.replace(slot=active.slot)
        if not slot_matches(slots, prev)[0]:
            prev = None
    new = record.successor(active=active.replace(slot=other), previous=prev)
    store.commit(new)
    slots.activate(other)
    return new


def reconcile(slots: SlotStore, store: TrustStore, record: TrustRecord) -> TrustRecord:
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
        raise NothingTrustedError(
            "no trusted model is active: none was installed yet, or the last one was found "
            "altered at an earlier boot (the journal says which); the next update installs "
            "the newest release")
    ok, fp = slot_matches(slots, active)
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


def boot_check(state_dir: Path, store: TrustStore) -> BootResult:
    """design.md "Boot": verify record and anchor, then the active slot, else fall back.

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
    after = reconcile(slots, store, record)
    active = after.active
    assert active is not None
    journal = Journal(state_dir / "journal.json")
    if journal.read().step not in ("active", "idle", "failed"):
        journal.enter("active", **_fields(active))  # an interrupted attempt is over
    fell_back, message = boot_outcome(record.active, active, moved=after is not record)
    return BootResult(active, fell_back, message)
