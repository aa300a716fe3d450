"""Issue 13 (a4), real swtpm + nginx: the signed status report carries only what the TPM
can vouch for. status.json is MACed by the TPM for its update counter; a report signed by
a process that made no attempt (as the next attempt's child would find it) believes it only
if that MAC verifies now. The trusted state never moves."""

from __future__ import annotations

import json
from typing import Any

import pytest

import modelward.agent._commands as commands
from modelward.updater.errors import HealthCheckError
from tests.conftest import World


def _report(world: World, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The report as a process that ran no attempt signs it (no status of its own)."""
    monkeypatch.setattr(commands, "_own_status", {})
    return dict(json.loads(commands.signed_report(world.cfg, "idle"))["report"])


def test_only_a_status_json_the_tpm_vouches_for_is_reported(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Genuine: believed. Edited with its MAC kept, planted without one, or an older
    genuine copy from before the last install put back: the report says nothing of it
    (only the TPM-backed record). The trusted state does not move."""
    path = world.state / "status.json"
    world.publish("1.0.0", seed=1)
    world.update()
    before_install = path.read_bytes()  # genuine, MACed at the counter before v2
    world.publish("2.0.0", seed=2)
    world.update()
    world.publish("3.0.0", seed=3, vectors_seed=4)  # fails its health check
    with pytest.raises(HealthCheckError):
        world.update()
    genuine = path.read_bytes()
    report = _report(world, monkeypatch)
    assert report["last_error"]["type"] == "HealthCheckError"
    assert report["counters"]["failures"] == 1 and report["counters"]["attempts"] == 3
    before = world.snapshot()
    for attack in ("edited", "unauthenticated", "before-the-install"):
        doc = json.loads(genuine)
        if attack == "edited":  # the failure hidden, the MAC kept
            doc["last_error"] = None
            doc["counters"]["failures"] = 0
            path.write_text(json.dumps(doc))
        elif attack == "unauthenticated":  # planted from scratch
            doc.pop("auth")
            doc["last_error"] = None
            path.write_text(json.dumps(doc))
        else:  # an older genuine copy put back: it says "installed, no error"
            path.write_bytes(before_install)
        report = _report(world, monkeypatch)
        assert report["last_error"] is None and report["counters"] == {}, attack
        assert report["last_activation"] is None, attack
        assert report["active"]["version"] == "2.0.0"  # (the TPM-backed record)
        after = world.snapshot()
        assert (after.record, after.counter, after.anchor, after.current, after.slots,
                after.metadata) == (before.record, before.counter, before.anchor,
                                    before.current, before.slots, before.metadata)
    # and the next attempt does not build on a planted file (counters start afresh)
    doc = json.loads(genuine)
    doc.pop("auth")
    doc["counters"]["failures"] = 10**9
    path.write_text(json.dumps(doc))
    world.update()  # nothing to do (3.0.0 is a remembered rejection)
    report = _report(world, monkeypatch)
    assert report["counters"]["failures"] == 0 and report["counters"]["attempts"] == 1
