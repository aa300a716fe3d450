"""Leftovers of issue 14 on one machine (publisher/_history.py): the served history gives
floors, never content.

- A careless operator restores KEYS from a backup taken before a withdraw and the newer
  targets are gone from metadata/ (pruned, or a partial restore): the next change is
  refused, naming the missing file, never built on the backup's older targets (the
  withdrawn release would come back under the targets key).
- A snapshot the snapshot keys signed (the online host; an old or altered copy put back)
  names a team role at a version, length or hash of its own: the next snapshot's entry is
  computed from the team's verified file, and a team publish is numbered above the
  version the snapshot lists (else devices keep asking for a file that does not exist).

Each ends with stock python-tuf following the repository.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from tuf.api.metadata import MetaFile, Snapshot, Timestamp

from modelward.publisher._history import LostTargetsError
from modelward.publisher._repo import Repository
from tests.unit.test_i14_offline_base import (
    NEW,
    OLD,
    online_keys,
    point_snapshot_at,
    sign_write,
    single,
    withdrawn,
)
from tests.unit.test_i14_online import Layout, stock_client_refresh

TEAM_NEW = "classifier/classifier-1.2.0.tar"


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def _files(lay: Layout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (lay.repo_dir / "metadata").iterdir()
            if p.is_file()}


@pytest.mark.parametrize("snapshot", ["kept", "rolled-back"])
def test_old_keys_backup_and_pruned_targets_never_undo_a_withdraw(
        lay: Layout, tmp_path: Path, snapshot: str) -> None:
    """KEYS from before the withdraw (head v2), 3.targets.json (the withdraw) removed; the
    served snapshot names v3, or was rolled back to v2 while 3.snapshot.json still names
    v3. Before: targets v3 re-signed from v2 (the withdrawn 1.0.0 live again)."""
    single(lay).publish(lay.bundle("1.0.0"))  # targets v2
    backup = tmp_path / "keys-backup"
    shutil.copytree(lay.keys, backup)
    single(lay).withdraw("classifier", "1.0.0")  # targets v3
    kept = (lay.repo_dir / "metadata" / "3.targets.json").read_bytes()
    (lay.repo_dir / "metadata" / "3.targets.json").unlink()
    shutil.rmtree(lay.keys)
    shutil.copytree(backup, lay.keys)
    if snapshot == "rolled-back":
        point_snapshot_at(lay, MetaFile(version=2))
    before = _files(lay)
    bundle = lay.bundle("1.1.0")
    with pytest.raises(LostTargetsError, match="3.targets.json is missing") as e:
        single(lay).publish(bundle)
    assert e.value.path.name == "3.targets.json"
    assert e.value.named_by.name == "3.snapshot.json" and "put 3.targets.json back" in e.value.hint
    assert _files(lay) == before
    assert not list((lay.repo_dir / "targets").glob("classifier/*1.1.0*"))
    # put back (e.g. from a device's trusted copy): the next publish keeps the withdraw
    (lay.repo_dir / "metadata" / "3.targets.json").write_bytes(kept)
    assert single(lay).publish(bundle).targets_version == 4
    assert withdrawn(lay, "4.targets.json")
    client = stock_client_refresh(lay, tmp_path)
    info = client.get_targetinfo(OLD)
    assert info is not None and info.custom["modelward"]["withdrawn"]
    assert client.get_targetinfo(NEW) is not None


def test_old_keys_backup_in_the_plain_layout_is_refused_too(tmp_path: Path) -> None:
    """No online directory: the KEYS floor (published.json) of the backup is old too; the
    served snapshot is the evidence."""
    from tests.unit.test_i14_online import OFFLINE

    def repo() -> Repository:
        return Repository(tmp_path / "repo", tmp_path / "keys", OFFLINE)

    repo().init()
    lay = Layout.__new__(Layout)
    lay.tmp, lay.n = tmp_path, 0
    repo().publish(lay.bundle("1.0.0"))
    shutil.copytree(tmp_path / "keys", tmp_path / "backup")
    repo().withdraw("classifier", "1.0.0")
    (tmp_path / "repo" / "metadata" / "3.targets.json").unlink()
    shutil.rmtree(tmp_path / "keys")
    shutil.copytree(tmp_path / "backup", tmp_path / "keys")
    with pytest.raises(LostTargetsError, match="3.targets.json"):
        repo().publish(lay.bundle("1.1.0"))
    with pytest.raises(LostTargetsError):
        repo().withdraw("classifier", "1.0.0")


def test_online_host_forging_a_newer_targets_file_still_does_not_block(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A present-but-forged targets file is no lost history: built on, with a warning (the
    online host must not stop offline publishing by planting one)."""
    from tests.unit.test_i14_offline_base import forged_targets

    single(lay).publish(lay.bundle("1.0.0"))
    forged_targets(lay, 3, "2.targets.json")
    point_snapshot_at(lay, MetaFile(version=3))
    with caplog.at_level(logging.WARNING):
        assert single(lay).publish(lay.bundle("1.1.0")).targets_version == 3
    assert "is not what this tool signed" in caplog.text
    stock_client_refresh(lay, tmp_path)


# --- delegated roles ---------------------------------------------------------------------


def _team(lay: Layout) -> None:
    single(lay).delegate("team-a", ["classifier/*"])  # targets v2, team-a v1
    single(lay).publish(lay.bundle("1.0.0"), role="team-a")  # team-a v2


def _snapshot_listing(lay: Layout, entry: MetaFile) -> str:
    """The holder of the snapshot and timestamp keys signs a snapshot whose team-a entry is
    ``entry`` (all else as served)."""
    snap_key, ts_key = online_keys(lay)
    ts = lay.md("timestamp.json").signed
    old = lay.md(f"{ts.snapshot_meta.version}.snapshot.json").signed
    v = old.version + 1
    sign_write(lay, Snapshot(version=v, expires=old.expires,
                             meta={**old.meta, "team-a.json": entry}),
               f"{v}.snapshot.json", snap_key)
    sign_write(lay, Timestamp(version=ts.version + 1, expires=old.expires,
                              snapshot_meta=MetaFile(version=v)), "timestamp.json", ts_key)
    return f"{v}.snapshot.json"


def test_team_entry_with_a_forged_hash_is_recomputed_from_the_verified_file(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the next snapshot copied length 5 / hash 00.. for team-a v2 from the served
    one, and every device dropped team-a's releases for good."""
    _team(lay)
    name = _snapshot_listing(lay, MetaFile(version=2, length=5, hashes={"sha256": "00" * 32}))
    with caplog.at_level(logging.WARNING, "modelward.publisher._history"):
        single(lay).publish(lay.bundle("1.1.0"))
    assert f"{name} lists team-a.json v2 with a length or hash other than" in caplog.text
    data = (lay.repo_dir / "metadata" / "2.team-a.json").read_bytes()
    ts = lay.md("timestamp.json").signed
    entry = lay.md(f"{ts.snapshot_meta.version}.snapshot.json").signed.meta["team-a.json"]
    assert (entry.version, entry.length) == (2, len(data))
    client = stock_client_refresh(lay, tmp_path)
    assert client.get_targetinfo(OLD) is not None  # team-a's release, through team-a
    assert client.get_targetinfo(NEW) is not None


@pytest.mark.parametrize("how", ["jumped", "team-file-removed"])
def test_team_publish_after_a_version_jump_is_numbered_above_it(
        lay: Layout, tmp_path: Path, how: str) -> None:
    """The snapshot lists team-a v999 (signed by the snapshot key), or 2.team-a.json is
    removed (listed v2, newest verified v1). Before: the team's publish wrote v3 (v2: a
    second, different v2), the snapshot kept v999 and stock python-tuf found no team-a
    (999.team-a.json missing)."""
    _team(lay)
    if how == "jumped":
        _snapshot_listing(lay, MetaFile(version=999))
        want = 1000
    else:
        (lay.repo_dir / "metadata" / "2.team-a.json").unlink()
        want = 3
    single(lay).publish(lay.bundle("1.2.0"), role="team-a")
    assert (lay.repo_dir / "metadata" / f"{want}.team-a.json").is_file()
    assert lay.snapshot_meta()["team-a.json"] == want
    client = stock_client_refresh(lay, tmp_path)
    assert client.get_targetinfo(TEAM_NEW) is not None


def test_sub_delegation_after_a_version_jump_is_numbered_above_it(
        lay: Layout, tmp_path: Path) -> None:
    """A team delegating on (its own role re-signed) after the jump: above it too."""
    _team(lay)
    _snapshot_listing(lay, MetaFile(version=50))
    single(lay).delegate("team-b", ["classifier/classifier-2*"], parent="team-a")
    assert lay.snapshot_meta()["team-a.json"] == 51
    assert lay.snapshot_meta()["team-b.json"] == 1
    stock_client_refresh(lay, tmp_path)


@pytest.mark.parametrize("how", ["forged-999", "missing-head-copy"])
def test_team_publish_after_a_top_level_version_jump_signs_the_targets_anew(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """The served snapshot names top-level targets v999 (a forged file): the next
    top-level targets are numbered v999, a version no signed file has yet. Before: the
    team's publish listed that version anyway and failed ("998.targets.json is missing")
    until the operator published once, leaving an unlisted team file behind."""
    from tests.unit.test_i14_offline_base import forged_targets

    _team(lay)  # targets v2, team-a v2
    forged_targets(lay, 999, "2.targets.json")
    point_snapshot_at(lay, MetaFile(version=999))
    with caplog.at_level(logging.WARNING):
        single(lay).publish(lay.bundle("1.2.0"), role="team-a")
    assert "signed anew, as v999" in caplog.text
    assert lay.snapshot_meta() == {"targets.json": 999, "team-a.json": 3}
    client = stock_client_refresh(lay, tmp_path)
    assert client.get_targetinfo(TEAM_NEW) is not None
    assert client.get_targetinfo(OLD) is not None
    if how == "missing-head-copy":  # and a sub-delegation right after another jump
        forged_targets(lay, 2000, "999.targets.json")
        point_snapshot_at(lay, MetaFile(version=2000), version=600)
        single(lay).delegate("team-b", ["classifier/classifier-2*"], parent="team-a")
        assert lay.snapshot_meta()["targets.json"] == 2000
        stock_client_refresh(lay, tmp_path)


def test_team_publish_with_another_teams_key_is_refused_before_anything_is_written(
        lay: Layout, tmp_path: Path) -> None:
    """KEYS/delegated-team-a.pem replaced by team-b's key (a wrong file restored, two
    teams' keys mixed up). Before: exit 0, a 3.team-a.json no delegator accepts, the
    snapshot still listing v2: the release was never seen by any device, and nothing said
    so."""
    from modelward.publisher._history import TeamKeyNotTrustedError

    _team(lay)
    single(lay).delegate("team-b", ["detector/*"])
    shutil.copyfile(lay.keys / "delegated-team-b.pem", lay.keys / "delegated-team-a.pem")
    before = _files(lay)
    with pytest.raises(TeamKeyNotTrustedError, match="delegated-team-a.pem") as e:
        single(lay).publish(lay.bundle("1.2.0"), role="team-a")
    assert e.value.role == "team-a" and "'targets' does not accept" in str(e.value)
    assert _files(lay) == before
    stock_client_refresh(lay, tmp_path)


def test_a_snapshot_not_signed_by_the_newest_roots_snapshot_keys_is_no_evidence(
        lay: Layout) -> None:
    """A planted 400.snapshot.json naming targets v9 (9.targets.json absent), signed by a
    key that is not a snapshot key of the newest root (a rotated-out online key, here the
    targets key): no lost history, the publish goes on."""
    from modelward.publisher._keys import load_signer_at
    from tests.unit.test_i14_online import OFFLINE

    single(lay).publish(lay.bundle("1.0.0"))
    other = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    exp = lay.md("2.targets.json").signed.expires
    sign_write(lay, Snapshot(version=400, expires=exp,
                             meta={"targets.json": MetaFile(version=9)}),
               "400.snapshot.json", other)
    assert single(lay).publish(lay.bundle("1.1.0")).targets_version == 3


def test_team_role_listed_beyond_the_json_bound_is_a_typed_error(lay: Layout) -> None:
    from modelward.publisher.errors import RepositoryStateError

    _team(lay)
    _snapshot_listing(lay, MetaFile(version=2**53 - 1))
    before = _files(lay)
    with pytest.raises(RepositoryStateError, match="no version above it can be published"):
        single(lay).publish(lay.bundle("1.2.0"), role="team-a")
    assert _files(lay) == before
