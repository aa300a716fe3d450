"""Root changes by TUF's rules on a real device (issue 14, must-show 1 and 2).

A 2-of-2 root (`repo init --threshold root=2 --keys-per-role root=2`), served by nginx, a
device with an swtpm. Every `repo`/`publish` command that exits 0 is also followed by a
stock python-tuf client (tests/conftest.py, World.cli); here it is asserted explicitly too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from modelward.agent._commands import provision as agent_provision
from modelward.publisher._repo import Repository
from modelward.publisher._tufcheck import StockClientWouldRejectError
from modelward.simulator._demo import write_device_config
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._swtpm import SwtpmHandle
from modelward.updater.errors import MetadataError
from modelward.updater.install._install import Outcome
from tests._stock_tuf import stock_refresh
from tests.conftest import PASSPHRASE, World, copytree, tree_digest


@pytest.fixture
def root2_world(tmp_path: Path, swtpm: SwtpmHandle, pki: tuple[object, object],
                monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """A 2-of-2 root made by the CLI; a device provisioned with 1.root.json, on v1.0.0."""
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE.decode())
    repo_dir, keys, builds = tmp_path / "repo", tmp_path / "keys", tmp_path / "builds"
    builds.mkdir()
    ca, server = pki
    origin = start_origin(repo_dir, tmp_path / "origin", server)  # type: ignore[arg-type]
    try:
        conf = write_device_config(tmp_path / "agent.toml", device_id="dev-1",
                                   state=tmp_path / "state", tcti=swtpm.tcti,
                                   origin_url=origin.url, ca=ca.cert)  # type: ignore[attr-defined]
        w = World(tmp_path, repo_dir, keys, Repository(repo_dir, keys, PASSPHRASE), builds,
                  conf, swtpm, origin.url, ca)  # type: ignore[arg-type]
        _ok(w.cli("repo", "init", "--threshold", "root=2", "--keys-per-role", "root=2",
                  *_where(w)))
        agent_provision(w.cfg, repo_dir / "metadata" / "1.root.json")
        w.publish("1.0.0", seed=1)
        w.update()
        assert w.active_version() == "1.0.0"
        yield w
    finally:
        stop_origin(tmp_path / "origin")


def _where(w: World) -> list[str]:
    return ["--repo", str(w.repo_dir), "--keys", str(w.keys)]


def _ok(r: object) -> None:
    assert getattr(r, "returncode", None) == 0, getattr(r, "stderr", r)


def _device_root(w: World) -> int:
    return int(json.loads((w.state / "trust" / "root.json").read_bytes())["signed"]["version"])


def _targets_keyids(w: World) -> set[str]:
    targets, _, _ = w.repo.current()
    md = Metadata.from_bytes(
        (w.repo_dir / "metadata" / f"{targets.version}.targets.json").read_bytes())
    return set(md.signatures)


def test_rotate_targets_parks_until_the_second_root_key_signs(root2_world: World) -> None:
    w = root2_world
    old_targets_key = _targets_keyids(w)
    before, served = w.snapshot(), tree_digest(w.repo_dir / "metadata")
    r = w.cli("repo", "rotate", "targets", *_where(w))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "root v2 is not published: devices would reject it" in r.stderr
    assert "1 more signature(s) by the previous root v1's root keys" in r.stderr
    assert "encfile:root-2.pem" in r.stderr and "repo sign root" in r.stderr
    # Nothing devices see moved: the served files, the device, a stock client.
    assert tree_digest(w.repo_dir / "metadata") == served
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.snapshot() == before
    assert stock_refresh(w.repo_dir) == 1

    # The new targets key does not count yet: targets it signs are never published ...
    new_key = next((w.keys / "rotating").glob("targets-*.pem"))
    from modelward.publisher._keys import load_signer_at

    targets, _, _ = w.repo.current()
    targets.version += 1
    early = Metadata(targets)
    early.sign(load_signer_at(new_key, PASSPHRASE))
    saved, local = w.tmp / "served-before", w.tmp / "device-md-before"
    copytree(w.repo_dir / "metadata", saved)
    copytree(w.state / "metadata", local)
    (w.repo_dir / "metadata" / f"{targets.version}.targets.json").write_bytes(early.to_bytes())
    with pytest.raises(StockClientWouldRejectError, match="targets was signed by 0/1"):
        w.repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    # ... and a device refuses them when a mirror serves them anyway.
    mirror = Repository(w.repo_dir, w.keys, PASSPHRASE)
    floors = (w.keys / "published.json").read_bytes()  # what this tool published
    import modelward.publisher._repo as repo_mod

    gate, repo_mod.check_state = repo_mod.check_state, lambda *_a, **_k: None  # type: ignore[assignment]
    verify, repo_mod.verify_role = repo_mod.verify_role, (  # type: ignore[assignment]
        lambda path, *_a: repo_mod.served_load(path))  # the mirror checks no signature
    try:
        mirror._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    finally:
        repo_mod.check_state = gate  # type: ignore[assignment]
        repo_mod.verify_role = verify  # type: ignore[assignment]
    with pytest.raises(MetadataError, match="targets"):
        w.update()
    after = w.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    # (that mirror signed with the online keys; undo its timestamp on both sides)
    copytree(saved, w.repo_dir / "metadata")
    copytree(local, w.state / "metadata")
    (w.keys / "published.json").write_bytes(floors)  # else: refused as a rollback

    # While root v2 waits, the old key still publishes, and the device installs.
    w.publish("2.0.0", seed=2)
    assert _targets_keyids(w) == old_targets_key
    w.update()
    assert w.active_version() == "2.0.0" and _device_root(w) == 1

    # The second root key signs: root v2 is published, targets re-signed with the new key.
    r = w.cli("repo", "sign", "root", "--yes", "--key", "encfile:root-2.pem", *_where(w))
    assert r.returncode == 0, r.stderr
    assert stock_refresh(w.repo_dir) == 2
    assert _targets_keyids(w) > old_targets_key  # by the new key and the old (the switch)
    w.publish("3.0.0", seed=3)
    assert _targets_keyids(w).isdisjoint(old_targets_key)  # from then on the new key only
    w.update()
    assert w.active_version() == "3.0.0" and _device_root(w) == 2
    newest = (w.repo_dir / "metadata" / "2.root.json").read_bytes()
    assert (w.state / "trust" / "root.json").read_bytes() == newest


def test_add_key_root_threshold_one_needs_both_old_signatures(root2_world: World,
                                                              tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    w = root2_world
    pub = tmp_path / "offline-root.pub.pem"
    pub.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    before, served = w.snapshot(), tree_digest(w.repo_dir / "metadata")
    r = w.cli("repo", "add-key", "root", "--uri", "envvar:OFFLINE_ROOT", "--public-key",
              str(pub), "--threshold", "1", *_where(w))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "previous root v1's root keys (threshold 2, have 1" in r.stderr
    assert "root v2's own" not in r.stderr  # 1-of-3 is met by one signature
    assert tree_digest(w.repo_dir / "metadata") == served
    assert w.update().outcome is Outcome.UP_TO_DATE and w.snapshot() == before

    _ok(w.cli("repo", "sign", "root", "--yes", "--key", "encfile:root-2.pem", *_where(w)))
    assert stock_refresh(w.repo_dir) == 2
    # 1-of-3 now: one root signature publishes the next root, and the device follows.
    _ok(w.cli("repo", "rotate", "timestamp", *_where(w)))
    assert stock_refresh(w.repo_dir) == 3
    w.publish("2.0.0", seed=2)
    w.update()
    assert w.active_version() == "2.0.0" and _device_root(w) == 3

