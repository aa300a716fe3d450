"""Attack (a14-operator) by someone who can write only the served repository directory
(not the keys): edit the published ``1.root.json`` so that the keys behind the targets,
snapshot and timestamp keyids are the attacker's. Nothing checks it: the operator's next
routine root change (`repo add-key`) loads that file as the trusted root, signs version 2
with the real root key, and a real device (swtpm, nginx) then installs the attacker's
model. (With a root threshold above 1 `repo sign root` would show no change either: its
summary compares against the same edited file.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from tuf.api.metadata import Metadata, Root

from tests.conftest import World
from tests.integration.test_a14_sign_keyswap import _as, _env, _rk, _ship_evil


def test_a14_edited_published_root_is_not_signed_onwards(world: World,
                                                        tmp_path: Path) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    assert w.active_version() == "1.0.0"
    path = w.repo_dir / "metadata" / "1.root.json"
    doc = json.loads(path.read_bytes())
    root = Root.from_dict(copy.deepcopy(doc["signed"]))
    atk = {role: _as(root.roles[role].keyids[0]) for role in ("targets", "snapshot",
                                                               "timestamp")}
    for s in atk.values():
        doc["signed"]["keys"][s.public_key.keyid] = s.public_key.to_dict()
    path.write_text(json.dumps(doc, indent=1))  # its signature no longer verifies

    # The operator's routine change: a CI key for targets.
    priv = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ci.pub.pem").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = w.cli("repo", "add-key", "targets", "--uri", "envvar:CI_KEY", "--public-key",
              str(tmp_path / "ci.pub.pem"), *_rk(w), env=_env())
    v2 = w.repo_dir / "metadata" / "2.root.json"
    carried = False
    if r.returncode == 0 and v2.exists():
        new = Metadata[Root].from_bytes(v2.read_bytes()).signed
        tid = atk["targets"].public_key.keyid
        carried = new.keys[tid].keyval == atk["targets"].public_key.keyval
    evil = carried and _ship_evil(w, atk)
    # What SHOULD happen: the edited root is refused (one clear error), nothing the real
    # root key signs carries the attacker's keys, and the device keeps 1.0.0.
    assert not carried
    assert not evil
    assert w.active_version() == "1.0.0"
