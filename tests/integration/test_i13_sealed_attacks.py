"""Issue 13, the disk attacking the sealed health-check inputs (updater/install/_sealed.py) through
swtpm + nginx + onnxruntime: what the disk plants in the stage between extraction and the
seal is refused without blocking and without being read into memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from modelward.agent._commands import update as agent_update
from modelward.updater.errors import StagedFilesChangedError
from tests.conftest import World
from tests.integration._i16_delta import drop_index


def test_what_the_disk_plants_before_the_seal_is_refused_without_reading_it(
        world: World) -> None:
    """A FIFO (must not block), a 1 TiB sparse file (must not be copied into memory) and a
    symlink to a model outside state_dir, each planted in turn between the extraction and
    the seal: refused, nothing trusted moves, and the signed release installs after."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    # (a release from before chunk indexes: the whole-bundle stage, whose seal refuses; a
    # delta whose files changed on disk falls back to the whole bundle once, by design:
    # updater/install/_install.py, the StagedFilesChangedError branch)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-2.0.0.tar")
    model = world.state / "staging" / "incoming" / "model.onnx"
    outside = world.tmp / "outside.onnx"
    before = world.snapshot()
    for plant in ("fifo", "sparse-giant", "symlink-outside"):
        _attack(world, plant, model, outside)
        after = world.snapshot()
        assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
            before.record, before.counter, before.anchor, before.current, before.slots)
        assert world.active_version() == "1.0.0"
    world.update()  # the disk stopped: the signed v2 installs
    assert world.active_version() == "2.0.0"


def _attack(world: World, plant: str, model: Path, outside: Path) -> None:
    def on_step(step: str) -> None:
        if step != "staged":  # extracted and hashed in the stream; not yet sealed
            return
        if plant == "sparse-giant":
            with open(model, "r+b") as f:
                f.truncate(1 << 40)  # 1 TiB of holes
            return
        outside.write_bytes(model.read_bytes())
        model.unlink()
        if plant == "fifo":
            os.mkfifo(model, 0o640)
        else:
            model.symlink_to(outside)

    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            agent_update(world.cfg, on_step=on_step)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"the update blocked on the planted {plant}"
    assert len(errors) == 1 and isinstance(errors[0], StagedFilesChangedError), (plant, errors)
    assert "before its health check" in str(errors[0]), errors[0]
