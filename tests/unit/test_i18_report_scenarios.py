"""The `sim report` catalogue has the issue-18 scenarios (swapped model, edited audit log,
replayed attestation), and a device whose operator-side check did not come out as
expected, or whose model moved, is shown in its row and fails it. The scenarios run on a
real fleet in tests/integration/test_i18_attack_scenarios.py."""

from __future__ import annotations

from modelward.simulator._catalogue import ATTACK_NAMES
from modelward.simulator._scenarios import (
    AUDIT_OK,
    REPLAY_OK,
    SCENARIOS,
    SWAP_OK,
    DeviceOutcome,
    Scenario,
    ScenarioResult,
    table,
)

I18 = ("swapped-model", "edited-audit-log", "replayed-attestation")


def _result(sc: Scenario, *outcomes: DeviceOutcome, goal: str = "2.0.0") -> ScenarioResult:
    return ScenarioResult(sc, list(outcomes), goal, 3.0, {o.id for o in outcomes}, goal)


def test_i18_scenarios_are_in_the_catalogue_after_issue_13s() -> None:
    assert ATTACK_NAMES[-3:] == I18
    for name in I18:
        sc = SCENARIOS[name]
        assert sc.kind == "attack" and sc.expected and sc.errors and sc.observe, name
    assert SCENARIOS["swapped-model"].boot
    assert SCENARIOS["edited-audit-log"].outcome == "keep"
    assert SCENARIOS["replayed-attestation"].outcome == "keep"


def test_i18_keep_rows_need_the_label_and_the_same_model() -> None:
    for name, ok in (("edited-audit-log", AUDIT_OK), ("replayed-attestation", REPLAY_OK)):
        sc = SCENARIOS[name]
        good = DeviceOutcome("dev-001", "mqtt", "2.0.0", "2.0.0", ok, "2.0.0")
        assert _result(sc, good).ok, name
        assert f"1/1 {sc.says} ({ok})" in _result(sc, good).observed()
        wrong = DeviceOutcome("dev-002", "https", "2.0.0", "2.0.0",
                              "REPLAY ATTESTED: 2.0.0 (boot-check)", "2.0.0")
        moved = DeviceOutcome("dev-003", "https", "2.0.0", "1.0.0", ok, "2.0.0")
        r = _result(sc, good, wrong, moved)
        assert not r.ok
        assert "NOT AS EXPECTED: dev-002 on 2.0.0 (REPLAY ATTESTED" in r.observed()
        assert "dev-003 on 1.0.0" in r.observed()
        assert "NOT AS EXPECTED" in table([r])


def test_i18_swapped_model_row() -> None:
    sc = SCENARIOS["swapped-model"]
    fell = DeviceOutcome("dev-001", "mqtt", "2.0.0", "1.0.0", SWAP_OK[0], "2.0.0")
    none = DeviceOutcome("dev-002", "https", "2.0.0", "1.0.0", SWAP_OK[3], "2.0.0")
    assert _result(sc, fell, none).ok
    stale = DeviceOutcome("dev-003", "https", "2.0.0", "1.0.0",
                          "AFTER BOOT-CHECK EXIT 0: 2.0.0 (boot-check)", "2.0.0")
    r = _result(sc, fell, stale)
    assert not r.ok and "NOT AS EXPECTED: dev-003 on 1.0.0 (AFTER BOOT-CHECK" in r.observed()
