"""Delegated team keys publish only their own models (issue #5 must-show 4)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from tuf.api.metadata import Metadata, TargetFile

from modelward.publisher._keys import load_signer_at
from tests.conftest import PASSPHRASE, World


def _team(w: World) -> None:
    r = w.cli("repo", "delegate", "vision", "--paths", "detector/*", "--repo",
              str(w.repo_dir), "--keys", str(w.keys))
    assert r.returncode == 0, r.stderr


def test_team_publishes_its_model_and_devices_install_it(world: World) -> None:
    _team(world)
    world.conf_path.write_text(world.conf_path.read_text().replace(
        'model = "classifier"', 'model = "detector"'))
    bundle = world.bundle("1.0.0", seed=4, name="detector")
    r = world.cli("publish", "--role", "vision", "--repo", str(world.repo_dir), "--keys",
                  str(world.keys), str(bundle))
    assert r.returncode == 0, r.stderr
    world.update()
    assert world.active_version() == "1.0.0"
    assert (world.state / "metadata" / "vision.json").exists()


def test_team_cannot_publish_outside_its_paths(world: World) -> None:
    _team(world)
    r = world.cli("publish", "--role", "vision", "--repo", str(world.repo_dir), "--keys",
                  str(world.keys), str(world.bundle("9.0.0", seed=9)))
    assert r.returncode == 1
    assert "outside the paths delegated to 'vision'" in r.stderr
    assert not list((world.repo_dir / "targets").rglob("*9.0.0*"))  # nothing was served


def test_device_ignores_a_team_listing_outside_its_paths(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    _team(world)
    # The team's key (say, stolen) signs a classifier release into its own metadata and
    # the file is put on the origin: everything a device would fetch is in place.
    bundle = world.bundle("9.0.0", seed=9)
    path = "classifier/classifier-9.0.0.tar"
    tf = TargetFile.from_file(path, str(bundle), ["sha256"])
    fp = json.loads((world.state / "trust" / "record.json").read_bytes())  # any 64 hex
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": "classifier", "version": "9.0.0",
        "fingerprint": fp["record"]["active"]["fingerprint"]}}
    dest = world.repo_dir / "targets" / "classifier" / f"{tf.hashes['sha256']}.classifier-9.0.0.tar"
    shutil.copyfile(bundle, dest)
    md_dir = world.repo_dir / "metadata"
    team = Metadata.from_bytes((md_dir / "1.vision.json").read_bytes())
    team.signed.targets[path] = tf
    team.signed.version = 2
    team.signatures.clear()
    team.sign(load_signer_at(world.keys / "delegated-vision.pem", PASSPHRASE))
    (md_dir / "2.vision.json").write_bytes(team.to_bytes())
    targets, _, _ = world.repo.current()
    world.repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001 - as a mirror would
    before = world.snapshot()
    log = world.tmp / "origin" / "access.log"
    seen = len(log.read_text().splitlines())
    with caplog.at_level(logging.WARNING, logger="modelward.updater.install._tuf"):
        result = world.update()
    assert "nothing to do" in result.message
    assert world.active_version() == "1.0.0"
    # TUF's search for classifier/ paths never reaches the role delegated detector/*:
    # a classifier device does not even fetch it (issue 13; it used to fetch every role
    # and drop the listing with a warning).
    assert not any("vision.json" in line for line in log.read_text().splitlines()[seen:])
    assert not (world.state / "metadata" / "vision.json").exists()
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)
