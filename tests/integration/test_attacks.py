"""The TUF attack catalogue against a real device (swtpm, nginx origin), issue #6.

Each attack is applied to the files the origin serves (``simulator.RepoAttacker``), the
device runs a normal update, and the test asserts the typed error and that the trusted
state did not move: trust record, TPM counter and anchor, ``current``, both slots, and the
device's TUF metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from modelward.publisher._repo import Expiry, Repository
from modelward.simulator._attacks import RepoAttacker
from modelward.simulator._demo import write_device_config
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import issue_cert
from modelward.updater.bundle._chunkindex import index_path
from modelward.updater.errors import DownloadFailedError, MetadataError, TargetHashError
from modelward.updater.install._install import Outcome
from tests.conftest import PASSPHRASE, DeviceState, World, tree_digest
from tests.integration._i16_delta import drop_index


def _attacker(w: World) -> RepoAttacker:
    return RepoAttacker(w.repo_dir, w.keys, PASSPHRASE)


def _on_v1(w: World) -> DeviceState:
    w.publish("1.0.0", seed=1)
    w.update()
    assert w.active_version() == "1.0.0"
    return w.snapshot()


def assert_nothing_moved(w: World, before: DeviceState) -> None:
    """Record, counter, anchor, ``current``, slots and TUF metadata are as they were."""
    assert w.snapshot() == before


def _fetched(w: World) -> int:
    return int(json.loads((w.state / "status.json").read_bytes())["counters"]["bytes_fetched"])


def _last_error(w: World) -> str:
    return str(json.loads((w.state / "status.json").read_bytes())["last_error"]["type"])


def test_arbitrary_installation_bundle_swapped_on_origin(world: World) -> None:
    _on_v1(world)
    world.publish("2.0.0", seed=2)
    before = world.snapshot()
    evil = world.bundle("2.0.0", seed=666, name="classifier")  # a valid bundle, not signed
    _attacker(world).replace_target("classifier", "2.0.0", evil.read_bytes())
    with pytest.raises(TargetHashError, match="does not match the signed target"):
        world.update()
    # the TUF metadata that verified (v2 is signed) is kept; nothing else moved
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
    assert _last_error(world) == "TargetHashError"


def test_arbitrary_installation_with_metadata_signed_by_the_attackers_keys(
    world: World,
) -> None:
    before = _on_v1(world)
    a = _attacker(world)
    own = a.own_key()
    a.forge_release(world.bundle("6.6.6", seed=666),
                    {"targets": own, "snapshot": own, "timestamp": own})
    with pytest.raises(MetadataError, match="timestamp"):
        world.update()
    assert_nothing_moved(world, before)
    assert not list((world.state / "staging").glob("*"))  # nothing was even downloaded


def test_rollback_attack_replays_older_signed_metadata(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    a = _attacker(world)
    old = a.snapshot_served()
    world.publish("2.0.0", seed=2)
    world.update()
    before = world.snapshot()
    a.replay(old, *old)  # timestamp, snapshot and targets as they were at v1
    with pytest.raises(MetadataError, match="BadVersionNumberError"):
        world.update()
    after = world.snapshot()
    assert after == before
    assert world.active_version() == "2.0.0"


def test_indefinite_freeze_is_caught_by_expiry(world: World) -> None:
    # The operator's timestamp lives 3 s; the attacker keeps serving it after that.
    quick = Repository(world.repo_dir, world.keys, PASSPHRASE,
                       expiry=Expiry(timestamp=timedelta(seconds=3)))
    quick.publish(world.bundle("1.0.0", seed=1))
    world.update()
    before = world.snapshot()
    time.sleep(3.5)
    with pytest.raises(MetadataError, match="ExpiredMetadataError"):
        world.update()
    assert_nothing_moved(world, before)
    # the operator's refresh job re-signs the timestamp: devices move on
    world.repo.refresh(margin=timedelta(days=1))
    assert world.update().outcome is Outcome.UP_TO_DATE


def test_endless_data_in_metadata_is_cut_off(world: World) -> None:
    before = _on_v1(world)
    fetched = _fetched(world)
    _attacker(world).inflate("timestamp.json", 64 << 20)
    with pytest.raises(DownloadFailedError, match="timestamp"):
        world.update()
    assert_nothing_moved(world, before)
    # the device stopped reading near TUF's 16 KiB bound for a timestamp, not at 64 MiB
    assert _fetched(world) - fetched < 1 << 20


def test_endless_data_in_a_target_is_cut_off(world: World) -> None:
    _on_v1(world)
    world.publish("2.0.0", seed=2)
    # (a release from before chunk indexes: this is TUF's own bounded download; the delta
    # path never asks for a byte past the signed length: test_i16_reg_attacks)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-2.0.0.tar")
    fetched = _fetched(world)
    before = world.snapshot()
    _attacker(world).append_to_target("classifier", "2.0.0", 64 << 20)
    with pytest.raises(TargetHashError, match="more than the signed"):
        world.update()
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)
    assert _fetched(world) - fetched < 8 << 20


def test_extraneous_dependencies_are_never_fetched(world: World) -> None:
    """The signed targets list other models, channels and versions (and their chunk
    indexes): the device fetches exactly the bundle it chose and that bundle's own signed
    chunk index, and nothing else."""
    world.publish("1.0.0", seed=1)
    world.repo.publish(world.bundle("1.0.0", seed=3, name="detector"))
    world.repo.publish(world.bundle("3.0.0", seed=4), channel="beta")
    world.repo.publish(world.bundle("2.0.0", seed=5), rollout=0.0)
    log = world.tmp / "origin" / "access.log"
    log.write_text("")
    world.update()
    assert world.active_version() == "1.0.0"
    gets = [line.split('"')[1].split()[1] for line in log.read_text().splitlines()
            if "/targets/" in line]
    signed = world.repo.current()[0].targets
    chosen = "classifier/classifier-1.0.0.tar"

    def served(target: str) -> str:
        name, _, base = target.rpartition("/")
        return f"/targets/{name}/{signed[target].hashes['sha256']}.{base}"

    assert gets == [served(index_path(chosen)), served(chosen)], gets
    assert sorted(p.name for p in (world.state / "slots" / "a").iterdir()) == [
        "manifest.json", "model.onnx", "vectors.npz"]


def test_fast_forward_attack_and_recovery_by_timestamp_key_rotation(world: World) -> None:
    before = _on_v1(world)
    a = _attacker(world)
    # A stolen timestamp key signs version 10**6: validly signed, so the device takes it.
    a.resign_timestamp(a.stolen("timestamp"), version=10**6)
    assert world.update().outcome is Outcome.UP_TO_DATE
    after_ff = world.snapshot()
    assert (after_ff.record, after_ff.counter, after_ff.current, after_ff.slots) == (
        before.record, before.counter, before.current, before.slots)
    # The operator notices, puts the real files back and publishes v2: the device is stuck
    # on the fast-forwarded version and refuses it, still serving v1.
    a.restore()
    world.publish("2.0.0", seed=2)
    stuck = world.snapshot()
    with pytest.raises(MetadataError, match="BadVersionNumberError"):
        world.update()
    assert world.snapshot() == stuck
    assert world.active_version() == "1.0.0"
    # Recovery: rotating the timestamp key (root v2) makes the device drop the
    # fast-forwarded timestamp, which the new key never signed.
    assert world.repo.rotate("timestamp") == 2
    result = world.update()
    assert result.outcome is Outcome.INSTALLED and world.active_version() == "2.0.0"
    assert json.loads((world.state / "trust" / "root.json").read_bytes())[
        "signed"]["version"] == 2


def test_mix_and_match_of_targets_versions_is_refused(world: World) -> None:
    _on_v1(world)
    world.publish("2.0.0", seed=2)
    a = _attacker(world)
    old_targets = [p.name for p in (world.repo_dir / "metadata").glob("*.targets.json")]
    older = sorted(old_targets, key=lambda n: int(n.split(".")[0]))[-2]
    before = world.snapshot()
    a.mix_and_match(older)  # validly signed targets v(n-1) served as v(n)
    # the snapshot signs the targets file's length and hash: the older file is refused by
    # them before its version is looked at
    with pytest.raises(MetadataError, match="LengthOrHashMismatchError"):
        world.update()
    # TUF's client workflow persists each role as soon as it verifies (issue 13): the new
    # timestamp and snapshot verified and are kept; the mixed-in targets is not; nothing
    # else moved.
    after = world.snapshot()
    assert after == replace(before, metadata=after.metadata)
    served = tree_digest(world.repo_dir / "metadata")
    assert after.metadata["timestamp.json"] == served["timestamp.json"]
    snap = json.loads((world.repo_dir / "metadata" / "timestamp.json").read_bytes())
    version = snap["signed"]["meta"]["snapshot.json"]["version"]
    assert after.metadata["snapshot.json"] == served[f"{version}.snapshot.json"]
    assert after.metadata["targets.json"] == before.metadata["targets.json"]


@pytest.mark.xdist_group("machine")
def test_slow_retrieval_is_aborted(world: World) -> None:
    _on_v1(world)
    big = world.tmp / "padding.bin"
    big.write_bytes(b"\x5a" * (4 << 20))
    world.publish("2.0.0", seed=2, extra=[(big, "padding.bin")])
    work = world.tmp / "slow-origin"
    (world.tmp / "slow-pki").mkdir()
    tls = issue_cert(world.ca, world.tmp / "slow-pki", "slow-origin")
    slow = start_origin(world.repo_dir, work, tls, limit_rate=16 * 1024)
    try:
        conf = write_device_config(
            world.tmp / "slow.toml", device_id="dev-1", state=world.state,
            tcti=world.tpm.tcti, origin_url=slow.url, ca=world.ca.cert,
            https={"min_speed": 256 * 1024, "min_speed_window": 1.0},
        )
        world.conf_path = conf
        before = world.snapshot()
        started = time.monotonic()
        with pytest.raises(DownloadFailedError, match="slow retrieval"):
            world.update()
        assert time.monotonic() - started < 15  # not the 4 MiB / 16 KiB/s = 256 s
        after = world.snapshot()
        assert (after.record, after.counter, after.current, after.slots) == (
            before.record, before.counter, before.current, before.slots)
        assert world.active_version() == "1.0.0"
    finally:
        stop_origin(work)


def test_compromised_online_keys_are_recovered_by_rotation(world: World) -> None:
    _on_v1(world)
    a = _attacker(world)
    stolen = {r: a.stolen(r) for r in ("targets", "snapshot", "timestamp")}
    # The operator learns of the theft and rotates every online key (roots v2..v4).
    for role in ("targets", "snapshot", "timestamp"):
        world.repo.rotate(role)
    world.update()
    before = world.snapshot()
    root = json.loads((world.state / "trust" / "root.json").read_bytes())
    assert root["signed"]["version"] == 4
    # The thief still signs a release with the old keys and serves it: refused.
    a.forge_release(world.bundle("6.6.6", seed=666), stolen)
    with pytest.raises(MetadataError):
        world.update()
    assert world.snapshot() == before
    assert world.active_version() == "1.0.0"
    # The real repository back on the origin: the next good release installs.
    a.restore()
    world.publish("2.0.0", seed=2)
    assert world.update().outcome is Outcome.INSTALLED
    assert world.active_version() == "2.0.0"


def test_expired_timestamp_re_signed_into_the_future_by_a_stranger(world: World) -> None:
    """A forged timestamp (attacker's own key) with a fresh expiry is not a way around a
    freeze: it is refused for its signature."""
    before = _on_v1(world)
    a = _attacker(world)
    a.resign_timestamp(a.own_key(), version=99,
                       expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=1))
    with pytest.raises(MetadataError, match="timestamp"):
        world.update()
    assert_nothing_moved(world, before)
