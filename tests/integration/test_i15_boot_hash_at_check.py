"""The boot check through the real stack (swtpm, nginx): the disk changes the active
model while the check runs, after the record and anchor are verified and before the slot
is hashed. The check hashes the slot when it checks it (fix 17 removed issue 15's early
hash), so it sees the change and falls back, never calling the altered model verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.agent._commands import run_boot_check
from modelward.trust._store import TrustStore
from modelward.updater.install import _boot
from tests.conftest import World


def _flip(p: Path) -> None:
    data = p.read_bytes()
    with open(p, "r+b") as f:  # same inode and size: only the bytes differ
        f.write(bytes([data[0] ^ 1]))


def test_i15_model_altered_after_the_early_hash_falls_back(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    slot = (world.state / "current").resolve()
    before = world.snapshot()
    real = TrustStore.anchored_root
    flipped: list[Path] = []

    def verified_then_attack(self: TrustStore) -> bytes:
        got = real(self)
        flipped.append(slot)
        _flip(slot / "model.onnx")  # after the record is verified, before the hash
        return got

    monkeypatch.setattr(TrustStore, "anchored_root", verified_then_attack)
    res = run_boot_check(world.cfg)
    assert flipped == [slot]
    assert res.fell_back and res.active.version == "1.0.0"
    after = world.snapshot()
    assert after.current != before.current and after.counter == before.counter + 1
    assert after.anchor == before.anchor and after.metadata == before.metadata


def test_i15_unchanged_slot_is_hashed_once(world: World,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    calls: list[Path] = []
    real = _boot.directory_entries

    def spy(root: Path) -> list[object]:
        calls.append(root)
        return real(root)  # type: ignore[return-value]

    monkeypatch.setattr(_boot, "directory_entries", spy)
    before = world.snapshot()
    res = run_boot_check(world.cfg)
    assert not res.fell_back and res.active.version == "1.0.0"
    assert calls == [world.state / "slots" / "a"]  # once, at the check
    assert world.snapshot() == before
