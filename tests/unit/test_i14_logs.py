"""Issue 14: logs never carry raw device or origin bytes; operator commands log JSON lines
under journald."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.agent._log import (
    JsonFormatter,
    TextFormatter,
    escape_text,
    setup_logging,
    stream_is_journal,
)
from tests.unit._logcapture import journal_stderr, root_logging_kept

# a device id / payload a hostile device (or team key, or origin) could make us log
HOSTILE = ('dev-9\n{"level": "error", "msg": "update failed on dev-2"}'
           "\x1b[8m\x1b]0;pwned\x07\r\u202eevil\u2028forged\x00\x85")
RAW = ["\n", "\r", "\x1b", "\x07", "\x00", "\x85", "\u202e", "\u2028"]


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError(f"bad report from {HOSTILE}")
        except ValueError:
            info = sys.exc_info()
    r = logging.LogRecord("modelward.test", logging.ERROR, __file__, 1, msg, args, info)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def _clean(line: str) -> None:
    for c in RAW:
        assert c not in line, repr(c)


def test_json_line_is_one_line_and_keeps_the_value() -> None:
    out = JsonFormatter().format(_record("refusing a request from %s: %s", HOSTILE,
                                         HOSTILE.encode(), device=HOSTILE, exc=True))
    assert out.count("\n") == 0 and out.isascii()
    _clean(out)
    doc = json.loads(out)
    assert doc["device"] == HOSTILE  # structured, exact, and still escaped on the wire
    assert HOSTILE in doc["msg"] and HOSTILE in doc["exc"]


def test_text_line_is_one_line_and_escaped() -> None:
    out = TextFormatter().format(_record("ignoring a request on %s", HOSTILE))
    assert "\n" not in out
    _clean(out)
    assert "\\n" in out and "\\x1b[8m" in out and "\\u202e" in out and "\\u2028" in out
    assert out.startswith("ignoring a request on dev-9")


def test_text_traceback_is_indented_under_its_record() -> None:
    out = TextFormatter().format(_record("update failed", exc=True))
    lines = out.split("\n")
    assert lines[0] == "update failed" and lines[1] == "  Traceback (most recent call last):"
    assert any(line.startswith("  ValueError: bad report from dev-9") for line in lines)
    # the message's own newline gives an indented line, never a record-looking one
    assert all(line.startswith("  ") for line in lines[1:])
    for line in lines:
        _clean(line)


def test_text_formatter_does_not_reuse_a_raw_cached_traceback() -> None:
    r = _record("x", exc=True)
    r.exc_text = f"cached by another handler {HOSTILE}"
    _clean(TextFormatter().format(r).replace("\n", "", 1).split("\n", 1)[0])
    for line in TextFormatter().format(r).split("\n")[1:]:
        _clean(line)


@pytest.mark.parametrize("text", ["plain ascii", "naïve café — ok", "tab\there", HOSTILE,
                                  "\ud800 lone surrogate", "\U000e0001 tag", "a\\x1b b"])
def test_escape_text_leaves_only_printable(text: str) -> None:
    out = escape_text(text)
    assert out.isprintable()
    if text.isascii() and text.isprintable() and "\\" not in text:
        assert out == text
    assert escape_text("naïve café") == "naïve café"


def test_journal_stream_detected_by_device_and_inode(tmp_path: Path) -> None:
    f = (tmp_path / "journal").open("w")
    try:
        st = os.fstat(f.fileno())
        assert stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stream_is_journal(f, {})
        for junk in ["", ":", "1", "a:b", "1:2:3", "-1:-2"]:
            assert not stream_is_journal(f, {"JOURNAL_STREAM": junk})
        assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    finally:
        f.close()


@pytest.fixture
def root_logging() -> Iterator[None]:
    with root_logging_kept():
        yield


def _journal_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return journal_stderr(tmp_path / "stderr", monkeypatch)


def test_operator_commands_log_json_under_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    from modelward import cli

    path = _journal_stderr(tmp_path, monkeypatch)
    seen: list[logging.Formatter | None] = []

    def fake(args: object) -> int:
        seen.extend(h.formatter for h in logging.getLogger().handlers)
        log = logging.getLogger("modelward.publisher._bridge")
        log.warning("refusing a request from %s", HOSTILE)
        return 0

    monkeypatch.setattr(cli, "_fleet_broker_config", fake)
    monkeypatch.setattr(cli, "_serve_mqtt", fake, raising=False)
    assert cli.main(["fleet", "broker-config", "--fleet", "f", "--devices", "a",
                     "-o", str(tmp_path / "bc")]) == 0
    sys.stderr.flush()
    # issue 15: under the journal each line starts with its syslog priority, <4> a warning
    assert seen and all(isinstance(getattr(f, "inner", None), JsonFormatter) for f in seen)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("<4>{")
    assert json.loads(lines[0][3:])["msg"] == f"refusing a request from {HOSTILE}"


def test_operator_commands_log_escaped_text_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    setup_logging(0, "auto")  # issue 15: human lines, not the journal
    logging.getLogger("x").warning("ignoring %s", HOSTILE)
    out = err.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    _clean(out[:-1])


def test_cli_error_lines_are_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    root_logging: None,
) -> None:
    from modelward import cli
    from modelward.publisher.errors import OperatorInputError

    def fake(args: object) -> int:
        raise OperatorInputError(f"device {HOSTILE} is odd", hint=f"ask {HOSTILE}")

    monkeypatch.setattr(cli, "_fleet_broker_config", fake)
    assert cli.main(["fleet", "broker-config", "--fleet", "f", "--devices", "a",
                     "-o", str(tmp_path / "bc")]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("modelward: error: device dev-9")
    # issue 15: the hint ends the error's (last) line, "; hint: ..."
    assert all(line.startswith(("modelward: error:", "  ")) for line in lines), lines
    assert err.count("; hint: ask dev-9") == 1 and lines[-1].endswith("evil\\u2028forged\\x00\\x85")
    for c in RAW[1:]:
        assert c not in err
