"""Outside attack review of ``repo rollout/pin/withdraw`` over delegated roles (issue 13).

``xfail(strict=True)``: the attack WORKS today (the assertions say what should happen);
unmarked: refused. The repository on disk, no TPM or network.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import DelegatedRole, Delegations, TargetFile
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._repo import Repository
from modelward.publisher.errors import RepositoryStateError
from modelward.simulator._models import make_linear_model

PASS = b"unit test passphrase"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo", tmp_path / "keys", PASS)
    r.init()
    return r


def _bundle(tmp: Path, version: str, seed: int, name: str = "classifier") -> Path:
    model = make_linear_model(tmp / f"{name}-{version}-{seed}.onnx", seed)
    out = tmp / f"{name}-{version}-{seed}.tar"
    build_bundle(model, name, version, out, options=BuildOptions())
    return out


def _team_resigns(repo: Repository, role: str, edit: object) -> None:
    """The team's key signs a new version of its role after ``edit(targets)``."""
    md = repo._role_md(role)  # noqa: SLF001 - attacker tooling
    edit(md.signed)  # type: ignore[operator]
    md.signed.version += 1
    repo._write_delegated(md, role, repo.keys / f"delegated-{role}.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001


@pytest.mark.parametrize("action", ["pin", "halt", "withdraw"])
def test_attack_team_ghost_subrole_blocks_operator_decisions(
    repo: Repository, tmp_path: Path, action: str
) -> None:
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    repo.publish(_bundle(tmp_path, "2.0.0", 2))
    repo.delegate("cls-team", ["classifier/*"], terminating=False)

    def ghost(t: object) -> None:
        k = CryptoSigner.generate_ed25519().public_key
        t.delegations = Delegations(  # type: ignore[attr-defined]
            keys={k.keyid: k},
            roles={"ghost": DelegatedRole("ghost", [k.keyid], 1, False,
                                          paths=["classifier/*"])})

    _team_resigns(repo, "cls-team", ghost)
    if action == "pin":
        repo.pin("classifier", "1.0.0")
    elif action == "halt":
        repo.set_rollout("classifier", "2.0.0", halted=True)
    else:
        repo.withdraw("classifier", "2.0.0")


def test_attack_unverified_team_file_is_laundered_into_top_level(
    repo: Repository, tmp_path: Path
) -> None:
    repo.delegate("cls-team", ["classifier/*"])
    repo.publish(_bundle(tmp_path, "3.0.0", 3), role="cls-team")
    # A file in the served directory that the team's key never signed (a stray upload,
    # or metadata signed with a key the operator since replaced): same release, evil bytes.
    md = repo._role_md("cls-team")  # noqa: SLF001
    evil = _bundle(tmp_path, "3.0.0", 66)
    path = "classifier/classifier-3.0.0.tar"
    custom = md.signed.targets[path].custom
    tf = TargetFile.from_file(path, str(evil), ["sha256"])
    tf.unrecognized_fields["custom"] = custom
    md.signed.targets[path] = tf
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    (repo.metadata_dir / f"{md.signed.version}.cls-team.json").write_bytes(
        md.to_bytes(JSONSerializer()))
    # The file is never used (modelward.publisher._served): the decision, refused or made, is about
    # the team's verified entry only.
    with contextlib.suppress(RepositoryStateError):
        repo.set_rollout("classifier", "3.0.0", percent=50)
    top, _, _ = repo.current()
    assert path not in top.targets or top.targets[path].hashes != tf.hashes


def test_attack_team_republishes_an_operator_withdrawn_release(
    repo: Repository, tmp_path: Path
) -> None:
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    bad = _bundle(tmp_path, "2.0.0", 2)
    repo.publish(bad)
    repo.withdraw("classifier", "2.0.0")
    repo.delegate("cls-team", ["classifier/*"])
    with pytest.raises(RepositoryStateError, match="withdrawn"):
        repo.publish(bad, role="cls-team")


def test_team_cannot_make_pin_act_on_another_models_release(
    repo: Repository, tmp_path: Path
) -> None:
    """The detector team lists, under its own paths and in its sub-role, entries naming
    the classifier: `rollout pin classifier` never sees them."""
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    repo.delegate("vision", ["detector/*"], terminating=False)
    fake = _bundle(tmp_path, "9.0.0", 9)

    def lie(t: object) -> None:
        for p in ("detector/classifier-9.0.0.tar", "classifier/classifier-9.0.0.tar"):
            tf = TargetFile.from_file(p, str(fake), ["sha256"])
            tf.unrecognized_fields["custom"] = {"modelward": {
                "name": "classifier", "version": "9.0.0", "fingerprint": "0" * 64}}
            t.targets[p] = tf  # type: ignore[attr-defined]

    _team_resigns(repo, "vision", lie)
    with pytest.raises(RepositoryStateError, match="not published"):
        repo.pin("classifier", "9.0.0")
    assert [f.path for f in repo.releases("classifier")] == [
        "classifier/classifier-1.0.0.tar"]


def _device_choice(repo: Repository) -> str | None:
    """What a classifier device on `stable` picks from the repository's current view."""
    from modelward.updater.install._tuf import _candidate
    from modelward.updater.rollout import choose_release

    cands = [c for f in repo.releases("classifier")
             if (c := _candidate(f, "classifier")) is not None]
    choice = choose_release(cands, "dev-1", "stable")
    return str(choice.release.version) if choice else None


@pytest.mark.parametrize("operator_pin", [True, False])
def test_attack_halting_a_team_pin_turns_it_into_an_operator_pin(
    repo: Repository, tmp_path: Path, operator_pin: bool
) -> None:
    from modelward.simulator._teams import team_sign

    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    repo.publish(_bundle(tmp_path, "2.0.0", 2))
    if operator_pin:
        repo.pin("classifier", "2.0.0")
    repo.delegate("cls-team", ["classifier/*"])
    team_sign(repo, "cls-team", _bundle(tmp_path, "3.0.0", 3), pinned=True)
    before = _device_choice(repo)
    assert before == ("2.0.0" if operator_pin else "3.0.0")
    repo.set_rollout("classifier", "3.0.0", halted=True)  # the operator stops 3.0.0
    assert _device_choice(repo) != "3.0.0"


def test_attack_pin_of_an_ambiguous_version(repo: Repository, tmp_path: Path) -> None:
    from modelward.simulator._teams import team_sign

    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    repo.delegate("cls-team", ["classifier/*"])
    team_sign(repo, "cls-team", _bundle(tmp_path, "3.0.0", 3))  # the one reviewed
    team_sign(repo, "cls-team", _bundle(tmp_path, "3.0.0", 66),
              path="classifier/a-classifier-3.0.0.tar")  # its twin, sorting first
    with pytest.raises(RepositoryStateError, match="a-classifier-3.0.0.tar"):
        repo.pin("classifier", "3.0.0")
