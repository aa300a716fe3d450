"""Issue 17, step 1: what the fleet view needs travels in the signed status report
(``model``, ``channel``, ``durations``, ``failure_reasons``), each checked by the closed
schema with hostile values, and an old report without them is still accepted."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from modelward.agent._observe import (
    BOOT_SECONDS_FILE,
    Metrics,
    build_report,
    read_boot_seconds,
    write_boot_seconds,
)
from modelward.agent._status import clean_status
from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.trust._report_fields import MAX_DURATION, MAX_REASONS, OTHER_REASON

NOW = 1_800_000_000.0


def report(**changes: Any) -> dict[str, Any]:
    status = {"counters": {"attempts": 2, "failures": 1}, "verify_s": 1.25,
              "failure_reasons": {"HealthCheckError": 1}}
    r = build_report("d1", "f1", None, "idle", status, seq=1, now=NOW, poll_interval=60,
                     model="classifier", channel="beta", boot_check_s=0.2)
    r.update(changes)
    return r


def test_a_device_reports_model_channel_durations_and_reasons() -> None:
    r = report()
    assert (r["model"], r["channel"]) == ("classifier", "beta")
    assert r["durations"] == {"verify_s": 1.25, "boot_check_s": 0.2}
    assert r["failure_reasons"] == {"HealthCheckError": 1}
    assert check_report(r) is r


def test_an_old_report_without_the_new_fields_is_accepted() -> None:
    old = {k: v for k, v in report().items()
           if k not in {"model", "channel", "durations", "failure_reasons"}}
    assert check_report(old) is old
    assert check_report(report(durations={})) is not None  # (each duration optional)
    assert check_report(report(durations={"verify_s": None, "boot_check_s": None}))


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("NaN verify", {"durations": {"verify_s": math.nan}}, "durations.verify_s"),
    ("inf boot", {"durations": {"boot_check_s": math.inf}}, "durations.boot_check_s"),
    ("-inf boot", {"durations": {"boot_check_s": -math.inf}}, "durations.boot_check_s"),
    ("negative", {"durations": {"verify_s": -1.0}}, "durations.verify_s"),
    ("huge", {"durations": {"verify_s": float(MAX_DURATION)}}, "durations.verify_s"),
    ("bool", {"durations": {"verify_s": True}}, "durations.verify_s"),
    ("string", {"durations": {"verify_s": "1"}}, "durations.verify_s"),
    ("unknown duration", {"durations": {"p95": 1.0}}, "durations.p95"),
    ("durations list", {"durations": [1.0]}, "durations"),
    ("reasons list", {"failure_reasons": ["x"]}, "failure_reasons"),
    ("too many reasons", {"failure_reasons": {f"E{i}": 1 for i in range(MAX_REASONS + 1)}},
     "failure_reasons"),
    ("reason forging a row", {"failure_reasons": {"E\ndev-9  ok  ok": 1}}, "failure_reasons"),
    ("escape in reason", {"failure_reasons": {"\x1b]0;pwned\x07": 1}}, "failure_reasons"),
    ("digit first", {"failure_reasons": {"1E": 1}}, "failure_reasons"),
    ("empty reason", {"failure_reasons": {"": 1}}, "failure_reasons"),
    ("long reason", {"failure_reasons": {"E" * 65: 1}}, "failure_reasons"),
    ("non-ASCII reason", {"failure_reasons": {"Errör": 1}}, "failure_reasons"),
    ("negative count", {"failure_reasons": {"E": -1}}, "failure_reasons.E"),
    ("huge count", {"failure_reasons": {"E": 2**60}}, "failure_reasons.E"),
    ("float count", {"failure_reasons": {"E": 1.0}}, "failure_reasons.E"),
    ("bool count", {"failure_reasons": {"E": True}}, "failure_reasons.E"),
    ("channel number", {"channel": 5}, "channel"),
    ("channel too long", {"channel": "c" * 257}, "channel"),
    ("channel surrogate", {"channel": "\ud800"}, "channel"),
    ("model null", {"model": None}, "model"),
]


@pytest.mark.parametrize(("label", "changes", "field"), BAD, ids=[b[0] for b in BAD])
def test_hostile_new_fields_fail_the_schema_naming_the_field(
        label: str, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ReportSchemaError) as e:
        check_report(report(**changes))
    assert e.value.field == field, label
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_failure_reasons_stay_bounded_on_the_device() -> None:
    m = Metrics()
    for i in range(100):
        m.note_failure(f"Error{i}")
    m.note_failure("Error0")
    m.note_failure("not an identifier\n")
    assert len(m.failure_reasons) == MAX_REASONS
    assert m.failure_reasons["Error0"] == 2
    assert m.failure_reasons[OTHER_REASON] == 100 - (MAX_REASONS - 1) + 1
    assert sum(m.failure_reasons.values()) == 102
    back = Metrics.from_status(m.to_status())
    assert back.failure_reasons == m.failure_reasons
    assert check_report(report(failure_reasons=back.failure_reasons))


def test_status_json_keeps_only_well_formed_reasons_and_durations() -> None:
    doc = clean_status({"failure_reasons": {"Good": 1, "bad key": 2, "Neg": -1, "B": True,
                                            **{f"E{i:02}": 1 for i in range(40)}},
                        "verify_s": math.nan})
    assert "verify_s" not in doc
    assert len(doc["failure_reasons"]) == MAX_REASONS
    assert "bad key" not in doc["failure_reasons"] and "Neg" not in doc["failure_reasons"]
    assert clean_status({"verify_s": 1e9}).get("verify_s") is None
    assert clean_status({"verify_s": 2.5})["verify_s"] == 2.5
    # a status.json written before issue 17 is cleaned (and MACed) exactly as before
    assert clean_status({"counters": {"attempts": 1}}) == {"counters": {"attempts": 1}}


def test_the_boot_check_time_is_read_back_only_as_plain_seconds(tmp_path: Path) -> None:
    assert read_boot_seconds(tmp_path) is None
    write_boot_seconds(tmp_path, 0.1234)
    assert (tmp_path / BOOT_SECONDS_FILE).read_text() == "0.123\n"
    assert read_boot_seconds(tmp_path) == 0.123
    path = tmp_path / BOOT_SECONDS_FILE
    for planted in (b"nan\n", b"inf", b"-1", b"1e9", b"1000000", b"", b" 1 2", b"9" * 40,
                    b"0x10", b"1.2.3"):
        path.write_bytes(planted)
        assert read_boot_seconds(tmp_path) is None, planted
    path.unlink()
    (tmp_path / "elsewhere").write_text("0.5\n")
    path.symlink_to(tmp_path / "elsewhere")
    assert read_boot_seconds(tmp_path) is None  # never through a link
    path.unlink()
    os.mkfifo(path)
    assert read_boot_seconds(tmp_path) is None  # a FIFO does not hang the agent


def test_an_unwritable_state_dir_costs_the_boot_check_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    write_boot_seconds(tmp_path / "file", 1.0)  # one warning, no exception
    assert (tmp_path / "file").read_text() == "not a directory"
