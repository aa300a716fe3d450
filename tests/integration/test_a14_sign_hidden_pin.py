"""Attack (a14-operator) through the real CLI and a real device (swtpm, nginx): someone who
can write ``KEYS/pending`` adds ``"pinned": 1`` to an old release in a parked targets
change. The device reads the flag with ``bool()``, the summary only when it ``is True``:
both signers see just the new release, and every device rolls back to the old one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import PASSPHRASE, World


def _rk(w: World) -> list[str]:
    return ["--repo", str(w.repo_dir), "--keys", str(w.keys)]


def _two_signers(w: World, tmp: Path) -> dict[str, str]:
    """targets 2-of-2: the operator's key and a CI key in an envvar."""
    priv = ed25519.Ed25519PrivateKey.generate()
    env = {"MODELWARD_KEY_PASSPHRASE": PASSPHRASE.decode(), "CI_KEY": priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()}
    (tmp / "ci.pub.pem").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = w.cli("repo", "add-key", "targets", "--uri", "envvar:CI_KEY", "--public-key",
              str(tmp / "ci.pub.pem"), "--threshold", "2", *_rk(w), env=env)
    assert r.returncode == 0, r.stderr
    return env


def _sign(w: World, key: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return w.cli("repo", "sign", "targets", "--key", key, "--yes", *_rk(w), env=env)


def test_a14_hidden_pin_in_pending_targets_rolls_devices_back(world: World,
                                                               tmp_path: Path) -> None:
    w = world
    env = _two_signers(w, tmp_path)
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        r = w.cli("publish", *_rk(w), "--sign-with", "encfile:targets.pem", "--sign-with",
                  "envvar:CI_KEY", str(w.bundle(version, seed=seed)), env=env)
        assert r.returncode == 0, r.stderr
    w.update()
    assert w.active_version() == "2.0.0"
    r = w.cli("publish", *_rk(w), str(w.bundle("3.0.0", seed=3)), env=env)
    assert r.returncode == 1 and "1 of the 2 signatures" in r.stderr, r.stderr
    (pending,) = (w.keys / "pending").glob("*.targets.json")

    # The attacker: pin 1.0.0 with a value the summary does not read as a pin.
    doc = json.loads(pending.read_bytes())
    doc["signed"]["targets"]["classifier/classifier-1.0.0.tar"]["custom"]["modelward"][
        "pinned"] = 1
    doc["signatures"] = []
    pending.write_text(json.dumps(doc, indent=1))

    summaries = []
    for key in ("envvar:CI_KEY", "encfile:targets.pem"):
        r = _sign(w, key, env)
        summaries.append(r.stdout)
        assert "Traceback" not in r.stderr, r.stderr
    published = not pending.exists()
    w.update()
    # What SHOULD happen: the signers are shown the pin, or the device is not moved back.
    shown = all("PINNED" in s for s in summaries)
    assert shown or not published or w.active_version() == "3.0.0", (
        summaries, w.active_version())
