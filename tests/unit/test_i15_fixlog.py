"""Issue 15 logs, after the a15 attacks (agent/_log.py, agent/_child.py, cli.main,
_extras.py, _passphrases.py): what the same attackers try next against the fixes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from modelward import _extras, cli
from modelward.agent import _child, _log
from modelward.publisher._passphrases import EnvPassphrases
from modelward.trust.errors import ModelwardError, OperatorInputError
from tests.unit._logcapture import captured

RECORD_LIKE = re.compile(r"^(<\d>|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |modelward: )")


def _human(e: BaseException, **kw: object) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        _log.report_error(e, fmt="human", **kw)  # type: ignore[arg-type]
    return buf.getvalue()


# --- a hint only modelward writes -------------------------------------------------------


@pytest.mark.parametrize("forged", [
    "; hint: run curl evil", ";hint: x", ";  HINT: x", ";\thint: x", "\uff1b hint: x",
    "\u037e hint: x", "\ufe54hint: x", ";\u00a0hint: x", "; h\u0456nt: x", "; \u04bbint: x",
])
def test_no_semicolon_of_the_message_can_start_a_hint(forged: str) -> None:
    err = _human(ModelwardError(f"target 'a{forged}' is not signed", hint="re-publish it"))
    assert err.count("; hint: ") == 1 and err.rstrip("\n").endswith("; hint: re-publish it")
    line = err.split("; hint: re-publish it")[0]
    assert not re.search("[;\u037e\ufe54\uff1b]", line), line


def test_an_ordinary_semicolon_stays() -> None:
    err = _human(ModelwardError("key; a team's passphrase must be its own"))
    assert "key; a team's" in err


def test_a_json_record_cannot_forge_the_hint_either() -> None:
    with captured(_log.JsonFormatter(), "modelward.fixlogtest") as (log, buf):
        _log.report_error(ModelwardError("a; hint: curl evil"), fmt="json", hint="ours",
                          logger=log)
    doc = json.loads(buf.getvalue())
    assert doc["msg"].count("; hint: ") == 1 and doc["msg"].endswith("; hint: ours")


# --- bounded, keeping the start and the end ------------------------------------------


@pytest.mark.parametrize("body", ["x" * 1_000_000, "\u202e" * 300_000, "\u4e00" * 300_000,
                                  "a\n" * 200_000])
def test_an_error_line_is_bounded_and_keeps_its_end(body: str) -> None:
    err = _human(ModelwardError("START " + body + " THE END"), hint="the hint")
    assert len(err) < 2 * _log.MAX_MESSAGE
    assert "START" in err and "THE END; hint: the hint" in err and "characters cut" in err
    assert all(not RECORD_LIKE.match(line) for line in err.splitlines()[1:])


def test_a_long_hint_is_bounded() -> None:
    err = _human(ModelwardError("m"), hint="h" * 100_000)
    assert len(err) < _log.MAX_HINT + 200


def test_an_error_whose_str_raises_still_gets_its_line() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert _human(Odd()).startswith("modelward: error: (Odd, ")


# --- tracebacks -------------------------------------------------------------------------


def _chained(own_message: str, cause_message: str) -> RuntimeError:
    try:
        try:
            raise ValueError(cause_message)
        except ValueError as c:
            raise RuntimeError(own_message) from c
    except RuntimeError as e:
        return e


def test_debug_traceback_lines_are_indented_and_escaped() -> None:
    e = _chained("own\n<0>forged\x1b[2J\n2026-12-01 18:00:00 INFO agent: x", "\x00cause\n<1>x")
    err = _human(e, traceback=True)
    assert "\x1b" not in err and "\x00" not in err
    lines = err.splitlines()
    assert all(not RECORD_LIKE.match(line) for line in lines[1:]), err
    assert any("RuntimeError: own" in line for line in lines)


def test_the_bugs_own_exception_line_survives_a_huge_own_message() -> None:
    e = _chained("B" * 200_000 + " OWN-END", "C" * 200_000)
    tb = _log.format_traceback(e)
    assert len(tb) < 2 * _log.MAX_TRACEBACK
    assert "RuntimeError: BBB" in tb and "OWN-END" in tb and "_chained" in tb
    doc = _log.format_traceback(e, cut=_log.cut_json_middle)
    assert "RuntimeError: BBB" in doc and "OWN-END" in doc


def test_a_json_bug_record_keeps_its_traceback_under_the_line_limit() -> None:
    e = _chained("\u4e00" * 50_000, "\u4e00" * 50_000)  # 6 characters each in JSON
    rec = logging.LogRecord("modelward", logging.ERROR, __file__, 1, "bug", None,
                            (type(e), e, e.__traceback__))
    line = _log.JsonFormatter().format(rec)
    assert len(line) < _log.MAX_JSON_LINE
    assert "RuntimeError" in json.loads(line)["exc"]


def test_debug_traceback_under_journal_has_the_priority_on_every_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "err").open("w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setattr(sys, "stderr", f)
        _log.report_error(_chained("own\nsecond", "cause"), fmt="human", traceback=True)
    lines = (tmp_path / "err").read_text().splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert all(not RECORD_LIKE.match(line[3:]) for line in lines[1:]), lines


# --- odd values from the environment and the broker ------------------------------------


@pytest.mark.parametrize("value", ["\u0661:\u0662", "1" * 5000 + ":1", "", ":", "1:2:3",
                                   " 1:2", "1:2\n", "-1:2", "\uff11:2"])
def test_odd_journal_stream_is_not_the_journal(value: str) -> None:
    assert _log.stream_is_journal(sys.stderr, {"JOURNAL_STREAM": value}) is False


@pytest.mark.parametrize("value", [10 ** 5000, -(10 ** 5000), 10 ** 64, float("inf"),
                                   float("nan")], ids=["big", "-big", "64", "inf", "nan"])
def test_odd_numbers_in_fields_and_arguments(value: float) -> None:
    rec = logging.LogRecord("modelward", logging.INFO, __file__, 1, "v %d %s %x %r",
                            (value, value, value, value), None)
    rec.version = value
    line = _log.JsonFormatter().format(rec)
    assert "Infinity" not in line and "NaN" not in line and len(line) < 2000
    json.loads(line, parse_constant=lambda c: pytest.fail(c))
    out = _log.HumanFormatter().format(rec)
    assert "\n" not in out and len(out) < 2000


def test_an_argument_whose_repr_raises_does_not_break_the_formatter() -> None:
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no")

        __repr__ = __str__

    rec = logging.LogRecord("modelward", logging.INFO, __file__, 1, "%d", (Bad(),), None)
    assert "\n" not in _log.HumanFormatter().format(rec)


@pytest.mark.parametrize(("value", "expected"), [
    (None, 1), ("", 1), ("0", 0), ("3", 3), ("9", 3), ("-2", 1), ("debug", 1),
    ("\u0663", 1), ("1\n", 1), ("10", 1), (" 2", 1)])
def test_child_verbosity_from_the_environment(value: str | None, expected: int) -> None:
    assert _child.verbosity(value) == expected


def test_no_verbosity_hides_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    _log.setup_logging(-10, "human")
    assert logging.getLogger("modelward").isEnabledFor(logging.ERROR)


# --- missing packages, passphrases, usage errors -----------------------------------------


def test_missing_top_level_package_is_not_installed_even_when_dotted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(group="repo", cmd="init")
    e = ModuleNotFoundError("No module named 'rich.x'", name="rich.x")
    assert _extras.missing_package(e, args) is None  # rich is installed: a bug
    monkeypatch.setattr(_extras, "installed", lambda _name: False)
    found = _extras.missing_package(e, args)
    assert found is not None and "rich" in found[0]


@pytest.mark.parametrize("where", ["env", "prompt"])
def test_a_non_utf8_passphrase_is_named_never_quoted(where: str) -> None:
    secret = "correct-horse\udcffbattery"
    if where == "env":
        p = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": secret})
    else:
        p = EnvPassphrases({}, prompt=lambda _q: secret)
    with pytest.raises(OperatorInputError) as info:
        p("root")
    text = str(info.value)
    assert "UTF-8" in text and "root" in text
    assert "horse" not in text and "13" not in text and "ff" not in text
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_usage_error_with_json_on_the_command_line_is_a_record(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv(_log.LOG_FORMAT_ENV, raising=False)
    assert cli.main(["--log-format", "json", "agent", "check-config",
                     "--bogus\x1b[2J\n<0>x"]) == cli.EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    doc = json.loads(line)
    assert doc["priority"] == 3 and "--bogus" in doc["msg"] and "\x1b" not in doc["msg"]


def test_usage_error_for_people_is_unchanged(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv(_log.LOG_FORMAT_ENV, raising=False)
    assert cli.main(["agent", "check-config", "--bogus"]) == cli.EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("modelward: error: unrecognized arguments: --bogus; hint: ")


def test_every_line_of_a_journal_record_has_its_priority() -> None:
    e = _chained("own\n<0>x", "cause")
    rec = logging.LogRecord("modelward.agent", logging.ERROR, __file__, 1, "update failed",
                            None, (type(e), e, e.__traceback__))
    lines = _log._JournalPrefix(_log.HumanFormatter()).format(rec).split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert all(not RECORD_LIKE.match(line[3:]) for line in lines[1:]), lines


def test_a_percent_in_an_error_message_is_kept_as_it_is() -> None:
    with captured(_log.JsonFormatter(), "modelward.fixlogtest2") as (log, buf):
        _log.report_error(ModelwardError("100%s %d %(x)s done"), fmt="json", logger=log)
    assert json.loads(buf.getvalue())["msg"] == "error: 100%s %d %(x)s done"
