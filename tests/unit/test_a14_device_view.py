"""Attack 14 (one compromised device, its own MQTT credentials and TPM key; the broker where
named) on ``fleet status`` and the bounded JSON parser it shares with the bridge.

Worked (strict xfail, the assertions say what should happen):

* a report of escaped quotes (``"\\"\\"\\"...``, never closed) costs the depth pre-scan of
  ``modelward.trust._bounded.json_depth`` quadratic time: the string regex is retried from every
  quote and each try runs to the end (64 KiB: ~10 s per ``fleet status``; a 16 KiB bridge
  request ~0.5 s of the bridge's network thread), before the signature is checked;
* a lone surrogate (``"\\ud800"``) in a signed report goes into ``--json`` as it is: not
  I-JSON (RFC 7493 2.1), and strict readers (serde_json, ...) refuse the whole document;
* the broker names a topic device id with runs of spaces: ``escape_id`` keeps U+0020, so
  the DEVICE cell of that row reads like a whole ``ok`` row;
* column widths are ``len()``, not display width: fullwidth characters (two columns) and
  kept combining marks (zero) shift the rest of the device's row out of its columns;
* the table is printed in the locale's encoding, strictly: under a non-UTF-8 locale one
  device's CJK string ends ``fleet status`` in ``UnicodeEncodeError`` for the fleet.
"""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._bridge import MAX_REQUEST_BYTES
from modelward.publisher._fleet import REJECTED, _judge_device, format_table, judge_fleet, rows_json
from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.trust._report import MAX_REPORT_BYTES, MAX_REPORT_DEPTH, sign_report
from tests.unit.test_i14_fleetview import FLEET, NOW, _registry, good_report


def _escaped_quotes(size: int) -> bytes:
    """``"`` then ``\\"`` repeated: a JSON string that never ends, ``size`` bytes."""
    return b'"' + b'\\"' * ((size - 1) // 2)


def _time(f: Any) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


@pytest.mark.xdist_group("machine")
def test_an_unclosed_string_of_escaped_quotes_is_refused_in_linear_time(
        tmp_path: Path) -> None:
    fd, _ = _registry(tmp_path, ["dev-1"])
    payload = _escaped_quotes(32 * 1024)
    assert len(payload) <= MAX_REPORT_BYTES
    rows: list[Any] = []
    took = _time(lambda: rows.append(
        _judge_device("dev-1", payload, True, fd, FLEET, NOW, 3600.0)))
    assert rows[0].flags == (REJECTED,)
    assert took < 0.2, f"{took:.2f}s to refuse one {len(payload)}-byte report"


@pytest.mark.xdist_group("machine")
def test_a_bridge_request_of_escaped_quotes_is_refused_in_linear_time() -> None:
    payload = _escaped_quotes(MAX_REQUEST_BYTES)

    def parse() -> None:
        with pytest.raises(UntrustedJsonError):
            loads_bounded(payload, max_bytes=MAX_REQUEST_BYTES, max_depth=2, what="req")

    took = _time(parse)
    assert took < 0.05, f"{took:.2f}s for one {len(payload)}-byte request"


@pytest.mark.xdist_group("machine")
def test_the_quadratic_input_is_what_costs_not_its_size() -> None:
    """Control: a closed string of the same size scans in linear time already."""
    payload = b'"' + b"\\\"" * (MAX_REQUEST_BYTES // 2 - 2) + b'"'
    took = _time(lambda: loads_bounded(payload, max_bytes=MAX_REQUEST_BYTES,
                                       max_depth=MAX_REPORT_DEPTH, what="req"))
    assert took < 0.05


def _strings(doc: Any) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for k, v in doc.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return []


def test_json_output_has_no_lone_surrogate(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["dev-1", "dev-2"])
    honest = good_report("dev-2")
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1", state="\ud800"),
                                             keys["dev-1"]),
                        "dev-2": sign_report(honest, keys["dev-2"])},
                       fd, FLEET, NOW, 3600.0)
    doc = json.loads(rows_json(rows))
    for s in _strings(doc):
        s.encode("utf-8")  # what an I-JSON / serde_json reader requires
    assert {r["device"]: r["status"] for r in doc}["dev-2"] == "ok"


def test_a_broker_named_id_with_spaces_cannot_forge_cells(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["dev-1"])
    fake = "dev-9  ok  ok  classifier 6.6.6"
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1"), keys["dev-1"]),
                        fake: sign_report(good_report(fake), keys["dev-1"])},
                       fd, FLEET, NOW, 3600.0)
    table = format_table(rows)
    assert "dev-9  ok" not in table, table
    line = next(ln for ln in table.split("\n") if ln.startswith("dev-9"))
    assert " " not in line.split("  ")[0], line  # the id is one token


def _width(s: str) -> int:
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def test_columns_line_up_on_the_terminal(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["dev-1", "dev-2"])
    wide = {"name": "\uff43" * 30, "version": "1.0.0", "fingerprint": "x"}  # fullwidth c
    thin = "e\u0301\u0301" * 20  # 60 characters, 20 columns
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1", active=wide, state=thin),
                                             keys["dev-1"]),
                        "dev-2": sign_report(good_report("dev-2"), keys["dev-2"])},
                       fd, FLEET, NOW, 3600.0)
    lines = format_table(rows).split("\n")
    head = lines[0]
    col = head.index("SEQ")
    for line in lines[1:]:
        seq = line.rsplit("  ", 1)[1]
        assert _width(line[:line.rindex(seq)]) == col, line


def test_c1_controls_as_utf8_bytes_and_hostile_keys_are_escaped(tmp_path: Path) -> None:
    """Resisted: C1 controls sent as raw UTF-8 (\\xc2\\x9b = CSI), ANSI in a counters key and
    a 60 KiB escape-sequence device claim all end as one cut, printable line per row."""
    fd, keys = _registry(tmp_path, ["dev-1", "dev-2", "dev-3"])
    r1 = good_report("dev-1")
    r1["counters"] = {"\x1b]0;pwned\x07\u009b8m": 1}
    claim = good_report("dev-3")
    claim["device_id"] = "\u009b2J\x1b[8m" * 7000
    payloads = {"dev-1": sign_report(r1, keys["dev-1"]),
                "dev-2": sign_report(good_report("dev-2", state="x\u009b8m"), keys["dev-2"]),
                "dev-3": sign_report(claim, keys["dev-3"])}
    assert b"\xc2\x9b" in payloads["dev-2"] or b"\\u009b" in payloads["dev-2"]
    rows = judge_fleet(payloads, fd, FLEET, NOW, 3600.0)
    table = format_table(rows)
    lines = table.split("\n")
    assert len(lines) == 4
    for line in lines:
        assert all(unicodedata.category(c) != "Cc" for c in line), ascii(line)
        assert len(line) < 2000
    assert [r.status for r in rows] == [REJECTED, "ok", REJECTED]
    json.loads(rows_json(rows))


def _status_under_latin1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         *extra: str) -> tuple[int, str]:
    import io
    import sys

    import modelward.publisher._fleet as publisher
    from modelward.cli import main

    fd, keys = _registry(tmp_path, ["dev-1", "dev-2"])
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1", state="\u6d3b\u52d5"),
                                             keys["dev-1"]),
                        "dev-2": sign_report(good_report("dev-2"), keys["dev-2"])},
                       fd, FLEET, NOW, 3600.0)
    monkeypatch.setattr(publisher, "collect_status", lambda *a, **k: rows)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="iso-8859-1")  # errors="strict", as Python sets it
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["fleet", "status", "--fleet-dir", str(fd), "--broker",
                 "mqtts://127.0.0.1:1", "--fleet", FLEET, "--username", "u",
                 "--password-file", "/dev/null", *extra])
    out.flush()
    return code, raw.getvalue().decode("iso-8859-1")


def test_fleet_status_table_prints_under_a_latin1_locale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = _status_under_latin1(tmp_path, monkeypatch)
    assert code == 0 and "dev-2" in text


def test_fleet_status_json_prints_under_a_latin1_locale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resisted: --json is ASCII."""
    code, text = _status_under_latin1(tmp_path, monkeypatch, "--json")
    assert code == 0 and {r["device"] for r in json.loads(text)} == {"dev-1", "dev-2"}
