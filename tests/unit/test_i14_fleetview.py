"""Issue 14 finding 6 / must-show 8, pure and in-memory: ``fleet status`` treats device data
as hostile even when it is validly signed.

Reports are signed with a software P-256 key exactly as the device's TPM identity key signs
them (``modelward.trust._report.sign_report``), or, for wire forms ``json.dumps`` cannot produce
(deep nesting, ``1e400``), with a hand-built canonical text and the same domain-separated
digest. Each goes through the real pure pipeline: ``verify_report`` (size and depth bound
before parsing, signature), ``check_report`` (schema), ``judge_report``, ``format_table``
and ``rows_json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelward.agent._observe import build_report
from modelward.publisher._fleet import (
    REJECTED,
    _judge_device,
    add_device,
    format_table,
    judge_fleet,
    rows_json,
)
from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.trust._display import escape, is_clean
from modelward.trust._report import _DOMAIN, ALG, ReportSignatureError, sign_report, verify_report
from tests.unit.test_report import _SoftKey

NOW = 1_800_000_000.0
FLEET = "f1"
AT = datetime.fromtimestamp(NOW - 10, UTC).isoformat(timespec="seconds")
MODEL = {"name": "classifier", "version": "1.0.0", "fingerprint": "sha256:" + "ab" * 32}

OSC_RETITLE = "\x1b]0;pwned\x07"
HIDE = "\x1b[8m"
FORGED_ROW = "\ndev-9  ok  ok  classifier 6.6.6"


def good_report(device: str, seq: int = 5, now: float = NOW, **changes: Any
                ) -> dict[str, Any]:
    """What ``modelward.agent._observe.build_report`` writes for a device on MODEL, signed at
    ``now - 10``."""
    status = {"last_error": {"type": "FetchError", "message": "origin down", "at": AT},
              "last_activation": {"ok": True, "detail": "activated"},
              "counters": {"attempts": 3, "installed": 1, "failures": 1}}
    r = build_report(device, FLEET, None, "active", status, seq=seq, now=now - 10,
                     poll_interval=60.0)
    r["active"] = dict(MODEL)
    r.update(changes)
    return r


def sign_canonical(key: _SoftKey, canonical: str, extra_top: str = "") -> bytes:
    """A wire report whose ``report`` is the given canonical JSON text, validly signed (for
    texts ``json.dumps`` cannot produce: the operator must refuse them before parsing)."""
    digest = hashlib.sha256(_DOMAIN + canonical.encode()).digest()
    sig = base64.b64encode(key.sign(digest)).decode()
    return f'{{"alg": "{ALG}", "report": {canonical}, "signature": "{sig}"{extra_top}}}'.encode()


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


# (label, report changes) signed with sign_report: the signature verifies, the shape is wrong
ODD_SHAPES: list[tuple[str, dict[str, Any]]] = [
    ("active without name", {"active": _without(MODEL, "name")}),
    ("active without fingerprint", {"active": _without(MODEL, "fingerprint")}),
    ("active as a string", {"active": "classifier 1.0.0"}),
    ("active as a list", {"active": [MODEL]}),
    ("active name as a number", {"active": {**MODEL, "name": 7}}),
    ("active name as a dict", {"active": {**MODEL, "name": {"x": 1}}}),
    ("active with an extra key", {"active": {**MODEL, "evil": 1}}),
    ("previous as true", {"previous": True}),
    ("last_error as a string", {"last_error": "boom"}),
    ("last_error as a list", {"last_error": ["boom"]}),
    ("last_error without type", {"last_error": {"message": "m"}}),
    ("last_error type as null", {"last_error": {"type": None}}),
    ("last_error message as a number", {"last_error": {"type": "E", "message": 1}}),
    ("last_error message too long", {"last_error": {"type": "E", "message": "m" * 5000}}),
    ("last_activation ok as a string", {"last_activation": {"ok": "yes", "detail": "d"}}),
    ("counters as a list", {"counters": [1, 2, 3]}),
    ("counters as a number", {"counters": 3}),
    ("counter as a float", {"counters": {"attempts": 1.5}}),
    ("counter as a whole float", {"counters": {"attempts": 3.0}}),
    ("counter as a bool", {"counters": {"attempts": True}}),
    ("counter negative", {"counters": {"attempts": -1}}),
    ("counter huge", {"counters": {"attempts": 10**30}}),
    ("counter just over 2**53", {"counters": {"attempts": 2**53}}),
    ("counter as a string", {"counters": {"attempts": "3"}}),
    ("unknown counter", {"counters": {"evil": 1}}),
    ("unknown field", {"evil": "x"}),
    ("seq as a string", {"seq": "5"}),
    ("seq as a float", {"seq": 5.0}),
    ("seq huge", {"seq": 2**64}),
    ("seq negative", {"seq": -1}),
    ("poll_interval zero", {"poll_interval": 0}),
    ("poll_interval huge", {"poll_interval": 1e300}),
    ("poll_interval as a string", {"poll_interval": "60"}),
    ("state as a list", {"state": ["active"]}),
    ("state as null", {"state": None}),
    ("state too long", {"state": "a" * 300}),
    ("at as a number", {"at": NOW}),
    ("fleet as a dict", {"fleet": {"name": FLEET}}),
    ("uptime as a float", {"uptime_s": 1.5}),
    # a lone surrogate ("\\ud800" in the JSON) is not text: --json could not carry it
    ("lone surrogate in state", {"state": "active\ud800"}),
    ("lone surrogate in a model", {"previous": {**MODEL, "fingerprint": "\udc80"}}),
    ("lone surrogate in last_error", {"last_error": {"type": "E", "message": "x\udfff"}}),
]

# (label, wire from a key and a device id): refused before or while parsing
def _nan(k: _SoftKey, d: str) -> bytes:
    return sign_report(good_report(d, poll_interval=math.nan), k)  # json.dumps writes NaN


def _inf_counter(k: _SoftKey, d: str) -> bytes:
    return sign_report(good_report(d, counters={"attempts": math.inf}), k)


def _deep(k: _SoftKey, d: str) -> bytes:
    return sign_canonical(k, '{"active":' + "[" * 20000 + "]" * 20000
                          + f',"device_id":"{d}"}}')


def _deep_just_over(k: _SoftKey, d: str) -> bytes:
    return sign_canonical(k, '{"active":{"name":[[{}]]},' + f'"device_id":"{d}"}}')


def _big_exponent(k: _SoftKey, d: str) -> bytes:
    return sign_canonical(k, '{"counters":{"attempts":1e400},' + f'"device_id":"{d}"}}')


def _many_digits(k: _SoftKey, d: str) -> bytes:
    return sign_canonical(k, '{"counters":{"attempts":' + "9" * 5000 + "},"
                          + f'"device_id":"{d}"}}')


def _oversize(k: _SoftKey, d: str) -> bytes:
    return sign_report(good_report(d, state="s" * (70 * 1024)), k)


WIRE_ATTACKS = {"NaN poll interval": _nan, "Infinity counter": _inf_counter,
                "20000-deep JSON": _deep, "JSON one level too deep": _deep_just_over,
                "1e400": _big_exponent, "5000-digit integer": _many_digits,
                "70 KiB report": _oversize}


def hostile_strings_report(device: str, seq: int = 5, now: float = NOW) -> dict[str, Any]:
    """A report of the right shape whose strings try to take over the operator's terminal."""
    return good_report(
        device, seq, now,
        state=OSC_RETITLE + "active",
        active={"name": HIDE + "classifier", "version": "1.0.0\u202e0.9",
                "fingerprint": "sha256:\u200b" + "ab" * 8},
        previous={"name": "x" + FORGED_ROW, "version": "\r\x00\x9b2J", "fingerprint": "\ue000"},
        last_error={"type": "E" + FORGED_ROW, "message": "\x1b[2J\x1b[H", "at": "\u2028"},
    )


# -- escape ------------------------------------------------------------------------------

_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _assert_safe(s: str) -> None:
    assert all(unicodedata.category(c) not in _UNSAFE for c in s), ascii(s)
    assert not re.search("[\u0300-\u036f\u0488\u0489]{3}", s), ascii(s)  # no mark stacks
    assert all(c == " " or unicodedata.category(c) != "Zs" for c in s), ascii(s)
    assert "\n" not in s and "\r" not in s and "\x1b" not in s
    s.encode("utf-8")  # strict: a lone surrogate would raise here (and in print)


def _unescape(s: str) -> str:
    return re.sub(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|(.))",
                  lambda m: chr(int(m.group(1) or m.group(2) or m.group(3), 16))
                  if not m.group(4) else {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[
                      m.group(4)], s, flags=re.DOTALL)


ESCAPE_VARIANTS = (
    [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
    + ["\u202e", "\u202d", "\u202a", "\u202b", "\u202c", "\u2066", "\u2067", "\u2068",
       "\u2069", "\u200e", "\u200f", "\u061c",  # bidi
       "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e",  # zero width
       "\u2028", "\u2029", "\x85",  # line breaks
       "\u00a0", "\u2007", "\u3000", "\u205f",  # look-alike spaces
       "\ud800", "\udfff", "\udc80",  # lone surrogates (json.loads makes them)
       "\ue000", "\U000f0000",  # private use
       "\u0378", "\U000e0001", "\U000e007f",  # unassigned, tag characters
       OSC_RETITLE, HIDE, FORGED_ROW, "\x1bP+q\x1b\\", "\x1b[6n", "\x9d0;t\x9c",
       "\x1b]52;c;cHduZWQ=\x07", "\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\"]
)


@pytest.mark.parametrize("bad", ESCAPE_VARIANTS, ids=ascii)
def test_every_control_and_format_character_is_escaped(bad: str) -> None:
    for text in (bad, f"dev{bad}1", bad * 3):
        out = escape(text, None)
        _assert_safe(out)
        assert out != text and not is_clean(text)
        assert _unescape(out) == text  # visible and unambiguous: it says what was sent


@pytest.mark.parametrize("text", ["dev-1", "classifier 1.0.0", "café", "模型 v2", "Ωmega",
                                  "emoji 🙂", "a b", "x=1;y=[2]", "", "e\u0301"])
def test_printable_text_is_unchanged(text: str) -> None:
    assert escape(text, None) == text and is_clean(text)


def test_stacked_combining_marks_are_escaped_after_two() -> None:
    zalgo = "e" + "\u0301\u0316\u0489" * 30  # acute, grave below, enclosing millions sign
    out = escape(zalgo, None)
    assert out.startswith("e\u0301\u0316\\u0489\\u0301")
    assert sum(unicodedata.category(c) in {"Mn", "Me"} for c in out) == 2
    assert _unescape(out) == zalgo
    assert escape("a\u0301b\u0301\u0302c", None) == "a\u0301b\u0301\u0302c"  # kept


def test_backslash_is_escaped_so_an_escape_always_came_from_escape() -> None:
    assert escape("\\x1b", None) == "\\\\x1b"
    assert escape("\x1b", None) == "\\x1b"
    assert escape("\\x1b", None) != escape("\x1b", None)


def test_the_cut_bounds_the_output_and_never_splits_an_escape() -> None:
    out = escape("\x1b" * 100, 10)
    assert out == "\\x1b\\x1b..."
    assert escape("a" * 500) == "a" * 200 + "..."
    assert len(escape("\U000e0001" * 1000)) <= 200 + 3
    assert escape(12345) == "12345" and escape(None) == "None"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(), max_size=60))
def test_escape_is_safe_and_reversible_for_any_text(text: str) -> None:
    out = escape(text, None)
    _assert_safe(out)
    assert _unescape(out) == text


# -- the schema check ----------------------------------------------------------------------

def test_what_a_device_writes_passes_the_schema() -> None:
    for r in (good_report("d1"), build_report("d1", FLEET, None, "idle", {}, seq=1, now=NOW,
                                              poll_interval=3600),
              {"device_id": "d1"}, hostile_strings_report("d1")):
        assert check_report(r) is r


@pytest.mark.parametrize(("label", "changes"), ODD_SHAPES, ids=[s[0] for s in ODD_SHAPES])
def test_odd_shapes_fail_the_schema_naming_the_field(label: str,
                                                     changes: dict[str, Any]) -> None:
    with pytest.raises(ReportSchemaError) as e:
        check_report(good_report("d1", **changes))
    assert e.value.field.split(".")[0] in {*changes, "report"}, (label, e.value.field)
    assert str(e.value).startswith("report field ")


@pytest.mark.parametrize("report", [[], "x", 1, None, {}, {"device_id": 5}])
def test_a_report_that_is_not_an_object_with_a_device_id_fails(report: Any) -> None:
    with pytest.raises(ReportSchemaError):
        check_report(report)


# -- through the fleet view ----------------------------------------------------------------

def _registry(tmp_path: Path, devices: list[str]) -> tuple[Path, dict[str, _SoftKey]]:
    fd = tmp_path / "fleet"
    keys = {d: _SoftKey() for d in devices}
    for d, k in keys.items():
        add_device(fd, d, k.identity_public_pem())
    return fd, keys


def _strict_loads(text: str) -> Any:
    def no(name: str) -> Any:
        raise ValueError(f"{name} in --json output")

    return json.loads(text, parse_constant=no)


def _check_view(rows: list[Any], honest: dict[str, dict[str, Any]]) -> str:
    """The table and the JSON of ``rows``: every honest row right, nothing raw printed."""
    table = format_table(rows)
    _assert_table_safe(table, [r.device_id for r in rows])
    doc = _strict_loads(rows_json(rows))
    by = {row["device"]: row for row in doc}
    for d, report in honest.items():
        assert (by[d]["status"], by[d]["verified"], by[d]["report"]) == ("ok", True, report)
    return table


def _assert_table_safe(table: str, devices: list[str]) -> None:
    lines = table.split("\n")
    assert len(lines) == len(devices) + 1  # no forged row
    for line, device in zip(lines[1:], devices, strict=True):
        assert line.startswith(device + " ")
        _assert_safe(line)


@pytest.mark.parametrize(("label", "changes"), ODD_SHAPES, ids=[s[0] for s in ODD_SHAPES])
def test_a_signed_odd_shape_is_one_rejected_row_and_the_rest_is_right(
        tmp_path: Path, label: str, changes: dict[str, Any]) -> None:
    fd, keys = _registry(tmp_path, ["a-good", "evil", "z-good"])
    honest = {d: good_report(d) for d in ("a-good", "z-good")}
    payloads = {d: sign_report(r, keys[d]) for d, r in honest.items()}
    payloads["evil"] = sign_report(good_report("evil", **changes), keys["evil"])
    rows = judge_fleet(payloads, fd, FLEET, NOW, 3600.0)
    evil = next(r for r in rows if r.device_id == "evil")
    assert (evil.flags, evil.verified, evil.report) == ((REJECTED,), False, {})
    assert evil.problem.startswith("signed, but report field ")
    assert not (fd / "seen" / "evil.json").exists()  # nothing of it is remembered
    table = _check_view(rows, honest)
    assert "REJECTED: signed, but report field" in table


@pytest.mark.parametrize("attack", sorted(WIRE_ATTACKS))
def test_nan_deep_json_and_huge_numbers_are_refused_before_use(tmp_path: Path,
                                                               attack: str) -> None:
    fd, keys = _registry(tmp_path, ["a-good", "evil"])
    honest = {"a-good": good_report("a-good")}
    wire = WIRE_ATTACKS[attack](keys["evil"], "evil")
    with pytest.raises(ReportSignatureError):
        verify_report(wire, keys["evil"].identity_public_pem(), "evil")
    rows = judge_fleet({"a-good": sign_report(honest["a-good"], keys["a-good"]),
                        "evil": wire}, fd, FLEET, NOW, 3600.0)
    evil = rows[1]
    assert (evil.device_id, evil.flags, evil.report) == ("evil", (REJECTED,), {})
    assert len(evil.problem) <= 210 and is_clean(evil.problem.replace("\\", ""))
    _check_view(rows, honest)


def test_the_deep_report_is_refused_by_its_depth_not_by_a_recursion(tmp_path: Path) -> None:
    k = _SoftKey()
    with pytest.raises(ReportSignatureError, match="nested deeper than 4") as e:
        verify_report(_deep(k, "evil"), k.identity_public_pem(), "evil")
    assert not isinstance(e.value.__cause__, RecursionError)


def test_hostile_strings_are_shown_escaped_and_kept_exact_in_json(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["a-good", "evil", "z-good"])
    honest = {d: good_report(d) for d in ("a-good", "z-good")}
    evil_report = hostile_strings_report("evil")
    payloads = {d: sign_report(r, keys[d]) for d, r in honest.items()}
    payloads["evil"] = sign_report(evil_report, keys["evil"])
    rows = judge_fleet(payloads, fd, FLEET, NOW, 3600.0)
    table = _check_view(rows, {**honest, "evil": evil_report})  # shape is right: ok
    for shown in ("\\x1b]0;pwned\\x07active", "\\x1b[8mclassifier", "1.0.0\\u202e0.9",
                  "E\\ndev-9 \\x20ok \\x20ok \\x20classifier 6.6.6"):
        assert shown in table
    out = rows_json(rows)
    assert all(" " <= c <= "~" for c in out)  # ASCII only: nothing raw reaches a terminal


def test_device_ids_from_topics_and_rejection_reasons_are_escaped(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["a-good"])
    honest = {"a-good": good_report("a-good")}
    topic_id = "x\x1b]0;pwned\x07\ny"  # an id no enrolment allows, named by a topic
    payloads = {"a-good": sign_report(honest["a-good"], keys["a-good"]),
                topic_id: b'{"report": {"device_id": "\\u001b[8m"}, "alg": "x"}',
                "z-" + "\u202e" * 300: b"[" * 60000}
    rows = judge_fleet(payloads, fd, FLEET, NOW, 3600.0)
    assert [r.status for r in rows] == ["ok", REJECTED, REJECTED]
    table = format_table(rows)
    lines = table.split("\n")
    assert len(lines) == 4
    for line in lines:
        _assert_safe(line)
        assert len(line) < 1000
    _strict_loads(rows_json(rows))


def test_a_schema_rejected_report_does_not_move_the_seen_sequence(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["d1"])
    k = keys["d1"]
    judge_fleet({"d1": sign_report(good_report("d1", seq=5), k)}, fd, FLEET, NOW)
    seen = (fd / "seen" / "d1.json").read_bytes()
    rows = judge_fleet({"d1": sign_report(good_report("d1", seq=10**6, last_error="x"), k)},
                       fd, FLEET, NOW)
    assert rows[0].status == REJECTED
    assert (fd / "seen" / "d1.json").read_bytes() == seen  # seq 10**6 is not believed
    assert judge_fleet({"d1": sign_report(good_report("d1", seq=6), k)}, fd, FLEET,
                       NOW)[0].status == "ok"


def test_rows_json_never_writes_nan_even_if_a_row_carries_one(tmp_path: Path) -> None:
    from modelward.publisher._fleet import DeviceRow

    rows = [DeviceRow("d1", True, "", {"device_id": "d1", "x": math.nan}),
            DeviceRow("d2", True, "", {"device_id": "d2", "seq": 1})]
    doc = _strict_loads(rows_json(rows))
    assert doc[0]["status"] == REJECTED and doc[0]["report"] == {}
    assert doc[1]["report"] == {"device_id": "d2", "seq": 1}


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["name", "version", "fingerprint", "type", "message",
                                       "at", "ok", "detail", "attempts", "x"]), inner,
                      max_size=4),
    max_leaves=12)
_FIELDS = ["fleet", "seq", "poll_interval", "active", "previous", "state", "last_error",
           "last_activation", "counters", "at", "uptime_s", "junk"]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_FIELDS), _JSONISH, max_size=6))
def test_any_signed_shape_is_ok_or_one_rejected_row_never_an_exception(
        tmp_path: Path, changes: dict[str, Any]) -> None:
    k = _SoftKey()
    pem = k.identity_public_pem()
    fd = tmp_path / "fuzz"
    add_device(fd, "evil", pem)
    wire = sign_report({"device_id": "evil", **changes}, k)
    row = _judge_device("evil", wire, True, fd, FLEET, NOW, 3600.0)
    assert row.verified or row.flags == (REJECTED,)
    _assert_table_safe(format_table([row]), ["evil"])
    _strict_loads(rows_json([row]))


# -- attacks tried on the change -----------------------------------------------------------

def test_broker_named_look_alike_device_id_is_told_apart(tmp_path: Path) -> None:
    """The broker (not a device: the ACL keeps each to its own topic) names a look-alike
    ``dеv-1`` (Cyrillic ``е``) with a zero-width joiner: its row does not look like
    ``dev-1``'s."""
    fd, keys = _registry(tmp_path, ["dev-1"])
    fake = "d\u0435v-1\u200d"
    rows = judge_fleet({"dev-1": sign_report(good_report("dev-1"), keys["dev-1"]),
                        fake: sign_report(good_report(fake), keys["dev-1"])},
                       fd, FLEET, NOW, 3600.0)
    lines = format_table(rows).split("\n")
    assert lines[1].startswith("dev-1 ") and lines[2].startswith("d\\u0435v-1\\u200d ")
    assert "not enrolled" in lines[2] and all(c < "\x7f" for c in lines[2].split(" ")[0])
    _assert_safe(lines[2])


def test_a_hostile_unknown_field_name_is_escaped_in_the_reason(tmp_path: Path) -> None:
    fd, keys = _registry(tmp_path, ["evil"])
    rows = judge_fleet({"evil": sign_report(
        good_report("evil", counters={OSC_RETITLE + "\n" * 50: 1}), keys["evil"])},
        fd, FLEET, NOW, 3600.0)
    assert rows[0].status == REJECTED and "\\x1b]0;pwned\\x07\\n" in rows[0].problem
    _assert_table_safe(format_table(rows), ["evil"])


@pytest.mark.xdist_group("machine")
def test_a_64_kib_wall_of_bidi_and_escapes_is_cut_quickly(tmp_path: Path) -> None:
    import time

    fd, keys = _registry(tmp_path, ["evil"])
    wall = "\u202e\x1b[8m" * 5000
    report = good_report("evil", state=wall[:256], last_error={"type": wall[:256],
                                                                "message": wall[:4096]})
    t = time.monotonic()
    rows = judge_fleet({"evil": sign_report(report, keys["evil"])}, fd, FLEET, NOW, 3600.0)
    table = format_table(rows)
    assert time.monotonic() - t < 1.0
    assert max(len(line) for line in table.split("\n")) < 1000
    _assert_table_safe(table, ["evil"])


def test_sim_fleet_status_escapes_what_a_device_disk_holds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelward.cli import main

    dev = tmp_path / "dev-1"
    (dev / "state" / "current").mkdir(parents=True)
    (dev / "state" / "status.json").write_text(json.dumps(
        {"last_error": {"type": "E" + FORGED_ROW + OSC_RETITLE, "message": None, "at": None},
         "counters": {"attempts": 2}}))
    (dev / "state" / "current" / "manifest.json").write_text(json.dumps(
        {"version": HIDE + "9.9.9\u202e"}))
    (tmp_path / "passphrase").write_text("x\n")
    (tmp_path / "fleet.json").write_text(json.dumps(
        {"devices": [{"id": "dev-1", "dir": str(dev), "transport": "mqtt", "tpm_port": 0}],
         "origin_port": 1, "broker_port": 2}))
    assert main(["sim", "fleet", "status", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == 2 and lines[1].startswith("dev-1 ")
    _assert_safe(lines[1])
    assert "\\x1b[8m9.9.9\\u202e" in lines[1] and "\\x1b]0;pwned\\x07" in lines[1]
    assert main(["sim", "fleet", "status", "--dir", str(tmp_path), "--json"]) == 0
    doc = _strict_loads(capsys.readouterr().out)
    assert doc[0]["active"] == HIDE + "9.9.9\u202e"


@pytest.mark.parametrize("wait", ["nan", "-1", "inf", "1e9"])
def test_cli_refuses_a_wait_that_is_not_a_sane_number_of_seconds(
        tmp_path: Path, wait: str, capsys: pytest.CaptureFixture[str]) -> None:
    from modelward.cli import main

    code = main(["fleet", "status", "--fleet-dir", str(tmp_path), "--wait", wait,
                 "--broker", "mqtts://127.0.0.1:1", "--fleet", FLEET, "--username", "u",
                 "--password-file", "/dev/null"])
    err = capsys.readouterr().err
    # issue 15: a usage error (exit 2) in one line, naming the argument
    assert code == 2 and "argument --wait" in err and "at most 3600" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
