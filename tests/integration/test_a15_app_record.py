"""Attack (a15app), real stack: a disk attacker plants a self-consistent slot (model plus a
manifest listing its sha256) and points ``current`` at it. The example app checks the model
only against the manifest in the same slot, so it serves whatever the trust record does not
name, until a boot-check happens to run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator

import pytest

from modelward.simulator._app import AppHandle, start_app, stop_app
from modelward.simulator._models import make_linear_model
from tests.conftest import World


@pytest.fixture
def app(world: World) -> Iterator[AppHandle]:
    world.publish("1.0.0", seed=1)
    world.update()
    h = start_app(world.state / "current", world.tmp / "app-busy", world.tmp / "app.log")
    try:
        yield h
    finally:
        stop_app(h.pid, h.proc)


def _plant(w: World) -> None:
    """slots/b: a copy of the active slot with another model and a manifest that lists it."""
    b = w.state / "slots" / "b"
    if b.exists():
        shutil.rmtree(b)
    shutil.copytree(w.state / "slots" / "a", b)
    evil = make_linear_model(w.tmp / "evil.onnx", 666).read_bytes()
    m = json.loads((b / "manifest.json").read_text())
    path = m["model"]["path"]
    (b / path).write_bytes(evil)
    m["version"] = "6.6.6"
    for f in m["files"]:
        if f["path"] == path:
            f["sha256"] = hashlib.sha256(evil).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m))
    tmp = w.state / ".current.evil"
    os.symlink("slots/b", tmp)
    os.replace(tmp, w.state / "current")


def test_a15_app_never_serves_a_slot_the_trust_record_does_not_name(
    world: World, app: AppHandle,
) -> None:
    assert app.wait_for("1.0.0")["version"] == "1.0.0"
    _plant(world)
    # The running app follows `current` within a poll ...
    got = app.wait_for("6.6.6", timeout=3.0)
    # ... and an app (re)started before the agent's boot-check loads the planted slot.
    fresh = start_app(world.state / "current", world.tmp / "busy2", world.tmp / "app2.log")
    try:
        fresh_got = fresh.info()
    finally:
        stop_app(fresh.pid, fresh.proc)
    assert got.get("version") == "1.0.0", got
    assert fresh_got.get("version") != "6.6.6", fresh_got


def test_a15_app_swapped_slots_do_not_roll_the_app_back(world: World, app: AppHandle) -> None:
    world.publish("2.0.0", seed=2)
    world.update()
    assert app.wait_for("2.0.0")["version"] == "2.0.0"
    slots = world.state / "slots"
    os.rename(slots / "a", slots / "tmp")
    os.rename(slots / "b", slots / "a")
    os.rename(slots / "tmp", slots / "b")
    got = app.wait_for("1.0.0", timeout=3.0)
    assert got.get("version") == "2.0.0", got
