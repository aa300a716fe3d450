"""Logging set-up for the entry point: JSON lines for the agent and for every command under
journald, plain text for people.

Log records carry strings that devices, the origin, a team key or the broker chose (device
ids, topics, target paths, role names, exception messages quoting them). Whatever the
call site formats, a record comes out as exactly one line with no raw control or format
characters: the JSON formatter escapes them (``json.dumps`` with ASCII output), and the
text formatter escapes them as ``\\xNN`` / ``\\uNNNN`` (:func:`escape_text`). So a
newline cannot forge a log line, and ``ESC[...`` or an OSC sequence never reaches the
terminal or the journal viewer raw.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

from trust._display import escape

_STD = set(vars(logging.makeLogRecord({})))


def escape_text(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control, format and separator character escaped
    (:func:`trust._display.escape`); with ``keep_newlines``, ``\\n`` is kept (a
    traceback's lines)."""
    if text.isprintable() and text.isascii() and "\\" not in text:
        return text
    if keep_newlines:
        return "\n".join(escape(line, None) for line in text.split("\n"))
    return escape(text, None)


class JsonFormatter(logging.Formatter):
    """One JSON object a line (journald keeps it as it is); non-ASCII is escaped, so no
    control or format character of a logged value is ever written raw."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STD and k != "message"})
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """``%(message)s`` for people, escaped: one record is one line (a traceback, when one
    is shown, follows on indented lines)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # not Formatter.format: it would reuse a traceback text another formatter cached
        record.message = record.getMessage()
        out = escape_text(self.formatMessage(record))
        if record.exc_info:
            out += _indented(self.formatException(record.exc_info))
        if record.stack_info:
            out += _indented(self.formatStack(record.stack_info))
        return out


def _indented(text: str) -> str:
    """A traceback under its record, every line indented: a line break inside an
    exception's message cannot start a line that looks like a record of its own."""
    return "".join(f"\n  {line}" for line in escape_text(text, keep_newlines=True).split("\n"))


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is systemd's journal stream: ``$JOURNAL_STREAM`` names the
    ``device:inode`` of the socket systemd connected (systemd.exec(5)); the variable
    alone is not enough, a child may inherit it with its stderr redirected elsewhere."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no file descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(verbosity: int, json_lines: bool) -> None:
    """Configure the root logger once, at the entry point: JSON lines when asked for
    (the agent) and whenever stderr is the journal (operator commands run by systemd:
    ``repo refresh``, ``serve-mqtt``), escaped plain text otherwise."""
    level = logging.WARNING - 10 * verbosity
    handler = logging.StreamHandler(sys.stderr)
    as_json = json_lines or stream_is_journal(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logging.basicConfig(level=max(level, logging.DEBUG), handlers=[handler], force=True)
