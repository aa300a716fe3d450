"""The pure decisions of updater/plan.py, without a device."""

from __future__ import annotations

import pytest

from modelward.trust._record import ModelRef, TrustRecord
from modelward.updater.bundle._semver import SemVer
from modelward.updater.errors import RollbackError
from modelward.updater.plan import boot_outcome, check_metadata_not_rolled_back, should_install
from modelward.updater.rollout import Choice


def _ref(version: str, slot: str = "a", fp: str = "f1") -> ModelRef:
    return ModelRef(name="m", version=version, slot=slot, fingerprint=fp)


class _Rel:
    def __init__(self, version: str) -> None:
        self.version = SemVer.parse(version)


def test_should_install_newer_or_a_different_pinned_release_only() -> None:
    assert should_install(None, _ref("1.0.0")) is False
    assert should_install(Choice(_Rel("1.0.0"), pinned=False), None) is True  # type: ignore[arg-type]
    assert should_install(Choice(_Rel("2.0.0"), pinned=False), _ref("1.0.0")) is True  # type: ignore[arg-type]
    assert should_install(Choice(_Rel("1.0.0"), pinned=False), _ref("1.0.0")) is False  # type: ignore[arg-type]
    assert should_install(Choice(_Rel("0.9.0"), pinned=False), _ref("1.0.0")) is False  # type: ignore[arg-type]
    assert should_install(Choice(_Rel("0.9.0"), pinned=True), _ref("1.0.0")) is True  # type: ignore[arg-type]
    assert should_install(Choice(_Rel("1.0.0"), pinned=True), _ref("1.0.0")) is False  # type: ignore[arg-type]


def test_metadata_older_than_the_record_or_the_tpm_floor_is_a_rollback() -> None:
    rec = TrustRecord(root_version=1, targets_version=5, active=None, previous=None,
                      counter=1)
    check_metadata_not_rolled_back(rec, 5)
    with pytest.raises(RollbackError, match="trust record"):
        check_metadata_not_rolled_back(rec, 4)
    with pytest.raises(RollbackError, match="TPM's targets floor"):
        check_metadata_not_rolled_back(rec, 6, tpm_floor=7)


def test_boot_outcome_says_verified_moved_or_fell_back() -> None:
    a, b = _ref("2.0.0", "a", "f2"), _ref("1.0.0", "b", "f1")
    assert boot_outcome(a, a, moved=False) == (False, "m 2.0.0 verified")
    moved = _ref("2.0.0", "b", "f2")
    fell, msg = boot_outcome(a, moved, moved=True)
    assert not fell and "moved from slot a" in msg
    fell, msg = boot_outcome(a, b, moved=True)
    assert fell and msg == "active m 2.0.0 was altered; fell back to m 1.0.0 in slot b"
