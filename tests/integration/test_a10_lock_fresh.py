"""Attack a10lock: the gap "no state directory yet: no lock". An ``agent update`` started on
a fresh device, before the state directory exists (``agent provision`` is run just after
it, as a setup script may do), takes no lock and keeps running without one once the
directory is there: a second update then takes the lock and runs beside it. Real processes
against swtpm and nginx (the pausing wrapper of test_a10_conc, plus one hold point right
before the update opens the trust store).

Fixed: the update makes the missing state directory and locks it at once (agent/_lock.py
device_lock), so "provision ran meanwhile" can no longer be the whole provisioned
directory renamed into place (rename(2) does not replace a non-empty directory): the
real ``agent provision`` is run and is refused, then provision's files are moved in."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import tests.integration.test_a10_conc as conc
from modelward.agent._lock import LOCK_NAME, holder
from tests.conftest import World

_OPEN_HOLD = """
import modelward.agent._commands as c
open0 = c.open_store
def open_store(cfg):
    wait("open-store")
    return open0(cfg)
c.open_store = open_store
"""
_MARK = 'sys.argv = ["modelward"'


@pytest.fixture
def holder_at_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    script = conc._HOLDER.replace(_MARK, _OPEN_HOLD + _MARK, 1)
    assert script != conc._HOLDER
    monkeypatch.setattr(conc, "_HOLDER", script)
    yield
    while conc._RUNNING:
        p = conc._RUNNING.pop()
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_a10_an_update_started_before_provision_still_excludes_a_second(
        world: World, holder_at_open: None) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    counter = w.snapshot().counter
    saved = w.tmp / "state.provisioned"
    w.state.rename(saved)  # a fresh device: no state directory yet
    a = conc._update(w, "a", ["open-store", "health-checked"])
    a.at("open-store")  # (past its device_lock)
    # It made the state directory and locked it before anything else: an `agent
    # provision` run now (it makes the directory the same way, then locks) is refused.
    h = holder(w.state)
    assert h is not None and h.command == "agent update", h
    p = conc.Held(w, "p", [], "agent", "provision", "--config", str(w.conf_path),
                  "--root", str(w.repo_dir / "metadata" / "1.root.json"))
    rp = p.finish(60)
    assert conc._refused(rp), (rp.returncode, rp.stderr)
    assert sorted(os.listdir(w.state)) == [LOCK_NAME]
    # What provision leaves appears there all the same (the disk: the state directory
    # can no longer be renamed over, it is not empty, so its entries are moved in).
    for e in saved.iterdir():
        e.rename(w.state / e.name)
    a.go("open-store")
    a.at("health-checked")
    b = conc._update(w, "b", [])
    conc._second_refused_or_waiting(b, 30)
    a.go("health-checked")
    ra = a.finish()
    assert ra.returncode == 0, ra.stderr
    conc._consistent(w, "1.0.0", counter + 1)
