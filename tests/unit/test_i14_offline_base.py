"""The offline side builds its next targets on its own signed history (publisher/_offline_base.py).

Attackers: the online host (snapshot and timestamp keys, write access to metadata/) in the
single-machine layout (MODELWARD_ONLINE_DIR on the operator's host) and on the offline machine
of the two-machine layout; and the careless operator (publishes twice, withdraws then
publishes, restores KEYS from an old backup). Each attack ends with the operator's next
publish: it must build on the operator's newest signed targets (never lose a withdraw, never
adopt what only the online host vouches for), say loudly which served file is at fault, and
leave a state stock python-tuf accepts.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from modelward.publisher._keys import load_signer_at
from modelward.publisher._offline_base import HEAD_FILE, OnlineHostFaultError, OwnTargetsError
from modelward.publisher._online import attach
from modelward.publisher._repo import Repository
from modelward.publisher.errors import RepositoryStateError
from tests.unit.test_i14_online import OFFLINE, PASS, Layout, _pw, stock_client_refresh

EVIL = "classifier/classifier-9.9.9.tar"
OLD = "classifier/classifier-1.0.0.tar"
NEW = "classifier/classifier-1.1.0.tar"
LOG = "modelward.publisher._offline_base"


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def single(lay: Layout) -> Repository:
    """The operator's command in the single-machine layout (KEYS and MODELWARD_ONLINE_DIR)."""
    return attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)


def online_keys(lay: Layout) -> tuple[Signer, Signer]:
    return (load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot"),
            load_signer_at(lay.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp"))


def sign_write(lay: Layout, signed: Any, name: str, signer: Signer | None) -> None:
    md = Metadata(signed)
    if signer is not None:
        md.sign(signer)
    lay.write(md, name)


def point_snapshot_at(lay: Layout, targets: MetaFile, version: int = 500) -> None:
    """The online host's snapshot ``version`` naming ``targets``, and its timestamp."""
    snap, ts = online_keys(lay)
    exp = lay.md("1.root.json").signed.expires
    sign_write(lay, Snapshot(version=version, expires=exp, meta={"targets.json": targets}),
               f"{version}.snapshot.json", snap)
    sign_write(lay, Timestamp(version=version, expires=exp,
                              snapshot_meta=MetaFile(version=version)), "timestamp.json", ts)


def evil_entry() -> TargetFile:
    tf = TargetFile(1234, {"sha256": "ab" * 32}, EVIL)
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": "classifier", "version": "9.9.9", "fingerprint": "00" * 32,
        "channel": "stable", "rollout": {"basis_points": 10000, "halted": False},
        "pinned": False}}
    return tf


def forged_targets(lay: Layout, version: int, base: str) -> None:
    """``version``.targets.json: ``base``'s entries without a withdraw, plus EVIL, signed by
    the online host's snapshot key (all it has)."""
    snap, _ = online_keys(lay)
    pub = lay.md(base).signed
    entries = {p: t for p, t in pub.targets.items()}
    for t in entries.values():
        if "modelward" in t.custom:  # (a chunk index target has no modelward field)
            t.custom["modelward"].pop("withdrawn", None)
    sign_write(lay, Targets(version=version, expires=pub.expires,
                            targets={**entries, EVIL: evil_entry()}),
               f"{version}.targets.json", snap)


def withdrawn(lay: Layout, name: str) -> bool:
    return bool(lay.md(name).signed.targets[OLD].custom["modelward"].get("withdrawn"))


def released(lay: Layout, operator: Callable[[], Repository]) -> None:
    """1.0.0 published (targets v2), then withdrawn (targets v3: the tombstone)."""
    operator().publish(lay.bundle("1.0.0"))
    operator().withdraw("classifier", "1.0.0")
    assert withdrawn(lay, "3.targets.json")


def after_next_publish(lay: Layout, operator: Callable[[], Repository], tmp_path: Path,
                       caplog: pytest.LogCaptureFixture, *, want: int = 4,
                       repair: Callable[[], None] = lambda: None) -> str:
    """The operator's next publish: built on its own v3 (the withdraw kept, EVIL never
    signed), the refresh lists it, stock python-tuf follows. Returns the warnings."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOG):
        r = operator().publish(lay.bundle("1.1.0"))
    assert r.targets_version == want
    new = lay.md(f"{want}.targets.json").signed
    assert EVIL not in new.targets and NEW in new.targets
    assert withdrawn(lay, f"{want}.targets.json")
    repair()  # what the operator puts right on the online host before its next refresh
    lay.online().refresh()
    assert lay.snapshot_meta()["targets.json"] == want
    client = stock_client_refresh(lay, tmp_path)
    assert client.get_targetinfo(EVIL) is None
    info = client.get_targetinfo(OLD)
    assert info is not None and info.custom["modelward"]["withdrawn"]
    return caplog.text


# --- the online host ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["single-machine", "offline-machine"])
def test_snapshot_rolled_back_before_a_withdraw_keeps_the_withdraw(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    operator = (lambda: single(lay)) if where == "single-machine" else (lambda: lay.offline)
    released(lay, operator)
    lay.online().refresh()
    point_snapshot_at(lay, MetaFile(version=2))  # signed by the online keys: a rollback
    text = after_next_publish(lay, operator, tmp_path, caplog)
    if where == "single-machine":
        assert "500.snapshot.json lists targets v2, older than the v3 this tool signed" in text


@pytest.mark.parametrize("where", ["single-machine", "offline-machine"])
def test_snapshot_naming_forged_targets_neither_blocks_nor_seeds_the_publish(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    operator = (lambda: single(lay)) if where == "single-machine" else (lambda: lay.offline)
    released(lay, operator)
    lay.online().refresh()
    forged_targets(lay, 4, "3.targets.json")
    point_snapshot_at(lay, MetaFile(version=4))
    text = after_next_publish(lay, operator, tmp_path, caplog)
    assert "500.snapshot.json is not what this tool signed" in text
    assert "4.targets.json" in text


def test_snapshot_naming_a_high_targets_version_numbers_the_next_one_to_it(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Devices that took the online host's snapshot (targets v999) refuse a lower version:
    the operator's next targets is v999 (its own content), and they follow it."""
    released(lay, lambda: single(lay))
    forged_targets(lay, 999, "3.targets.json")
    point_snapshot_at(lay, MetaFile(version=999))
    text = after_next_publish(lay, lambda: single(lay), tmp_path, caplog, want=999)
    assert "is not what this tool signed" in text and "numbering the next targets v999" in text


@pytest.mark.parametrize("huge", [2**53, 10 ** 30])
def test_snapshot_naming_a_targets_version_beyond_any_is_a_typed_error(
        lay: Layout, huge: int) -> None:
    released(lay, lambda: single(lay))
    point_snapshot_at(lay, MetaFile(version=huge))
    before = {p.name: p.read_bytes() for p in (lay.repo_dir / "metadata").iterdir()}
    with pytest.raises(OnlineHostFaultError, match="500.snapshot.json") as e:
        single(lay).publish(lay.bundle("1.1.0"))
    assert e.value.path.name == "500.snapshot.json" and "rotate the snapshot" in e.value.hint
    assert {p.name: p.read_bytes() for p in (lay.repo_dir / "metadata").iterdir()} == before


def test_snapshot_version_at_the_json_bound_is_a_typed_error_not_a_corrupt_floor(
        lay: Layout) -> None:
    """The online host signs snapshot and timestamp v2^53-1: the single-machine publish
    refuses to sign above them (KEYS/published.json would no longer read back) with a typed
    error naming the served timestamp; no snapshot or timestamp is written."""
    released(lay, lambda: single(lay))
    point_snapshot_at(lay, MetaFile(version=3), version=2**53 - 1)
    ts = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()
    snaps = sorted(p.name for p in (lay.repo_dir / "metadata").glob("*.snapshot.json"))
    with pytest.raises(OnlineHostFaultError, match="timestamp.json"):
        single(lay).publish(lay.bundle("1.1.0"))
    assert (lay.repo_dir / "metadata" / "timestamp.json").read_bytes() == ts
    assert sorted(p.name for p in (lay.repo_dir / "metadata").glob("*.snapshot.json")) == snaps
    single(lay).current()  # the floors still read back


def test_planted_huge_targets_names_are_not_the_next_version(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    released(lay, lambda: single(lay))
    for v in (10 ** 30, 10 ** 9, 5):
        forged_targets(lay, v, "3.targets.json")
    (lay.repo_dir / "metadata" / f"{10 ** 40}.targets.json").write_bytes(b"")
    after_next_publish(lay, lambda: single(lay), tmp_path, caplog)


@pytest.mark.parametrize("how", ["swapped", "removed", "symlink"])
def test_served_copy_of_the_head_changed_the_head_in_keys_is_used(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """The online host rewrites (same version, no withdraw, EVIL), removes or symlinks the
    served 3.targets.json that its snapshot names: the head in KEYS is what is built on."""
    released(lay, lambda: single(lay))
    path = lay.repo_dir / "metadata" / "3.targets.json"
    if how == "swapped":
        forged_targets(lay, 3, "3.targets.json")
    elif how == "removed":
        path.unlink()
    else:
        shutil.copyfile(path, tmp_path / "elsewhere.json")
        path.unlink()
        os.symlink(tmp_path / "elsewhere.json", path)
    point_snapshot_at(lay, MetaFile(version=3))
    text = after_next_publish(lay, lambda: single(lay), tmp_path, caplog)
    assert "3.targets.json" in text and "is not what this tool signed" in text


@pytest.mark.parametrize("anchor", ["v2", "v1-crash-before-the-anchor-moved"])
def test_targets_signed_by_the_retired_targets_key_never_seed_the_publish(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, anchor: str) -> None:
    """The online host holds the targets key that `repo rotate targets` retired (root v2):
    its targets v5 (the withdraw undone, EVIL added) verify under root v1, which the
    served view still accepts while KEYS/trusted-root.json is v1 (a crash before the root
    change completed); the offline side builds on its own v4, never on those."""
    leaked = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    released(lay, lambda: single(lay))
    assert single(lay).rotate("targets") == 2  # targets v4 under the new key
    if anchor != "v2":
        shutil.copyfile(lay.root_path, lay.keys / "trusted-root.json")
    snap, _ = online_keys(lay)
    pub = lay.md("4.targets.json").signed
    entries = dict(pub.targets)
    entries[OLD].custom["modelward"].pop("withdrawn")
    sign_write(lay, Targets(version=5, expires=pub.expires,
                            targets={**entries, EVIL: evil_entry()}), "5.targets.json", leaked)
    point_snapshot_at(lay, MetaFile(version=5))
    text = after_next_publish(lay, lambda: single(lay), tmp_path, caplog, want=5)
    assert "500.snapshot.json is not what this tool signed" in text and "5.targets.json" in text


def test_replayed_old_timestamp_never_makes_the_publish_rewrite_a_held_version(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The online host puts back timestamp v1 (genuine, signed by the timestamp key): the
    single-machine publish signs snapshot and timestamp above every version it and the
    refresh signed, and never rewrites a published N.snapshot.json."""
    first = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()
    released(lay, lambda: single(lay))
    lay.online().refresh()
    held = {p.name: p.read_bytes() for p in (lay.repo_dir / "metadata").glob("*.snapshot.json")}
    ts_before = lay.md("timestamp.json").signed.version
    (lay.repo_dir / "metadata" / "timestamp.json").write_bytes(first)
    with caplog.at_level(logging.WARNING, LOG):
        r = single(lay).publish(lay.bundle("1.1.0"))
    assert r.timestamp_version > ts_before
    assert "older than the online host signed" in caplog.text
    for name, data in held.items():
        assert (lay.repo_dir / "metadata" / name).read_bytes() == data, name
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(NEW) is not None


@pytest.mark.parametrize("how", ["swapped", "removed", "symlink"])
def test_team_publish_after_the_head_copy_changed_puts_the_signed_head_back(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A team's publish signs no new top-level targets: its snapshot names the head, whose
    served copy the online host changed; the head's own bytes are put back first, so the
    snapshot never pins the hash of the online host's file (or of none)."""
    single(lay).delegate("team-a", ["classifier/*"])  # targets v2
    path = lay.repo_dir / "metadata" / "2.targets.json"
    signed = path.read_bytes()
    if how == "swapped":
        forged_targets(lay, 2, "2.targets.json")
    elif how == "removed":
        path.unlink()
    else:
        (tmp_path / "elsewhere.json").write_bytes(b"{}")
        path.unlink()
        os.symlink(tmp_path / "elsewhere.json", path)
    with caplog.at_level(logging.WARNING, LOG):
        single(lay).publish(lay.bundle("1.0.0"), role="team-a")
    assert "2.targets.json is not the targets v2 this tool signed" in caplog.text
    assert not path.is_symlink() and path.read_bytes() == signed
    assert (tmp_path / "elsewhere.json").read_bytes() == b"{}" if how == "symlink" else True
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(OLD) is not None


def test_forged_online_state_root_is_not_the_offline_sides_anchor(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The refresh unit may write ONLINE/state/: it puts a root there under which its own
    key is the targets key. The operator's single-machine publish never adopts targets
    signed by it."""
    from tuf.api.metadata import Root

    released(lay, lambda: single(lay))
    lay.online().refresh()
    snap, ts = online_keys(lay)
    root = lay.md("1.root.json").signed
    forged = Root(version=root.version, expires=root.expires, consistent_snapshot=True)
    for role in ("root", "targets", "snapshot"):
        forged.add_key(snap.public_key, role)
    forged.add_key(ts.public_key, "timestamp")
    md = Metadata(forged)
    md.sign(snap)
    (lay.online_dir / "state" / "root.json").write_bytes(md.to_bytes())
    forged_targets(lay, 4, "3.targets.json")
    point_snapshot_at(lay, MetaFile(version=4))
    after_next_publish(lay, lambda: single(lay), tmp_path, caplog,
                       repair=(lay.online_dir / "state" / "root.json").unlink)


# --- the careless operator -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["single-machine", "offline-machine", "plain"])
def test_publish_twice_and_withdraw_then_publish_warn_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    if where == "plain":
        repo = Repository(tmp_path / "repo", tmp_path / "keys", OFFLINE)
        repo.init()

        def operator() -> Repository:
            return Repository(tmp_path / "repo", tmp_path / "keys", OFFLINE)
        lay = None
    else:
        lay = Layout(tmp_path)
        operator = (lambda: single(lay)) if where == "single-machine" else \
            (lambda: lay.offline)
    from modelward.publisher._bundle_build import build_bundle
    from modelward.simulator._models import make_linear_model

    def bundle(v: str, n: int) -> Path:
        out = tmp_path / f"x{n}.tar"
        build_bundle(make_linear_model(tmp_path / f"x{n}.onnx", n), "classifier", v, out)
        return out

    with caplog.at_level(logging.INFO, LOG):
        assert operator().publish(bundle("1.0.0", 1)).targets_version == 2
        with pytest.raises(RepositoryStateError, match="published already"):
            operator().publish(bundle("1.0.0", 2))
        assert operator().withdraw("classifier", "1.0.0") == 3
        with pytest.raises(RepositoryStateError, match="withdrawn"):
            operator().publish(bundle("1.0.0", 3))
        assert operator().publish(bundle("1.1.0", 4)).targets_version == 4
    assert not [r for r in caplog.records if r.name == LOG and r.levelno >= logging.WARNING]
    t = operator().current()[0]
    assert t.version == 4 and t.targets[OLD].custom["modelward"]["withdrawn"]


def test_keys_restored_from_an_old_backup_builds_on_the_newest_operator_signed_targets(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """KEYS restored from before the withdraw: its head (v2) is older than the published
    targets the targets key signed (v3): those are built on, with a warning; never the
    backup's v2 (the withdrawn release would come back)."""
    single(lay).publish(lay.bundle("1.0.0"))
    backup = tmp_path / "keys-backup"
    shutil.copytree(lay.keys, backup)
    single(lay).withdraw("classifier", "1.0.0")
    shutil.rmtree(lay.keys)
    shutil.copytree(backup, lay.keys)
    text = after_next_publish(lay, lambda: single(lay), tmp_path, caplog)
    assert f"{HEAD_FILE} holds targets v2, older than the published v3" in text


def test_keys_restored_and_a_fork_of_the_same_version_builds_on_the_published_one(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The head in KEYS is a v3 other than the published v3 (both by the targets key: two
    copies of KEYS signed): the next targets build on the published one, which devices hold."""
    released(lay, lambda: single(lay))
    key = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    fork = Metadata(lay.md("2.targets.json").signed)
    fork.signed.version = 3
    fork.sign(key)
    (lay.keys / HEAD_FILE).write_bytes(fork.to_bytes())
    text = after_next_publish(lay, lambda: single(lay), tmp_path, caplog)
    assert f"{HEAD_FILE} holds targets v3, other than the published v3" in text


def test_keys_restored_and_the_snapshot_rolled_back_still_finds_the_newest_signed(
        lay: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both at once: the backup's head is v2 and the online host points the snapshot at v2;
    the newer 3.targets.json the targets key signed is still found."""
    single(lay).publish(lay.bundle("1.0.0"))
    backup = tmp_path / "keys-backup"
    shutil.copytree(lay.keys, backup)
    single(lay).withdraw("classifier", "1.0.0")
    shutil.rmtree(lay.keys)
    shutil.copytree(backup, lay.keys)
    point_snapshot_at(lay, MetaFile(version=2))
    text = after_next_publish(lay, lambda: single(lay), tmp_path, caplog)
    assert "building on v3, which the targets keys of root v1 signed" in text


@pytest.mark.parametrize("what", ["garbage", "forged", "symlink"])
def test_a_head_in_keys_that_is_not_the_operators_is_a_typed_error(
        lay: Layout, tmp_path: Path, what: str) -> None:
    single(lay).publish(lay.bundle("1.0.0"))
    head = lay.keys / HEAD_FILE
    if what == "garbage":
        head.write_bytes(b"{")
    elif what == "forged":
        snap, _ = online_keys(lay)
        md = Metadata(Targets(version=9, expires=lay.md("2.targets.json").signed.expires,
                              targets={EVIL: evil_entry()}))
        md.sign(snap)
        head.write_bytes(md.to_bytes())
    else:
        shutil.copyfile(head, tmp_path / "h.json")
        head.unlink()
        os.symlink(tmp_path / "h.json", head)
    before = sorted(p.name for p in (lay.repo_dir / "metadata").iterdir())
    with pytest.raises(OwnTargetsError, match=HEAD_FILE) as e:
        single(lay).publish(lay.bundle("1.1.0"))
    assert e.value.path == head
    assert sorted(p.name for p in (lay.repo_dir / "metadata").iterdir()) == before
