"""Attacks on ``repo sync`` (issue 17): what a careless operator, a team key holder or the
destination's storage could make it upload, and in which order.

Every prefix of a sync's writes is a state devices may see (a kill, a network error, a
device polling meanwhile): each one must verify as a stock TUF client verifies it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelward.publisher import _sync
from modelward.publisher._sync_dest import DirDestination
from modelward.publisher._tufcheck import check_state
from tests.conftest import _new_repo


class Killed(Exception):
    """Stands in for the sync's death after its n-th write."""


def _reader(www: Path) -> Callable[[str], bytes | None]:
    def read(name: str) -> bytes | None:
        p = www / "metadata" / name
        return p.read_bytes() if p.is_file() else None
    return read


def _verifies(www: Path) -> None:
    """A device provisioned with 1.root.json accepts what ``www`` serves (raises if not)."""
    check_state(_reader(www), datetime.now(UTC))


def _sync_dir(repo_dir: Path, www: Path, kill_after: int | None = None) -> _sync.SyncResult:
    dest = DirDestination(www)
    plan = _sync.plan(repo_dir, dest, _sync.SyncConfig())

    def after(n: int, _up: _sync.Upload) -> None:
        if kill_after is not None and n >= kill_after:
            raise Killed

    return _sync.run(plan, dest, after)


def test_a_sync_killed_anywhere_during_a_key_rotation_leaves_a_state_devices_verify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_dir, _keys, _builds, repo, _root = _new_repo(tmp_path, monkeypatch)
    www = tmp_path / "www"
    _sync_dir(repo_dir, www)
    _verifies(www)
    old = tmp_path / "www-old"
    shutil.copytree(www, old)

    repo.rotate("timestamp")  # root 2 re-keys the timestamp; timestamp by both keys
    dest = DirDestination(www)
    n = len(_sync.plan(repo_dir, dest, _sync.SyncConfig()).uploads)
    assert n >= 3  # 2.snapshot.json, 2.root.json, timestamp.json
    for k in range(1, n):
        shutil.rmtree(www)
        shutil.copytree(old, www)
        with pytest.raises(Killed):
            _sync_dir(repo_dir, www, kill_after=k)
        _verifies(www)  # after k of n writes: the old state or the new, both verify
    _sync_dir(repo_dir, www)
    _verifies(www)
    assert (www / "metadata" / "2.root.json").read_bytes() == \
        (repo_dir / "metadata" / "2.root.json").read_bytes()


def test_a_root_change_landing_while_the_sync_reads_is_not_half_uploaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_dir, _keys, _builds, repo, _root = _new_repo(tmp_path, monkeypatch)
    www = tmp_path / "www"
    _sync_dir(repo_dir, www)
    capture = _sync._capture
    rotated: list[int] = []

    def capture_then_rotate(path: Path) -> bytes:
        data = capture(path)
        if path.name == "timestamp.json" and not rotated:
            rotated.append(repo.rotate("timestamp"))  # the operator's rotation, meanwhile
        return data

    monkeypatch.setattr(_sync, "_capture", capture_then_rotate)
    _sync_dir(repo_dir, www)
    assert rotated == [2]
    _verifies(www)  # the sync finished: what it left must verify
    monkeypatch.setattr(_sync, "_capture", capture)
    _sync_dir(repo_dir, www)  # the next sync brings the rotation
    _verifies(www)
    assert (www / "metadata" / "2.root.json").is_file()


def test_a_root_whose_keys_do_not_verify_the_timestamp_is_refused_and_nothing_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelward.publisher.errors import SyncSourceError

    repo_dir, _keys, _builds, repo, _root = _new_repo(tmp_path, monkeypatch)
    www = tmp_path / "www"
    _sync_dir(repo_dir, www)
    before = sorted((p.relative_to(www).as_posix(), p.read_bytes()) for p in www.rglob("*")
                    if p.is_file())
    old = tmp_path / "old-metadata"
    shutil.copytree(repo_dir / "metadata", old)
    repo.rotate("timestamp")
    # a root change half-written: root 2 is there, the timestamp still the old key's alone
    new_root = (repo_dir / "metadata" / "2.root.json").read_bytes()
    shutil.rmtree(repo_dir / "metadata")
    shutil.copytree(old, repo_dir / "metadata")
    (repo_dir / "metadata" / "2.root.json").write_bytes(new_root)
    with pytest.raises(SyncSourceError, match=r"2\.root\.json.*do not verify"):
        _sync_dir(repo_dir, www)
    assert sorted((p.relative_to(www).as_posix(), p.read_bytes()) for p in www.rglob("*")
                  if p.is_file()) == before


def _files(www: Path) -> list[tuple[str, bytes]]:
    return sorted((p.relative_to(www).as_posix(), p.read_bytes()) for p in www.rglob("*")
                  if p.is_file())


def test_syncing_another_repository_over_the_destination_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The careless operator's wrong ``--repo`` (a staging repository, one made anew):
    its ``1.root.json`` and ``timestamp.json`` would replace production's, and every device
    would refuse the origin from then on."""
    from modelward.publisher.errors import SyncDestinationError

    (tmp_path / "prod").mkdir()
    (tmp_path / "staging").mkdir()
    prod, *_ = _new_repo(tmp_path / "prod", monkeypatch)
    staging, *_ = _new_repo(tmp_path / "staging", monkeypatch)
    www = tmp_path / "www"
    _sync_dir(prod, www)
    before = _files(www)
    with pytest.raises(SyncDestinationError, match=r"metadata/1\.[a-z]+\.json"):
        _sync_dir(staging, www)
    assert _files(www) == before
    _verifies(www)


def test_syncing_an_older_copy_of_the_repository_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository restored from a backup (or an old checkout): its timestamp is older
    than the one devices hold, so all of them would refuse the origin (a rollback)."""
    from modelward.publisher.errors import SyncDestinationError

    repo_dir, _keys, _builds, repo, _root = _new_repo(tmp_path, monkeypatch)
    backup = tmp_path / "backup"
    shutil.copytree(repo_dir, backup)
    repo.refresh()
    repo.refresh()
    www = tmp_path / "www"
    _sync_dir(repo_dir, www)
    before = _files(www)
    with pytest.raises(SyncDestinationError, match=r"timestamp\.json.*older"):
        _sync_dir(backup, www)
    assert _files(www) == before
    # a timestamp there that the repository's keys never signed is no reason to refuse
    ts = www / "metadata" / "timestamp.json"
    planted = ts.read_bytes().replace(b'"version": 3', b'"version": 99')
    assert planted != ts.read_bytes()
    ts.write_bytes(planted)
    _sync_dir(repo_dir, www)
    assert ts.read_bytes() == (repo_dir / "metadata" / "timestamp.json").read_bytes()
