"""Issue 14 must-show 5 (f14-summary) through the real CLI and a real device (swtpm,
nginx): a pending file that a device would act on otherwise than its summary can say is
refused by `repo sign` with a typed one-line error, and nothing the device trusts moves
(active model, trust record, counter, ``current``, TUF metadata)."""

from __future__ import annotations

import json
from pathlib import Path

from tuf.api.metadata import Metadata, Root

from tests.conftest import World
from tests.integration.test_a14_sign_hidden_pin import _rk, _sign, _two_signers
from tests.integration.test_a14_sign_keyswap import _as, _env, _park_root_v2


def test_i14_sign_refuses_a_hidden_pin_and_nothing_moves(world: World, tmp_path: Path
                                                         ) -> None:
    w = world
    env = _two_signers(w, tmp_path)
    r = w.cli("publish", *_rk(w), "--sign-with", "encfile:targets.pem", "--sign-with",
              "envvar:CI_KEY", str(w.bundle("1.0.0", seed=1)), env=env)
    assert r.returncode == 0, r.stderr
    r = w.cli("publish", *_rk(w), str(w.bundle("2.0.0", seed=2)), env=env)
    assert r.returncode == 1, r.stderr
    w.update()
    assert w.active_version() == "1.0.0"
    (pending,) = (w.keys / "pending").glob("*.targets.json")
    doc = json.loads(pending.read_bytes())
    doc["signed"]["targets"]["classifier/classifier-1.0.0.tar"]["custom"]["modelward"][
        "pinned"] = 1  # devices: bool(1), a pin
    doc["signatures"] = []
    pending.write_text(json.dumps(doc))
    planted = pending.read_bytes()
    before = w.snapshot()
    meta = sorted((p.name, p.read_bytes()) for p in (w.repo_dir / "metadata").iterdir())
    for key in ("envvar:CI_KEY", "encfile:targets.pem"):
        r = _sign(w, key, env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "pinned is 1" in r.stderr and "refusing to sign" in r.stderr, r.stderr
    assert pending.read_bytes() == planted  # left as it is, for the operator to look at
    assert sorted((p.name, p.read_bytes()) for p in (w.repo_dir / "metadata").iterdir()) \
        == meta
    w.update()
    assert w.snapshot() == before and w.active_version() == "1.0.0"


def test_i14_sign_refuses_a_root_redefining_trusted_keyids_and_nothing_moves(
        world: World, tmp_path: Path) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    _park_root_v2(w, tmp_path)
    pending = w.keys / "pending" / "2.root.json"
    md = Metadata[Root].from_bytes(pending.read_bytes())
    tid = md.signed.roles["targets"].keyids[0]
    md.signed.keys[tid] = _as(tid).public_key  # same keyid, the attacker's key
    md.signatures.clear()
    pending.write_bytes(md.to_bytes())
    before = w.snapshot()
    r = w.cli("repo", "sign", "root", "--key", "encfile:root.pem", "--yes", *_rk(w),
              env=_env())
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "another key behind keyid" in r.stderr, r.stderr
    assert not (w.repo_dir / "metadata" / "2.root.json").exists()
    w.update()
    assert w.snapshot() == before and w.active_version() == "1.0.0"
