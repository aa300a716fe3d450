"""Semantic versions decide what is newer."""

from __future__ import annotations

import pytest

from modelward.updater.bundle._semver import SemVer


@pytest.mark.parametrize(
    "lo,hi",
    [
        ("1.0.0", "2.0.0"), ("1.9.0", "1.10.0"), ("1.0.0-alpha", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-alpha.1"), ("1.0.0-alpha.1", "1.0.0-alpha.beta"),
        ("1.0.0-beta.2", "1.0.0-beta.11"), ("1.0.0-rc.1", "1.0.0"),
    ],
)
def test_precedence(lo: str, hi: str) -> None:
    assert SemVer.parse(lo) < SemVer.parse(hi)


def test_build_metadata_is_ignored() -> None:
    assert SemVer.parse("1.0.0+a") == SemVer.parse("1.0.0+b")


@pytest.mark.parametrize("bad", ["1", "1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0 ", ""])
def test_invalid(bad: str) -> None:
    with pytest.raises(ValueError, match="semantic version"):
        SemVer.parse(bad)
