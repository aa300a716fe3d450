"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from modelward.simulator._pki import CertPair
from tests.unit.test_i13_a3_https import Origin, Script


@pytest.fixture
def origin(pki: tuple[CertPair, CertPair]) -> Iterator[Callable[[Script], Origin]]:
    """Make scripted TLS origins (closed after the test)."""
    made: list[Origin] = []

    def make(script: Script) -> Origin:
        made.append(Origin(pki[1], script))
        return made[-1]

    yield make
    for o in made:
        o.close()
