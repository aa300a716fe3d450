"""Attacks (a14-operator) on expiry hygiene: `repo refresh` re-signing what it should not,
lifetimes that silently stop devices, `repo status` rows without the warning they need,
a corrupted ``KEYS/expiry.json``.

Attackers: whoever can write the served repository directory (not the keys), and a
careless operator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Snapshot, Timestamp

from modelward.publisher._expiry import Expiry
from modelward.publisher._repo import Repository, ThresholdNotMetError
from tests._helpers import Clock

PASS = b"a14 operator unit passphrase"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """targets v1..v3 published; team ``vision`` delegates ``vision-sub`` (two levels)."""
    base = tmp_path_factory.mktemp("a14expiry")
    r = Repository(base / "repo", base / "keys", PASS, clock=lambda: T0)
    r.init()
    r.delegate("vision", ["detector/*"])
    r.delegate("vision-sub", ["detector/sub-*"], parent="vision")
    r._commit_targets(r.current()[0])  # noqa: SLF001 - targets v3
    return base


@pytest.fixture(scope="module")
def template2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose snapshot role needs 2 of 2 signatures."""
    base = tmp_path_factory.mktemp("a14snap2")
    r = Repository(base / "repo", base / "keys", PASS, clock=lambda: T0)
    r.init(thresholds={"snapshot": 2}, key_counts={"snapshot": 2})
    return base


def _hold_elsewhere(keys: Path, uri: str) -> str:
    """The key ``uri`` is held by another person: not in this machine's registry (a
    registered key signs every time). Returns the registry to put back when they come."""
    text = (keys / "signers.json").read_text()
    doc = json.loads(text)
    (keys / "signers.json").write_text(json.dumps({k: u for k, u in doc.items() if u != uri}))
    return text


def _copy(src: Path, tmp: Path) -> tuple[Repository, Clock]:
    shutil.copytree(src, tmp / "w")
    clock = Clock(T0)
    return Repository(tmp / "w" / "repo", tmp / "w" / "keys", PASS, clock=clock), clock


@pytest.fixture
def world(template: Path, tmp_path: Path) -> tuple[Repository, Clock]:
    return _copy(template, tmp_path)


def _cli(repo: Repository, *argv: str, faketime: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELWARD_KEY_PASSPHRASE": PASS.decode(), "PYTHONPATH": str(ROOT)}
    pre = ["faketime", "-f", faketime] if faketime else []
    return subprocess.run([*pre, sys.executable, "-m", "modelward", *argv, "--repo",
                           str(repo.repo), "--keys", str(repo.keys)], capture_output=True,
                          text=True, env=env, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)


def _published(repo: Repository) -> tuple[Metadata[Snapshot], Metadata[Timestamp]]:
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    snap = Metadata[Snapshot].from_bytes(
        (repo.metadata_dir / f"{ts.signed.snapshot_meta.version}.snapshot.json").read_bytes())
    return snap, ts


def _valid(repo: Repository, md: Metadata[Any], role: str) -> bool:
    try:
        repo._trusted_root().verify_delegate(role, md.signed_bytes, md.signatures)  # noqa: SLF001
    except UnsignedMetadataError:
        return False
    return True


# --- refresh re-signs what the served directory says -----------------------------------


def test_a14_refresh_does_not_resign_an_edited_snapshot(world: tuple[Repository, Clock]
                                                         ) -> None:
    repo, clock = world
    latest = repo.current()[0].version
    assert latest >= 3
    snap, _ = _published(repo)
    path = repo.metadata_dir / f"{snap.signed.version}.snapshot.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["meta"] = {"targets.json": {"version": 1}}  # roll back, drop the teams
    doc["signed"]["expires"] = (T0 + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(doc))  # unsigned edit: devices would refuse this file
    clock.now = T0 + timedelta(minutes=5)
    with contextlib.suppress(Exception):  # refusing is fine
        repo.refresh()
    snap, _ = _published(repo)
    if not _valid(repo, snap, "snapshot"):
        return  # nothing was signed over the edit
    # What SHOULD hold: anything validly signed still lists the latest targets and teams.
    assert snap.signed.meta["targets.json"].version == latest
    assert "vision.json" in snap.signed.meta


def test_a14_refresh_does_not_follow_an_edited_timestamp(world: tuple[Repository, Clock]
                                                          ) -> None:
    repo, clock = world
    snap, _ = _published(repo)
    newest, latest = snap.signed.version, repo.current()[0].version
    assert newest >= 3
    doc = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())
    doc["signed"]["meta"] = {"snapshot.json": {"version": 1}}
    (repo.metadata_dir / "timestamp.json").write_text(json.dumps(doc))
    clock.now = T0 + 30 * DAY  # snapshot 1 is due
    with contextlib.suppress(Exception):  # refusing is fine
        repo.refresh()
    snap, ts = _published(repo)
    if not _valid(repo, ts, "timestamp"):
        return  # nothing was signed over the edit
    assert ts.signed.snapshot_meta.version > newest
    assert snap.signed.meta["targets.json"].version == latest
    assert "vision.json" in snap.signed.meta


# --- a snapshot threshold above 1 ---------------------------------------------------------


def test_a14_snapshot_threshold_two_keeps_devices_updating(template2: Path,
                                                           tmp_path: Path) -> None:
    repo, clock = _copy(template2, tmp_path)
    clock.now = T0 + 29 * DAY + timedelta(hours=1)  # snapshot inside its window
    registry = _hold_elsewhere(repo.keys, "encfile:snapshot-2.pem")
    with pytest.raises(ThresholdNotMetError):
        repo.refresh()
    _, ts = _published(repo)
    timestamp_fresh = ts.signed.expires > clock.now + timedelta(hours=12)
    (repo.keys / "signers.json").write_text(registry)  # the second key holder comes
    checked, _ = repo.review_pending("snapshot")
    repo.sign_pending("snapshot", "encfile:snapshot-2.pem", reviewed=checked.digest)
    snap, ts = _published(repo)
    # What SHOULD hold: the timestamp was refreshed, and it points at the signed snapshot.
    assert timestamp_fresh
    assert ts.signed.snapshot_meta.version == checked.md.signed.version
    assert snap.signed.expires > clock.now + 7 * DAY


# --- lifetimes that stop devices ---------------------------------------------------------


def test_a14_snapshot_lifetime_shorter_than_refresh_interval_warns(
        world: tuple[Repository, Clock]) -> None:
    repo, _ = world
    r = _cli(repo, "repo", "set-expiry", "snapshot=3h", "--warn", "snapshot=1h")
    refused = r.returncode != 0
    assert refused or ("snapshot" in r.stderr and "6h" in r.stderr), (r.stdout, r.stderr)


def test_a14_snapshot_shorter_than_timestamp_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        try:
            Expiry().changed({"snapshot": timedelta(hours=13), "timestamp": 2 * DAY},
                             {"snapshot": timedelta(hours=6)})
        except Exception:  # noqa: BLE001 - refusing is fine too
            return
    assert "snapshot" in caplog.text


def test_a14_timestamp_lifetime_of_one_hour_warns_on_the_cli(
        world: tuple[Repository, Clock]) -> None:
    """Resists: the short timestamp is warned about where the operator sees it."""
    repo, _ = world
    r = _cli(repo, "repo", "set-expiry", "timestamp=1h", "--warn", "timestamp=30m")
    assert r.returncode == 0, r.stderr
    assert "refresh timer runs every 6h" in r.stderr


# --- status -------------------------------------------------------------------------------


def test_a14_status_warns_two_levels_deep_and_for_expired_roles(
        world: tuple[Repository, Clock]) -> None:
    """Resists: a role delegated by a team is a row, warned inside its window, and an
    expired role says EXPIRED."""
    repo, clock = world
    clock.now = T0 + 340 * DAY
    rows = {r.role: r for r in repo.status()}
    assert {"vision", "vision-sub"} <= set(rows)
    assert rows["vision-sub"].warning.startswith("expires in")
    clock.now = T0 + 400 * DAY
    rows = {r.role: r for r in repo.status()}
    assert {r for r, row in rows.items() if row.warning == "EXPIRED"} == set(rows)


def test_a14_status_flags_a_published_role_whose_signature_fails(
        world: tuple[Repository, Clock]) -> None:
    repo, _ = world
    snap, _ = _published(repo)
    tv = snap.signed.meta["targets.json"].version
    path = repo.metadata_dir / f"{tv}.targets.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"  # devices: signature fails
    path.write_text(json.dumps(doc))
    row = next(r for r in repo.status() if r.role == "targets")
    assert row.signatures == 0 or row.warning, row


@pytest.mark.parametrize("content", [
    b"", b"{", b'{"lifetimes": {"timestamp": "1d"}}', b'{"lifetimes": {"snapshot": 60}}',
    b'{"warn_within": {"timestamp": 86400}}', b"\xff" * 10, b"[]" * 3000,
    b'{"lifetimes": {"root": 1e400}}',
])
def test_a14_corrupt_expiry_file_is_one_line_on_status_and_refresh(
        world: tuple[Repository, Clock], content: bytes) -> None:
    """Resists: a hand-edited expiry.json is a one-line error, never a traceback."""
    repo, _ = world
    (repo.keys / "expiry.json").write_bytes(content)
    for argv in (("repo", "status"), ("repo", "refresh")):
        r = _cli(repo, *argv)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "expiry.json" in r.stderr


def test_a14_snapshot_without_targets_entry_is_a_clean_error(
        world: tuple[Repository, Clock]) -> None:
    repo, _ = world
    snap, _ = _published(repo)
    path = repo.metadata_dir / f"{snap.signed.version}.snapshot.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["meta"] = {}
    path.write_text(json.dumps(doc))
    for argv in (("repo", "status"), ("repo", "refresh")):
        r = _cli(repo, *argv)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_a14_set_expiry_repairs_a_corrupt_expiry_file(world: tuple[Repository, Clock]
                                                      ) -> None:
    repo, _ = world
    (repo.keys / "expiry.json").write_bytes(b"{")
    r = _cli(repo, "repo", "status")
    assert r.returncode == 1 and "set-expiry" in r.stderr, r.stderr
    r = _cli(repo, "repo", "set-expiry", "timestamp=1d")
    assert r.returncode == 0, r.stderr
    assert _cli(repo, "repo", "status").returncode == 0


@pytest.mark.parametrize("role", ["root", "targets"])
def test_a14_offline_role_lifetime_of_hours_warns(world: tuple[Repository, Clock],
                                                  role: str) -> None:
    repo, _ = world
    r = _cli(repo, "repo", "set-expiry", f"{role}=2h", "--warn", f"{role}=1h")
    assert r.returncode != 0 or role in r.stderr, (r.stdout, r.stderr)


def test_a14_snapshot_lists_only_verified_team_versions(world: tuple[Repository, Clock]
                                                        ) -> None:
    repo, _ = world
    real = max(int(p.name.split(".")[0]) for p in repo.metadata_dir.glob("*.vision.json"))
    (repo.metadata_dir / "999999.vision.json").write_bytes(b'{"not": "signed"}')
    repo._commit_targets(repo.current()[0])  # noqa: SLF001 - any targets change
    snap, _ = _published(repo)
    assert snap.signed.meta["vision.json"].version == real
