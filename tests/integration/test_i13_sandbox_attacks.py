"""Issue 13, outside review of the health-check sandbox, end to end (real swtpm, nginx,
onnxruntime): a signed but malicious release against a provisioned device.

The unit-level attacks are in tests/unit/test_i13_sandbox_attacks.py; a test marked
``xfail(strict=True)`` demonstrates an attack that works today.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.updater.errors import HealthCheckError
from modelward.updater.install import _install as install_mod
from modelward.updater.install._sandbox import Completed, SandboxPolicy, run
from tests.conftest import World
from tests.unit.test_i13_sandbox_attacks import _abi_launcher, _ext_model, _vectors

# health check children as nobody: one worker, alone (scripts/test)
pytestmark = pytest.mark.xdist_group("machine")


def _journal_step(w: World) -> str:
    return str(json.loads((w.state / "journal.json").read_bytes()).get("step"))


def test_signed_model_reading_the_trust_record_as_external_data_is_refused(
        world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    record = world.state / "trust" / "record.json"
    size = record.stat().st_size
    vec = world.builds / "ext-vectors.npz"
    _vectors(vec, **{"input:x": np.zeros(size, np.uint8), "output:y": np.zeros(size, np.uint8)})
    bundle = world.builds / "classifier-2.0.0.tar"
    build_bundle(_ext_model(world.builds / "ext.onnx", "../../trust/record.json", size),
                 "classifier", "2.0.0", bundle, vectors=vec, options=BuildOptions())
    world.repo.publish(bundle)
    with pytest.raises(HealthCheckError) as e:
        world.update()
    assert (e.value.model, e.value.version) == ("classifier", "2.0.0")
    assert "external data" in e.value.detail.lower(), e.value.detail
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0" and _journal_step(world) == "failed"


def test_compromised_child_report_crashes_the_update(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.install._health as health

    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    world.publish("2.0.0", seed=2)

    def compromised(argv: list[str], policy: SandboxPolicy, **kw: object) -> Completed:
        # the signed 2.0.0's model runs code in onnxruntime: it writes its own "report"
        code = 'import sys; sys.stdout.write("[" * 4000 + "\\n")'
        return run([sys.executable, "-c", code], policy, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(health, "run", compromised)
    # (the child started ahead of the seal would bypass the patched `run`: issue 16's
    # fixed costs; its own compromised report: tests/unit/test_i16_fixedcost.py)
    monkeypatch.setattr(install_mod, "start_check", lambda *a, **k: None)
    try:
        with pytest.raises(HealthCheckError):
            world.update()
    finally:
        after = world.snapshot()
        assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
            before.record, before.counter, before.anchor, before.current, before.slots)
    assert _journal_step(world) == "failed"
    status = json.loads(Path(world.state / "status.json").read_bytes())
    assert status["last_error"]["type"] == "HealthCheckError", status


def test_child_cannot_alter_what_the_agent_commits_on_landlock_abi2(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.install._health as health

    world.publish("1.0.0", seed=1)
    world.update()
    published = world.publish("2.0.0", seed=2)
    monkeypatch.setattr("modelward.updater.install._sandbox.LAUNCHER", _abi_launcher(world.tmp, 2))

    def compromised(argv: list[str], policy: SandboxPolicy, **kw: object) -> Completed:
        # the signed 2.0.0's model runs code in onnxruntime; the staged model file as if
        # the child had the agent's uid (a root agent's child is nobody). (The child gets
        # sealed copies and cannot see the stage at all; seccomp refuses O_TRUNC first.)
        slot = os.path.realpath(world.state / "staging" / "incoming")
        model = slot + "/model.onnx"
        mode = os.stat(model).st_mode & 0o7777
        os.chmod(model, 0o666)  # noqa: S103
        code = ("import os, sys\n"
                "try:\n"
                "    os.close(os.open(sys.argv[1] + '/model.onnx', os.O_RDONLY | os.O_TRUNC))\n"
                "    print('{\"ok\": true, \"detail\": \"1 output(s) match\"}')\n"
                "except OSError as e:\n"
                "    print('{\"ok\": false, \"detail\": \"truncate: errno %d\"}' % e.errno)\n")
        try:
            return run([sys.executable, "-c", code, slot], policy,  # type: ignore[arg-type]
                       **kw)
        finally:  # (a slot file with odd modes never matches its fingerprint)
            os.chmod(model, mode)

    monkeypatch.setattr(health, "run", compromised)
    # (the child started ahead of the seal would bypass the patched `run`: issue 16's
    # fixed costs; its own compromised report: tests/unit/test_i16_fixedcost.py)
    monkeypatch.setattr(install_mod, "start_check", lambda *a, **k: None)
    before = world.snapshot()
    # the seccomp filter refuses O_TRUNC (Landlock ABI 2 has no truncate right); had it not,
    # the slot fingerprint derived again before the commit would refuse the emptied model
    with pytest.raises(HealthCheckError) as e:
        world.update()
    assert e.value.detail == "truncate: errno 1", e.value.detail  # EPERM
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0" and _journal_step(world) == "failed"
    assert published.exists()
