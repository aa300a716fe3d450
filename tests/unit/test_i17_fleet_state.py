"""Issue 17, step 2: ``fleet status`` states one fleet state per device, from its flags and
its verified report (``publisher._fleet.device_state``), through the real pure pipeline
(signature, schema, freshness)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelward.publisher._fleet import (
    FAILED,
    FELL_BACK,
    MISSING,
    OK,
    REJECTED,
    STALE,
    UPDATING,
    device_state,
    format_table,
    judge_fleet,
    rows_json,
)
from modelward.trust._report import sign_report
from tests.unit.test_i14_fleetview import AT, FLEET, NOW, _registry, good_report


def _state_of(tmp_path: Path, **changes: Any) -> str:
    fd, keys = _registry(tmp_path, ["d1"])
    rep = good_report("d1", **changes)
    [row] = judge_fleet({"d1": sign_report(rep, keys["d1"])}, fd, FLEET, NOW, 3600.0)
    return row.state


def test_each_state_from_the_report(tmp_path: Path) -> None:
    fallback = {"type": "ActiveModelAltered", "message": "fell back to 1.0.0", "at": AT}
    health = {"type": "HealthCheckError", "message": "vectors differ", "at": AT}
    cases = [
        ("ok", {"last_error": None, "state": "idle"}, OK),
        ("ok active", {"last_error": None, "state": "active"}, OK),
        ("updating", {"last_error": None, "state": "downloading"}, UPDATING),
        ("updating after a failure", {"last_error": health, "state": "staged"}, UPDATING),
        ("fell back", {"last_error": fallback, "state": "idle"}, FELL_BACK),
        ("failed", {"last_error": health, "state": "failed"}, FAILED),
        ("unknown step is no progress", {"last_error": None, "state": "pwned"}, OK),
    ]
    for i, (label, changes, want) in enumerate(cases):
        assert _state_of(tmp_path / str(i), **changes) == want, label


def test_flags_win_over_the_report(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["old", "bad", "silent"])
    old = good_report("old", now=NOW - 4 * 3600, poll_interval=3600.0, last_error=None)
    rows = {r.device_id: r for r in judge_fleet(
        {"old": sign_report(old, keys["old"]),
         "bad": sign_report(good_report("bad"), keys["old"])},  # another device's key
        fd, FLEET, NOW, 3600.0)}
    assert (rows["old"].state, rows["bad"].state, rows["silent"].state) == \
        (STALE, REJECTED, MISSING)
    # a stale report of a device that said "updating" is not believed as its state now
    assert device_state((STALE,), {"state": "downloading"}) == STALE


def test_the_state_is_the_second_column_and_in_json(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["d1", "d2"])
    rows = judge_fleet({"d1": sign_report(good_report("d1", last_error=None), keys["d1"])},
                       fd, FLEET, NOW, 3600.0)
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["DEVICE", "STATE"]
    assert lines[1].split()[:2] == ["d1", "ok"] and lines[2].split()[:2] == ["d2", "MISSING"]
    doc = json.loads(rows_json(rows))
    assert [(d["device"], d["state"]) for d in doc] == [("d1", OK), ("d2", MISSING)]


def test_a_device_cannot_spell_another_state_into_its_row(tmp_path: Path) -> None:
    """``state`` and ``last_error.type`` are the device's own words: they pick one of the
    fixed states for its own row, and the STEP cell shows them escaped."""
    rep = good_report("d1", state="ok\n d2  ok", last_error={"type": "ok  \x1b[2J"})
    fd, keys = _registry(tmp_path, ["d1", "d2"])
    rows = judge_fleet({"d1": sign_report(rep, keys["d1"])}, fd, FLEET, NOW, 3600.0)
    assert [r.state for r in rows] == [FAILED, MISSING]
    table = format_table(rows)
    assert len(table.splitlines()) == 3 and "\x1b" not in table
