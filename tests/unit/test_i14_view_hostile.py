"""Issue 14 (must-show 8, log hygiene), the classes behind the a14-device findings on the
operator's tools, pure and in-memory:

* the JSON depth pre-scan (it runs before any signature check, on device reports, bridge
  requests and every other unverified document) is linear in every input;
* a logged value is cut at ``MAX_VALUE`` printed characters, a message at ``MAX_MESSAGE``,
  each cut saying how much it dropped, and a JSON line always fits one journal entry;
* ``fleet status`` prints under any locale's encoding, escapes ids to the enrolled-id
  alphabet, never shows two spaces inside a cell, and lines columns up by display width;
* a lone surrogate is refused by the report schema and never reaches ``--json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modelward.agent._log import (
    MAX_MESSAGE,
    MAX_VALUE,
    JsonFormatter,
    TextFormatter,
    bounded_message,
)
from modelward.publisher._fleet import REJECTED, DeviceRow, format_table, judge_fleet, rows_json
from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.trust._bounded import UntrustedJsonError, json_depth, loads_bounded
from modelward.trust._display import ID_ALPHABET, display_width, escape_id, for_encoding
from modelward.trust._report import sign_report
from tests.unit.test_i14_fleetview import FLEET, MODEL, NOW, _registry, good_report

KIB64 = 64 * 1024

# -- the depth pre-scan is linear ---------------------------------------------------------

# each (label, unit): the unit repeated to 64 KiB. The first ones are what made the old
# string regex quadratic (a string that never closes, retried from every quote inside it)
WORST = [
    ("escaped quotes, unclosed", '"' + '\\"' * 8, '\\"'),
    ("escaped backslashes, unclosed", '"', "\\\\"),
    ("backslash u, unclosed", '"', "\\u"),
    ("quote and escaped quote", "", '"\\"'),
    ("quote bracket", "", '"['),
    ("lone quotes", "", '"'),
    ("backslashes", "", "\\"),
    ("escaped quote bracket", "", '\\"['),
    ("open brackets", "", "["),
    ("balanced brackets", "", "[]"),
    ("open objects in strings", "", '{"a":"\\"'),
    ("mixed", '"', 'x\\"[{\\\\"'),
]


def _payload(prefix: str, unit: str, size: int = KIB64) -> str:
    return prefix + unit * ((size - len(prefix)) // len(unit))


def _best_of(f: Callable[[], object], n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize(("label", "prefix", "unit"), WORST, ids=[w[0] for w in WORST])
@pytest.mark.xdist_group("machine")
def test_the_depth_prescan_takes_linear_time_on_64_kib_worst_cases(
        label: str, prefix: str, unit: str) -> None:
    text = _payload(prefix, unit)
    for data in (text, text.encode()):
        took = _best_of(lambda d=data: json_depth(d, 32))  # type: ignore[misc]
        assert took < 0.05, f"{label}: {took * 1000:.1f} ms for {len(data)} bytes"
    # the whole bounded parse too (what the bridge and fleet status call)
    took = _best_of(lambda: _refused_or_parsed(text.encode()))
    assert took < 0.05, f"{label}: loads_bounded took {took * 1000:.1f} ms"


def _refused_or_parsed(data: bytes) -> None:
    with contextlib.suppress(UntrustedJsonError):
        loads_bounded(data, max_bytes=KIB64, what="x")


@pytest.mark.parametrize(("label", "prefix", "unit"), WORST[:4], ids=[w[0] for w in WORST[:4]])
@pytest.mark.xdist_group("machine")
def test_four_times_the_input_is_at_most_about_four_times_the_time(
        label: str, prefix: str, unit: str) -> None:
    """Quadratic would be 16x; allow noise on a shared machine (bigger sizes: less noise)."""
    small, big = _payload(prefix, unit, 256 * 1024), _payload(prefix, unit, 1024 * 1024)
    t_small = _best_of(lambda: json_depth(small, 32))
    t_big = _best_of(lambda: json_depth(big, 32))
    assert t_big < 9 * t_small + 0.005, (label, t_small, t_big)


def _depth(doc: Any) -> int:
    if isinstance(doc, list):
        return 1 + max((_depth(v) for v in doc), default=0)
    if isinstance(doc, dict):
        return 1 + max((_depth(v) for v in doc.values()), default=0)
    return 0


_TRICKY_TEXT = st.text(alphabet=st.sampled_from('"\\[]{}ab\n\u00e9\U000f0000/u'), max_size=12)
_DOCS = st.recursive(st.none() | st.integers() | _TRICKY_TEXT,
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_TRICKY_TEXT, inner, max_size=3), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_DOCS, st.booleans())
def test_the_prescan_counts_exactly_the_nesting_of_any_json(doc: Any, ascii_only: bool) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only)
    assert json_depth(text, 1000) == _depth(doc)
    assert json_depth(text.encode(), 1000) == _depth(doc)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('"\\[]{},:1 a'), max_size=40))
def test_the_prescan_never_lets_through_what_json_would_nest_deeper(text: str) -> None:
    """On any text json.loads accepts, the pre-scan sees at least its real depth."""
    try:
        doc = json.loads(text)
    except ValueError:
        return
    assert json_depth(text, 1000) >= _depth(doc)


# -- logs: cut, and one journal entry ------------------------------------------------------

JOURNALD_LINE_MAX = 48 * 1024
EXPANDING = ["\U000f0000", "\x7f", "\x1b", "\u6d3b", "\\", '"', "\u202e", "e\u0301\u0301\u0301"]


def _rec(msg: str, *args: object, exc: BaseException | None = None,
         **extra: object) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    r = logging.LogRecord("modelward.publisher._bridge", logging.ERROR, __file__, 1, msg, args,
                          info)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


@pytest.mark.parametrize("unit", EXPANDING, ids=ascii)
@pytest.mark.parametrize("conv", ["%s", "%r", "%a"])
def test_a_logged_value_is_cut_and_says_how_much(unit: str, conv: str) -> None:
    value = unit * 20000
    rec = _rec(f"refusing a request from dev-1: {conv}", value)
    text = TextFormatter().format(rec)
    line = JsonFormatter().format(rec)
    # %a escapes after the cut (ascii() of what __repr__ gave): up to 12 characters each
    grow = 12 if conv == "%a" else 1
    assert "\n" not in text and len(text) <= grow * MAX_VALUE + 100, len(text)
    assert len(line) <= 12 * MAX_VALUE + 300, len(line)
    assert re.search(r"\.\.\. \[\d+ of \d+ characters cut\]", text), text[-80:]
    assert json.loads(line)["msg"].startswith("refusing a request from dev-1: ")


@pytest.mark.parametrize("unit", EXPANDING, ids=ascii)
def test_a_record_is_one_journal_entry_whatever_it_carries(unit: str) -> None:
    big = unit * 200_000
    try:
        raise ValueError(big)
    except ValueError as e:
        err = e
    rec = _rec(big + " %s %r", big, big, exc=err, device=big, path=[big] * 3,
               blob=big.encode())
    line = JsonFormatter().format(rec).encode()
    assert len(line) < JOURNALD_LINE_MAX and b"\n" not in line, len(line)
    doc = json.loads(line)
    assert "characters cut" in doc["msg"] and "characters cut" in doc["device"]
    text = TextFormatter().format(rec)
    first, *trace = text.split("\n")
    assert len(first) <= MAX_MESSAGE + 100 and "characters cut" in first
    assert all(t.startswith("  ") for t in trace) and len(text) < JOURNALD_LINE_MAX


def test_numbers_mappings_and_a_broken_format_still_log() -> None:
    assert bounded_message(_rec("%d requests %.1f s %x", 12, 0.25, 255)) == \
        "12 requests 0.2 s ff"
    r = _rec("%(device)s: %(n)d")
    r.args = {"device": "x" * 5000, "n": 3}
    assert bounded_message(r).endswith("characters cut]: 3")
    assert "%d" in bounded_message(_rec("%d", "not a number"))  # shown, not raised
    short = "dev-1 \u6d3b\u52d5 e\u0301"
    assert bounded_message(_rec("from %s: %r", short, short)) == f"from {short}: {short!r}"


def test_the_bridge_refusal_logs_of_one_device_are_rate_limited(tmp_path: Path) -> None:
    """200 bad requests from one device in a burst: a handful of log lines."""
    from tests.unit.test_a14_device_logs import _bridge, _Capture, _request, _settle

    b = _bridge(tmp_path)
    cap = _Capture()
    log = logging.getLogger("modelward.publisher._bridge")
    log.addHandler(cap)
    try:
        for i in range(200):
            b._on_message(_request("dev-1", b'{"path": "x' + b"\x7f" * 900 + b'%d"}' % i))
        _settle(b, 200)
    finally:
        log.removeHandler(cap)
    assert 1 <= len(cap.records) <= 10, len(cap.records)
    assert sum(len(TextFormatter().format(r)) for r in cap.records) < 8 * 1024


# -- fleet status: ids, cells, widths, encodings -------------------------------------------

def test_escape_id_keeps_the_enrolled_alphabet_and_escapes_everything_else() -> None:
    assert escape_id("dev-1.a_B9") == "dev-1.a_B9"
    for n in [*range(0x80), 0xA0, 0x435, 0x3000, 0xFF43, 0x202E, 0xD800, 0x10FFFF]:
        c = chr(n)
        out = escape_id(f"a{c}b", None)
        if c in ID_ALPHABET:
            assert out == f"a{c}b"
        else:
            assert out != f"a{c}b" and re.fullmatch(r"a\\(?:\\|x[0-9a-f]{2}|u[0-9a-f]{4}|"
                                                    r"U[0-9a-f]{8})b", out), (n, out)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_an_escaped_id_is_one_printable_ascii_token(text: str) -> None:
    out = escape_id(text, None)
    assert out.isascii() and out.isprintable() and " " not in out


def test_display_width() -> None:
    assert display_width("dev-1") == 5
    assert display_width("\u6d3b\u52d5") == 4 and display_width("\uff43") == 2
    assert display_width("e\u0301\u0301") == 1 and display_width("\u20dd") == 0


_CELL_TEXT = st.text(alphabet=st.sampled_from(
    ["a", " ", "\u6d3b", "\uff43", "\u0301", "e", "\u00e9", "\U0001f642", "\x1b", "\t",
     "\u3000", "\u0e31"]), max_size=30)


def _columns(line: str) -> list[str]:
    """``line`` as the terminal shows it: one entry per column (a wide character takes
    its column and a "" after it; a combining mark joins the character before)."""
    cols: list[str] = []
    for c in line:
        w = display_width(c)
        if w == 0 and cols:
            cols[-1] += c
        else:
            cols.extend([c] + [""] * (w - 1))
    return cols


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=_CELL_TEXT, name=_CELL_TEXT)
@example(state="x  ok  ok", name="\u6d3b   \u0301b")
def test_every_row_lines_up_with_the_header_and_has_no_double_space_in_a_cell(
        tmp_path_factory: pytest.TempPathFactory, state: str, name: str) -> None:
    fd, keys = _registry(tmp_path_factory.mktemp("f"), ["dev-1", "dev-2"])
    rep = good_report("dev-1", state=state.strip() or "x",
                      active={**MODEL, "name": name.strip() or "x"})
    rows = judge_fleet({"dev-1": sign_report(rep, keys["dev-1"]),
                        "dev-2": sign_report(good_report("dev-2"), keys["dev-2"])},
                       fd, FLEET, NOW, 3600.0)
    assert [r.status for r in rows] == ["ok", "ok"]
    lines = format_table(rows).split("\n")
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", lines[0])]  # ASCII header
    for line in lines[1:]:
        cols = _columns(line)
        for s, end in zip([0, *starts], [*starts, len(cols)], strict=True):
            assert cols[s].strip(), (ascii(line), s)  # a cell starts at its column
            assert s == 0 or cols[s - 2:s] == [" ", " "], (ascii(line), s)
            cell = "".join(cols[s:end]).rstrip()
            assert "  " not in cell, ascii(cell)  # the separator is never inside a cell


@pytest.mark.parametrize("encoding", ["iso-8859-1", "ascii", "cp1252", "utf-8"])
def test_for_encoding_never_raises_and_keeps_what_encodes(encoding: str) -> None:
    text = "dev-1 \u6d3b\u52d5 caf\u00e9 \U0001f642 \\x1b"
    out = for_encoding(text, encoding)
    out.encode(encoding)  # strict
    assert out.startswith("dev-1 ") and out.endswith("\\x1b")
    assert for_encoding(text, "no-such-codec").isascii()
    assert for_encoding(text, None) == text


@pytest.mark.parametrize("encoding", ["ascii", "iso-8859-1"])
def test_fleet_status_prints_the_fleet_under_a_non_utf8_locale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    import modelward.publisher._fleet as publisher
    from modelward.cli import main

    fd, keys = _registry(tmp_path, ["dev-1", "dev-2"])
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1", state="\u6d3b\u52d5 \u00e9"),
                                             keys["dev-1"]),
                        "dev-2": sign_report(good_report("dev-2"), keys["dev-2"])},
                       fd, FLEET, NOW, 3600.0)
    monkeypatch.setattr(publisher, "collect_status", lambda *a, **k: rows)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding=encoding))
    code = main(["fleet", "status", "--fleet-dir", str(fd), "--broker",
                 "mqtts://127.0.0.1:1", "--fleet", FLEET, "--username", "u",
                 "--password-file", "/dev/null"])
    sys.stdout.flush()
    out = raw.getvalue().decode(encoding)
    assert code == 0
    assert "\\u6d3b\\u52d5" in out and len(out.strip().split("\n")) == 3


# -- lone surrogates -----------------------------------------------------------------------

SURROGATE_FIELDS = [
    ("device_id", {"device_id": "d1\ud800"}),
    ("fleet", {"fleet": "\udfff"}),
    ("state", {"state": "a\udc80b"}),
    ("at", {"at": "\ud83d"}),
    ("active.name", {"active": {**MODEL, "name": "\ud800"}}),
    ("active.version", {"active": {**MODEL, "version": "1\udbff"}}),
    ("previous.fingerprint", {"previous": {**MODEL, "fingerprint": "\udc00"}}),
    ("last_error.type", {"last_error": {"type": "\ud800"}}),
    ("last_error.message", {"last_error": {"type": "E", "message": "\ud800"}}),
    ("last_error.at", {"last_error": {"type": "E", "at": "\ud800"}}),
    ("last_activation.detail", {"last_activation": {"ok": True, "detail": "\ud800"}}),
]


@pytest.mark.parametrize(("field", "changes"), SURROGATE_FIELDS,
                         ids=[f[0] for f in SURROGATE_FIELDS])
def test_a_lone_surrogate_in_any_report_string_is_refused_naming_the_field(
        field: str, changes: dict[str, Any]) -> None:
    with pytest.raises(ReportSchemaError, match="lone surrogate") as e:
        check_report(good_report("d1", **changes))
    assert e.value.field == field


def test_a_surrogate_pair_written_as_json_escapes_is_text_and_kept() -> None:
    """``"\\ud83d\\ude42"`` is one character (U+1F642), not a lone surrogate."""
    rep = json.loads(json.dumps(good_report("d1", state="\U0001f642")))
    assert check_report(rep)["state"] == "\U0001f642"


def test_a_row_that_would_carry_a_lone_surrogate_into_json_is_rejected_in_its_place(
        ) -> None:
    rows = [DeviceRow("x\ud800", False, "p", {}, (REJECTED,)),
            DeviceRow("d2", True, "", {"device_id": "d2", "state": "\ud800"}),
            DeviceRow("d3", True, "", {"device_id": "d3", "state": "ok"})]
    out = rows_json(rows)
    doc = json.loads(out)
    for row in doc:
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # every string is text
    assert [r["status"] for r in doc] == [REJECTED, REJECTED, "ok"]
    assert doc[0]["device"] == "x\\ud800" and doc[1]["report"] == {}
    assert all(unicodedata.category(c) != "Cs" for c in out)


@pytest.mark.parametrize("text", ["\u0301x", "\x1b\u0301", "\\\u0301", "\u0489\u0489ok"],
                         ids=ascii)
def test_a_combining_mark_without_its_own_base_is_escaped(text: str) -> None:
    """It would sit on the column padding (or the escape) before it, moving the cell."""
    from modelward.trust._display import escape

    out = escape(text, None)
    assert all(unicodedata.category(c) not in {"Mn", "Me"} for c in out), ascii(out)
    assert escape("e\u0301", None) == "e\u0301" and escape("a \u0301", None) == "a \u0301"


# -- attacks tried on these fixes (each resisted) -------------------------------------------

@pytest.mark.parametrize("hidden", ['"\\\\"' + "[" * 100, '"\\\\\\""' + "[" * 100,
                                    '["\\"]"' + "[" * 100, '{"a\\\\":' + "[" * 100])
def test_escapes_cannot_hide_nesting_from_the_prescan(hidden: str) -> None:
    """A string ending in an escaped backslash, or quotes escaped inside it, does not
    swallow the brackets after it: the deep tail is still refused by its depth."""
    with pytest.raises(UntrustedJsonError, match="nested deeper"):
        loads_bounded(hidden.encode(), max_bytes=KIB64, max_depth=32, what="x")


def test_a_device_cannot_spell_the_tables_own_escapes(tmp_path: Path) -> None:
    """A state of literal ``x\\x20\\x20ok`` shows its backslashes doubled: what the
    table escaped and what the device wrote never look alike."""
    fd, keys = _registry(tmp_path, ["dev-1"])
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1", state="x\\x20\\x20ok"),
                                             keys["dev-1"])}, fd, FLEET, NOW, 3600.0)
    table = format_table(rows)
    assert "x\\\\x20\\\\x20ok" in table
    assert re.search(r"(?<!\\)\\x20", table) is None  # no single-backslash \x20 from it


def test_a_topic_id_of_any_length_is_one_cut_token(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["dev-1"])
    long_id = "a b\u3000" * 5000
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1"), keys["dev-1"]),
                        long_id: b"{}"}, fd, FLEET, NOW, 3600.0)
    line = format_table(rows).split("\n")[1]
    first = line.split("  ")[0]
    assert first.endswith("...") and len(first) <= 70 and " " not in first
    assert len(line) < 1000
