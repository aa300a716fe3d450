"""What the attacker-review fixes of the delegation search must also hold (issue 13 finding 1).

The next moves of the attackers after the committed attacks were refused: a broken team
role must remove only the paths its subtree could speak for (never hand them to a later
sibling), bounds are typed errors that keep the operator's top-level decisions, and the
operator's halt/resume/withdraw of a team's release never becomes a pin or a re-publish.
In memory (modelward.simulator._tufmem) and on a publisher repository on disk.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import DelegatedRole

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._repo import Repository
from modelward.publisher.errors import RepositoryStateError
from modelward.simulator._models import make_linear_model
from modelward.simulator._teams import team_sign
from modelward.simulator._tufmem import METADATA_URL, TARGETS_URL, MemFetcher, MemRepo
from modelward.updater.bundle._semver import SemVer
from modelward.updater.errors import MetadataError
from modelward.updater.install._search import SearchBudgetError
from modelward.updater.install._tuf import TufSession
from modelward.updater.rollout import choose_release

TOPLEVEL = 4


def _session(repo: MemRepo, d: Path) -> tuple[TufSession, MemFetcher]:
    f = MemFetcher(repo)
    s = TufSession(d, METADATA_URL, TARGETS_URL, f, repo.root_bytes)
    s.refresh()
    return s, f


def _mw(version: str, **extra: Any) -> dict[str, Any]:
    return {"modelward": {"name": "m", "version": version, "fingerprint": "f" * 64,
                          "channel": "stable", "rollout": {"basis_points": 10000},
                          **extra}}


# -- a broken team role removes only its own paths ---------------------------------


def test_broken_role_does_not_hand_its_paths_to_a_later_sibling(tmp_path: Path) -> None:
    """``first`` (m/*) expires; ``second`` (m/*, later) lists m/m-9.0.0.tar. TUF's search
    for that path passes through ``first``: the path is left out, not taken from
    ``second``; ``other`` (x/* only) and the top-level release are unaffected."""
    r = MemRepo()
    r.add_target("targets", "m/m-1.0.0.tar", custom=_mw("1.0.0"))
    r.delegate("targets", "first", paths=["m/*"])
    r.delegate("targets", "second", paths=["m/*"])
    r.add_target("first", "m/m-2.0.0.tar", custom=_mw("2.0.0"))
    r.add_target("second", "m/m-9.0.0.tar", custom=_mw("9.0.0"))
    r.roles["first"].signed.expires = datetime.now(UTC) - timedelta(days=1)
    r.publish()
    s, _ = _session(r, tmp_path)
    cands = s.candidates("m")
    assert [(c.target.path, c.role) for c in cands] == [("m/m-1.0.0.tar", "targets")]
    with pytest.raises(MetadataError, match="delegated role first"):
        s.search("m")  # the strict search names the role at fault


def test_broken_role_on_another_branch_keeps_a_disjoint_sibling(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "first", paths=["m/a-*"])
    r.delegate("targets", "second", paths=["m/b-*"])
    r.add_target("second", "m/b-2.0.0.tar", custom=_mw("2.0.0"))
    r.roles["first"].signed.expires = datetime.now(UTC) - timedelta(days=1)
    r.publish()
    s, _ = _session(r, tmp_path)
    assert [c.target.path for c in s.candidates("m")] == ["m/b-2.0.0.tar"]


def test_only_broken_roles_and_nothing_found_is_the_typed_error(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.add_target("team", "m/m-2.0.0.tar", custom=_mw("2.0.0"))
    r.roles["team"].signed.expires = datetime.now(UTC) - timedelta(days=1)
    r.publish()
    s, _ = _session(r, tmp_path)
    with pytest.raises(MetadataError, match="delegated role team"):
        s.candidates("m")


def test_team_role_not_delivered_keeps_the_operators_pin(tmp_path: Path) -> None:
    """The origin withholds the team's role (404): the top-level pin still applies."""
    r = MemRepo()
    r.add_target("targets", "m/m-1.0.0.tar", custom=_mw("1.0.0", pinned=True))
    r.delegate("targets", "team", paths=["m/*"])
    r.add_target("team", "m/m-3.0.0.tar", custom=_mw("3.0.0"))
    r.publish()
    for url in [u for u in r.served if u.endswith(".team.json")]:
        del r.served[url]
    s, _ = _session(r, tmp_path)
    choice = choose_release(s.candidates("m"), "dev-1", "stable")
    assert choice is not None and str(choice.release.version) == "1.0.0" and choice.pinned


# -- bounds are typed and keep the top level ---------------------------------------


@pytest.mark.xdist_group("machine")
def test_huge_succinct_delegation_is_a_typed_bound_and_keeps_the_top_level(
    tmp_path: Path
) -> None:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Delegations, SuccinctRoles

    r = MemRepo()
    r.add_target("targets", "m/m-1.0.0.tar", custom=_mw("1.0.0", pinned=True))
    key = CryptoSigner.generate_ed25519()
    r.roles["targets"].signed.delegations = Delegations(
        keys={key.public_key.keyid: key.public_key},
        succinct_roles=SuccinctRoles([key.public_key.keyid], 1, 32, "bin"))
    r.publish()
    s, _ = _session(r, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(SearchBudgetError, match="succinct"):
        s.search("m")
    cands = s.candidates("m")
    assert time.monotonic() - t0 < 5
    assert [c.target.path for c in cands] == ["m/m-1.0.0.tar"]


@pytest.mark.xdist_group("machine")
def test_wide_relevant_delegations_are_bounded_in_time(tmp_path: Path) -> None:
    """20000 delegations that all may match m/ paths, two levels deep: the search ends
    (found or a typed bound) within seconds, and the top-level release is found."""
    r = MemRepo()
    r.add_target("targets", "m/m-1.0.0.tar", custom=_mw("1.0.0"))
    r.delegate("targets", "team", paths=["m/*"])
    r.delegate("team", "c", paths=[f"m/a{i}-*" for i in range(2000)])
    r.publish()
    d = r.roles["team"].signed.delegations
    assert d is not None and d.roles is not None
    for j in range(20000):
        d.roles[f"w{j}"] = DelegatedRole(f"w{j}", [], 1, j % 2 == 0, paths=[f"m/w{j}-*"])
    r.publish()
    s, _ = _session(r, tmp_path)
    t0 = time.monotonic()
    cands = s.candidates("m")
    assert time.monotonic() - t0 < 20
    assert "m/m-1.0.0.tar" in [c.target.path for c in cands]


def test_long_role_name_is_metadata_error_naming_it(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.delegate("team", "y" * 129, paths=["m/*"])  # fits a file name, over the cap
    r.publish()
    s, _ = _session(r, tmp_path / "a")
    with pytest.raises(MetadataError, match="y" * 20 + ".*129 characters"):
        s.search("m")
    r2 = MemRepo()
    r2.delegate("targets", "team", paths=["m/*"])
    r2.delegate("team", "%" * 90, paths=["m/*"])  # quoted: 270 bytes, no file name
    r2.publish()
    s, _ = _session(r2, tmp_path / "b")
    with pytest.raises(MetadataError, match="%" * 20):
        s.search("m")


# -- the publisher: halt/resume, withdraw, pin ------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo", tmp_path / "keys", b"unit test passphrase")
    r.init()
    return r


def _bundle(tmp: Path, version: str, seed: int) -> Path:
    model = make_linear_model(tmp / f"c-{version}-{seed}.onnx", seed)
    out = tmp / f"c-{version}-{seed}.tar"
    build_bundle(model, "classifier", version, out, options=BuildOptions())
    return out


def _device_choice(repo: Repository) -> str | None:
    from modelward.updater.install._tuf import _candidate

    cands = [c for f in repo.releases("classifier")
             if (c := _candidate(f, "classifier")) is not None]
    choice = choose_release(cands, "dev-1", "stable")
    return str(choice.release.version) if choice else None


def test_halt_then_resume_of_a_team_pin_is_no_operator_pin(repo: Repository,
                                                           tmp_path: Path) -> None:
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    repo.publish(_bundle(tmp_path, "2.0.0", 2))
    repo.pin("classifier", "2.0.0")
    repo.delegate("cls-team", ["classifier/*"])
    team_sign(repo, "cls-team", _bundle(tmp_path, "3.0.0", 3), pinned=True)
    repo.set_rollout("classifier", "3.0.0", halted=True)
    repo.set_rollout("classifier", "3.0.0", halted=False)
    top = repo.current()[0].targets["classifier/classifier-3.0.0.tar"]
    assert top.custom["modelward"]["pinned"] is False
    assert _device_choice(repo) == "2.0.0"  # the operator's pin still rules


def test_halted_operator_pin_pins_nothing_and_no_team_pin_takes_over() -> None:
    from tests._helpers import R

    op = R("m", SemVer.parse("1.0.0"), pinned=True, halted=True)
    team = R("m", SemVer.parse("0.5.0"), pinned=True, role="team")
    newer = R("m", SemVer.parse("2.0.0"))
    c = choose_release([op, team, newer], "d", "stable")
    assert c is not None and c.release is newer and not c.pinned


def test_team_signed_republish_of_an_operator_withdrawn_release_is_ignored(
    repo: Repository, tmp_path: Path
) -> None:
    """The team key bypasses the publisher and lists the withdrawn version again (same
    path and another): devices still see only the operator's tombstone."""
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    bad = _bundle(tmp_path, "2.0.0", 2)
    repo.publish(bad)
    repo.withdraw("classifier", "2.0.0")
    repo.delegate("cls-team", ["classifier/*"], terminating=False)
    team_sign(repo, "cls-team", bad)
    team_sign(repo, "cls-team", bad, path="classifier/again-2.0.0.tar")
    assert _device_choice(repo) == "1.0.0"
    with pytest.raises(RepositoryStateError, match="withdrawn"):
        repo.pin("classifier", "2.0.0")


def test_rekeyed_team_file_is_not_used_but_operator_decisions_work(
    repo: Repository, tmp_path: Path
) -> None:
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    repo.delegate("cls-team", ["classifier/*"])
    team_sign(repo, "cls-team", _bundle(tmp_path, "3.0.0", 3))
    # The operator re-keys the team in the top-level targets; the team's file is now
    # signed by a key that no longer counts.
    from securesystemslib.signer import CryptoSigner

    top, _, _ = repo.current()
    assert top.delegations is not None and top.delegations.roles is not None
    top.revoke_key(top.delegations.roles["cls-team"].keyids[0], "cls-team")
    top.add_key(CryptoSigner.generate_ed25519().public_key, "cls-team")
    repo._commit_targets(top)  # noqa: SLF001
    with pytest.raises(RepositoryStateError, match="cls-team"):
        repo.set_rollout("classifier", "3.0.0", halted=True)
    repo.pin("classifier", "1.0.0")
    assert _device_choice(repo) == "1.0.0"


# -- the caps only ever over-approximate -------------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_capped_class_algebra_still_agrees_with_ngclient(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every cap of the class algebra at 1 (nearly every class approximated), the
    random delegation graphs still give exactly ngclient's answer for each path."""
    import modelward.updater.install._search as search_mod
    from tests.unit.test_i13_attack_search import test_wider_graphs_agree_with_ngclient

    for cap in ("_MAX_ATOMS", "_MAX_UNIONS", "_MAX_CLAIMS"):
        monkeypatch.setattr(search_mod, cap, 1)
    test_wider_graphs_agree_with_ngclient(seed, tmp_path)


def test_delegated_metadata_held_by_one_search_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A team key fans out into many large sub-roles (each under ngclient's per-role
    cap): past the byte bound no further role is fetched, a typed error says so, and
    the operator's top-level release stays."""
    import modelward.updater.install._tuf as tuf_mod

    monkeypatch.setattr(tuf_mod, "MAX_DELEGATED_BYTES", 20_000)
    r = MemRepo()
    r.add_target("targets", "m/m-1.0.0.tar", custom=_mw("1.0.0", pinned=True))
    r.delegate("targets", "team", paths=["m/*"])
    for i in range(20):
        r.delegate("team", f"sub{i}", paths=["m/*"])
        for j in range(30):
            r.add_target(f"sub{i}", f"m/s{i}-{j}.tar", custom=_mw(f"2.{i}.{j}"))
    r.publish()
    s, f = _session(r, tmp_path / "a")
    with pytest.raises(SearchBudgetError, match="not loaded"):
        s.search("m")
    fetched = f.roles_requested()[TOPLEVEL:]
    assert "team" in fetched and len(fetched) < 10, fetched
    s, _ = _session(r, tmp_path / "b")
    choice = choose_release(s.candidates("m"), "dev-1", "stable")
    assert choice is not None and str(choice.release.version) == "1.0.0"
