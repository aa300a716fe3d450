"""What a refresh that fails part-way persists (issue 13, must-show 3): TUF's client
workflow keeps each top-level role as soon as it verifies, so a refresh failing at the
snapshot keeps the new timestamp, and one failing at the targets keeps the new timestamp
and snapshot; nothing is installed, and the trust record, TPM counter and anchor,
``current`` and slots do not move. swtpm and nginx, the device's real update.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, MetaFile
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._repo import Expiry, Repository
from modelward.simulator._attacks import RepoAttacker
from modelward.updater.errors import DownloadFailedError, MetadataError
from modelward.updater.install._install import Outcome
from tests.conftest import PASSPHRASE, World, tree_digest


def _attacker(w: World) -> RepoAttacker:
    return RepoAttacker(w.repo_dir, w.keys, PASSPHRASE)


def _remove(path: Path) -> Callable[[], None]:
    data = path.read_bytes()
    path.unlink()
    return lambda: path.write_bytes(data)


def _snapshot_404(w: World) -> Callable[[], None]:
    snap, _ = _attacker(w).current_names()
    return _remove(w.repo_dir / "metadata" / snap)


def _snapshot_forged(w: World) -> Callable[[], None]:
    a = _attacker(w)
    snap, _ = a.current_names()
    md = a.load(snap)
    md.signatures.clear()
    md.sign(a.own_key())  # not the snapshot key
    a.serve(a.metadata / snap, md.to_bytes(JSONSerializer()))
    return a.restore


def _snapshot_hash_mismatch(w: World) -> Callable[[], None]:
    # A timestamp that pins the snapshot's length and hash, and snapshot bytes that differ
    # from it (same signed content, re-serialized).
    a = _attacker(w)
    snap_name, _ = a.current_names()
    real = (a.metadata / snap_name).read_bytes()
    ts = a.load("timestamp.json")
    ts.signed.snapshot_meta = MetaFile(version=ts.signed.snapshot_meta.version,
                                       length=len(real),
                                       hashes={"sha256": hashlib.sha256(real).hexdigest()})
    ts.signatures.clear()
    ts.sign(a.stolen("timestamp"))
    a.serve(a.metadata / "timestamp.json", ts.to_bytes(JSONSerializer()))
    a.serve(a.metadata / snap_name,
            Metadata.from_bytes(real).to_bytes(JSONSerializer(compact=True)))
    return a.restore


def _targets_hash_mismatch(w: World) -> Callable[[], None]:
    # A snapshot that pins the targets file's length and hash (as the spec allows), and
    # targets bytes that differ from it (same signed content, re-serialized).
    a = _attacker(w)
    snap_name, targets_name = a.current_names()
    real = (a.metadata / targets_name).read_bytes()
    snap = a.load(snap_name)
    snap.signed.meta["targets.json"] = MetaFile(
        version=snap.signed.meta["targets.json"].version, length=len(real),
        hashes={"sha256": hashlib.sha256(real).hexdigest()})
    snap.signatures.clear()
    snap.sign(a.stolen("snapshot"))
    a.serve(a.metadata / snap_name, snap.to_bytes(JSONSerializer()))
    a.serve(a.metadata / targets_name,
            Metadata.from_bytes(real).to_bytes(JSONSerializer(compact=True)))
    return a.restore


def _targets_404(w: World) -> Callable[[], None]:
    _, targets = _attacker(w).current_names()
    return _remove(w.repo_dir / "metadata" / targets)


def _targets_expired(w: World) -> Callable[[], None]:
    # Re-signed now with a 2 s lifetime (the repository refuses to publish what is expired
    # already): expired by the time the device looks.
    short = Repository(w.repo_dir, w.keys, PASSPHRASE,
                       expiry=Expiry(targets=timedelta(seconds=2)))
    short.set_rollout("classifier", "2.0.0", percent=100.0)
    time.sleep(2.1)
    return lambda: w.repo.set_rollout("classifier", "2.0.0", percent=100.0)


CASES = {
    "snapshot-404": (_snapshot_404, DownloadFailedError, "snapshot"),
    "snapshot-forged": (_snapshot_forged, MetadataError, "snapshot"),
    "snapshot-hash-mismatch": (_snapshot_hash_mismatch, MetadataError, "snapshot"),
    "targets-hash-mismatch": (_targets_hash_mismatch, MetadataError, "targets"),
    "targets-404": (_targets_404, DownloadFailedError, "targets"),
    "targets-expired": (_targets_expired, MetadataError, "targets"),
}
# The timestamp signs the snapshot's length and hash, so a snapshot re-signed by another
# key is refused by that hash before its signature is looked at.
REASON = {"snapshot-forged": "LengthOrHashMismatchError",
          "snapshot-hash-mismatch": "LengthOrHashMismatchError",
          "targets-hash-mismatch": "LengthOrHashMismatchError",
          "targets-expired": "ExpiredMetadataError"}


@pytest.mark.parametrize("case", list(CASES))
def test_refresh_failing_part_way_keeps_what_verified_and_installs_nothing(
    world: World, case: str
) -> None:
    breaks, error, at = CASES[case]
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    repair = breaks(world)
    before = world.snapshot()

    with pytest.raises(error) as ei:
        world.update()
    assert case not in REASON or REASON[case] in str(ei.value), ei.value
    after = world.snapshot()
    assert world.active_version() == "1.0.0"
    assert after == replace(before, metadata=after.metadata)  # nothing trusted moved
    served = tree_digest(world.repo_dir / "metadata")
    ts = json.loads((world.repo_dir / "metadata" / "timestamp.json").read_bytes())["signed"]
    snap_file = f"{ts['meta']['snapshot.json']['version']}.snapshot.json"
    # The new timestamp verified: persisted, whatever failed after it.
    assert after.metadata["timestamp.json"] == served["timestamp.json"]
    assert after.metadata["timestamp.json"] != before.metadata["timestamp.json"]
    if at == "snapshot":
        assert after.metadata["snapshot.json"] == before.metadata["snapshot.json"]
    else:  # the snapshot verified too
        assert after.metadata["snapshot.json"] == served[snap_file]
        assert after.metadata["snapshot.json"] != before.metadata["snapshot.json"]
    assert after.metadata["targets.json"] == before.metadata["targets.json"]

    # Once the origin serves the signed files again, the device goes on from there.
    repair()
    r = world.update()
    assert r.outcome is Outcome.INSTALLED and world.active_version() == "2.0.0"
