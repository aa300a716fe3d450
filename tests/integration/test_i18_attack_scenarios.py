"""The issue-18 `sim attack` scenarios on a two-device `sim fleet` (one over MQTT, one over
HTTPS; real swtpm, mosquitto, nginx, bridge and `agent run` daemon each), through the
scenario code `sim report` runs (docs/report.md), with what each device did checked
beyond the row's verdict: the active model, what `fleet attest` / `fleet audit` (the real
commands, over MQTT) said, and what stayed unchanged.

The catalogue side (names, outcomes, labels) is in tests/unit/test_i18_report_scenarios.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from modelward.simulator._fleet import Device, Fleet, fleet_down, fleet_up, pids_alive
from modelward.simulator._scenarios import (
    AUDIT_OK,
    REPLAY_OK,
    SCENARIOS,
    SWAP_OK,
    _attest_answered,
    _attested,
    _audit_kinds,
    _fleet_audit,
    _operator,
    run,
    wait_all_on,
)
from modelward.trust._bounded import read_json_file
from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("i18-report") / "fleet"
    f = fleet_up(d, 2)
    try:
        for _ in range(2):  # a previous model to fall back to
            assert wait_all_on(f, f.publish(), 120), [(x.active(), x.last_error())
                                                      for x in f.devices]
        _operator(f)
        yield f
    finally:
        fleet_down(d)
        assert pids_alive(d) == []


def _trusted(d: Device) -> tuple[Any, ...]:
    """What the device trusts and serves: the record's active model, `current`, slots."""
    rec = read_json_file(d.state / "trust" / "record.json", 1 << 16)["record"]
    return (rec["active"], (d.state / "current").readlink(), tree_digest(d.state / "slots"))


def test_i18_swapped_model_attests_what_boot_check_verified_until_the_next_boot(
        fleet: Fleet) -> None:
    newest, previous = fleet.published[-1], fleet.published[-2]
    kinds_before = {d.id: _audit_kinds(d) for d in fleet.devices}
    r = run(fleet, SCENARIOS["swapped-model"], timeout=120)
    assert r.ok, (r.observed(), r.recovered())
    for o in r.devices:
        # boot-check verified newest, the swap was attested as newest, the next
        # boot-check fell back to previous: `fleet attest` said fallback, the log too
        assert (o.before, o.during, o.error) == (newest, previous, SWAP_OK[0]), o
        assert o.after == newest and o.consistent, o  # the daemon reinstalled
    rows = _attest_answered(fleet, fleet.devices)
    for d in fleet.devices:
        assert _attested(rows.get(d.id)) == f"{newest} (activation)"
        kinds = _audit_kinds(d)
        assert kinds[:len(kinds_before[d.id])] == kinds_before[d.id]  # appended only
        assert kinds[len(kinds_before[d.id]):] == ["fallback", "install", "activation"]


def test_i18_edited_audit_log_is_named_by_fleet_audit_and_the_model_serves(
        fleet: Fleet) -> None:
    newest = fleet.published[-1]
    trusted = {d.id: _trusted(d) for d in fleet.devices}
    logs = {d.id: (d.state / "audit" / "live.jsonl").read_bytes() for d in fleet.devices}
    r = run(fleet, SCENARIOS["edited-audit-log"], timeout=60)
    assert r.ok, (r.observed(), r.recovered())
    for o in r.devices:
        assert (o.before, o.during, o.error, o.after) == (newest, newest, AUDIT_OK, newest), o
    for d in fleet.devices:
        assert _trusted(d) == trusted[d.id]  # nothing the device trusts or serves moved
        log = (d.state / "audit" / "live.jsonl").read_bytes()
        assert log == logs[d.id]  # cleared: the entry as the device wrote it ...
        rc, text = _fleet_audit(fleet, d)
        assert rc == 0 and f"audit log of {d.id}: verified" in text, text  # ... verifies


def test_i18_replayed_attestation_is_never_attested(fleet: Fleet) -> None:
    newest = fleet.published[-1]
    trusted = {d.id: _trusted(d) for d in fleet.devices}
    r = run(fleet, SCENARIOS["replayed-attestation"], timeout=60)
    assert r.ok, (r.observed(), r.recovered())
    for o in r.devices:
        # verbatim: ignored as stale (no answer); framed anew: refused, stale nonce; the
        # device, back online, attested again
        assert (o.before, o.during, o.error, o.after) == (newest, newest, REPLAY_OK, newest), o
    rows = _attest_answered(fleet, fleet.devices)
    for d in fleet.devices:
        assert _trusted(d) == trusted[d.id]
        assert _attested(rows.get(d.id)).startswith(f"{newest} ("), rows  # the device's own
