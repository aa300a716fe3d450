"""Bad bundles signed by the operator's own keys (a broken or compromised build) are
refused before anything outside ``staging/`` is written (issue #6 must-show 3).

The bundles are published through the real origin and fetched by a real device; the
format cases come from the unit suite, the health cases need onnxruntime.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from modelward.simulator._attacks import RepoAttacker
from modelward.simulator._models import make_linear_model
from modelward.trust._fingerprint import MerkleHasher, slot_fingerprint
from modelward.updater.bundle._bundle import MANIFEST, extract_bundle
from modelward.updater.errors import BundleFormatError, HealthCheckError
from tests.conftest import PASSPHRASE, World, tree_digest
from tests.unit.test_bundle import CASES, Mutate, _members, _tar

Members = list[tuple[tarfile.TarInfo, bytes]]


def _swap_file(name: str, data: bytes) -> Mutate:
    """Replace a member and make the manifest agree with it (so only the health check can
    tell)."""
    def f(ms: Members) -> Members:
        info, raw = ms[0]
        doc = json.loads(raw)
        m = MerkleHasher()
        m.update(data)
        entry = next(e for e in doc["files"] if e["path"] == name)
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     merkle_root=m.hexdigest())
        new = json.dumps(doc).encode()
        info.size = len(new)
        out: Members = [(info, new)]
        for i, d in ms[1:]:
            if i.name == name:
                i.size = len(data)
                d = data
            out.append((i, d))
        return out
    return f


def _outside_staging(state: Path) -> dict[str, object]:
    """Everything an install may write outside staging/: contents and directory mtimes
    (a file created and removed again still moves its directory's mtime)."""
    out: dict[str, object] = {
        "slots": tree_digest(state / "slots"),
        "trust": tree_digest(state / "trust"),
        "current": os.readlink(state / "current"),
    }
    for d in (state / "slots", state / "slots" / "a", state / "trust"):
        out[f"mtime {d.name}"] = d.stat().st_mtime_ns
    return out


HEALTH: dict[str, tuple[str, str]] = {
    "invalid onnx file": ("model.onnx", "cannot load"),
    "wrong input/output signature": ("model.onnx", "model signature"),
    "test vector mismatch": ("vectors.npz", "differs from the test vectors"),
}


def _health_mutation(case: str, good: Path, w: World) -> Mutate:
    if case == "invalid onnx file":
        return _swap_file("model.onnx", b"\x08\x07not an onnx model" * 64)
    if case == "wrong input/output signature":
        other = make_linear_model(w.builds / "renamed.onnx", seed=1, names=("pixels", "logits"))
        return _swap_file("model.onnx", other.read_bytes())
    donor = w.bundle("0.0.9", seed=7, name="donor")
    vectors = next(d for i, d in _members(donor) if i.name == "vectors.npz")
    return _swap_file("vectors.npz", vectors)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(HEALTH))
def test_bad_bundle_is_refused_before_anything_outside_staging_is_written(
    world: World, case: str,
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    good = world.bundle("2.0.0", seed=2)
    if case in CASES:
        mutate, message = CASES[case]
        error: type[Exception] = BundleFormatError
    else:
        mutate, message = _health_mutation(case, good, world), HEALTH[case][1]
        error = HealthCheckError
    data = _tar(mutate(_members(good)))
    try:  # the fingerprint the build would have signed, when the bundle has one at all
        _, entries = extract_bundle(io.BytesIO(data), None, "bad")
        fingerprint = slot_fingerprint(entries)
    except BundleFormatError:
        with open(good, "rb") as f:
            fingerprint = slot_fingerprint(extract_bundle(f, None, "good")[1])
    RepoAttacker(world.repo_dir, world.keys, PASSPHRASE).sign_raw(
        data, "classifier", "2.0.0", fingerprint)
    before, snap = _outside_staging(world.state), world.snapshot()

    with pytest.raises(error, match=message):
        world.update()

    assert _outside_staging(world.state) == before
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        snap.record, snap.counter, snap.anchor, snap.current, snap.slots)
    assert world.active_version() == "1.0.0"
    assert not list((world.state / "staging").iterdir())  # the rejected bundle is gone
    status = json.loads((world.state / "status.json").read_bytes())
    assert status["last_error"]["type"] == error.__name__
    journal = json.loads((world.state / "journal.json").read_bytes())
    assert journal["step"] == "failed" and journal["version"] == "2.0.0"


def test_signed_raw_round_trip_installs(world: World) -> None:
    """Sanity of the helper: an unmodified round trip installs."""
    good = world.bundle("1.0.0", seed=1)
    data = _tar(_members(good))
    with open(good, "rb") as f:
        fingerprint = slot_fingerprint(extract_bundle(f, None, "good")[1])
    assert _members(good)[0][0].name == MANIFEST
    RepoAttacker(world.repo_dir, world.keys, PASSPHRASE).sign_raw(
        data, "classifier", "1.0.0", fingerprint)
    world.update()
    assert world.active_version() == "1.0.0"
