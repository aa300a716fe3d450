"""A few of the issue-13 `sim report` scenarios on a one-device fleet (real swtpm,
mosquitto, nginx, bridge and `agent run` daemon), so CI runs the scenario code itself and
not only its catalogue (tests/unit/test_i13_report_scenarios.py). The whole catalogue runs
in `modelward sim report --devices 3` (docs/report.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelward.simulator._fleet import Fleet, fleet_down, fleet_up, pids_alive
from modelward.simulator._scenarios import SCENARIOS, run, wait_all_on


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("i13-report") / "fleet"
    f = fleet_up(d, 1)
    try:
        for _ in range(2):  # a previous model to fall back to
            assert wait_all_on(f, f.publish(), 120), [(x.active(), x.last_error())
                                                      for x in f.devices]
        yield f
    finally:
        fleet_down(d)
        assert pids_alive(d) == []


@pytest.mark.parametrize("name", ["team-other-model", "symlinked-staging",
                                  "tpm-second-client"])
def test_i13_report_scenario_behaves_and_the_fleet_recovers(fleet: Fleet, name: str) -> None:
    r = run(fleet, SCENARIOS[name], timeout=90)
    assert r.ok, (r.observed(), r.recovered())
    assert "NOT AS EXPECTED" not in r.observed()
    assert r.lost == 0
