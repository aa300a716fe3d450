"""Pure decisions over verified observations (design.md "Layout": updater/plan.py).

No I/O here: the callers (:mod:`modelward.updater.install._install`,
:mod:`modelward.updater.install._boot`) observe, verify, and carry the decision out.
Which release a device takes among those signed for it is :mod:`modelward.updater.rollout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelward.trust._record import ModelRef, TrustRecord
from modelward.updater.errors import RollbackError

if TYPE_CHECKING:  # (the update path's: `agent boot-check` needs boot_outcome only, issue 15)
    from modelward.updater.rollout import Choice


def should_install(choice: Choice | None, active: ModelRef | None) -> bool:
    """Install a newer release, or a pinned one that differs from the active one."""
    if choice is None:
        return False
    if active is None:
        return True
    from modelward.updater.bundle._semver import SemVer

    current = SemVer.parse(active.version)
    if choice.pinned:
        return choice.release.version != current
    return choice.release.version > current


def check_metadata_not_rolled_back(record: TrustRecord, targets_version: int,
                                   tpm_floor: int = 0) -> None:
    """Refuse targets metadata older than the version the trust record or the TPM saw.

    TUF's own rollback check compares against the local metadata files, which a
    local attacker can replace with older valid copies; the TPM-bound record cannot.
    ``tpm_floor`` (the highest targets version installed, kept in the TPM) also holds
    after a heal from an older, authentic copy of the disk.

    Raises:
        RollbackError: ``targets_version`` is below the recorded one or the TPM floor.
    """
    floor = max(record.targets_version, tpm_floor)
    if targets_version < floor:
        where = ("the trust record" if floor == record.targets_version
                 else "the TPM's targets floor")
        raise RollbackError(
            f"targets metadata version {targets_version} is older than version "
            f"{floor} in {where} (rollback of metadata)",
            what="targets",
            trusted=str(floor),
            offered=str(targets_version),
        )


def boot_outcome(recorded: ModelRef | None, active: ModelRef,
                 *, moved: bool) -> tuple[bool, str]:
    """(fell back, what to say) at boot, once the trust record was reconciled with the slots.

    Args:
        recorded: the active model the verified trust record named before the check.
        active: the model that is active after it (the same, or the previous slot's).
        moved: whether the reconciliation wrote a new record (a move, or a fall-back).
    """
    if not moved or recorded is None:
        return False, f"{active.name} {active.version} verified"
    if recorded.fingerprint == active.fingerprint:
        return False, (f"{active.name} {active.version} verified in slot {active.slot} "
                       f"(it had moved from slot {recorded.slot})")
    return True, (f"active {recorded.name} {recorded.version} was altered; fell back to "
                  f"{active.name} {active.version} in slot {active.slot}")
