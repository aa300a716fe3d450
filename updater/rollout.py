"""Channels and phased rollouts: which published release a device may install.

A release's signed ``modelward`` field carries ``channel``, ``rollout.basis_points``
(integer hundredths of a percent: TUF's canonical JSON has no floats),
``rollout.halted`` and ``pinned``. The rules, all pure:

* a device considers only releases of its model on its channel;
* eligibility: ``bucket(device, name, version) < percent``, where ``bucket`` is the first
  8 bytes of ``sha256("modelward-rollout:<name>:<version>:<device>")`` scaled to [0, 100).
  Deterministic per device and release, independent across releases, so raising the
  percentage only ever adds devices;
* a halted release is installed by no device that does not have it yet (those that have
  it keep it: devices never move down on their own);
* a pinned release is the operator's explicit, signed decision: devices install it even
  when it is older than what they run. A halted pin pins nothing (halting wins: the
  operator stopped that release); a team's pin counts only while no operator pin
  exists for the channel, halted or not. Replayed old metadata cannot pin anything back,
  because the trust record refuses targets metadata older than it has seen;
* the operator's top-level decisions win over a delegated role's for the same model: a
  release (name and version) that the top-level targets list is taken from there only
  (an entry the operator copied there to halt, re-phase, pin or withdraw a team's
  release shadows the team's own), and a top-level pin beats any delegated pin;
* a release marked ``withdrawn`` (the operator's tombstone for a team's release) is
  installed by no device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from modelward.updater.bundle._semver import SemVer

OPERATOR = "targets"  # the top-level targets role


def rollout_bucket(device_id: str, name: str, version: str) -> float:
    """The device's position in [0, 100) for one release."""
    h = hashlib.sha256(f"modelward-rollout:{name}:{version}:{device_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 * 100


class Release(Protocol):
    """What the selection needs to know of a published release."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> SemVer: ...
    @property
    def channel(self) -> str: ...
    @property
    def percent(self) -> float: ...
    @property
    def halted(self) -> bool: ...
    @property
    def pinned(self) -> bool: ...
    @property
    def withdrawn(self) -> bool: ...
    @property
    def role(self) -> str: ...


@dataclass(frozen=True)
class Choice:
    """The release to install, and whether it is a pin (which may go down)."""

    release: Release
    pinned: bool


def choose_release(
    releases: Sequence[Release], device_id: str, channel: str
) -> Choice | None:
    """Pick what this device should run (None: nothing eligible)."""
    mine = [r for r in operator_first(releases) if r.channel == channel]
    pins = [r for r in mine if r.pinned and r.role == OPERATOR] or \
        [r for r in mine if r.pinned]
    pinned = [r for r in pins if not r.halted]
    if pinned:
        return Choice(max(pinned, key=lambda r: r.version), True)
    eligible = [r for r in mine if not r.halted and
                rollout_bucket(device_id, r.name, str(r.version)) < r.percent]
    if not eligible:
        return None
    return Choice(max(eligible, key=lambda r: r.version), False)


def operator_first(releases: Sequence[Release]) -> list[Release]:
    """The releases in force: for a version the operator lists, only the operator's
    entries; withdrawn ones dropped."""
    operator = {r.version for r in releases if r.role == OPERATOR}
    return [r for r in releases if (r.role == OPERATOR or r.version not in operator)
            and not r.withdrawn]
