"""Attack (a14-operator): someone who can write the operator's ``KEYS/pending`` rewrites a
parked root so that the *keyids* stay as they were but the keys behind them are the
attacker's. `repo sign` shows only keyids, so its summary is exactly what the signer
expected; the pending file's "first signature" verifies because check_pending lets the
pending root's own key table override the trusted one; the published root then hands
targets, snapshot and timestamp to the attacker, and a real device (swtpm, nginx)
installs a model the operator never signed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from modelward.trust._fingerprint import slot_fingerprint
from modelward.updater.bundle._bundle import extract_bundle
from tests.conftest import PASSPHRASE, World


def _rk(w: World) -> list[str]:
    return ["--repo", str(w.repo_dir), "--keys", str(w.keys)]


def _env() -> dict[str, str]:
    return {"MODELWARD_KEY_PASSPHRASE": PASSPHRASE.decode()}


def _as(keyid: str) -> CryptoSigner:
    """A fresh ed25519 key of the attacker that signs under ``keyid``."""
    priv = ed25519.Ed25519PrivateKey.generate()
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    return CryptoSigner(priv, SSlibKey(keyid, "ed25519", "ed25519", {"public": raw.hex()}))


def _write(path: Path, md: Metadata[Any]) -> bytes:
    data = md.to_bytes(JSONSerializer(compact=False))
    path.write_bytes(data)
    return data


def _park_root_v2(w: World, tmp: Path) -> str:
    """The operator adds a second root key (an envvar key) with threshold 2: root v2
    waits in KEYS/pending with one signature. Returns the new key's keyid."""
    priv = ed25519.Ed25519PrivateKey.generate()
    (tmp / "k3.pub.pem").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = w.cli("repo", "add-key", "root", "--uri", "envvar:ROOT2", "--public-key",
              str(tmp / "k3.pub.pem"), "--threshold", "2", *_rk(w), env=_env())
    assert r.returncode == 1 and "pending/2.root.json" in r.stderr, r.stderr
    parked = Metadata[Root].from_bytes((w.keys / "pending" / "2.root.json").read_bytes())
    new = [k for k in parked.signed.roles["root"].keyids
           if k not in Metadata[Root].from_bytes(
               (w.repo_dir / "metadata" / "1.root.json").read_bytes()).signed.keys]
    assert len(new) == 1
    return new[0]


def test_a14_pending_root_with_swapped_keys_behind_same_keyids(world: World,
                                                                tmp_path: Path) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    assert w.active_version() == "1.0.0"
    k3 = _park_root_v2(w, tmp_path)
    pending = w.keys / "pending" / "2.root.json"

    # The attacker (write access to KEYS/pending) rewrites the parked root.
    md = Metadata[Root].from_bytes(pending.read_bytes())
    root = md.signed
    atk = {role: _as(root.roles[role].keyids[0]) for role in ("targets", "snapshot",
                                                               "timestamp")}
    atk["root"] = _as(k3)
    for s in atk.values():
        root.keys[s.public_key.keyid] = s.public_key
    md.signatures.clear()
    md.sign(atk["root"])  # "signed by the new root key's holder", as expected
    _write(pending, md)

    shown = summary_of(w)
    # The operator signs with the original root key after reading the summary.
    r = w.cli("repo", "sign", "root", "--key", "encfile:root.pem", "--yes", *_rk(w),
              env=_env())
    signed_ok = r.returncode == 0
    evil_installed = False
    if signed_ok:
        evil_installed = _ship_evil(w, atk)
    # What SHOULD happen: the signer is told the keys behind targets, snapshot and
    # timestamp changed (or the file is refused), and no attacker model is installed.
    assert not evil_installed
    assert not signed_ok or any("targets" in x and "key" in x for x in shown), shown
    assert w.active_version() == "1.0.0"


def summary_of(w: World) -> list[str]:
    """The summary lines `repo sign` shows (none: it refused the file, with a typed
    error and no traceback)."""
    r = w.cli("repo", "sign", "root", "--key", "encfile:root.pem", *_rk(w), env=_env())
    if r.returncode == 1 and "Traceback" not in r.stderr and "refusing to sign" in r.stderr:
        return []
    assert "not signed: no terminal" in r.stderr, r.stderr
    return [x for x in r.stdout.splitlines()[1:] if "expires" not in x]


def _ship_evil(w: World, atk: dict[str, CryptoSigner]) -> bool:
    """As the origin: publish classifier 6.6.6 with the attacker's keys; True if the
    device installs it."""
    meta = w.repo_dir / "metadata"
    bundle = w.bundle("6.6.6", seed=66)
    with open(bundle, "rb") as f:
        manifest, entries = extract_bundle(f, None, str(bundle))
    path = "classifier/classifier-6.6.6.tar"
    tf = TargetFile.from_file(path, str(bundle), ["sha256"])
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": "classifier", "version": "6.6.6", "fingerprint": slot_fingerprint(entries),
        "channel": "stable", "rollout": {"basis_points": 10000, "halted": False},
        "pinned": False}}
    dest = w.repo_dir / "targets" / "classifier" / f"{tf.hashes['sha256']}.classifier-6.6.6.tar"
    dest.write_bytes(bundle.read_bytes())
    ts = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes()).signed
    snap = Metadata[Snapshot].from_bytes(
        (meta / f"{ts.snapshot_meta.version}.snapshot.json").read_bytes()).signed
    tv = snap.meta["targets.json"].version
    targets = Metadata[Targets].from_bytes((meta / f"{tv}.targets.json").read_bytes()).signed
    targets.version += 1
    targets.targets[path] = tf
    tmd = Metadata(targets)
    tmd.sign(atk["targets"])
    data = _write(meta / f"{targets.version}.targets.json", tmd)
    snap.version += 1
    snap.meta["targets.json"] = MetaFile(targets.version, len(data),
                                         {"sha256": hashlib.sha256(data).hexdigest()})
    smd = Metadata(snap)
    smd.sign(atk["snapshot"])
    sdata = _write(meta / f"{snap.version}.snapshot.json", smd)
    ts.version += 1
    ts.snapshot_meta = MetaFile(snap.version, len(sdata),
                                {"sha256": hashlib.sha256(sdata).hexdigest()})
    tsmd = Metadata(ts)
    tsmd.sign(atk["timestamp"])
    _write(meta / "timestamp.json", tsmd)
    try:
        w.update()
    except Exception:  # noqa: BLE001 - any refusal is what should happen
        return False
    return w.active_version() == "6.6.6" and manifest.version == "6.6.6"


def test_a14_stock_client_sees_the_swapped_root_as_valid(tmp_path: Path) -> None:
    """Why devices accept it: TUF trusts a root's keyid -> key table as signed; a keyid
    is not checked to be the hash of its key (python-tuf's Root verifies the swapped
    root with the old root's threshold and its own)."""
    real = {r: CryptoSigner.generate_ed25519() for r in ("root", "targets")}
    from datetime import UTC, datetime, timedelta

    v1 = Root(expires=datetime.now(UTC) + timedelta(days=1))
    for role in ("root", "targets", "snapshot", "timestamp"):
        v1.add_key(real["root" if role == "root" else "targets"].public_key, role)
    v2 = Root.from_dict(json.loads(json.dumps(v1.to_dict())))
    v2.version = 2
    tid = real["targets"].public_key.keyid
    swapped = _as(tid)
    v2.keys[tid] = swapped.public_key
    md = Metadata(v2)
    md.sign(real["root"])
    v1.verify_delegate("root", md.signed_bytes, md.signatures)  # old root: accepted
    v2.verify_delegate("root", md.signed_bytes, md.signatures)  # its own: accepted
    t = Metadata(Targets(expires=datetime.now(UTC) + timedelta(days=1)))
    t.sign(swapped)
    v2.verify_delegate("targets", t.signed_bytes, t.signatures)  # the attacker's targets
