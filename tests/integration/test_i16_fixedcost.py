"""Issue 16, the install's fixed costs, through swtpm + nginx + onnxruntime: the health child
started ahead of the seal (updater/install/_health.PendingCheck) runs the real update, and the
disk that rewrites the stage after the seal (in place, or by rename) gets nothing past the
check before the commit; nothing trusted moves and the signed release installs after."""

from __future__ import annotations

import os

import pytest

from modelward.agent._commands import update as agent_update
from modelward.updater.errors import StagedFilesChangedError
from modelward.updater.install import _health
from tests.conftest import World


def test_i16_the_disk_rewriting_the_stage_after_the_seal_gets_nothing_installed(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the seal ("verified"), the stage's model is rewritten in place with v1's bytes;
    on the next attempt, after the health check ("health-checked"), it is replaced by
    rename. Each time the check ran in the child started ahead on the sealed bytes, the
    pre-commit check refused (StagedFilesChangedError, "before its commit"), and the
    record, counter, anchor, ``current`` and slots did not move. Mutation: dropping
    ``_verify_on_disk`` before the commit, or a child loading the stage, fails it."""
    old = world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    model = world.state / "staging" / "incoming" / "model.onnx"
    v1_model = (world.state / "current" / "model.onnx").read_bytes()
    assert old.exists()
    went: list[bool] = []
    real_go = _health.PendingCheck.go

    def go(self: _health.PendingCheck, *a: object) -> object:
        done = real_go(self, *a)  # type: ignore[arg-type]
        went.append(done is not None)
        return done

    monkeypatch.setattr(_health.PendingCheck, "go", go)
    before = world.snapshot()
    for at, how in (("verified", "in place"), ("health-checked", "by rename")):
        def on_step(step: str, at: str = at, how: str = how) -> None:
            if step != at:
                return
            if how == "in place":
                with open(model, "r+b") as f:
                    f.truncate(0)
                    f.write(v1_model)
            else:
                tmp = model.with_name("model.tmp")
                tmp.write_bytes(v1_model)
                os.chmod(tmp, 0o640)
                os.rename(tmp, model)

        with pytest.raises(StagedFilesChangedError, match="before its commit"):
            agent_update(world.cfg, on_step=on_step)
        after = world.snapshot()
        assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
            before.record, before.counter, before.anchor, before.current, before.slots), at
        assert world.active_version() == "1.0.0"
    assert went == [True, True]  # (both checks were the children started ahead)
    world.update()  # the disk stopped: the signed v2 installs, not rejected
    assert world.active_version() == "2.0.0"
