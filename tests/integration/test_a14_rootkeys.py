"""A Ctrl-C in `repo rotate snapshot`, then the operator runs it again (a14-rootkeys), on
the real stack: nginx origin, a device with an swtpm, the real `modelward` CLI for the retry.

The stale hard link ``KEYS/snapshot.pem`` left by the interrupted key filing signs the
re-keyed snapshot after the retry's root v3 is published: root v3 is served, the snapshot
it needs is never re-signed, and the device (like a stock TUF client) stops updating.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import modelward.publisher._keys as keys_mod
import modelward.publisher._repo as repo_mod
import modelward.publisher._rootstage as stage_mod
from modelward.publisher._repo import Repository
from modelward.updater.install._install import Outcome
from tests._stock_tuf import stock_refresh
from tests.conftest import PASSPHRASE, World


class Crash(BaseException):
    """The operator's Ctrl-C."""


def test_ctrl_c_in_snapshot_rotation_then_cli_retry_keeps_the_device_updating(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    assert w.active_version() == "1.0.0"
    real = repo_mod.write_atomic
    state = {"root2": False, "registry": 0}

    def write(path: Path, data: bytes, mode: int = 0o644) -> None:
        if path.name == "2.root.json":
            state["root2"] = True
        if state["root2"] and path.name == "signers.json":
            state["registry"] += 1
            if state["registry"] == 2:  # rotating/snapshot-ID.pem -> snapshot.pem
                raise Crash(path.name)
        real(path, data, mode)

    monkeypatch.setattr(repo_mod, "write_atomic", write)
    monkeypatch.setattr(keys_mod, "write_atomic", write)
    monkeypatch.setattr(stage_mod, "write_atomic", write)  # N.root.json (rootstage)
    with pytest.raises(Crash):
        w.repo.rotate("snapshot")
    monkeypatch.setattr(repo_mod, "write_atomic", real)
    monkeypatch.setattr(keys_mod, "write_atomic", real)
    monkeypatch.setattr(stage_mod, "write_atomic", real)
    where = ["--repo", str(w.repo_dir), "--keys", str(w.keys)]
    r = w.cli("repo", "rotate", "snapshot", *where)  # the operator runs it again
    assert "Traceback" not in r.stderr
    w.repo = Repository(w.repo_dir, w.keys, PASSPHRASE)
    w.publish("2.0.0", seed=2)  # the operator's next release reaches the device
    w.update()
    assert w.active_version() == "2.0.0"
    root = json.loads((w.state / "trust" / "root.json").read_bytes())["signed"]
    assert root["version"] == w.repo.latest_root_version()


def test_cli_add_timestamp_key_threshold_two_keeps_the_device_updating(
        world: World, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    priv = ed25519.Ed25519PrivateKey.generate()
    pub = tmp_path / "ts2.pub.pem"
    pub.write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    env = {"TS2": priv.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()}
    where = ["--repo", str(w.repo_dir), "--keys", str(w.keys)]
    r = w.cli("repo", "add-key", "timestamp", "--uri", "envvar:TS2", "--public-key", str(pub),
              "--threshold", "2", *where, env=env)
    assert "Traceback" not in r.stderr
    w.cli("repo", "refresh", *where, env=env)  # the timer, with both keys
    stock_refresh(w.repo_dir)  # a stock TUF client still accepts what is served
    assert w.update().outcome is Outcome.UP_TO_DATE  # and the device still refreshes
    assert w.active_version() == "1.0.0"
