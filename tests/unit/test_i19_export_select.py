"""``repo export``'s selection (issue 19): the chosen models' namespaces, and top-level
``_modelward/`` targets (repository-wide policy) whichever models are chosen, never a
delegated role's."""

from __future__ import annotations

import pytest

from modelward.publisher._export import _wanted, check_models
from modelward.publisher.errors import SyncSourceError


@pytest.mark.parametrize(("path", "role", "models", "want"), [
    ("classifier/a.tar", "targets", None, True),
    ("classifier/a.tar", "team", ["classifier"], True),
    ("classifier/a.tar.chunks", "targets", ["classifier"], True),
    ("detector/a.tar", "targets", ["classifier"], False),
    ("classifierx/a.tar", "targets", ["classifier"], False),
    ("_modelward/provenance.json", "targets", ["classifier"], True),
    ("_modelward/provenance.json", "targets", None, True),
    ("_modelward/provenance.json", "team", None, False),
])
def test_wanted(path: str, role: str, models: list[str] | None, want: bool) -> None:
    assert _wanted(path, role, models) is want


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".x", "a b", "x" * 200])
def test_model_names_are_plain(bad: str) -> None:
    with pytest.raises(SyncSourceError):
        check_models([bad])


def test_model_names_are_deduplicated() -> None:
    assert check_models(["a", "b", "a"]) == ("a", "b")
