"""Real stack (swtpm, nginx): the disk attacker holds a shared writable mapping of the
active model, primed before boot, and stores into it while the boot check runs (after
the record and anchor are verified, right before the slot is hashed). No syscall touches
the file, so no timestamp moves; the boot check must still not call the altered model
verified: it hashes the slot when it checks it (fix 17: no earlier hash is reused) and
falls back."""

from __future__ import annotations

import mmap
import os
import time

import pytest

from modelward.agent._commands import run_boot_check
from modelward.trust._store import TrustStore
from tests.conftest import World


def test_a17_mmap_store_after_the_early_hash_falls_back(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    slot = (world.state / "current").resolve()
    model = slot / "model.onnx"
    fd = os.open(model, os.O_RDWR)  # (the disk attacker: the agent's uid here)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    try:
        m[0:1] = m[0:1]  # primed: the write fault (and mtime update) happen now
        time.sleep(0.02)
        real = TrustStore.anchored_root
        stored: list[bool] = []

        def verified_then_store(self: TrustStore) -> object:
            got = real(self)
            m[0:1] = bytes([m[0] ^ 1])  # after the record is verified, before the hash
            stored.append(True)
            return got

        monkeypatch.setattr(TrustStore, "anchored_root", verified_then_store)
        before = world.snapshot()
        res = run_boot_check(world.cfg)
        assert stored
        assert model.read_bytes()[:1] == bytes(m[0:1])  # the bytes did change
        assert res.fell_back and res.active.version == "1.0.0"
        after = world.snapshot()
        assert after.counter == before.counter + 1 and after.current != before.current
        assert after.anchor == before.anchor and after.metadata == before.metadata
    finally:
        m.close()
        os.close(fd)
