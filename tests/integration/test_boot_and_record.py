"""Boot check and the TPM-bound trust record (issue #2 must-show 4 and 5)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from modelward.trust.errors import TrustRecordError, TrustRecordRollbackError
from tests.conftest import World


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _installed_v1_v2(w: World) -> None:
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    w.update()
    assert w.active_version() == "2.0.0"


def test_boot_check_passes_on_untouched_model(world: World) -> None:
    _installed_v1_v2(world)
    before = world.snapshot()
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr
    assert "2.0.0 verified" in r.stdout
    assert world.snapshot() == before  # no NV write on a normal boot


@pytest.mark.parametrize("member", ["model.onnx", "vectors.npz"])
def test_byte_flip_falls_back_to_previous_slot(world: World, member: str) -> None:
    _installed_v1_v2(world)
    c = world.snapshot().counter
    _flip(world.state / "current" / member)
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr
    assert "fell back to classifier 1.0.0" in r.stdout
    assert world.active_version() == "1.0.0"
    assert os.readlink(world.state / "current") == "slots/a"
    rec = json.loads((world.state / "trust" / "record.json").read_bytes())["record"]
    assert rec["active"]["version"] == "1.0.0" and rec["previous"] is None
    assert world.snapshot().counter == c + 1
    # The fallback is reported as the device's last error.
    st = json.loads(world.cli("agent", "status", "--config", str(world.conf_path),
                              "--json").stdout)
    assert st["active"]["version"] == "1.0.0"
    assert st["last_error"]["type"] == "ActiveModelAltered"
    # And the next update heals the device: v2 goes back into the other slot.
    world.update()
    assert world.active_version() == "2.0.0"


def test_extra_file_in_active_slot_is_a_mismatch(world: World) -> None:
    _installed_v1_v2(world)
    (world.state / "current" / "backdoor.py").write_text("print('hi')")
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0
    assert world.active_version() == "1.0.0"


def test_both_slots_altered_exits_nonzero_and_activates_nothing(world: World) -> None:
    _installed_v1_v2(world)
    _flip(world.state / "slots" / "a" / "model.onnx")
    _flip(world.state / "slots" / "b" / "vectors.npz")
    before = world.snapshot()
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 3
    assert "no trusted previous model" in r.stderr
    assert "Traceback" not in r.stderr
    after = world.snapshot()
    assert after.current is None  # nothing activated: the altered slot is not served (#13)
    rec = json.loads((world.state / "trust" / "record.json").read_bytes())["record"]
    assert rec["active"] is None and rec["previous"] is None  # nothing is trusted now
    assert after.counter == before.counter + 1
    # A second boot: still exit 3, and no further NV write.
    again = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert again.returncode == 3 and world.snapshot().counter == after.counter
    # The next update heals the device: the newest release is installed and verified.
    world.update()
    assert world.active_version() == "2.0.0"
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0


def test_missing_active_slot_falls_back(world: World) -> None:
    _installed_v1_v2(world)
    shutil.rmtree(world.state / "slots" / "b")
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0
    assert world.active_version() == "1.0.0"


def test_fresh_device_boot_check_says_nothing_installed(world: World) -> None:
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 3
    assert "no trusted model is active: none was installed yet" in r.stderr


def test_boot_after_nothing_trusted_does_not_claim_nothing_was_installed(world: World) -> None:
    """The boot after one that found the only model altered: still exit 3, and the message
    says a model may have been found altered, not only "none was installed"."""
    world.publish("1.0.0", seed=1)
    world.update()
    (world.state / "current" / "model.onnx").write_bytes(b"junk")
    first = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert first.returncode == 3 and "was altered" in first.stderr
    second = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert second.returncode == 3
    assert "or the last one was found altered" in second.stderr


def test_edited_trust_record_is_detected(world: World) -> None:
    _installed_v1_v2(world)
    path = world.state / "trust" / "record.json"
    doc = json.loads(path.read_bytes())
    doc["record"]["active"]["fingerprint"] = "0" * 64  # point trust at something else
    path.write_text(json.dumps(doc))
    edited = world.snapshot()
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 3  # nothing is served from it (issue 13: the update heals)
    assert "TPM MAC does not verify" in r.stderr
    assert "Traceback" not in r.stderr
    store = world.store()
    try:
        with pytest.raises(TrustRecordError):
            store.load()
    finally:
        store.tpm.close()
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        edited.record, edited.counter, edited.current, edited.slots)
    world.update()  # heals: the edited record is discarded, never re-MACed
    assert json.loads(path.read_bytes())["record"]["active"]["fingerprint"] != "0" * 64


def test_older_valid_trust_record_is_detected(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    old = (world.state / "trust" / "record.json").read_bytes()
    world.publish("2.0.0", seed=2)
    world.update()
    (world.state / "trust" / "record.json").write_bytes(old)  # authentic, but stale
    # ... together with the slot pointer, as a full rollback of the disk would do
    before = world.snapshot()
    store = world.store()
    try:
        with pytest.raises(TrustRecordRollbackError) as ei:
            store.load()
    finally:
        store.tpm.close()
    assert "older copy was put back" in str(ei.value)
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 3 and "older copy" in r.stderr
    assert world.snapshot() == before


def test_deleted_trust_record_is_detected(world: World) -> None:
    _installed_v1_v2(world)
    (world.state / "trust" / "record.json").unlink()
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 3
    assert "is missing" in r.stderr
    assert world.active_version() == "2.0.0"


class _Crash(BaseException):
    """Stands in for power loss at a named step."""


def _crash_at(step: str):  # type: ignore[no-untyped-def]
    def hook(s: str) -> None:
        if s == step:
            raise _Crash(step)
    return hook


@pytest.mark.parametrize("step", ["downloading", "staged", "verified", "health-checked",
                                  "committing", "committed"])
def test_crash_at_each_install_step_leaves_a_trusted_current(world: World, step: str) -> None:
    from modelward.agent._commands import open_store
    from modelward.updater.install._install import open_source, update_once

    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    store = open_store(world.cfg)
    try:
        with pytest.raises(_Crash):
            update_once(world.cfg.updater, store, open_source(world.cfg.updater, "https"),
                        on_step=_crash_at(step))
    finally:
        store.tpm.close()
    # Before the commit the device still trusts and runs v1; after it, v2 is trusted
    # and boot-check completes the move.
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr
    expected = "2.0.0" if step == "committed" else "1.0.0"
    assert world.active_version() == expected
    rec = json.loads((world.state / "trust" / "record.json").read_bytes())["record"]
    assert rec["active"]["version"] == expected
    # And an update afterwards converges on v2 either way.
    world.update()
    assert world.active_version() == "2.0.0"
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0


def test_swapped_slots_keep_serving_the_active_model(world: World) -> None:
    """An attacker renames slots/a <-> slots/b: the active fingerprint is found intact in
    the other slot, so the slots are put back by rename (no fallback, no data lost, and
    no NV write: the record is not re-committed)."""
    _installed_v1_v2(world)
    before = world.snapshot()
    slots = world.state / "slots"
    os.rename(slots / "a", slots / "tmp")
    os.rename(slots / "b", slots / "a")
    os.rename(slots / "tmp", slots / "b")
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr
    assert "2.0.0 verified" in r.stdout
    assert "moved back" in r.stderr
    assert world.active_version() == "2.0.0"
    assert os.readlink(world.state / "current") == "slots/b"
    assert world.snapshot() == before  # record, counter, slots, current as before
    # a second boot is a plain pass with no NV write
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0
    assert world.snapshot() == before


def test_missing_root_anchor_is_refused_with_a_typed_error(world: World) -> None:
    """The anchor NV index undefined (TPM owner access): the device trusts no root any
    more; update and boot-check refuse, naming the index, and nothing is rewritten."""
    import subprocess

    from modelward.trust.errors import TpmNotProvisionedError

    _installed_v1_v2(world)
    before_files = {p: p.read_bytes() for p in (world.state / "trust").iterdir()}
    cur = os.readlink(world.state / "current")
    subprocess.run(["tpm2_nvundefine", "-C", "o", "0x01000101", "-T", world.tpm.tcti],
                   check=True, capture_output=True)
    world.publish("3.0.0", seed=3)
    with pytest.raises(TpmNotProvisionedError, match="0x1000101|0x01000101"):
        world.update()
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 1
    assert "TpmNotProvisionedError" in r.stderr or "not provisioned" in r.stderr.lower(), \
        r.stderr
    assert {p: p.read_bytes() for p in (world.state / "trust").iterdir()} == before_files
    assert os.readlink(world.state / "current") == cur
    assert world.active_version() == "2.0.0"
