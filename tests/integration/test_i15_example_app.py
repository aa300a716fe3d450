"""Issue 15, must-show 4: the example inference app (examples/inference_app.py) against the
real stack (swtpm, nginx, onnxruntime, the real agent): it serves the active model, reloads on
activation, never serves a tampered or unverified model, and its busy signal holds updates."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from modelward.simulator._app import AppHandle, start_app, stop_app
from modelward.updater.errors import HealthCheckError
from tests.conftest import World

X = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(2, 8).tolist()


def expected(model: Path) -> list[list[float]]:
    """The output of the operator's own model file (the trusted reference)."""
    s = ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": np.asarray(X, dtype=np.float32)})[0].tolist()  # type: ignore[no-any-return]


def trusted(w: World, version: str) -> tuple[str, list[list[float]]]:
    model = w.builds / f"classifier-{version}.onnx"
    return hashlib.sha256(model.read_bytes()).hexdigest(), expected(model)


@pytest.fixture
def app(world: World) -> Iterator[AppHandle]:
    world.publish("1.0.0", seed=1)
    world.update()
    h = start_app(world.state / "current", world.tmp / "app-busy", world.tmp / "app.log")
    try:
        yield h
    finally:
        stop_app(h.pid, h.proc)


def served(app: AppHandle, w: World, version: str) -> dict[str, Any]:
    """The app answers with ``version``'s operator-built bytes and their outputs."""
    info = app.wait_for(version)
    got = app.infer(X)
    sha, out = trusted(w, version)
    assert info.get("version") == version, (info, app.log.read_text())
    assert (got["version"], got["sha256"]) == (version, sha), got
    np.testing.assert_allclose(got["output"], out, rtol=1e-6)
    return got


def _flip(p: Path) -> bytes:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    return bytes(data)


def test_i15_app_reloads_on_activation_and_never_serves_the_tampered_model(
    world: World, app: AppHandle,
) -> None:
    served(app, world, "1.0.0")
    world.publish("2.0.0", seed=2)
    world.update()
    t0 = time.monotonic()
    served(app, world, "2.0.0")
    assert time.monotonic() - t0 < 3.0  # polled each second
    v2_out = app.infer(X)["output"]

    # The disk attacker flips a byte of the active model; even asked to reload (SIGHUP),
    # the app refuses the bytes that do not match the record and keeps serving v2.
    tampered = _flip(world.state / "current" / "model.onnx")
    bad_sha = hashlib.sha256(tampered).hexdigest()
    app.reload()
    _wait_log(app, "does not have the fingerprint")  # (fixapp: the record check, first)
    got = app.infer(X)
    assert got["sha256"] != bad_sha and got["version"] == "2.0.0"
    np.testing.assert_allclose(got["output"], v2_out)

    # An app (re)started before the boot check, on the tampered slot, serves nothing.
    fresh = start_app(world.state / "current", world.tmp / "busy2", world.tmp / "app2.log")
    try:
        assert fresh.info().get("status") == 503
        assert fresh.infer(X).get("status") == 503
        assert "does not have the fingerprint" in fresh.log.read_text()
    finally:
        stop_app(fresh.pid, fresh.proc)

    # Boot-check falls back to v1; the app follows within a bound and serves v1's outputs.
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0 and "fell back to classifier 1.0.0" in r.stdout, r.stderr
    served(app, world, "1.0.0")
    assert f"(sha256 {bad_sha})" not in app.log.read_text()  # never "serving" it


def _wait_log(app: AppHandle, needle: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in app.log.read_text():
        assert time.monotonic() < deadline, app.log.read_text()
        time.sleep(0.05)


def test_i15_bundle_failing_its_health_check_never_reaches_the_app(
    world: World, app: AppHandle,
) -> None:
    served(app, world, "1.0.0")
    before = world.snapshot()
    world.publish("2.0.0", seed=2, vectors_seed=3)  # signed, but fails its test vectors
    with pytest.raises(HealthCheckError):
        world.update()
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots["a/model.onnx"]) == \
        (before.record, before.counter, before.current, before.slots["a/model.onnx"])
    time.sleep(1.2)  # one poll
    app.reload()
    served(app, world, "1.0.0")
    assert "2.0.0" not in app.log.read_text()


def test_i15_busy_app_holds_the_update_until_its_queue_drains(
    world: World, app: AppHandle,
) -> None:
    busy = world.tmp / "app-busy"
    world.conf_path.write_text(world.conf_path.read_text() +
                               f'\n[idle]\nbusy_file = "{busy}"\npoll = 0.1\n')
    world.publish("2.0.0", seed=2)
    # (fixapp: a request counts only once its body has arrived, and is answered in
    # microseconds by this model: the app is frozen with one in its queue, as a slow model)
    _wait_file(busy, "0\n")
    os.kill(app.pid, signal.SIGSTOP)
    busy.write_text("1\n")
    log = open(world.tmp / "update.log", "w")  # noqa: SIM115
    agent = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "update",
                              "--config", str(world.conf_path), "--once"],
                             stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_text(world.tmp / "update.log", "pausing")
        time.sleep(0.5)
        assert world.active_version() == "1.0.0"
        assert "classifier-2.0.0.tar" not in (world.tmp / "origin" / "access.log").read_text()
        os.kill(app.pid, signal.SIGCONT)
        assert app.info()["version"] == "1.0.0"  # its next heartbeat: the queue drained
        assert agent.wait(60) == 0, (world.tmp / "update.log").read_text()
    finally:
        os.kill(app.pid, signal.SIGCONT)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    served(app, world, "2.0.0")
    assert "resuming" in (world.tmp / "update.log").read_text()


def _wait_file(p: Path, text: str) -> None:
    deadline = time.monotonic() + 5
    while not (p.exists() and p.read_text() == text):
        assert time.monotonic() < deadline, p.read_text() if p.exists() else "missing"
        time.sleep(0.02)


def _wait_text(p: Path, needle: str) -> None:
    deadline = time.monotonic() + 30
    while needle not in p.read_text():
        assert time.monotonic() < deadline, p.read_text()
        time.sleep(0.05)

