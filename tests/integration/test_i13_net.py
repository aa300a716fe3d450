"""Issue 13 "bounded before verified", TUF metadata through the real stack (nginx, swtpm).

The repository signs the length and SHA-256 of snapshot (in timestamp) and of targets (in
snapshot), so the device downloads no more than the signed length and checks the hash
before parsing; what has no signed length (a repository from before) is bounded by the
device's lowered ``TufConfig`` maxima instead of ngclient's defaults.
"""

from __future__ import annotations

import pytest
from tuf.api.metadata import Metadata, MetaFile

from modelward.simulator._attacks import RepoAttacker
from modelward.updater._config import TufConfig
from tests._helpers import update_peak_rss
from tests.conftest import PASSPHRASE, DeviceState, World


def _trusted(s: DeviceState) -> tuple[object, ...]:
    return s.record, s.counter, s.anchor, s.current, s.slots



def _strip_signed_lengths(a: RepoAttacker) -> None:
    """Re-sign the current snapshot and timestamp (the operator's online keys) with
    version-only meta, as a publisher from before signed lengths wrote them."""
    snap_name, _ = a.current_names()
    snap: Metadata = a.load(snap_name)  # type: ignore[type-arg]
    snap.signed.meta = {k: MetaFile(version=v.version) for k, v in snap.signed.meta.items()}
    snap.sign(a.stolen("snapshot"))
    a.serve(a.metadata / snap_name, snap.to_bytes())
    ts: Metadata = a.load("timestamp.json")  # type: ignore[type-arg]
    ts.signed.snapshot_meta = MetaFile(version=ts.signed.snapshot_meta.version)
    ts.sign(a.stolen("timestamp"))
    a.serve(a.metadata / "timestamp.json", ts.to_bytes())


def test_published_meta_carries_signed_length_and_hash(world: World) -> None:
    world.publish("1.0.0", seed=1)
    a = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    snap_name, targets_name = a.current_names()
    ts = a.load("timestamp.json").signed
    snap = a.load(snap_name).signed
    ts.snapshot_meta.verify_length_and_hashes((a.metadata / snap_name).read_bytes())
    snap.meta["targets.json"].verify_length_and_hashes(
        (a.metadata / targets_name).read_bytes())
    assert ts.snapshot_meta.length and snap.meta["targets.json"].length
    world.repo.refresh()  # re-signed timestamp: still with the snapshot's length and hash
    assert a.load("timestamp.json").signed.snapshot_meta.hashes


@pytest.mark.xdist_group("machine")
def test_junk_targets_within_the_device_bound_is_refused_by_the_signed_length(
    world: World,
) -> None:
    """Junk of the device's own targets maximum (not ngclient's): only the signed length
    keeps it from being parsed (~20x in objects)."""
    world.publish("1.0.0", seed=1)
    rc, normal, err = update_peak_rss(world.conf_path)
    assert rc == 0, err
    world.publish("2.0.0", seed=2)
    a = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    _, targets_name = a.current_names()
    limit = TufConfig().targets_max_length
    a.serve(a.metadata / targets_name, b"[" + b"{}," * ((limit - 3) // 3) + b"{}]")
    before = world.snapshot()
    rc, rss, err = update_peak_rss(world.conf_path)
    assert rc == 1, err
    assert "Traceback" not in err, err[-600:]
    assert "DownloadLengthMismatch" in err or "length" in err.lower(), err[-600:]
    assert _trusted(world.snapshot()) == _trusted(before)
    assert world.active_version() == "1.0.0"
    assert rss <= normal + 16 * 1024, (normal, rss)


@pytest.mark.xdist_group("machine")
def test_repository_without_signed_lengths_still_updates_and_is_bounded(world: World) -> None:
    """A repository from before signed lengths: the update works; junk over the device's
    lowered bound (3 MB, under ngclient's 5 MB default) is refused before it is parsed."""
    world.publish("1.0.0", seed=1)
    rc, normal, err = update_peak_rss(world.conf_path)
    assert rc == 0, err
    world.publish("2.0.0", seed=2)
    a = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    _strip_signed_lengths(a)
    _, targets_name = a.current_names()
    good = (a.metadata / targets_name).read_bytes()
    a.serve(a.metadata / targets_name, b"[" + b"{}," * 1_000_000 + b"{}]")
    before = world.snapshot()
    rc, rss, err = update_peak_rss(world.conf_path)
    assert rc == 1, err
    assert "Traceback" not in err, err[-600:]
    assert _trusted(world.snapshot()) == _trusted(before)
    assert world.active_version() == "1.0.0"
    assert rss <= normal + 16 * 1024, (normal, rss)
    a.serve(a.metadata / targets_name, good)
    rc, _, err = update_peak_rss(world.conf_path)
    assert rc == 0, err
    assert world.active_version() == "2.0.0"
