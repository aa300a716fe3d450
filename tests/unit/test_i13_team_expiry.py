"""Issue 13: a team release is not published behind an expired delegated role (devices
would refuse the role and never install it). The repository on disk, no TPM or network;
the decision alone in the last tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._repo import Repository
from modelward.publisher._team_expiry import TeamRoleExpiredError, expired_on_the_way
from modelward.simulator._models import make_linear_model

PASS = b"unit test passphrase"
PAST = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo", tmp_path / "keys", PASS)
    r.init()
    return r


def _bundle(tmp: Path, version: str, seed: int) -> Path:
    model = make_linear_model(tmp / f"m-{version}.onnx", seed)
    out = tmp / f"m-{version}.tar"
    build_bundle(model, "classifier", version, out, options=BuildOptions())
    return out


def _expire(repo: Repository, role: str) -> None:
    """The role's last signed version is past its expiry (nobody re-signed it)."""
    md = repo._role_md(role)  # noqa: SLF001 - test tooling
    md.signed.expires = PAST
    md.signed.version += 1
    repo._write_delegated(md, role, repo.keys / f"delegated-{role}.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001


def _served(repo: Repository) -> tuple[list[str], int]:
    _, _, ts = repo.current()
    return sorted(p.name for p in repo.targets_dir.rglob("*.tar")), ts.version


def test_a_release_behind_an_expired_parent_role_is_refused(repo: Repository,
                                                            tmp_path: Path) -> None:
    repo.delegate("chain1", ["classifier/*"], terminating=False)
    repo.delegate("chain2", ["classifier/*"], parent="chain1", terminating=False)
    _expire(repo, "chain1")
    before = _served(repo)
    with pytest.raises(TeamRoleExpiredError) as e:
        repo.publish(_bundle(tmp_path, "1.0.0", 1), role="chain2")
    assert e.value.role == "chain1" and e.value.expires == PAST
    assert e.value.publishing == "chain2"
    assert "'chain1' expired at 2020-01-01T00:00:00+00:00" in str(e.value)
    assert "chain1" in e.value.hint
    assert _served(repo) == before  # nothing served, no new metadata


def test_an_expired_sibling_the_search_visits_first_is_refused_too(
        repo: Repository, tmp_path: Path) -> None:
    repo.delegate("early", ["classifier/*"], terminating=False)  # visited, holds nothing
    repo.delegate("team", ["classifier/*"])
    _expire(repo, "early")
    with pytest.raises(TeamRoleExpiredError) as e:
        repo.publish(_bundle(tmp_path, "1.0.0", 1), role="team")
    assert e.value.role == "early"


def test_the_role_published_into_is_re_signed_so_its_own_expiry_is_no_obstacle(
        repo: Repository, tmp_path: Path) -> None:
    repo.delegate("team", ["classifier/*"])
    _expire(repo, "team")
    repo.publish(_bundle(tmp_path, "1.0.0", 1), role="team")
    assert repo._role_md("team").signed.expires > datetime.now(UTC)  # noqa: SLF001


def test_an_expired_role_the_search_does_not_reach_is_no_obstacle(
        repo: Repository, tmp_path: Path) -> None:
    repo.delegate("vision", ["detector/*"])
    repo.delegate("team", ["classifier/*"])
    _expire(repo, "vision")
    repo.publish(_bundle(tmp_path, "1.0.0", 1), role="team")


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(("trail", "expired", "want"), [
    (["targets", "a", "b"], {"a"}, "a"),
    (["targets", "a", "b"], {"b"}, None),          # b is re-signed by the publish
    (["targets", "a", "b"], {"targets"}, None),    # the operator's role: checked elsewhere
    (["targets", "x", "a", "b"], {"x", "a"}, "x"),  # the first in search order
    (["targets", "b"], set(), None),
])
def test_the_decision(trail: list[str], expired: set[str], want: str | None) -> None:
    def expires(r: str) -> datetime:
        return NOW - timedelta(seconds=1) if r in expired else NOW + timedelta(days=1)

    got = expired_on_the_way(trail, "b", expires, NOW)
    assert (got[0] if got else None) == want


def test_expiring_exactly_now_counts_as_expired() -> None:
    assert expired_on_the_way(["a"], "b", lambda r: NOW, NOW) == ("a", NOW)
