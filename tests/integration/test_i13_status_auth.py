"""Issue 13 (a4), real swtpm + nginx: the signed status report carries only what the TPM
can vouch for. status.json is MACed by the TPM for its update counter; a report signed by
a process that made no attempt (as the next attempt's child would find it) believes it only
if that MAC verifies now. The trusted state never moves."""

from __future__ import annotations

import json
from typing import Any

import pytest

import agent._commands as commands
from tests.conftest import World
from updater.errors import HealthCheckError


def _report(world: World, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The report as a process that ran no attempt signs it (no status of its own)."""
    monkeypatch.setattr(commands, "_own_status", {})
    return dict(json.loads(commands.signed_report(world.cfg, "idle"))["report"])


def _failed_v2(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2, vectors_seed=3)  # fails its health check
    with pytest.raises(HealthCheckError):
        world.update()


def test_a_genuine_status_json_is_believed(world: World,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _failed_v2(world)
    report = _report(world, monkeypatch)
    assert report["last_error"]["type"] == "HealthCheckError"
    assert report["counters"]["failures"] == 1 and report["counters"]["attempts"] == 2


@pytest.mark.parametrize("attack", ["edited", "unauthenticated", "before-the-install"])
def test_a_status_json_the_tpm_does_not_vouch_for_is_not_reported(
        world: World, monkeypatch: pytest.MonkeyPatch, attack: str) -> None:
    path = world.state / "status.json"
    world.publish("1.0.0", seed=1)
    world.update()
    before_install = path.read_bytes()  # genuine, MACed at the counter before v2
    world.publish("2.0.0", seed=2)
    world.update()
    world.publish("3.0.0", seed=3, vectors_seed=4)
    with pytest.raises(HealthCheckError):
        world.update()
    before = world.snapshot()
    doc = json.loads(path.read_bytes())
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
    assert report["last_error"] is None and report["counters"] == {}  # nothing it can't prove
    assert report["last_activation"] is None
    assert report["active"]["version"] == "2.0.0"  # (from the TPM-backed record)
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots,
            after.metadata) == (before.record, before.counter, before.anchor, before.current,
                                before.slots, before.metadata)
    status = world.cli("agent", "status", "--config", str(world.conf_path), "--json")
    assert status.returncode == 0, status.stderr


def test_the_next_attempt_starts_from_nothing_it_cannot_prove(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted status.json with huge counters does not become the next MACed one."""
    world.publish("1.0.0", seed=1)
    world.update()
    path = world.state / "status.json"
    doc = json.loads(path.read_bytes())
    doc.pop("auth")
    doc["counters"]["failures"] = 10**9
    path.write_text(json.dumps(doc))
    world.update()  # nothing to do
    report = _report(world, monkeypatch)
    assert report["counters"]["failures"] == 0 and report["counters"]["attempts"] == 1
