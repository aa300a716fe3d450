"""Operator-grade repository operations on a real device (issue #5, part)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from modelward.publisher._repo import Repository
from modelward.updater.errors import MetadataError
from tests.conftest import PASSPHRASE, World


def test_expired_timestamp_is_refused_until_refresh(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    # The operator's clock is 8 days behind: v2's timestamp (7-day lifetime) has expired.
    late = Repository(world.repo_dir, world.keys, PASSPHRASE,
                      clock=lambda: datetime.now(UTC).replace(microsecond=0) - timedelta(days=8))
    late.publish(world.bundle("2.0.0", seed=2))
    st = world.cli("repo", "status", "--repo", str(world.repo_dir), "--keys", str(world.keys))
    assert st.returncode == 0 and "EXPIRED" in st.stdout
    before = world.snapshot()
    with pytest.raises(MetadataError, match="ExpiredMetadataError"):
        world.update()
    after = world.snapshot()
    assert world.active_version() == "1.0.0"
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)

    r = world.cli("repo", "refresh", "--repo", str(world.repo_dir), "--keys", str(world.keys))
    assert r.returncode == 0, r.stderr
    assert "timestamp" in r.stdout
    st = world.cli("repo", "status", "--repo", str(world.repo_dir), "--keys", str(world.keys))
    assert "EXPIRED" not in st.stdout
    world.update()
    assert world.active_version() == "2.0.0"


def test_refresh_resigns_snapshot_only_when_due(world: World) -> None:
    md = world.repo_dir / "metadata"
    snaps = len(list(md.glob("*.snapshot.json")))
    assert world.repo.refresh() == ["timestamp"]
    assert len(list(md.glob("*.snapshot.json"))) == snaps
    assert world.repo.refresh(margin=timedelta(days=31)) == ["snapshot", "timestamp"]
    assert len(list(md.glob("*.snapshot.json"))) == snaps + 1
    ts = json.loads((md / "timestamp.json").read_bytes())["signed"]
    assert ts["meta"]["snapshot.json"]["version"] == snaps + 1


def test_device_offline_across_two_root_rotations_follows_and_reanchors(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    # The device is offline while the operator rotates root twice and the targets key once.
    for role in ("root", "targets", "root"):
        r = world.cli("repo", "rotate", role, "--repo", str(world.repo_dir),
                      "--keys", str(world.keys))
        assert r.returncode == 0, r.stderr
    assert (world.repo_dir / "metadata" / "4.root.json").exists()
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"
    newest = (world.repo_dir / "metadata" / "4.root.json").read_bytes()
    assert world.snapshot().anchor == hashlib.sha256(newest).digest()
    assert (world.state / "trust" / "root.json").read_bytes() == newest
    rec = json.loads((world.state / "trust" / "record.json").read_bytes())["record"]
    assert rec["root_version"] == 4
    assert len(list((world.keys / "retired").glob("*.pem"))) == 3


def test_retired_targets_key_cannot_publish(world: World,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tuf.api.metadata import Metadata

    from modelward.publisher._keys import load_signer_at
    from modelward.publisher._served import load as served_load
    from modelward.publisher._tufcheck import StockClientWouldRejectError

    world.publish("1.0.0", seed=1)
    world.update()
    world.repo.rotate("targets")
    retired = next((world.keys / "retired").glob("targets-*.pem"))
    # The old (say, stolen) key signs a new targets version with a v9 entry.
    md_dir = world.repo_dir / "metadata"
    targets, _, _ = world.repo.current()
    targets.version += 1
    evil = Metadata(targets)
    evil.sign(load_signer_at(retired, PASSPHRASE))
    (md_dir / f"{targets.version}.targets.json").write_bytes(evil.to_bytes())
    # The repository refuses to make it reachable (issue 14's pre-publish gate) ...
    with pytest.raises(StockClientWouldRejectError, match="targets was signed by 0/1"):
        world.repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    # ... so a mirror holding the online keys does it, past the gate: the device refuses.
    monkeypatch.setattr("modelward.publisher._repo.check_state", lambda *_a, **_k: None)
    monkeypatch.setattr("modelward.publisher._repo.verify_role",  # the mirror checks no signature
                        lambda path, *_a: served_load(path))
    world.repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001 - a mirror's view
    before = world.snapshot()
    with pytest.raises(MetadataError, match="targets"):
        world.update()
    after = world.snapshot()
    assert (after.record, after.counter, after.current) == (
        before.record, before.counter, before.current)


def _rollout(w: World, *argv: str) -> None:
    r = w.cli("rollout", *argv, "--repo", str(w.repo_dir), "--keys", str(w.keys))
    assert r.returncode == 0, r.stderr


def test_phased_rollout_halt_and_signed_pin_back(world: World) -> None:
    from modelward.updater.errors import RollbackError
    from modelward.updater.rollout import rollout_bucket
    from tests.conftest import copytree

    world.publish("1.0.0", seed=1)
    world.update()
    # v2 goes to a share of devices that just misses this one.
    share = rollout_bucket("dev-1", "classifier", "2.0.0") // 1
    r = world.cli("publish", "--repo", str(world.repo_dir), "--keys", str(world.keys),
                  "--rollout", str(share), str(world.bundle("2.0.0", seed=2)))
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in world.update().message
    assert world.active_version() == "1.0.0"
    _rollout(world, "set", "classifier", "2.0.0", "--percent", str(share + 1))
    world.update()
    assert world.active_version() == "2.0.0"

    # v3 is published to everyone but halted before this device gets to it.
    world.publish("3.0.0", seed=3)
    _rollout(world, "set", "classifier", "3.0.0", "--halt")
    world.update()
    assert world.active_version() == "2.0.0"  # not installed; nothing moved down either

    # The operator pins back to v1: a signed decision, so the device moves down.
    old_local, old_origin = world.tmp / "md-local", world.tmp / "md-origin"
    _rollout(world, "pin", "classifier", "1.0.0")
    world.update()
    assert world.active_version() == "1.0.0"
    copytree(world.state / "metadata", old_local)  # the pin era, for a replay later
    copytree(world.repo_dir / "metadata", old_origin)
    _rollout(world, "unpin", "classifier")
    world.update()
    assert world.active_version() == "2.0.0"  # v3 is still halted

    # Replaying the pin-era metadata (device and mirror) cannot pin the device back.
    copytree(old_origin, world.repo_dir / "metadata")
    copytree(old_local, world.state / "metadata")
    before = world.snapshot()
    with pytest.raises(RollbackError):
        world.update()
    assert world.active_version() == "2.0.0"
    assert world.snapshot().record == before.record


def test_devices_follow_only_their_channel(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    r = world.cli("publish", "--repo", str(world.repo_dir), "--keys", str(world.keys),
                  "--channel", "beta", str(world.bundle("2.0.0", seed=2)))
    assert r.returncode == 0, r.stderr
    world.update()
    assert world.active_version() == "1.0.0"  # a stable device ignores beta
    world.conf_path.write_text(world.conf_path.read_text().replace(
        'model = "classifier"', 'model = "classifier"\nchannel = "beta"', 1))
    world.update()
    assert world.active_version() == "2.0.0"
