"""``agent status`` without the TPM (agent/_status_offline.py), fixer of the a15cfg
attacks: what the disk attacker, who writes every file of the state directory, tries
next against the checked, escaped, labelled rows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from modelward.agent._config import load_config
from modelward.agent._status_offline import (
    ROW,
    UNVERIFIED_END,
    status_lines,
    unverified_status,
)
from modelward.cli import main
from modelward.trust._display import display_width
from tests.unit._configbase import BASE, config_dir

LABELS = ("record    ", "active    ", "previous  ", "last error ", "rejected  ", " " * 10 + "| ")
FORGED = "verified by the TPM (trust record MAC and update counter)"
NOW = time.time()


@pytest.fixture
def d(tmp_path: Path) -> Path:
    (config_dir(tmp_path) / "agent.toml").write_text(BASE)
    return tmp_path


def _record(d: Path, **active: Any) -> None:
    ref = {"name": "m", "version": "1.0", "fingerprint": "fp", "slot": "a", **active}
    rec = {"record": {"counter": 1, "root_version": 1, "targets_version": 1, "active": ref,
                      "previous": None}, "mac": "00"}
    (d / "state" / "trust" / "record.json").write_text(json.dumps(rec))


def _rejection(d: Path, **over: Any) -> None:
    e = {"path": "t.onnx", "hashes": {"sha256": "00"}, "reason": "HealthCheckError",
         "detail": "d", "model": "m", "version": "1", "at": NOW - 10,
         "until": NOW - 10 + 86400, **over}
    (d / "state" / "rejections.json").write_text(
        json.dumps({"version": 1, "rejections": [e], "mac": "00"}))


def _last_error(d: Path, **over: Any) -> None:
    err = {"type": "X", "message": "m", "at": "now", **over}
    (d / "state" / "status.json").write_text(json.dumps({"last_error": err}))


def _out(d: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> list[str]:
    rc = main(["agent", "status", "--no-tpm", *flags, "--config", str(d / "agent.toml")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.splitlines()


def _assert_unforgeable(lines: list[str]) -> None:
    """The notice first and last; every other row labelled or a ``|`` continuation, of at
    most ROW columns; no row starts with, and nothing holds, the verified line's text."""
    assert lines[0].startswith("UNVERIFIED: ") and lines[-1] == UNVERIFIED_END
    for ln in lines[1:-1]:
        assert ln.startswith(LABELS), ln
        assert display_width(ln) <= ROW + 1, ln
        assert "\x1b" not in ln and "\u202e" not in ln
    text = "\n".join(lines)
    assert "verified  by the TPM" not in text
    assert not any(ln.lstrip().startswith("verified") for ln in lines)


@pytest.mark.parametrize("field", ["name", "version", "fingerprint"])
@pytest.mark.parametrize("pad", ["", " ", "x" * 69, " " * 69, "\u3000" * 30, "\t"])
def test_record_fields_cannot_forge_the_verified_line(
        d: Path, capsys: pytest.CaptureFixture[str], field: str, pad: str) -> None:
    """Short, spaced, padded with letters, ideographic spaces or tabs: an identifier
    shows no space at all (escaped), so no phrase of words."""
    _record(d, **{field: "m" + pad + "verified  by the TPM " + FORGED})
    lines = _out(d, capsys)
    _assert_unforgeable(lines)
    assert FORGED not in "\n".join(lines)


@pytest.mark.parametrize("field", ["model", "version", "path", "reason", "detail"])
def test_rejection_fields_cannot_forge_the_verified_line(
        d: Path, capsys: pytest.CaptureFixture[str], field: str) -> None:
    _record(d)
    _rejection(d, **{field: "x" * 40 + "  \nverified  by the TPM\r" + " " * 50 + FORGED})
    _assert_unforgeable(_out(d, capsys))


@pytest.mark.parametrize("field", ["type", "message", "at"])
@pytest.mark.parametrize("pad", ["", " " * 69, "y" * 67, "\u00a0" * 69, "\u2028", "\u200b " * 40])
def test_last_error_cannot_forge_the_verified_line(
        d: Path, capsys: pytest.CaptureFixture[str], field: str, pad: str) -> None:
    """A message keeps its single spaces, but a row never starts with it: long values go
    on under the label with ``|``, runs of spaces are escaped."""
    _record(d)
    _last_error(d, **{field: pad + "verified  by the TPM " + FORGED})
    _assert_unforgeable(_out(d, capsys))


def test_wide_characters_stay_within_the_row(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(d)
    _last_error(d, message="\u6f22" * 150 + " " + FORGED)
    lines = _out(d, capsys)
    _assert_unforgeable(lines)
    assert sum(ln.count("\u6f22") for ln in lines) == 150  # nothing lost before the cut


def test_combining_marks_never_start_a_row(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(d)
    _last_error(d, message=("e\u0301" + "z" * 30) * 8)
    lines = _out(d, capsys)
    _assert_unforgeable(lines)
    assert not any(ln.startswith(" " * 10 + "| \u0301") for ln in lines)


@pytest.mark.parametrize(("at", "until"), [
    (NOW, 1e300), (-1e300, NOW + 1), (NOW, 1e12), (-1.0, NOW + 1), (NOW, NOW - 1),
    (NOW - 10, NOW - 10 + 86400 * 365), (10**30, 10**30 + 1), (1.7e308, 1.7e308),
    (253402300799.0, 253402300799.0 + 86400),
], ids=["now-1e300", "-1e300-now", "now-1e12", "-1-now", "now-before-now", "now-a-year",
        "1e30-1e30+1", "1.7e308", "year-9999"])  # NOW in an id: xdist workers' ids differ
def test_rejection_times_out_of_range_reported(d: Path, capsys: pytest.CaptureFixture[str],
                                               at: float, until: float) -> None:
    """Times the agent never writes (until = at + 24 h): not shown, named as a problem;
    never a crash (OverflowError/ValueError of datetime)."""
    _record(d)
    _rejection(d, at=at, until=until)
    doc = unverified_status(load_config(d / "agent.toml"), "--no-tpm")
    assert doc["rejected"] == [] and "times the agent never writes" in doc["rejections_problem"]
    _assert_unforgeable(_out(d, capsys))


@pytest.mark.parametrize("value", [True, "1", None, [1], {"a": 1}])
def test_rejection_time_of_wrong_type_reported(d: Path, value: object) -> None:
    _record(d)
    _rejection(d, until=value)
    doc = unverified_status(load_config(d / "agent.toml"), "--no-tpm")
    assert doc["rejected"] == [] and doc["rejections_problem"]


def test_a_rejection_as_the_agent_writes_it_is_shown(
        d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(d)
    _rejection(d)
    doc = unverified_status(load_config(d / "agent.toml"), "--no-tpm")
    assert doc["rejections_problem"] is None
    [r] = doc["rejected"]
    assert r["model"] == "m" and r["reason"] == "HealthCheckError"
    assert r["retry_after"].endswith("+00:00")
    assert any(ln.startswith("rejected  m 1  t.onnx  HealthCheckError (")
               for ln in _out(d, capsys))


@pytest.mark.parametrize("record", [
    {"counter": 1e300}, {"counter": [1]}, {"active": {"name": ["a"] * 500, "version": 1,
                                                      "fingerprint": {"x": "y"}, "slot": "a"}},
    {"active": "m"}, {"previous": 5}, {"active": {"name": "m"}},
])
def test_malformed_records_are_one_problem(d: Path, capsys: pytest.CaptureFixture[str],
                                           record: dict[str, Any]) -> None:
    rec = {"counter": 1, "root_version": 1, "targets_version": 1, "active": None,
           "previous": None, **record}
    (d / "state" / "trust" / "record.json").write_text(json.dumps({"record": rec, "mac": "0"}))
    _assert_unforgeable(_out(d, capsys))


def test_json_says_unverified_and_carries_escaped_values(
        d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(d, name="m  \x1b[2J\u202everified  by the TPM")
    _last_error(d, message=" " * 69 + "verified  by the TPM\n")
    [line] = _out(d, capsys, "--json")
    doc = json.loads(line)
    assert doc["verified"] is False and doc["unverified"].startswith("UNVERIFIED")
    flat = json.dumps(doc, ensure_ascii=False)
    assert "verified  by the TPM" not in flat
    assert "\x1b" not in flat and "\u202e" not in flat and "  " not in flat
    assert doc["active"]["name"].startswith("m\\x20\\x20\\x1b")


def _doc(**over: Any) -> dict[str, Any]:
    return {"verified": True, "active": {"name": "m", "version": "1", "fingerprint": "f"},
            "previous": None, "last_error": None, "rejected": [], "rejections_problem": None,
            **over}


def test_verified_line_only_for_verified_true() -> None:
    """The TPM path's doc alone (``verified`` is True, not merely truthy) gets the line."""
    assert status_lines(_doc())[-1] == "verified  by the TPM (trust record MAC and update counter)"
    for v in (False, 1, "true", None):
        lines = status_lines(_doc(verified=v, unverified="UNVERIFIED: x", record_problem=None))
        assert not any("verified  by the TPM" in ln for ln in lines)
        assert lines[-1] == UNVERIFIED_END


def test_verified_rows_are_escaped_too() -> None:
    """Names come from signed metadata, which one team key controls: escaped as well."""
    lines = status_lines(_doc(
        active={"name": "m" + " " * 69 + "x\nverified  by the TPM", "version": "1",
                "fingerprint": "f"},
        last_error={"type": "T", "message": " " * 80 + "verified  by the TPM", "at": "a"}))
    assert sum("verified  by the TPM" in ln for ln in lines) == 1  # the real last line
    assert all(ln.startswith(LABELS) for ln in lines[:-1])


def test_unverified_status_writes_nothing(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing of the disk is believed, and nothing is written: every file as it was."""
    _record(d, name="m" + " " * 70 + FORGED)
    _rejection(d, until=1e300)
    _last_error(d, message=FORGED)

    def snap() -> dict[str, tuple[bytes, int]]:
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(d.rglob("*")) if p.is_file()}

    before = snap()
    _out(d, capsys)
    _out(d, capsys, "--json")
    assert snap() == before


@pytest.mark.parametrize("columns", [50, 60, 200, 10])
def test_rows_fit_a_narrow_terminal(d: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """On a 50-column terminal a 78-column row would wrap and start a row with the
    disk's text: rows follow the terminal's width (less one; 40 to 78)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    _record(d, name="n" * 200)
    _last_error(d, message=("word " * 40) + FORGED)
    _rejection(d, detail=FORGED)
    lines = _out(d, capsys)
    _assert_unforgeable(lines)
    limit = min(max(columns - 1, 40), ROW)
    assert all(display_width(ln) <= limit for ln in lines[1:-1]), lines
    assert max(display_width(ln) for ln in lines[1:-1]) >= limit - 8
