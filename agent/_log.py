"""Logging set-up for the entry point: lines for people on a terminal, JSON lines for
journald.

The format (``--log-format``, else ``$MODELWARD_LOG_FORMAT``, else ``auto``):

* ``human``: ``2026-12-01 18:00:00 WARNING agent: ...``, one escaped line a record;
* ``json``: one JSON object a line with ``ts``, ``level``, ``priority`` (the syslog level
  number journald uses: 3 error, 4 warning, 6 info, 7 debug), ``logger``, ``msg`` and the
  record's fields;
* ``auto``: ``json`` when stderr is systemd's journal stream (``$JOURNAL_STREAM`` names the
  ``device:inode`` of stderr, systemd.exec(5)), ``human`` otherwise, agent or not.

When stderr is the journal, every line also starts with ``<N>`` (sd-daemon(3)): journald
takes it as the entry's PRIORITY, so ``journalctl -p warning`` selects our warnings.

Errors that end a command are reported once, by the entry point (:func:`report_error`):
library code raises them and does not log them too.

Log records carry strings that devices, the origin, a team key or the broker chose (device
ids, topics, target paths, role names, exception messages quoting them). Whatever the
call site formats, a record comes out as exactly one line with no raw control or format
characters: the JSON formatter escapes them (``json.dumps`` with ASCII output), and the
text formatter escapes them as ``\\xNN`` / ``\\uNNNN`` (:func:`escape_text`). So a
newline cannot forge a log line, and ``ESC[...`` or an OSC sequence never reaches the
terminal or the journal viewer raw.

And a record is bounded, so that one request cannot write kilobytes of log, nor split
into two journal entries (journald cuts a line at ``LineMax=``, 48K by default, and the
second entry would start with text the device chose): every logged value (an argument of
the message, a structured field) is cut at :data:`MAX_VALUE` characters as printed, the
message at :data:`MAX_MESSAGE`, a traceback at :data:`MAX_TRACEBACK`, each cut saying how
much it dropped; a JSON line stays under :data:`MAX_JSON_LINE` whatever it carries.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from modelward.trust._display import escape, printed_widths

_STD = set(vars(logging.makeLogRecord({})))

MAX_VALUE = 200  # characters of one logged value, as printed (escaped)
MAX_MESSAGE = 4096  # characters of one record's message, as printed
MAX_TRACEBACK = 8192  # characters of a traceback (exception messages quote devices)
MAX_JSON_LINE = 32 * 1024  # one JSON line: below journald's LineMax= (48K)


def cut_to(text: str, limit: int, widths: Iterable[int]) -> str:
    """``text`` cut before the character that would take its printed form (``widths``:
    the printed length of each character in turn) past ``limit``, saying how much was cut
    (pure)."""
    used = 0
    for i, w in enumerate(widths):
        used += w
        if used > limit:
            return f"{text[:i]}... [{len(text) - i} of {len(text)} characters cut]"
    return text


def cut_printed(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` cut so that its escaped form (:func:`escape_text`) is at most about
    ``limit`` characters (pure)."""
    if len(text) <= limit and text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return cut_to(text, limit, printed_widths(text))


def _json_width(c: str) -> int:
    n = ord(c)
    if 0x20 <= n < 0x7F:
        return 2 if c in '"\\' else 1
    return 12 if n > 0xFFFF else 6  # \uNNNN, a surrogate pair for astral (\n: 2, at most)


def cut_json(text: str, limit: int) -> str:
    """``text`` cut so that it is at most about ``limit`` characters inside an ASCII JSON
    string (pure)."""
    if len(text) <= limit // 12:
        return text
    return cut_to(text, limit, map(_json_width, text))


class _Cut:
    """A logged argument: ``%s`` and ``%r`` of it are cut at :data:`MAX_VALUE`."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return cut_printed(str(self.value))

    def __repr__(self) -> str:
        return cut_printed(repr(self.value))


def _bounded_arg(v: object) -> object:
    return v if isinstance(v, numbers.Number) or v is None else _Cut(v)


def bounded_message(record: logging.LogRecord) -> str:
    """``record.getMessage()`` with every argument cut at :data:`MAX_VALUE` and the whole
    at :data:`MAX_MESSAGE` characters as printed (a format that does not fit its
    arguments is shown with them, not raised)."""
    msg = str(record.msg)
    args: Any = record.args
    if args:
        bounded: Any = ({k: _bounded_arg(v) for k, v in args.items()}
                        if isinstance(args, Mapping)
                        else tuple(_bounded_arg(a) for a in args))
        try:
            msg = msg % bounded
        except (TypeError, ValueError, KeyError):
            msg = f"{msg} % {bounded!r}"
    return cut_printed(msg, MAX_MESSAGE)


def _bounded_field(v: object) -> object:
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, str):
        return cut_json(v, MAX_VALUE)
    try:
        if len(json.dumps(v, default=str)) <= MAX_VALUE:
            return v
    except (TypeError, ValueError, RecursionError):
        pass
    return cut_json(str(v), MAX_VALUE)


def escape_text(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control, format and separator character escaped
    (:func:`modelward.trust._display.escape`); with ``keep_newlines``, ``\\n`` is kept (a
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
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "priority": syslog_priority(record.levelno),
            "logger": record.name,
            "msg": cut_json(bounded_message(record), MAX_MESSAGE),
        }
        doc.update({k: _bounded_field(v) for k, v in vars(record).items()
                    if k not in _STD and k != "message"})
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc"] = cut_json(self.formatException(record.exc_info), MAX_TRACEBACK)
        line = json.dumps(doc, default=str, ensure_ascii=True)
        if len(line) > MAX_JSON_LINE:  # many fields: keep what says what happened
            line = json.dumps({k: doc[k] for k in ("ts", "level", "logger", "msg")}
                              | {"cut": f"{len(line)} characters of fields"},
                              ensure_ascii=True)
        return line


class TextFormatter(logging.Formatter):
    """``%(message)s`` for people, escaped: one record is one line (a traceback, when one
    is shown, follows on indented lines)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # not Formatter.format: it would reuse a traceback text another formatter cached
        record.message = bounded_message(record)
        out = escape_text(self.formatMessage(record))
        if record.exc_info:
            out += _indented(cut_printed(self.formatException(record.exc_info),
                                         MAX_TRACEBACK))
        if record.stack_info:
            out += _indented(cut_printed(self.formatStack(record.stack_info), MAX_TRACEBACK))
        return out


def _indented(text: str) -> str:
    """A traceback under its record, every line indented: a line break inside an
    exception's message cannot start a line that looks like a record of its own."""
    return "".join(f"\n  {line}" for line in escape_text(text, keep_newlines=True).split("\n"))


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
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


LOG_FORMATS = ("auto", "human", "json")
LOG_FORMAT_ENV = "MODELWARD_LOG_FORMAT"  # the default of --log-format; the daemon's child


def syslog_priority(levelno: int) -> int:
    """The syslog level number of a logging level (journald's PRIORITY=): 2 critical,
    3 error, 4 warning, 6 info, 7 debug (pure)."""
    for floor, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                            (logging.INFO, 6)):
        if levelno >= floor:
            return priority
    return 7


class HumanFormatter(TextFormatter):
    """``2026-12-01 18:00:00 WARNING agent: message`` (local time; the logger's name
    without its ``modelward.`` prefix), escaped like :class:`TextFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        name = record.name.removeprefix("modelward.")
        return f"{when} {record.levelname} {escape_text(name)}: {super().format(record)}"


class _JournalPrefix(logging.Formatter):
    """``<N>`` before each record (sd-daemon(3)): journald reads it as the PRIORITY."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{self.inner.format(record)}"


def resolve_format(fmt: str, stream: TextIO, environ: Mapping[str, str] | None = None) -> str:
    """``human`` or ``json`` for ``fmt`` (one of :data:`LOG_FORMATS`; ``auto``: json when
    ``stream`` is the journal)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    if fmt != "auto":
        return fmt
    return "json" if stream_is_journal(stream, environ) else "human"


def setup_logging(verbosity: int, fmt: str = "auto") -> str:
    """Configure the root logger once, at the entry point, for stderr in format ``fmt``
    (see the module's docstring); returns the format used, ``human`` or ``json``."""
    level = logging.WARNING - 10 * verbosity
    handler = logging.StreamHandler(sys.stderr)
    used = resolve_format(fmt, sys.stderr)
    inner: logging.Formatter = JsonFormatter() if used == "json" else HumanFormatter()
    handler.setFormatter(_JournalPrefix(inner) if stream_is_journal(sys.stderr) else inner)
    logging.basicConfig(level=max(level, logging.DEBUG), handlers=[handler], force=True)
    return used


# --- the error that ends a command --------------------------------------------

_FIELDS = ("model", "version", "target", "member", "path", "url")


def error_fields(e: BaseException) -> dict[str, str]:
    """The log fields of an error: its type, its hint and the fields it carries (model,
    version, target, member, path, url) that are set."""
    fields = {"error": type(e).__name__}
    for k in _FIELDS:
        v = getattr(e, k, None)
        if v:
            fields[k] = str(v)
    hint = getattr(e, "hint", "")
    if hint:
        fields["hint"] = str(hint)
    return fields


def error_line(prefix: str, message: str, hint: str) -> str:
    """``PREFIX: MESSAGE; hint: HINT`` escaped: one line, unless the message has line
    breaks, which only ever start an indented continuation (an error may quote what a
    device or the origin sent)."""
    text = escape_text(message, keep_newlines=True).replace("\n", "\n  ")
    return f"{prefix}: {text}" + (f"; hint: {escape_text(hint)}" if hint else "")


def report_error(e: BaseException, *, fmt: str, prefix: str = "modelward: error",
                 hint: str = "", traceback: bool = False,
                 logger: logging.Logger | None = None, message: str = "") -> None:
    """Report the error that ends a command, once: one line on stderr for people
    (``fmt`` ``human``), one JSON record (error type, hint and the error's fields)
    otherwise, and always a record of ``logger`` when one is given (the daemon's child).
    ``traceback``: the exception's traceback too (``--debug``; an internal error in
    JSON, where the journal keeps it). ``message``: said instead of ``str(e)``."""
    hint = hint or str(getattr(e, "hint", "") or "")
    if fmt == "json" or logger is not None:
        log = logger or logging.getLogger("modelward")
        log.error("%s: %s" + ("; hint: %s" if hint else ""), prefix.removeprefix("modelward: "),
                  message or e, *([hint] if hint else []),
                  extra=error_fields(e) | ({"hint": hint} if hint else {}),
                  exc_info=e if traceback else None)
        return
    print(error_line(prefix, message or str(e), hint), file=sys.stderr, flush=True)
    if traceback:
        import traceback as tb

        print("".join(tb.format_exception(e)), end="", file=sys.stderr)
