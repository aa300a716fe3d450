"""Root changes in the two-machine layout (issue 14, open point 1): the offline side
stages root N+1, the online refresh publishes it with its snapshot and timestamp
(publisher/_rootstage.py). A stock client must succeed at every instant, including a
client that walked the root chain before one of the refresh's writes and fetched the rest
after it; the careless operator and the online host are tried against it.
tests/integration/test_i14_rotation_two_machine.py runs a real device through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization.json import JSONSerializer

import modelward.publisher._online as online_mod
from modelward.publisher._keys import generate_key_at, load_signer_at
from modelward.publisher._online import attach
from modelward.publisher._repo import Repository
from modelward.publisher._rootflow import RootNotPublishableError
from modelward.publisher._rootstage import STAGE_DIR, StagedRootError
from modelward.publisher._served import read_file
from modelward.publisher._tufcheck import check_state
from modelward.publisher.errors import RepositoryStateError
from tests._stock_tuf import stock_refresh
from tests.unit.test_i14_online import OFFLINE, Layout, _pw

MD = "metadata"


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def _files(lay: Layout) -> dict[str, bytes]:
    d = lay.repo_dir / MD
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _keyids(md: Metadata[Any]) -> set[str]:
    return set(md.signatures)


def _root(lay: Layout, v: int) -> Root:
    r: Root = lay.md(f"{v}.root.json").signed
    return r


def _staged(lay: Layout) -> Path:
    return lay.repo_dir / MD / STAGE_DIR / "2.root.json"


def _mixed_ok(states: list[dict[str, bytes]], now: Any) -> None:
    """For every pair of instants k <= j of the refresh's writes: a client that fetched
    the root chain at k and timestamp, snapshot, targets at j accepts them (stock TUF)."""
    for k, roots in enumerate(states):
        for rest in states[k:]:
            def read(name: str, roots: dict[str, bytes] = roots,
                     rest: dict[str, bytes] = rest) -> bytes | None:
                return (roots if name.endswith(".root.json") else rest).get(name)
            check_state(read, now)


def test_every_instant_of_the_refresh_is_consistent_for_a_client(
        lay: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    before = _files(lay)
    lay.offline.rotate("targets")
    assert not (lay.repo_dir / MD / "2.root.json").exists()  # staged, not published
    assert _staged(lay).is_file()
    assert stock_refresh(lay.repo_dir) == 1
    states = [_files(lay)]
    assert {k for k in before if k.endswith(".root.json")} == \
        {k for k in states[0] if k.endswith(".root.json")}
    real = online_mod.write_atomic

    def record(path: Path, data: bytes, **kw: Any) -> None:
        real(path, data, **kw)
        if path.parent == lay.repo_dir / MD:
            states.append(_files(lay))

    monkeypatch.setattr(online_mod, "write_atomic", record)
    assert lay.online().refresh() == ["root", "snapshot", "timestamp"]
    names = [next(n for n in b if n not in a or a[n] != b[n])
             for a, b in zip(states, states[1:], strict=False)]
    assert names[-1] == "2.root.json"  # the root last, after snapshot and timestamp
    _mixed_ok(states, lay.offline._clock())  # noqa: SLF001
    assert stock_refresh(lay.repo_dir) == 2
    new_targets = _root(lay, 2).roles["targets"].keyids
    old_targets = _root(lay, 1).roles["targets"].keyids
    listed = lay.snapshot_meta()["targets.json"]
    assert _keyids(lay.md(f"{listed}.targets.json")) >= set(new_targets) | set(old_targets)


def test_after_the_refresh_the_retired_key_signs_nothing(lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    old = set(_root(lay, 1).roles["targets"].keyids)
    lay.offline.rotate("targets")
    lay.online().refresh()
    r = lay.offline.publish(lay.bundle("1.1.0"))
    md = lay.md(f"{r.targets_version}.targets.json")
    assert not _keyids(md) & old  # the retired key no longer signs
    assert not (lay.keys / STAGE_DIR / "2.root.json").exists()
    assert not _staged(lay).exists()
    assert list((lay.keys / "retired").glob("targets-*.pem"))
    assert json.loads((lay.keys / "trusted-root.json").read_text())["signed"]["version"] == 2
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 2
    assert lay.snapshot_meta()["targets.json"] == r.targets_version


# --- the careless operator -----------------------------------------------------------------


def test_refresh_run_twice_publishes_the_root_once(lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    assert lay.online().refresh()[0] == "root"
    assert lay.online().refresh() == ["timestamp"]
    assert stock_refresh(lay.repo_dir) == 2


def test_second_rotation_before_the_refresh_is_refused_and_changes_nothing(
        lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    before = _files(lay)
    staged = _staged(lay).read_bytes()
    for change in (lambda: lay.offline.rotate("targets"), lambda: lay.offline.rotate("root"),
                   lambda: lay.offline.add_key(
                       "targets", "envvar:X", CryptoSigner.generate_ed25519().public_key)):
        with pytest.raises(StagedRootError, match="root v2 is staged"):
            change()
    assert _files(lay) == before and _staged(lay).read_bytes() == staged
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 2
    assert lay.offline.rotate("targets") == 3  # after the refresh: the next one goes
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 3


def test_release_added_before_the_refresh_is_signed_by_both_keys(lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    lay.offline.rotate("targets")
    r = lay.offline.publish(lay.bundle("1.1.0"))
    md = lay.md(f"{r.targets_version}.targets.json")
    _root(lay, 1).verify_delegate("targets", md.signed_bytes, md.signatures)
    staged = Metadata[Root].from_bytes(_staged(lay).read_bytes()).signed
    staged.verify_delegate("targets", md.signed_bytes, md.signatures)
    assert stock_refresh(lay.repo_dir) == 1
    assert lay.online().refresh() == ["root", "snapshot", "timestamp"]
    assert stock_refresh(lay.repo_dir) == 2
    assert lay.snapshot_meta()["targets.json"] == r.targets_version


def test_root_threshold_2_parks_then_stages_then_publishes(tmp_path: Path) -> None:
    repo_dir, keys, online = tmp_path / "repo", tmp_path / "keys", tmp_path / "online"
    attach(Repository(repo_dir, keys, OFFLINE), online, _pw).init({"root": 2}, {"root": 2})
    offline = Repository(repo_dir, keys, OFFLINE)
    with pytest.raises(RootNotPublishableError):
        offline.rotate("targets")
    assert not (repo_dir / MD / STAGE_DIR / "2.root.json").exists()
    offline.sign_pending("root", "encfile:root-2.pem")
    assert (repo_dir / MD / STAGE_DIR / "2.root.json").is_file()
    assert stock_refresh(repo_dir) == 1
    attach(Repository(repo_dir, online, b""), online, _pw).refresh()
    assert stock_refresh(repo_dir) == 2


def test_threshold_change_of_targets_is_staged_and_signed_by_both_sets(lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    key = generate_key_at(lay.keys / "targets-2.pem", lambda _r: OFFLINE, "targets")
    assert lay.offline.add_key("targets", "encfile:targets-2.pem", key, threshold=2) == 2
    assert stock_refresh(lay.repo_dir) == 1
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 2
    listed = lay.md(f"{lay.snapshot_meta()['targets.json']}.targets.json")
    _root(lay, 2).verify_delegate("targets", listed.signed_bytes, listed.signatures)


def test_crash_before_the_copy_for_the_online_host_is_resumed(
        lay: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.publisher._rootstage as stage_mod

    lay.offline.publish(lay.bundle("1.0.0"))
    real = stage_mod._real_dir  # noqa: SLF001

    def crash(path: Path, mode: int = 0o700) -> Path:
        if path.parent.name == MD:
            raise KeyboardInterrupt
        return real(path, mode)

    monkeypatch.setattr(stage_mod, "_real_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        lay.offline.rotate("targets")
    monkeypatch.setattr(stage_mod, "_real_dir", real)
    assert lay.online().refresh() == ["snapshot", "timestamp"]  # nothing staged yet
    assert stock_refresh(lay.repo_dir) == 1
    with pytest.raises(StagedRootError):  # the retry completes the stage, then says so
        lay.offline.rotate("targets")
    assert lay.online().refresh()[0] == "root"
    assert stock_refresh(lay.repo_dir) == 2


# --- the online host -----------------------------------------------------------------------


def _rewrite_staged(lay: Layout, edit: Any, signer: CryptoSigner | None = None) -> None:
    md = Metadata[Root].from_bytes(_staged(lay).read_bytes())
    edit(md.signed)
    if signer is not None:
        md.signatures.clear()
        md.sign(signer)
    _staged(lay).write_bytes(md.to_bytes(JSONSerializer()))


@pytest.mark.parametrize("how", ["edited", "self-signed", "next-but-one"])
def test_online_host_cannot_publish_a_root_the_offline_keys_did_not_sign(
        lay: Layout, how: str, caplog: pytest.LogCaptureFixture) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    evil = CryptoSigner.generate_ed25519()

    def add_evil(root: Root) -> None:
        root.add_key(evil.public_key, "targets")
        if how == "self-signed":
            for k in list(root.roles["root"].keyids):
                root.revoke_key(k, "root")
            root.add_key(evil.public_key, "root")
        if how == "next-but-one":
            root.version = 3

    _rewrite_staged(lay, add_evil, evil if how != "edited" else None)
    with caplog.at_level(logging.WARNING):
        assert lay.online().refresh() == ["snapshot", "timestamp"]  # under root v1
    assert "ignoring the staged root" in caplog.text
    assert not (lay.repo_dir / MD / "2.root.json").exists()
    assert not (lay.repo_dir / MD / "3.root.json").exists()
    assert stock_refresh(lay.repo_dir) == 1


def test_online_host_publishing_the_root_early_strands_no_one_after_a_refresh(
        lay: Layout) -> None:
    """It copies the staged root in place before signing anything: a denial of service it
    could always cause (it may stop signing timestamps); the next refresh mends it."""
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    lay.offline.rotate("targets")
    (lay.repo_dir / MD / "2.root.json").write_bytes(_staged(lay).read_bytes())
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 2
    r = lay.offline.publish(lay.bundle("1.1.0"))  # finishes the rotation offline
    assert not _keyids(lay.md(f"{r.targets_version}.targets.json")) & \
        set(_root(lay, 1).roles["targets"].keyids)


def test_online_host_cannot_keep_the_retired_targets_key_alive(lay: Layout) -> None:
    """After root v2 is published, targets signed by the retired key (leaked to the
    online host) are never listed, and a staged root planted again is ignored."""
    leaked = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    staged = _staged(lay).read_bytes()
    lay.online().refresh()
    lay.offline.publish(lay.bundle("1.1.0"))  # finishes: the staged copies go
    assert not _staged(lay).exists()
    listed = lay.snapshot_meta()["targets.json"]
    t: Targets = lay.md(f"{lay.offline.current()[0].version}.targets.json").signed
    t.version = 50
    forged = Metadata(t)
    forged.sign(leaked)
    lay.write(forged, "50.targets.json")
    _staged(lay).parent.mkdir(exist_ok=True)
    _staged(lay).write_bytes(staged)
    lay.online().refresh()
    assert lay.snapshot_meta()["targets.json"] != 50
    assert lay.snapshot_meta()["targets.json"] >= listed
    assert stock_refresh(lay.repo_dir) == 2
    r = lay.offline.publish(lay.bundle("1.2.0"))
    assert r.targets_version != 50 and not _keyids(
        lay.md(f"{r.targets_version}.targets.json")) & {leaked.public_key.keyid}


def test_targets_not_signed_by_the_new_key_keep_the_root_staged(
        lay: Layout, caplog: pytest.LogCaptureFixture) -> None:
    """The staged root is published only with targets that verify under it too; without
    them the refresh goes on under root v1, says why, and strands no one."""
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    new = set(Metadata[Root].from_bytes(_staged(lay).read_bytes()).signed.roles[
        "targets"].keyids)
    v = lay.offline.current()[0].version
    md = lay.md(f"{v}.targets.json")
    for k in new:
        del md.signatures[k]
    lay.write(md, f"{v}.targets.json")
    with caplog.at_level(logging.WARNING):
        assert lay.online().refresh() == ["snapshot", "timestamp"]
    assert "root v2 is staged but not published" in caplog.text
    assert not (lay.repo_dir / MD / "2.root.json").exists()
    assert stock_refresh(lay.repo_dir) == 1


def test_staged_directory_planted_as_a_symlink_is_not_written_through(
        lay: Layout, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (lay.repo_dir / MD / STAGE_DIR).symlink_to(elsewhere)
    lay.offline.publish(lay.bundle("1.0.0"))
    with pytest.raises(RepositoryStateError, match="not a directory"):
        lay.offline.rotate("targets")
    assert list(elsewhere.iterdir()) == []
    assert stock_refresh(lay.repo_dir) == 1
    assert read_file(lay.repo_dir / MD / "2.root.json") is None


# --- the same order on one machine ------------------------------------------------------------


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_single_machine_rotation_is_consistent_at_every_instant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str) -> None:
    """Without an online host the same order holds: the re-keyed metadata by both roots'
    keys first, N+1.root.json last (before, a device fetching between the root and the
    re-signed role was refused, and a crash there stranded every device)."""
    repo = Repository(tmp_path / "repo", tmp_path / "keys", OFFLINE)
    repo.init()
    states = _record_writes(monkeypatch, repo.metadata_dir)
    assert repo.rotate(role) == 2
    assert len(states) >= 3 and "2.root.json" not in states[-2]
    _mixed_ok(states, repo._clock())  # noqa: SLF001
    assert stock_refresh(repo.repo) == 2
    assert not (repo.keys / STAGE_DIR / "2.root.json").exists()


def test_online_host_hiding_the_published_root_never_brings_the_old_key_back(
        lay: Layout) -> None:
    """Root v2 published and finished offline; the online host then removes 2.root.json
    from the served directory: the offline side refuses (typed), and signs nothing with the
    retired key."""
    lay.offline.publish(lay.bundle("1.0.0"))
    old = set(_root(lay, 1).roles["targets"].keyids)
    lay.offline.rotate("targets")
    lay.online().refresh()
    lay.offline.publish(lay.bundle("1.1.0"))  # finishes: anchored at v2
    (lay.repo_dir / MD / "2.root.json").unlink()
    before = _files(lay)
    with pytest.raises(RepositoryStateError):
        lay.offline.publish(lay.bundle("1.2.0"))
    after = _files(lay)
    for name in set(after) - set(before):
        assert not _keyids(lay.md(name)) & old


def _record_writes(monkeypatch: pytest.MonkeyPatch, d: Path) -> list[dict[str, bytes]]:
    import modelward.publisher._repo as repo_mod
    import modelward.publisher._rootstage as stage_mod

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}

    states = [files()]
    for mod in (repo_mod, stage_mod):
        real = mod.write_atomic

        def record(path: Path, data: bytes, real: Any = real, **kw: Any) -> None:
            real(path, data, **kw)
            if path.parent == d:
                states.append(files())

        monkeypatch.setattr(mod, "write_atomic", record)
    return states


@pytest.mark.parametrize("role", ["snapshot", "timestamp"])
def test_online_key_threshold_change_is_consistent_at_every_instant(
        lay: Layout, monkeypatch: pytest.MonkeyPatch, role: str) -> None:
    """`repo add-key snapshot|timestamp --threshold 2`: refused on the offline machine
    (the key lives in the online directory; nothing written); on a machine with both
    directories, the online role is re-signed by both key sets before N+1.root.json."""
    key = generate_key_at(lay.online_dir / f"{role}-2.pem", _pw, role)
    before = _files(lay)
    with pytest.raises(RepositoryStateError, match="online directory"):
        lay.offline.add_key(role, f"encfile:{role}-2.pem", key, threshold=2)
    assert _files(lay) == before and lay.offline.latest_root_version() == 1
    both = attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)
    states = _record_writes(monkeypatch, lay.repo_dir / MD)
    assert both.add_key(role, f"encfile:{role}-2.pem", key, threshold=2) == 2
    assert "2.root.json" not in states[-2]
    _mixed_ok(states, both._clock())  # noqa: SLF001
    assert stock_refresh(lay.repo_dir) == 2
    monkeypatch.undo()
    lay.online().refresh()  # the online host alone: both keys sign
    assert stock_refresh(lay.repo_dir) == 2


def test_origin_removing_or_blocking_the_staged_copy_stops_nothing(lay: Layout) -> None:
    """The origin deletes metadata/staged/2.root.json: the offline side's next release
    puts it back; it plants a file named ``staged``: offline publishing goes on (warned),
    and the root waits (the operator removes the file; the next release copies it)."""
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    _staged(lay).unlink()
    lay.offline.publish(lay.bundle("1.1.0"))
    assert _staged(lay).is_file()
    _staged(lay).unlink()
    _staged(lay).parent.rmdir()
    _staged(lay).parent.write_bytes(b"")
    r = lay.offline.publish(lay.bundle("1.2.0"))
    assert lay.online().refresh() == ["snapshot", "timestamp"]  # under root v1
    assert stock_refresh(lay.repo_dir) == 1
    _staged(lay).parent.unlink()
    lay.offline.publish(lay.bundle("1.3.0"))
    assert lay.online().refresh()[0] == "root"
    assert stock_refresh(lay.repo_dir) == 2
    assert lay.snapshot_meta()["targets.json"] == r.targets_version + 1
