"""Operator-grade repository operations on a real device (issue #5, part)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from publisher import Repository
from tests.conftest import PASSPHRASE, World
from updater.errors import MetadataError


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
