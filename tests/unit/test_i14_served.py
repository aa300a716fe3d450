"""The served ``metadata/`` directory is hostile input to the operator's tools
(modelward.publisher._served): every read is verified from the anchor in KEYS, and a file that fails
is a typed error naming it, with nothing signed.

Attackers: whoever writes the served tree (origin, CDN sync), a careless operator.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelward.publisher._repo import Repository
from modelward.publisher._served import STATE_FILE, TRUSTED_ROOT_FILE, ServedFileError, read_file
from modelward.publisher.errors import RepositoryStateError
from tests._helpers import Clock

PASS = b"i14 served unit passphrase"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("i14served")
    r = Repository(base / "repo", base / "keys", PASS, clock=lambda: T0)
    r.init()
    r.delegate("vision", ["detector/*"])
    return base


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Repository:
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    clock = Clock(T0)
    clock.now = T0 + timedelta(minutes=5)
    return Repository(tmp_path / "w" / "repo", tmp_path / "w" / "keys", PASS, clock=clock)


def _files(repo: Repository) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(repo.metadata_dir.iterdir())
            if p.is_file() and not p.is_symlink()}


def _refused(repo: Repository, match: str) -> None:
    """Every operation that signs onwards is refused, naming the file; nothing moves."""
    before = _files(repo)
    for op in (repo.refresh, lambda: repo._commit_targets(repo.current()[0])):  # noqa: SLF001
        with pytest.raises(RepositoryStateError, match=match):
            op()
    assert _files(repo) == before


def test_symlinked_timestamp_is_not_followed(repo: Repository, tmp_path: Path) -> None:
    ts = repo.metadata_dir / "timestamp.json"
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(ts.read_bytes())  # even the genuine bytes: never via a symlink
    ts.unlink()
    ts.symlink_to(outside)
    _refused(repo, "timestamp.json cannot be opened as a plain file")


def test_deep_json_snapshot_is_a_typed_error(repo: Repository) -> None:
    (repo.metadata_dir / "1.snapshot.json").unlink()
    (repo.metadata_dir / "1.snapshot.json").write_bytes(b"[" * 100_000)
    ts = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())
    v = ts["signed"]["meta"]["snapshot.json"]["version"]
    (repo.metadata_dir / f"{v}.snapshot.json").write_bytes(b"[" * 100_000)
    _refused(repo, rf"{v}\.snapshot\.json")


def test_read_file_bounds_size_and_refuses_a_fifo(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2049)
    with pytest.raises(ServedFileError, match="larger than 2048 bytes"):
        read_file(big, 2048)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ServedFileError, match="not a regular file"):
        read_file(fifo)  # and it does not block
    assert read_file(tmp_path / "absent.json") is None


def test_old_validly_signed_state_copied_back_is_a_rollback(repo: Repository) -> None:
    """A CDN sync restores yesterday's metadata: every file validly signed, but older than
    what this tool published (KEYS/published.json)."""
    old = _files(repo)
    repo._commit_targets(repo.current()[0])  # noqa: SLF001
    assert json.loads((repo.keys / STATE_FILE).read_bytes())["timestamp"] > \
        json.loads(old["timestamp.json"])["signed"]["version"]
    (repo.metadata_dir / "timestamp.json").write_bytes(old["timestamp.json"])
    _refused(repo, "older than the v")


def test_edited_served_root_differs_from_the_anchor(repo: Repository) -> None:
    path = repo.metadata_dir / "1.root.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))
    _refused(repo, r"1\.root\.json differs from the trusted root")


def test_unsigned_next_root_planted_is_refused(repo: Repository) -> None:
    doc = json.loads((repo.metadata_dir / "1.root.json").read_bytes())
    doc["signed"]["version"] = 2
    (repo.metadata_dir / "2.root.json").write_text(json.dumps(doc))
    _refused(repo, r"2\.root\.json does not chain to root v1")


def test_snapshot_listing_an_unverified_team_file_is_not_made(repo: Repository) -> None:
    """A validly shaped team file signed by someone else, at a higher version, is never
    listed; the operator's tools use the verified one."""
    md = repo._role_md("vision")  # noqa: SLF001
    real = md.signed.version
    md.signed.version = 50
    md.signatures.clear()
    from securesystemslib.signer import CryptoSigner

    md.sign(CryptoSigner.generate_ed25519())
    (repo.metadata_dir / "50.vision.json").write_bytes(md.to_bytes())
    repo._commit_targets(repo.current()[0])  # noqa: SLF001
    _, snap, _ = repo.current()
    assert snap.meta["vision.json"].version == real
    assert repo._role_md("vision").signed.version == real  # noqa: SLF001


def test_a_repository_without_anchor_bootstraps_once_with_a_warning(
        repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    (repo.keys / TRUSTED_ROOT_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        repo.refresh()
    assert "trusting" in caplog.text and "1.root.json" in caplog.text
    assert (repo.keys / TRUSTED_ROOT_FILE).read_bytes() == \
        (repo.metadata_dir / "1.root.json").read_bytes()


def test_anchor_follows_a_published_root(repo: Repository) -> None:
    v = repo.rotate("targets")
    assert json.loads((repo.keys / TRUSTED_ROOT_FILE).read_bytes())["signed"]["version"] == v
    # trust starts at the anchor; the gate still refuses a 1.root.json devices cannot use
    (repo.metadata_dir / "1.root.json").write_bytes(b"{}")
    assert repo.latest_root_version() == v
    ts = (repo.metadata_dir / "timestamp.json").read_bytes()
    with pytest.raises(RepositoryStateError, match=r"1\.root\.json"):
        repo.refresh()
    assert (repo.metadata_dir / "timestamp.json").read_bytes() == ts


def test_status_shows_a_failing_signature_and_refresh_refuses(repo: Repository) -> None:
    _, snap, _ = repo.current()
    path = repo.metadata_dir / f"{snap.version}.snapshot.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))
    rows = {r.role: r for r in repo.status()}
    assert rows["snapshot"].signatures == 0
    assert rows["snapshot"].warning.startswith("SIGNATURE DOES NOT VERIFY")
    assert rows["targets"].warning == "" and rows["targets"].signatures == 1
    _refused(repo, rf"{snap.version}\.snapshot\.json")


def test_old_team_file_replayed_under_a_higher_name_is_ignored(repo: Repository) -> None:
    real = repo._role_md("vision")  # noqa: SLF001
    old = (repo.metadata_dir / f"{real.signed.version}.vision.json").read_bytes()
    (repo.metadata_dir / "7.vision.json").write_bytes(old)  # genuine bytes, says v1
    repo._commit_targets(repo.current()[0])  # noqa: SLF001
    assert repo.current()[1].meta["vision.json"].version == real.signed.version


def test_served_root_of_the_anchor_version_deleted_is_named(repo: Repository) -> None:
    (repo.metadata_dir / "1.root.json").unlink()
    _refused(repo, r"1\.root\.json is missing")


@pytest.mark.parametrize("content", [b"{", b'{"timestamp": "9"}', b"[]", b'{"snapshot": -1}',
                                     b"[" * 5000])
def test_corrupt_state_file_is_a_typed_error(repo: Repository, content: bytes) -> None:
    (repo.keys / STATE_FILE).write_bytes(content)
    _refused(repo, STATE_FILE)


def test_online_host_never_re_signs_an_edited_snapshot(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The online host verifies the same way: an edited snapshot is never re-signed by the
    online keys; it builds on its own record of what it signed (ONLINE/state/refresh.json),
    so the edit neither lowers a role nor puts one in."""
    from tests.unit.test_i14_online import Layout

    lay = Layout(tmp_path)
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    signed = lay.snapshot_meta()
    ts = lay.md("timestamp.json").signed
    path = lay.repo_dir / "metadata" / f"{ts.snapshot_meta.version}.snapshot.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["meta"] = {"targets.json": {"version": 1}}
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        lay.online().refresh()
    assert "do not verify" in caplog.text
    assert lay.snapshot_meta() == signed  # not the edited role list
    assert lay.md("timestamp.json").signed.snapshot_meta.version > ts.snapshot_meta.version


def test_snapshot_threshold_two_refresh_parks_one_snapshot_and_renews_the_timestamp(
        tmp_path: Path) -> None:
    from modelward.publisher._repo import ThresholdNotMetError

    clock = Clock(T0)
    repo = Repository(tmp_path / "repo", tmp_path / "keys", PASS, clock=clock)
    repo.init(thresholds={"snapshot": 2}, key_counts={"snapshot": 2})
    registry = (tmp_path / "keys" / "signers.json").read_text()
    (tmp_path / "keys" / "signers.json").write_text(json.dumps(  # held by someone else
        {k: u for k, u in json.loads(registry).items() if u != "encfile:snapshot-2.pem"}))
    clock.now = T0 + timedelta(days=29, hours=1)  # the snapshot is inside its window
    versions: list[int] = []
    parked: list[bytes] = []
    for _ in range(2):
        with pytest.raises(ThresholdNotMetError, match="1 of the 2"):
            repo.refresh()
        versions.append(repo.current()[2].version)
        parked.append((repo.pending_dir / "2.snapshot.json").read_bytes())
        assert repo.current()[2].expires > clock.now + timedelta(hours=12)
        clock.now += timedelta(hours=6)
    assert versions[1] == versions[0] + 1
    assert parked[1] == parked[0]  # the second refresh left the waiting one as it was
    assert [p.name for p in repo.pending_dir.iterdir()] == ["2.snapshot.json"]
    (tmp_path / "keys" / "signers.json").write_text(registry)  # its holder comes
    repo.sign_pending("snapshot", "encfile:snapshot-2.pem")
    assert repo.current()[2].snapshot_meta.version == 2
