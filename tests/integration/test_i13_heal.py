"""Issue 13, must-show 9: a device heals itself after its disk was rolled back or lost.

Real swtpm and nginx. Boot-check refuses the state it cannot believe (exit 3, nothing
moves); the next ``agent update --once`` recovers from the TPM-anchored root to the newest
release signed for the device, with no provisioning command; boot-check then passes and
the TPM counter only ever moved forward.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from modelward.agent._commands import run_boot_check
from modelward.simulator._attacks import RepoAttacker
from modelward.trust.errors import RootAnchorError, TrustRecordError, TrustRecordRollbackError
from modelward.updater.errors import RollbackError, TrustStateLostError
from tests._helpers import publish_root_v2
from tests.conftest import PASSPHRASE, MqttWorld, World, copytree


def _counter(w: World) -> int:
    s = w.store()
    try:
        return s.tpm.read_counter()
    finally:
        s.tpm.close()


def _anchor(w: World) -> bytes:
    s = w.store()
    try:
        return s.tpm.read_anchor()
    finally:
        s.tpm.close()


def _record(w: World) -> dict[str, object]:
    doc = json.loads((w.state / "trust" / "record.json").read_bytes())
    rec = doc["record"]
    assert isinstance(rec, dict)
    return rec


def _files(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and symlink (target) under ``root``, for "nothing moved" (the
    audit trail and the measurement log excepted: a refusal is recorded there,
    :func:`_audited`, and boot-check measures what it found)."""
    out: dict[str, bytes | str] = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if rel in ("audit", "measure") or rel.startswith(("audit/", "measure/")):
                continue
            if p.is_symlink():
                out[rel] = str(p.readlink())
            elif p.is_file() and rel not in ("status.json", "journal.json"):
                out[rel] = p.read_bytes()
    return out


def _boot_check_refuses(w: World, cause: type[Exception]) -> None:
    """boot-check exits 3 saying the next update heals, and changes nothing trusted."""
    before, counter, anchor = _files(w.state), _counter(w), _anchor(w)
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert r.returncode == 3, r.stderr
    assert "heals the device from its TPM-anchored root" in r.stderr
    assert "re-provision" not in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(TrustStateLostError) as ei:
        run_boot_check(w.cfg)
    assert isinstance(ei.value.__cause__, cause)
    assert (_files(w.state), _counter(w), _anchor(w)) == (before, counter, anchor)
    assert _audited(w) == ("nothing-trusted", "TrustStateLostError")


def _audited(w: World) -> tuple[str, str]:
    """The newest audit entry's kind and the error type its reason names."""
    last = json.loads((w.state / "audit" / "live.jsonl").read_bytes().splitlines()[-1])
    return last["kind"], last["fields"]["reason"].split(":")[0]


def _heals_to(w: World, version: str) -> None:
    r = w.cli("agent", "update", "--once", "--config", str(w.conf_path))
    assert r.returncode == 0, r.stderr
    assert w.active_version() == version
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert r.returncode == 0, r.stderr
    assert f"{version} verified" in r.stdout


def test_i13_heal_after_state_dir_put_back_from_older_copy(world: World) -> None:
    """9a: install v1, copy the state dir, install v2, put the copy back."""
    world.publish("1.0.0", seed=1)
    world.update()
    old = world.tmp / "state-at-v1"
    shutil.copytree(world.state, old, symlinks=True)
    world.publish("2.0.0", seed=2)
    world.update()
    at_v2 = world.snapshot()
    v2_record = _record(world)
    # left in the old copy: metadata and a "partial download" the heal must not keep
    (old / "metadata" / "planted.json").write_text("{}")
    (old / "staging").mkdir(exist_ok=True)
    (old / "staging" / "planted").write_text("x")
    copytree(old, world.state)  # consistent, authentic, older
    _boot_check_refuses(world, TrustRecordRollbackError)

    _heals_to(world, "2.0.0")
    healed = world.snapshot()
    # genesis (one increment) + the install (one increment): forward, never back
    assert healed.counter == at_v2.counter + 2
    assert healed.anchor == at_v2.anchor
    rec = _record(world)
    assert rec["counter"] == healed.counter
    active = rec["active"]
    assert isinstance(active, dict) and active["version"] == "2.0.0"
    assert rec["previous"] is None  # the v1 slot of the old copy was never re-trusted
    assert rec["targets_version"] == v2_record["targets_version"]
    assert not (world.state / "metadata" / "planted.json").exists()
    assert not (world.state / "staging" / "planted").exists()
    old_record = (old / "trust" / "record.json").read_bytes()
    assert healed.record != old_record
    # the old copy can never become current again
    (world.state / "trust" / "record.json").write_bytes(old_record)
    _boot_check_refuses(world, TrustRecordRollbackError)


def test_i13_heal_after_state_dir_deleted(world: World) -> None:
    """9b: the whole state directory is gone; only the TPM is left."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    at_v2 = world.snapshot()
    shutil.rmtree(world.state)
    _boot_check_refuses(world, TrustRecordError)

    _heals_to(world, "2.0.0")
    healed = world.snapshot()
    assert healed.counter == at_v2.counter + 2 and healed.anchor == at_v2.anchor
    anchored = (world.state / "trust" / "root.json").read_bytes()
    assert hashlib.sha256(anchored).digest() == healed.anchor
    assert _record(world)["previous"] is None


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_i13_heal_after_root_json_lost(world: World, how: str) -> None:
    """9c: root.json alone deleted or replaced, after a root rotation (so the anchored root
    is 2.root.json): the record is still authentic, so it is kept; only the root is
    fetched again, by its anchored sha256."""
    world.publish("1.0.0", seed=1)
    world.update()
    publish_root_v2(world.repo_dir, world.keys, PASSPHRASE)
    world.publish("2.0.0", seed=2)
    world.update()
    before = world.snapshot()
    anchored = (world.state / "trust" / "root.json").read_bytes()
    assert json.loads(anchored)["signed"]["version"] == 2
    root = world.state / "trust" / "root.json"
    if how == "deleted":
        root.unlink()
    else:
        old = world.repo_dir / "metadata" / "1.root.json"
        root.write_bytes(old.read_bytes())  # valid, signed, older root
    _boot_check_refuses(world, RootAnchorError)

    _heals_to(world, "2.0.0")
    assert root.read_bytes() == anchored
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)


def test_i13_heal_keeps_the_authentic_rollback_floor(world: World) -> None:
    """The disk puts back a copy taken at v2 and the origin replays the v1 metadata: the
    old record is not believed, but its (MAC-verified) targets version stays a floor, and
    the TPM's (v3's) is the genesis record's, so the replay cannot move the device down."""
    world.publish("1.0.0", seed=1)
    world.update()
    attacker = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    served_v1 = attacker.snapshot_served()
    world.publish("2.0.0", seed=2)
    world.update()
    copy = world.tmp / "state-at-v2"
    shutil.copytree(world.state, copy, symlinks=True)
    world.publish("3.0.0", seed=3)
    world.update()
    counter = _counter(world)
    floor = _record(world)["targets_version"]  # v3's: the TPM keeps it (FLOOR_INDEX)
    copytree(copy, world.state)
    attacker.replay(served_v1, *served_v1)
    with pytest.raises(RollbackError):
        world.update()
    assert world.active_version() is None  # nothing is served from the copy
    rec = _record(world)
    assert rec["active"] is None and rec["targets_version"] == floor
    assert _counter(world) == counter + 1  # the genesis record only
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 3


def test_i13_heal_cannot_be_used_to_downgrade_with_expired_metadata(world: World) -> None:
    """The disk is deleted (no floor is left) and the origin replays the metadata of v1:
    a healed device trusts only what verifies from the TPM-anchored root, and the old
    timestamp has expired, so nothing is installed and the heal can be done again."""
    import time
    from datetime import timedelta

    from modelward.publisher._repo import Expiry, Repository
    from modelward.updater.errors import MetadataError

    quick = Repository(world.repo_dir, world.keys, PASSPHRASE,
                       expiry=Expiry(timestamp=timedelta(seconds=3)))
    quick.publish(world.bundle("1.0.0", seed=1))
    attacker = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    served_v1 = attacker.snapshot_served()
    t_v1 = time.monotonic()
    world.repo.publish(world.bundle("2.0.0", seed=2))  # normal expiry
    world.update()
    counter = _counter(world)
    shutil.rmtree(world.state)
    attacker.replay(served_v1, *served_v1)
    time.sleep(max(0.0, 3.5 - (time.monotonic() - t_v1)))
    with pytest.raises(MetadataError, match="ExpiredMetadataError"):
        world.update()
    assert world.active_version() is None
    rec = _record(world)
    assert rec["active"] is None and _counter(world) == counter + 1
    attacker.restore()  # the origin serves the operator's files again: the device moves on
    world.update()
    assert world.active_version() == "2.0.0"
    assert _counter(world) == counter + 2  # no second heal: the genesis record was kept


def test_i13_heal_over_mqtt_after_state_dir_deleted(mqtt_world: MqttWorld) -> None:
    """The anchored root is recovered through the update's own transport (MQTT here)."""
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    counter = _counter(w)
    shutil.rmtree(w.state)
    _boot_check_refuses(w, TrustRecordError)
    _heals_to(w, "1.0.0")
    assert _counter(w) == counter + 2


def test_i13_daemon_heals_after_state_dir_put_back(mqtt_world: MqttWorld) -> None:
    """The daemon's first attempt heals too: no operator step, no provisioning."""
    import signal
    import subprocess
    import sys
    import time

    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    old = w.tmp / "state-at-v1"
    shutil.copytree(w.state, old, symlinks=True)
    w.publish("2.0.0", seed=2)
    w.update()
    counter = _counter(w)
    copytree(old, w.state)
    _boot_check_refuses(w, TrustRecordRollbackError)
    with open(w.tmp / "daemon.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run",
                                 "--config", str(w.conf_path)], stderr=log)
        try:
            end = time.monotonic() + 60
            while w.active_version() != "2.0.0":
                assert time.monotonic() < end, (w.tmp / "daemon.log").read_text()[-3000:]
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert r.returncode == 0, r.stderr
    assert _counter(w) == counter + 2
