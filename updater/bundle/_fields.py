"""The signed ``modelward`` fields of a target, as a device acts on them (pure).

One reading for everyone: the device's candidate selection (:func:`updater.install._tuf._candidate`)
and the signer's summary (:mod:`publisher._summary`) both call :func:`read_fields`, so what
a signer is shown is what a device will do. :func:`noncanonical` says where the raw fields
differ from the form the repository writes (``"pinned": 1`` read as a pin, ``"rollout": 0``
read as 100 %): the repository refuses to sign such fields rather than hope the reading is
what was meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelward.updater.bundle._semver import SemVer

FLAGS = ("pinned", "withdrawn")
KNOWN = ("name", "version", "fingerprint", "channel", "rollout", *FLAGS)
ROLLOUT_KNOWN = ("basis_points", "halted")


@dataclass(frozen=True)
class Fields:
    """What a device reads from a target's ``modelward`` field."""

    name: object  # compared with the model the path belongs to (any type: then no match)
    version: SemVer
    fingerprint: str
    channel: str = "stable"
    percent: float = 100.0
    halted: bool = False
    pinned: bool = False
    withdrawn: bool = False


def modelward_field(custom: object) -> Mapping[str, Any] | None:
    """The ``modelward`` object of a target's ``custom``, or None if there is none."""
    field = custom.get("modelward") if isinstance(custom, dict) else None
    return field if isinstance(field, dict) else None


def read_fields(field: Mapping[str, Any]) -> Fields:
    """The device's reading of ``field``.

    Raises:
        KeyError, ValueError, TypeError, AttributeError: malformed; devices ignore the
            target (logged).
    """
    version = SemVer.parse(str(field["version"]))
    fingerprint = str(field["fingerprint"])
    rollout = field.get("rollout") or {}
    bp = rollout.get("basis_points", 10000)
    if not isinstance(bp, int) or isinstance(bp, bool):
        raise ValueError(f"rollout basis_points {bp!r}")
    percent = bp / 100
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"rollout percent {percent}")
    return Fields(field.get("name"), version, fingerprint,
                  channel=str(field.get("channel", "stable")), percent=percent,
                  halted=bool(rollout.get("halted", False)),
                  pinned=bool(field.get("pinned", False)),
                  withdrawn=bool(field.get("withdrawn", False)))


def noncanonical(field: Mapping[str, Any]) -> list[str]:
    """Where ``field`` is not in the form the repository writes (a type the device would
    coerce or read differently): empty when the raw values mean what they say. Fields
    the device does not know are not listed here (it ignores them; the summary shows
    them)."""
    out = []
    for key in ("name", "version", "fingerprint", "channel"):
        if key in field and not isinstance(field[key], str):
            out.append(f"{key} is {type(field[key]).__name__}, not a string")
    for key in FLAGS:
        if key in field and not isinstance(field[key], bool):
            out.append(f"{key} is {field[key]!r:.40}, not true or false")
    if "rollout" in field:
        rollout = field["rollout"]
        if not isinstance(rollout, dict):
            out.append(f"rollout is {rollout!r:.40}, not an object")
        else:
            bp = rollout.get("basis_points")
            if "basis_points" in rollout and (type(bp) is not int or not 0 <= bp <= 10000):
                out.append(f"rollout basis_points is {bp!r:.40}, not 0..10000")
            if "halted" in rollout and not isinstance(rollout["halted"], bool):
                out.append(f"rollout halted is {rollout['halted']!r:.40}, not true or false")
    return out


__all__ = ["FLAGS", "KNOWN", "Fields", "modelward_field", "noncanonical", "read_fields"]
