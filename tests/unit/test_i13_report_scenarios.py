"""The `sim report` catalogue has a scenario for each issue-13 attack family that applies
to a running fleet (must-show 14), and a device that does not behave is shown in its row,
never counted as expected. The scenarios themselves run in `modelward sim report`
(docs/report.md); each one's real-stack test is in tests/integration/test_i13_*.py."""

from __future__ import annotations

from modelward.simulator._catalogue import ATTACK_NAMES
from modelward.simulator._scenarios import SCENARIOS, DeviceOutcome, Scenario, ScenarioResult, table

I13 = {  # issue-13 finding -> scenario
    "1 team key ships another model": "team-other-model",
    "2 planted partial stage": "planted-stage",
    "3 current repointed": "current-outside",
    "4 pax-header bundle": "pax-bundle",
    "4 MQTT junk flood": "mqtt-junk-flood",
    "5 replayed status report": "replayed-status",
    "6 symlinked staging": "symlinked-staging",
    "7 state dir rolled back": "state-rollback",
    "8 second TPM client": "tpm-second-client",
    "9/10 malicious model, rejection remembered": "memory-hog",
    "11 busy_file FIFO": "busy-fifo",
}


def test_i13_every_attack_family_has_a_report_scenario() -> None:
    for finding, name in I13.items():
        assert name in ATTACK_NAMES, finding
        sc = SCENARIOS[name]
        assert sc.kind == "attack" and sc.expected, name
        assert sc.outcome in ("refuse", "ignore", "install"), name
        assert sc.errors or sc.outcome != "refuse", name  # a refusal names its errors


def _result(sc: Scenario, *outcomes: DeviceOutcome, goal: str = "2.0.0") -> ScenarioResult:
    return ScenarioResult(sc, list(outcomes), goal, 3.0, {o.id for o in outcomes}, goal)


def test_i13_a_device_not_behaving_is_shown_and_fails_the_row() -> None:
    refuse = SCENARIOS["symlinked-staging"]
    good = DeviceOutcome("dev-001", "https", "1.0.0", "1.0.0", "StateDirError", "2.0.0")
    bad = DeviceOutcome("dev-002", "mqtt", "1.0.0", "2.0.0", None, "2.0.0")
    assert _result(refuse, good).ok
    r = _result(refuse, good, bad)
    assert not r.ok
    assert "1/2 refused (StateDirError)" in r.observed()
    assert "NOT AS EXPECTED: dev-002 on 2.0.0 (no error)" in r.observed()
    assert "NOT AS EXPECTED" in table([r])


def test_i13_install_ignore_and_boot_outcomes() -> None:
    install = SCENARIOS["planted-stage"]
    on = DeviceOutcome("dev-001", "https", "1.0.0", "2.0.0", None, "2.0.0")
    planted = DeviceOutcome("dev-002", "https", "1.0.0", "2.0.0", "PLANTED MODEL ACTIVE")
    assert _result(install, on).ok
    assert not _result(install, on, planted).ok
    labelled = SCENARIOS["tpm-second-client"]
    assert _result(labelled, DeviceOutcome("d", "https", "1.0.0", "2.0.0",
                                           "TPM commands refused", "2.0.0")).ok
    assert not _result(labelled, DeviceOutcome("d", "https", "1.0.0", "2.0.0",
                                               "TPM MOVED by tpm2_nvwrite", "2.0.0")).ok
    ignore = SCENARIOS["team-other-model"]
    assert _result(ignore, DeviceOutcome("d", "mqtt", "1.0.0", "1.0.0", None), goal="1.0.0").ok
    assert not _result(ignore, DeviceOutcome("d", "mqtt", "1.0.0", "104.0.0", None),
                       goal="1.0.0").ok
    assert not _result(ignore, DeviceOutcome("d", "mqtt", "1.0.0", "1.0.0", "MetadataError"),
                       goal="1.0.0").ok  # an error is no "ignored": a team role broke it
    boot = SCENARIOS["state-rollback"]
    assert _result(boot, DeviceOutcome("d", "mqtt", "1.0.0", "1.0.0", "boot-check exit 3")).ok
    assert not _result(boot, DeviceOutcome("d", "mqtt", "1.0.0", "1.0.0",
                                           "boot-check exit 0")).ok
