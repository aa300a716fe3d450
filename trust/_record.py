"""The trust record and the pure rules that decide which copy of it to believe.

No I/O here: the store (``_store.py``) reads files and asks the TPM; these
functions take bytes and numbers and decide, so tests can drive every crash
window without a TPM or a disk (house style 1).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable
from typing import Any

from modelward.trust._bounded import loads_bounded
from modelward.trust._plain import Frozen
from modelward.trust.errors import RootAnchorError, TrustRecordError, TrustRecordRollbackError

RECORD_MAX_BYTES = 64 * 1024  # bytes; a record is about 1 kB

_MAC_DOMAIN = b"modelward trust record v1\n"

HEAL_HINT = ("the next `modelward agent update` heals the device from the TPM-anchored root "
             "(no operator step); until then nothing is served")


class ModelRef(Frozen):
    """A model installed in a slot, as recorded when it was verified."""

    __slots__ = ("name", "version", "fingerprint", "slot")
    name: str
    version: str
    fingerprint: str
    slot: str

    def __init__(self, name: str, version: str, fingerprint: str, slot: str) -> None:
        self._set(name, version, fingerprint, slot)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRef:
        """Parse one ``active``/``previous`` entry; raises KeyError/TypeError on bad shape."""
        ref = cls(str(d["name"]), str(d["version"]), str(d["fingerprint"]), str(d["slot"]))
        if ref.slot not in ("a", "b"):
            raise ValueError(f"slot {ref.slot!r}")
        return ref


class TrustRecord(Frozen):
    """What the device trusts, bound to the TPM update counter.

    ``active`` is None on a device that was provisioned and never installed a model.
    """

    __slots__ = ("counter", "root_version", "targets_version", "active", "previous")
    counter: int
    root_version: int
    targets_version: int
    active: ModelRef | None
    previous: ModelRef | None

    def __init__(self, counter: int, root_version: int, targets_version: int,
                 active: ModelRef | None, previous: ModelRef | None) -> None:
        self._set(counter, root_version, targets_version, active, previous)

    def to_json(self) -> dict[str, Any]:
        """The record's canonical fields."""
        return {
            "counter": self.counter,
            "root_version": self.root_version,
            "targets_version": self.targets_version,
            "active": self.active.asdict() if self.active else None,
            "previous": self.previous.asdict() if self.previous else None,
        }

    def digest(self) -> bytes:
        """What the TPM MACs: a domain-separated hash of the canonical JSON."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(_MAC_DOMAIN + canonical.encode()).digest()

    def successor(self, **changes: Any) -> TrustRecord:
        """The next record: ``counter + 1`` and the given field changes."""
        return self.replace(counter=self.counter + 1, **changes)


def encode_record(record: TrustRecord, mac: bytes) -> bytes:
    """Serialise a record with its MAC."""
    doc = {"record": record.to_json(), "mac": mac.hex()}
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


def decode_record(data: bytes, path: str) -> tuple[TrustRecord, bytes]:
    """Parse a record file into the record and its MAC.

    Raises:
        TrustRecordError: the file is not a well-formed record.
    """
    try:
        doc = loads_bounded(data, max_bytes=RECORD_MAX_BYTES, what=path)
        r = doc["record"]
        rec = TrustRecord(
            counter=int(r["counter"]),
            root_version=int(r["root_version"]),
            targets_version=int(r["targets_version"]),
            active=ModelRef.from_dict(r["active"]) if r["active"] else None,
            previous=ModelRef.from_dict(r["previous"]) if r["previous"] else None,
        )
        mac = bytes.fromhex(doc["mac"])
    except (ValueError, KeyError, TypeError) as e:
        raise TrustRecordError(f"trust record {path} is malformed: {e}", path=path) from e
    return rec, mac


class Resolution(enum.Enum):
    """What the store must do to the files after choosing a record."""

    USE = "use"  # the record file is right; a pending file, if any, is stale
    PROMOTE_PENDING = "promote"  # crash after the counter increment: rename pending over


def choose_record(
    current: bytes | None,
    pending: bytes | None,
    nv_counter: int,
    mac_ok: Callable[[bytes, bytes], bool],
    *,
    current_path: str,
    pending_path: str,
) -> tuple[TrustRecord, Resolution]:
    """Decide which trust record is authentic and current (design.md "Trust store").

    Commit order is: write pending with counter+1, increment the NV counter,
    rename pending over current. So exactly one authentic copy carries the NV
    counter's value; any other state is tampering or rollback.

    Args:
        current: bytes of the record file, or None if it is missing.
        pending: bytes of the ``.next`` file, or None.
        nv_counter: the TPM update counter.
        mac_ok: ``mac_ok(digest, mac)`` asks the TPM whether ``mac`` is its MAC of ``digest``.
        current_path: for error messages.
        pending_path: for error messages.

    Raises:
        TrustRecordError: no authentic record exists (missing, edited, wrong MAC).
        TrustRecordRollbackError: the authentic record is older than the counter.
    """
    if pending is not None:
        try:
            prec, pmac = decode_record(pending, pending_path)
        except TrustRecordError:
            prec = None  # a torn pending write is harmless before the increment
        if prec is not None and prec.counter == nv_counter and mac_ok(prec.digest(), pmac):
            return prec, Resolution.PROMOTE_PENDING
    if current is None:
        raise TrustRecordError(
            f"trust record {current_path} is missing",
            path=current_path,
            hint=HEAL_HINT,
        )
    rec, mac = decode_record(current, current_path)
    if not mac_ok(rec.digest(), mac):
        raise TrustRecordError(
            f"trust record {current_path} was altered: its TPM MAC does not verify",
            path=current_path,
            hint=HEAL_HINT,
        )
    if rec.counter != nv_counter:
        raise TrustRecordRollbackError(
            f"trust record {current_path} has counter {rec.counter} but the TPM update "
            f"counter is {nv_counter}: an older copy was put back",
            path=current_path,
            hint=HEAL_HINT,
        )
    return rec, Resolution.USE


# --- healing ------------------------------------------------------------------


class UseRecord(Frozen):
    """The record is authentic and current: use it (after ``resolution`` on the files)."""

    __slots__ = ("record", "resolution")
    record: TrustRecord
    resolution: Resolution

    def __init__(self, record: TrustRecord, resolution: Resolution) -> None:
        self._set(record, resolution)


class Heal(Frozen):
    """The record cannot be believed: start again from the TPM-anchored root.

    Nothing in the old record is accepted: not its models, slots, or counter. The
    device continues as a freshly provisioned one would, with a genesis record bound
    to the next TPM counter value (:func:`genesis`).

    Attributes:
        reason: why the record is not believed (missing, malformed, altered, older).
        targets_floor: the highest targets version found in a copy whose TPM MAC verifies
            (an older record put back is still *authentic*: the device saw that targets
            version verified, so newer metadata cannot be below it). 0 when no copy is
            authentic: the disk's rollback floor is then lost (design.md "Healing").
    """

    __slots__ = ("reason", "targets_floor")
    reason: TrustRecordError
    targets_floor: int

    def __init__(self, reason: TrustRecordError, targets_floor: int) -> None:
        self._set(reason, targets_floor)


def plan_record(
    current: bytes | None,
    pending: bytes | None,
    nv_counter: int,
    mac_ok: Callable[[bytes, bytes], bool],
    *,
    current_path: str,
    pending_path: str,
) -> UseRecord | Heal:
    """:func:`choose_record`, with every way of not believing the record turned into a
    :class:`Heal` plan instead of an error a device cannot leave without an operator.
    """
    try:
        return UseRecord(*choose_record(current, pending, nv_counter, mac_ok,
                                        current_path=current_path, pending_path=pending_path))
    except TrustRecordError as e:
        return Heal(e, _authentic_floor((current, pending), mac_ok))


def _authentic_floor(copies: tuple[bytes | None, ...],
                     mac_ok: Callable[[bytes, bytes], bool]) -> int:
    floor = 0
    for data in copies:
        if data is None:
            continue
        try:
            rec, mac = decode_record(data, "")
        except TrustRecordError:
            continue
        if mac_ok(rec.digest(), mac):
            floor = max(floor, rec.targets_version)
    return floor


def genesis(nv_counter: int, root_version: int, targets_floor: int) -> TrustRecord:
    """The record a heal commits: nothing installed, bound to the next counter value.

    Committing it moves the TPM counter (like any commit), so the record that was not
    believed, and every copy of it, can never verify as current again.
    """
    return TrustRecord(counter=nv_counter + 1, root_version=root_version,
                       targets_version=targets_floor, active=None, previous=None)


class RootResolution(enum.Enum):
    """What the store must do to the root files after matching them to the anchor."""

    USE = "use"
    PROMOTE_PENDING = "promote"  # crash during a root rotation, after the NV write


def choose_root(
    root: bytes | None,
    pending: bytes | None,
    anchor: bytes,
    *,
    root_path: str,
) -> tuple[bytes, RootResolution]:
    """The root file whose sha256 the TPM anchors.

    Raises:
        RootAnchorError: neither file matches (deleted or replaced); the root bytes can be
            recovered from the repository by the same rule (modelward.updater.install._heal).
    """
    if root is not None and hashlib.sha256(root).digest() == anchor:
        return root, RootResolution.USE
    if pending is not None and hashlib.sha256(pending).digest() == anchor:
        return pending, RootResolution.PROMOTE_PENDING
    what = "is missing" if root is None else "does not match the root anchor in the TPM"
    raise RootAnchorError(f"trusted root {root_path} {what}", path=root_path,
                          hint="the next `modelward agent update` fetches the anchored root "
                          "from the repository again (only bytes with the anchored sha256)")
