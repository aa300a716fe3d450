"""Real stack (swtpm device, nginx origin, the real `modelward` command): the leftovers of
issue 14 on one machine (publisher/_history.py), each through stock python-tuf and a
modelward device.

- The careless operator restores KEYS from before a withdraw and prunes the newer
  targets from metadata/: `publish` is refused (exit 1, one line naming the missing file);
  the device's trusted state does not move; with the file put back (from the device's own
  trusted copy) the next publish keeps the withdraw and the device never installs it.
  Before: targets v4 re-signed from the backup's v3, and the device installed the
  withdrawn 1.1.0.
- A version jump of a team role (a snapshot listing the team at v40, signed by the
  snapshot key): the team's next publish is numbered above it and the device installs it.
  Before: the team wrote v3, the snapshot kept v40, and neither stock python-tuf nor the
  device ever found the release.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater

from modelward.publisher._keys import load_signer_at
from modelward.updater.errors import DownloadFailedError
from tests._stock_tuf import BASE, LocalFetcher, stock_refresh
from tests.conftest import PASSPHRASE, World


def _args(w: World) -> list[str]:
    return ["--repo", str(w.repo_dir), "--keys", str(w.keys)]


def _stock_find(w: World, path: str) -> bool:
    """A fresh stock python-tuf client finds ``path`` (its delegation search included)."""
    md = w.repo_dir / "metadata"
    with tempfile.TemporaryDirectory(prefix="stock-tuf-") as d:
        u = Updater(d, BASE, fetcher=LocalFetcher(md), bootstrap=(md / "1.root.json").read_bytes())
        u.refresh()
        return u.get_targetinfo(path) is not None


def test_old_keys_backup_and_pruned_targets_never_bring_a_withdrawn_release_back(
        world: World) -> None:
    w = world
    w.publish("1.0.0", seed=1)  # targets v2
    w.update()
    assert w.active_version() == "1.0.0"
    r = w.cli("publish", *_args(w), str(w.bundle("1.1.0", seed=2)))  # v3
    assert r.returncode == 0, r.stderr
    backup = w.tmp / "keys-backup"
    shutil.copytree(w.keys, backup)
    assert w.cli("rollout", "withdraw", "classifier", "1.1.0", *_args(w)).returncode == 0  # v4
    w.update()
    assert w.active_version() == "1.0.0"
    md = w.repo_dir / "metadata"
    (md / "4.targets.json").unlink()  # pruned; and KEYS from before the withdraw
    shutil.rmtree(w.keys)
    shutil.copytree(backup, w.keys)
    served = {p.name: p.read_bytes() for p in md.iterdir() if p.is_file()}
    before = w.snapshot()
    r = w.cli("publish", *_args(w), str(w.bundle("1.2.0", seed=3)), "--channel", "beta")
    assert r.returncode == 1
    assert "4.targets.json is missing" in r.stderr and "put 4.targets.json back" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in md.iterdir() if p.is_file()} == served
    w.update()
    assert w.snapshot() == before and w.active_version() == "1.0.0"
    # the device's own trusted copy of targets v4 is the operator's way back
    (md / "4.targets.json").write_bytes((w.state / "metadata" / "targets.json").read_bytes())
    r = w.cli("publish", *_args(w), str(w.bundle("1.2.0", seed=3)), "--channel", "beta")
    assert r.returncode == 0, r.stderr
    t = Metadata.from_bytes((md / "5.targets.json").read_bytes()).signed
    assert t.targets["classifier/classifier-1.1.0.tar"].custom["modelward"]["withdrawn"]
    w.update()
    assert w.active_version() == "1.0.0"  # never the withdrawn 1.1.0


def test_team_publish_after_a_version_jump_reaches_the_device(world: World) -> None:
    w = world
    assert w.cli("repo", "delegate", "vision", "--paths", "classifier/*",
                 *_args(w)).returncode == 0
    r = w.cli("publish", "--role", "vision", *_args(w), str(w.bundle("1.0.0", seed=1)))
    assert r.returncode == 0, r.stderr  # vision v2
    w.update()
    assert w.active_version() == "1.0.0"
    # a snapshot listing vision at v40 (the snapshot key's holder; or an altered copy)
    md = w.repo_dir / "metadata"
    ts_md = Metadata.from_bytes((md / "timestamp.json").read_bytes())
    old = Metadata.from_bytes((md / f"{ts_md.signed.snapshot_meta.version}.snapshot.json")
                              .read_bytes()).signed
    v = old.version + 1
    for signed, name, role in (
            (Snapshot(version=v, expires=old.expires,
                      meta={**old.meta, "vision.json": MetaFile(version=40)}),
             f"{v}.snapshot.json", "snapshot"),
            (Timestamp(version=ts_md.signed.version + 1, expires=old.expires,
                       snapshot_meta=MetaFile(version=v)), "timestamp.json", "timestamp")):
        m = Metadata(signed)
        m.sign(load_signer_at(w.keys / f"{role}.pem", PASSPHRASE, role))
        (md / name).write_bytes(m.to_bytes(JSONSerializer()))
    before = w.snapshot()
    with pytest.raises(DownloadFailedError, match="40.vision.json"):
        w.update()  # the team's releases are out of reach: nothing installed
    after = w.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == \
        (before.record, before.counter, before.anchor, before.current, before.slots)
    r = w.cli("publish", "--role", "vision", *_args(w), str(w.bundle("1.1.0", seed=2)))
    assert r.returncode == 0, r.stderr
    assert (md / "41.vision.json").is_file()
    stock_refresh(w.repo_dir)
    assert _stock_find(w, "classifier/classifier-1.1.0.tar")
    w.update()
    assert w.active_version() == "1.1.0"
