"""Reviewer a4: the device's disk as the attacker (issue 13 heal / rejections / report seq).

Real swtpm and nginx. Each test is one attack. A test marked ``xfail(strict=True)`` shows
an attack that WORKS today (its assertions state what should hold); the others show an
attack that is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from modelward.agent._commands import run_boot_check
from modelward.agent._commands import update as agent_update
from modelward.simulator._attacks import RepoAttacker
from modelward.trust.errors import ModelwardError
from modelward.updater.errors import HealthCheckError, RollbackError, StagedFilesChangedError
from tests.conftest import PASSPHRASE, World, copytree, tree_digest


def _counter(w: World) -> int:
    s = w.store()
    try:
        return s.tpm.read_counter()
    finally:
        s.tpm.close()


def _floor(w: World) -> int:
    s = w.store()
    try:
        return s.targets_floor()
    finally:
        s.tpm.close()


def _victim(w: World) -> Path:
    """A directory outside state_dir holding something the agent must never touch."""
    v = w.tmp / "victim"
    (v / "a").mkdir(parents=True)
    (v / "b").mkdir()
    for p in (v / "precious.txt", v / "a" / "precious.txt", v / "b" / "precious.txt",
              v / "timestamp.json", v / "root.json"):
        p.write_text("operator data outside state_dir\n")
    return v


# --- `current` must be exactly slots/a or slots/b -------------------------------------


def test_a4_current_pointing_outside_state_dir_is_repointed_by_boot_check(
        world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    evil = world.tmp / "evil" / "a"
    shutil.copytree(world.state / "slots" / "a", evil)
    (evil / "model.onnx").write_bytes(b"attacker model")
    cur = world.state / "current"
    cur.unlink()
    os.symlink(str(evil), cur)
    before = _counter(world)
    res = run_boot_check(world.cfg)  # exit 0: "classifier 1.0.0 verified"
    assert res.active.version == "1.0.0"
    assert _counter(world) == before
    # what the inference app opens after a passing boot-check:
    assert os.readlink(cur) == "slots/a"
    assert (cur / "model.onnx").read_bytes() != b"attacker model"


# --- nothing outside state_dir is touched through a planted symlink --------------------


def test_a4_symlinked_staging_does_not_delete_outside_state_dir(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    victim = _victim(world)
    before = tree_digest(victim)
    shutil.rmtree(world.state / "staging", ignore_errors=True)
    os.symlink(victim, world.state / "staging")
    world.publish("2.0.0", seed=2)
    with contextlib.suppress(ModelwardError):  # a typed refusal is fine
        world.update()
    assert tree_digest(victim) == before


def test_a4_symlinked_slots_does_not_delete_outside_state_dir(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    victim = _victim(world)
    shutil.copytree(world.state / "slots" / "a", victim / "a", dirs_exist_ok=True)
    before = tree_digest(victim / "b")
    shutil.rmtree(world.state / "slots")
    os.symlink(victim, world.state / "slots")
    world.publish("2.0.0", seed=2)
    with contextlib.suppress(ModelwardError):  # a typed refusal is fine
        world.update()
    assert tree_digest(victim / "b") == before


def test_a4_symlinked_metadata_dir_is_not_written_through(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    victim = _victim(world)
    before = tree_digest(victim)
    shutil.rmtree(world.state / "metadata")
    os.symlink(victim, world.state / "metadata")
    world.publish("2.0.0", seed=2)
    with contextlib.suppress(ModelwardError):  # a typed refusal is fine
        world.update()
    assert tree_digest(victim) == before


# --- TOCTOU inside an attempt: the disk changes staging/incoming after "verified" -------


def _corrupt_after_verified(w: World, how: str) -> object:
    incoming = w.state / "staging" / "incoming"

    def on_step(step: str) -> None:
        if step != "verified":
            return
        if how == "break":
            (incoming / "model.onnx").write_bytes(b"not a model")
        else:  # swap in a bundle of the same name/version with another (unsigned) model
            other = w.bundle("2.0.0", seed=7)
            for p in incoming.iterdir():
                p.unlink()
            with tarfile.open(other) as t:
                t.extractall(incoming, filter="data")
    return on_step


def test_a4_incoming_changed_after_verification_does_not_reject_a_good_release(
        world: World) -> None:
    """Bytes changed in staging/incoming during the health check are a local fault
    (StagedFilesChangedError), never a rejection of the signed release: the health check
    passed on the sealed copies of the verified bytes, and the commit check refuses."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    before = world.snapshot()
    with pytest.raises(StagedFilesChangedError, match="before its commit"):
        agent_update(world.cfg, on_step=_corrupt_after_verified(world, "break"))  # type: ignore[arg-type]
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
    assert not (world.state / "staging" / "incoming").exists()  # discarded
    world.update()  # no more tampering: the good, signed v2 must install
    assert world.active_version() == "2.0.0"


def test_a4_incoming_swapped_after_verification_is_not_served(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    with contextlib.suppress(ModelwardError):  # a typed refusal is fine
        agent_update(world.cfg, on_step=_corrupt_after_verified(world, "swap"))  # type: ignore[arg-type]
    attacker_model = (world.builds / "classifier-2.0.0.onnx").read_bytes()  # seed 7 build
    assert (world.state / "current" / "model.onnx").read_bytes() != attacker_model


# --- heal: downgrade and NV wear -----------------------------------------------------


def test_a4_heal_from_older_copy_with_replayed_metadata_does_not_downgrade(
        world: World) -> None:
    """The TPM keeps the highest targets version installed (FLOOR_INDEX): the heal from an
    authentic older copy starts from it, so the replayed v2-era metadata is a rollback."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    attacker = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    served_v2 = attacker.snapshot_served()
    copy = world.tmp / "state-at-v2"
    shutil.copytree(world.state, copy, symlinks=True)
    world.publish("3.0.0", seed=3)
    world.update()
    assert world.active_version() == "3.0.0"
    floor = _floor(world)
    assert floor == json.loads((world.state / "trust" / "record.json").read_bytes())[
        "record"]["targets_version"]
    before = world.snapshot()
    copytree(copy, world.state)  # authentic, older
    attacker.replay(served_v2, *served_v2)  # validly signed, not expired
    with pytest.raises(RollbackError, match="rollback of metadata"):
        world.update()
    assert world.active_version() != "2.0.0"
    after = world.snapshot()
    assert after.counter == before.counter + 1  # the heal's genesis record only
    assert after.anchor == before.anchor
    assert _floor(world) == floor  # not lowered
    rec = json.loads(after.record)["record"]
    assert rec["active"] is None and rec["targets_version"] == floor


def test_a4_heal_nv_cost_is_two_increments_per_attempt_and_bounded(world: World) -> None:
    """Refused (bounded): deleting the record before each attempt costs one heal + one
    reinstall (2 NV increments and a full download) per attempt, no more; an untouched
    attempt costs none."""
    world.publish("1.0.0", seed=1)
    world.update()
    for _ in range(2):
        c = _counter(world)
        (world.state / "trust" / "record.json").unlink()
        world.update()
        assert _counter(world) == c + 2
    c = _counter(world)
    world.update()
    assert _counter(world) == c


def test_a4_swapped_slots_do_not_write_nv_on_every_boot(world: World) -> None:
    """Swapping slots/a and slots/b before every boot: boot-check puts them back by
    rename; the record, the counter, the slots and `current` do not move."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    before = world.snapshot()
    slots = world.state / "slots"
    for _ in range(3):
        os.rename(slots / "a", slots / "tmp")
        os.rename(slots / "b", slots / "a")
        os.rename(slots / "tmp", slots / "b")
        res = run_boot_check(world.cfg)
        assert res.active.version == "2.0.0"
        assert not res.fell_back
        assert world.snapshot() == before  # no NV write, slots back where recorded
    # only one slot present, in the wrong place: moved back too, still no NV write
    os.rename(slots / "a", world.tmp / "prev-aside")
    os.rename(slots / "b", slots / "a")
    assert run_boot_check(world.cfg).active.version == "2.0.0"
    assert _counter(world) == before.counter
    assert os.readlink(world.state / "current") == "slots/b"
    # and an update still works from there
    world.publish("3.0.0", seed=3)
    world.update()
    assert world.active_version() == "3.0.0"
    assert run_boot_check(world.cfg).active.version == "3.0.0"


# --- crashes and hangs on planted files ----------------------------------------------


def test_a4_garbled_status_json_is_not_a_traceback(world: World) -> None:
    world.publish("1.0.0", seed=1)
    (world.state / "status.json").write_text(json.dumps({"counters": [1],
                                                         "last_success": "x"}))
    r = world.cli("agent", "update", "--once", "--config", str(world.conf_path))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0


def test_a4_planted_old_slot_file_does_not_brick_after_commit(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()  # v2 in slot b; v3 goes to slot a, which exists
    (world.state / "slots" / ".old-a").write_text("planted")
    world.publish("3.0.0", seed=3)
    results = []
    for argv in (("agent", "update", "--once"), ("agent", "boot-check"),
                 ("agent", "update", "--once"), ("agent", "boot-check")):
        r = world.cli(*argv, "--config", str(world.conf_path))
        results.append((argv[1], r.returncode, "Traceback" in r.stderr,
                        (r.stderr.splitlines() or [""])[-1][:120]))
    assert all(not tb for _, _, tb, _ in results), results
    assert results[-1][1] == 0, results  # the device serves a verified model again
    assert world.active_version() == "3.0.0"


def test_a4_fifo_at_journal_json_does_not_hang_real_boot_check(world: World) -> None:
    """Refused (it worked: boot-check hung on the FIFO, so inference never started): the
    journal is read O_NONBLOCK and must be a regular file; boot-check passes on the good
    slot and nothing trusted moves."""
    import subprocess
    import sys

    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    (world.state / "journal.json").unlink()
    os.mkfifo(world.state / "journal.json")
    proc = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "boot-check",
                             "--config", str(world.conf_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(10)
    assert b"Traceback" not in err, err[-2000:]
    assert proc.returncode == 0, err[-2000:]
    after = world.snapshot()
    assert (after.record, after.counter, after.current) == \
        (before.record, before.counter, before.current)
    assert world.active_version() == "1.0.0"


def test_a4_signed_report_does_not_carry_a_put_back_status_json(world: World) -> None:
    """Refused: the report says what the attempt that signs it saw (its process's own
    status), never what status.json says now; and a status.json that its TPM MAC does not
    vouch for (see test_i13_status_auth.py) is not believed at all."""
    from modelward.agent._commands import signed_report
    world.publish("1.0.0", seed=1)
    world.update()
    good_status = (world.state / "status.json").read_bytes()
    world.publish("2.0.0", seed=2, vectors_seed=3)  # fails its health check
    with pytest.raises(HealthCheckError):
        world.update()
    (world.state / "status.json").write_bytes(good_status)  # the disk hides the failure
    report = json.loads(signed_report(world.cfg, "idle"))["report"]
    assert report["last_error"] is not None
    assert report["counters"].get("failures", 0) >= 1


@pytest.mark.parametrize("victim_size", [
    "shorter",  # refused: not resumed into
    "longer",  # refused: the stage trusts only files with a single link
])
def test_a4_hard_linked_partial_download_does_not_write_outside_state_dir(
        world: World, victim_size: str) -> None:
    import hashlib

    world.publish("1.0.0", seed=1)
    world.update()
    published = world.publish("2.0.0", seed=2)
    data = published.read_bytes()
    key = hashlib.sha256(data).hexdigest()
    victim = world.tmp / "victim-file"
    size = len(data) // 2 if victim_size == "shorter" else len(data) * 3
    victim.write_bytes(b"V" * size)
    staging = world.state / "staging"
    staging.mkdir(exist_ok=True)
    os.link(victim, staging / f"{key}.part")
    with contextlib.suppress(ModelwardError):
        world.update()
    assert victim.stat().st_size == size
    assert victim.read_bytes() == b"V" * size
