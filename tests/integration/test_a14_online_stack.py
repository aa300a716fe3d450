"""The compromised online host ships a model through the operator's next publish, on the
real stack (swtpm device, nginx, the refresh confined as systemd/modelward-repo-refresh.service
says): tests/integration/test_i14_online.py's layout, where the offline machine's commands
read the metadata/ directory the online host writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._keys import load_signer_at
from modelward.publisher._repo import Repository
from modelward.updater.errors import MetadataError
from modelward.updater.install._install import Outcome
from tests.integration.test_i14_online import PASS, OnlineWorld
from tests.integration.test_i14_online import online_world as online_world  # noqa: F401


def _dump(md: Metadata, path: Path) -> None:  # type: ignore[type-arg]
    path.write_bytes(md.to_bytes(JSONSerializer()))


def test_online_host_ships_a_model_through_the_next_offline_publish(
        online_world: OnlineWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = online_world
    w.publish("1.0.0", seed=1)
    assert w.refresh_as_unit().returncode == 0
    w.update()
    assert w.active_version() == "1.0.0"

    # the attacker's model, with the modelward fields a real publish gives it
    evil = w.bundle("9.9.9", seed=666)
    scratch = Repository(tmp_path / "scratch", tmp_path / "scratch-keys",
                         b"scratch passphrase, not the operator's")
    scratch.init()
    scratch.publish(evil)
    path = "classifier/classifier-9.9.9.tar"
    tf = scratch.current()[0].targets[path]
    dest = w.repo_dir / "targets" / "classifier" / f"{tf.hashes['sha256']}.classifier-9.9.9.tar"
    shutil.copyfile(evil, dest)

    # the online host: targets v3 (the published ones + 9.9.9, signed by nobody who counts),
    # then its own snapshot and timestamp naming it, in the served metadata/
    md_dir = w.repo_dir / "metadata"
    published = Metadata[Targets].from_bytes((md_dir / "2.targets.json").read_bytes()).signed
    snap_key = load_signer_at(w.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    ts_key = load_signer_at(w.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp")
    forged = Metadata(Targets(version=3, expires=published.expires,
                              targets={**published.targets, path: tf}))
    forged.sign(snap_key)
    _dump(forged, md_dir / "3.targets.json")
    snap = Metadata(Snapshot(version=40, expires=published.expires,
                             meta={"targets.json": MetaFile(version=3)}))
    snap.sign(snap_key)
    _dump(snap, md_dir / "40.snapshot.json")
    ts = Metadata(Timestamp(version=40, expires=published.expires,
                            snapshot_meta=MetaFile(version=40)))
    ts.sign(ts_key)
    _dump(ts, md_dir / "timestamp.json")
    with pytest.raises(MetadataError):  # the device alone is not fooled
        w.update()

    # the operator's next, ordinary release on the offline side
    with caplog.at_level(logging.WARNING, "modelward.publisher._offline_base"):
        w.repo.publish(w.bundle("1.1.0", seed=2))  # on its own v2, never blocked
    assert "40.snapshot.json is not what this tool signed" in caplog.text
    assert "3.targets.json" in caplog.text
    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    w.update()
    assert w.active_version() == "1.1.0"  # never the online host's 9.9.9


def test_planted_huge_snapshot_file_name_does_not_freeze_the_device(
        online_world: OnlineWorld) -> None:
    """The origin plants an empty ``10**200.snapshot.json``: the refresh numbers its next
    snapshot right above its own floor (the planted name raises nothing); the device
    still follows."""
    w = online_world
    w.update()
    (w.repo_dir / "metadata" / f"{10 ** 200}.snapshot.json").write_bytes(b"")
    w.publish("1.0.0", seed=1)
    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.0.0"
