"""Fix of attack 17, through swtpm + nginx + onnxruntime: the app gets busy while the
health inputs are sealed (after the child started ahead): the child is ended before the
gate pauses, none sits in memory through the pause, and the release installs after."""

from __future__ import annotations

import time

import pytest

from modelward.agent._commands import update as agent_update
from modelward.updater.idle import Gate, IdleSignal
from modelward.updater.install import _health
from modelward.updater.install import _install as install_mod
from tests.conftest import World
from tests.unit.test_a17_health import _wait_dead

pytestmark = pytest.mark.xdist_group("machine")


def test_f17_busy_during_the_seal_ends_the_early_child_before_the_pause(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.publish("1.0.0", seed=1)
    children: list[int] = []
    real_start, real_seal = install_mod.start_check, install_mod._seal_on_disk

    def start(*a: object, **k: object) -> _health.PendingCheck | None:
        p = real_start(*a, **k)  # type: ignore[arg-type]
        assert p is not None and p._proc is not None
        children.append(p._proc.pid)
        return p

    class AppBusy(IdleSignal):
        at: float | None = None
        held: list[int] = []  # noqa: RUF012
        polls = 0

        def busy(self) -> str | None:
            if self.at is None or time.monotonic() - self.at > 1.5:
                return None
            self.polls += 1
            self.held += [pid for pid in children if not _wait_dead(pid, 0)]
            return "the app is serving"

    app = AppBusy()

    def seal(*a: object, **k: object) -> object:
        got = real_seal(*a, **k)  # type: ignore[arg-type]
        app.at = time.monotonic()  # (busy from the end of the seal on)
        return got

    monkeypatch.setattr(install_mod, "start_check", start)
    monkeypatch.setattr(install_mod, "_seal_on_disk", seal)
    agent_update(world.cfg, Gate([app], poll=0.2))
    assert world.active_version() == "1.0.0"
    assert len(children) == 1 and app.polls > 1  # (it paused)
    assert app.held[1:] == [], app.held  # (the first poll is the one that ends it)
