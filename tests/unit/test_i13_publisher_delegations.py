"""Publisher side of issue 13: multi-level delegations, releases found by TUF's search,
and operator decisions on a team's release (no TPM or network: the repository on disk).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._repo import Repository, TeamMustActError
from modelward.publisher.errors import RepositoryStateError
from modelward.simulator._models import make_linear_model
from modelward.simulator._teams import team_sign

PASS = b"unit test passphrase"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo", tmp_path / "keys", PASS)
    r.init()
    return r


def _bundle(tmp: Path, name: str, version: str, seed: int) -> Path:
    model = make_linear_model(tmp / f"{name}-{version}-{seed}.onnx", seed)
    out = tmp / f"{name}-{version}-{seed}.tar"
    build_bundle(model, name, version, out, options=BuildOptions())
    return out


def _modelward(repo: Repository, name: str) -> dict[str, tuple[str, dict[str, object]]]:
    return {str(f.target.custom["modelward"]["version"]): (f.role, f.target.custom["modelward"])
            for f in repo.releases(name)}


def test_nested_delegation_and_publish_through_it(repo: Repository, tmp_path: Path) -> None:
    repo.delegate("vision", ["detector/*"], terminating=False)
    repo.delegate("edge", ["detector/detector-1*"], parent="vision")
    repo.publish(_bundle(tmp_path, "detector", "1.0.0", 1), role="edge")
    with pytest.raises(RepositoryStateError, match="outside the paths delegated to 'edge'"):
        repo.publish(_bundle(tmp_path, "detector", "2.0.0", 2), role="edge")
    repo.publish(_bundle(tmp_path, "detector", "2.0.0", 2), role="vision")
    assert {v: role for v, (role, _) in _modelward(repo, "detector").items()} == {
        "1.0.0": "edge", "2.0.0": "vision"}


def test_publish_into_a_role_hidden_by_a_terminating_sibling_names_the_winner(
    repo: Repository, tmp_path: Path
) -> None:
    repo.delegate("first", ["m/*"], terminating=True)
    repo.delegate("second", ["m/*"])
    with pytest.raises(RepositoryStateError,
                       match=r"through targets, first\) would take it in none"):
        repo.publish(_bundle(tmp_path, "m", "1.0.0", 1), role="second")
    assert not list(repo.targets_dir.rglob("*m-1.0.0*"))  # nothing was served


def test_operator_decisions_on_a_team_release_go_top_level(
    repo: Repository, tmp_path: Path
) -> None:
    repo.delegate("vision", ["detector/*"])
    for v, seed in (("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)):
        repo.publish(_bundle(tmp_path, "detector", v, seed), role="vision")
    (repo.keys / "delegated-vision.pem").unlink()  # the team keeps its key elsewhere
    repo.set_rollout("detector", "2.0.0", percent=10.0, halted=True)
    repo.withdraw("detector", "3.0.0")
    repo.pin("detector", "1.0.0")
    rel = _modelward(repo, "detector")
    assert rel["2.0.0"][0] == "targets" and rel["2.0.0"][1]["rollout"] == {
        "basis_points": 1000, "halted": True}
    assert rel["3.0.0"][0] == "targets" and rel["3.0.0"][1]["withdrawn"] is True
    assert rel["1.0.0"][0] == "targets" and rel["1.0.0"][1]["pinned"] is True
    with pytest.raises(RepositoryStateError, match="not published"):
        repo.withdraw("detector", "3.0.0")
    with pytest.raises(TeamMustActError) as ei:
        repo.publish(_bundle(tmp_path, "detector", "4.0.0", 4), role="vision")
    assert ei.value.role == "vision"
    assert not list(repo.targets_dir.rglob("*detector-4.0.0*"))  # nothing was served


def test_withdraw_of_a_top_level_release_uncovering_a_team_copy(
    repo: Repository, tmp_path: Path
) -> None:
    repo.publish(_bundle(tmp_path, "m", "1.0.0", 1))
    repo.delegate("team", ["m/*"])
    team_sign(repo, "team", _bundle(tmp_path, "m", "1.0.0", 2), path="m/again-1.0.0.tar")
    repo.withdraw("m", "1.0.0")
    rel = [(f.path, f.role, f.target.custom["modelward"].get("withdrawn"))
           for f in repo.releases("m")]
    # Both paths get a top-level tombstone (the operator's own stays: issue 13 attack 10).
    assert rel == [("m/again-1.0.0.tar", "targets", True), ("m/m-1.0.0.tar", "targets", True)]


def test_cli_delegates_from_a_team(repo: Repository, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from modelward.cli import main

    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASS.decode())
    common = ["--repo", str(repo.repo), "--keys", str(repo.keys)]
    assert main(["repo", "delegate", "vision", "--paths", "detector/*", "--non-terminating",
                 *common]) == 0
    assert main(["repo", "delegate", "edge", "--paths", "detector/e-*", "--parent", "vision",
                 *common]) == 0
    assert "by 'vision'" in capsys.readouterr().out
    top = repo.current()[0].delegations
    assert top is not None and top.roles is not None and not top.roles["vision"].terminating
    vision = repo._role_md("vision").signed.delegations  # noqa: SLF001
    assert vision is not None and vision.roles is not None
    assert vision.roles["edge"].paths == ["detector/e-*"] and vision.roles["edge"].terminating
