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
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
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


def _middle(text: str, limit: int,
            widths: Callable[[str], Iterable[int]]) -> tuple[str, str] | None:
    """``text``'s head and tail that together print in about ``limit`` characters (half
    each; ``widths``: the printed length of each character of a string in turn), or None
    when the whole fits (pure). Only the first and last ``limit`` characters are looked
    at: each prints in one character at least."""
    half = limit // 2
    head_src, tail_src = text[:limit + 1], text[-(limit + 1):]
    if len(text) <= limit and sum(widths(text)) <= limit:
        return None
    used = i = 0
    for w in widths(head_src):
        if used + w > half:
            break
        used += w
        i += 1
    tail_widths = list(widths(tail_src))
    used, j = 0, len(tail_widths)
    while j > 0 and used + tail_widths[j - 1] <= half:
        used += tail_widths[j - 1]
        j -= 1
    k = min(len(tail_src) - j, len(text) - i)  # (never overlapping the head)
    return text[:i], text[len(text) - k:] if k else ""


def _cut_note(text: str, head: str, tail: str) -> str:
    return f" ... [{len(text) - len(head) - len(tail)} of {len(text)} characters cut] ... "


def cut_middle(text: str, limit: int, *, keep_newlines: bool = False) -> str:
    """``text`` escaped (:func:`escape_text`) and, when that is longer than about
    ``limit`` characters, cut in the middle, keeping its start and its end (an error's
    message, then its hint or the exception line of a traceback) and saying how much was
    cut (pure)."""
    parts = _middle(text, limit, printed_widths)
    if parts is None:
        return escape_text(text, keep_newlines=keep_newlines)
    head, tail = parts
    return (escape_text(head, keep_newlines=keep_newlines) + _cut_note(text, head, tail)
            + escape_text(tail, keep_newlines=keep_newlines))


def cut_json_middle(text: str, limit: int) -> str:
    """``text`` cut in the middle (see :func:`cut_middle`) so that it is at most about
    ``limit`` characters inside an ASCII JSON string (pure)."""
    parts = _middle(text, limit, lambda t: map(_json_width, t))
    if parts is None:
        return text
    head, tail = parts
    return head + _cut_note(text, head, tail) + tail


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


MAX_DIGITS = 64  # an integer with more digits is logged as its number of digits


def _too_many_digits(v: object) -> bool:
    return isinstance(v, int) and v.bit_length() > MAX_DIGITS * 10 // 3


def _digits_of(v: int) -> str:
    return f"<an integer of about {int(v.bit_length() * math.log10(2)) + 1} digits>"


def _bounded_arg(v: object) -> object:
    if _too_many_digits(v):  # (str() of it is slow, and raises past 4300 digits)
        assert isinstance(v, int)
        return _digits_of(v)
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
        except Exception:  # noqa: BLE001 - e.g. OverflowError: '%d' of inf; show, not raise
            try:
                msg = f"{msg} % {bounded!r}"
            except Exception:  # noqa: BLE001 - an argument whose repr raises
                msg = f"{msg} % ({len(bounded)} arguments)"
    return escape_text_to(msg, MAX_MESSAGE)


def escape_text_to(text: str, limit: int) -> str:
    """``text`` cut like :func:`cut_middle`, not yet escaped (a formatter escapes it)."""
    parts = _middle(text, limit, printed_widths)
    if parts is None:
        return text
    head, tail = parts
    return head + _cut_note(text, head, tail) + tail


def _bounded_field(v: object) -> object:
    if _too_many_digits(v):
        assert isinstance(v, int)
        return _digits_of(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # (json.dumps would write Infinity / NaN: not JSON)
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
        if record.exc_info and record.levelno >= logging.ERROR and record.exc_info[1]:
            doc["exc"] = format_traceback(record.exc_info[1], MAX_TRACEBACK,
                                          cut=cut_json_middle)
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
        if record.exc_info and record.exc_info[1]:
            out += "".join(f"\n  {line}" for line in format_traceback(
                record.exc_info[1], MAX_TRACEBACK).split("\n"))
        if record.stack_info:
            out += _indented(cut_printed(self.formatStack(record.stack_info), MAX_TRACEBACK))
        return out


def format_traceback(e: BaseException, limit: int = MAX_TRACEBACK,
                     cut: Callable[[str, int], str] | None = None) -> str:
    """``e``'s traceback (its causes first, as Python prints it) in about ``limit``
    characters, without its last line break: ``e``'s own frames and exception line are
    kept first, each line cut in the middle at :data:`MAX_MESSAGE`; the chained causes
    before them (whose messages may quote what the origin sent) get what is left, cut in
    the middle. ``cut``: how a text is cut to a limit; the default, :func:`cut_middle`
    with line breaks kept, escapes it too (for a person); :func:`cut_json_middle` for
    JSON, which escapes it itself."""
    import traceback as tb

    def cut_text(text: str, n: int) -> str:
        return cut(text, n) if cut else cut_middle(text, n, keep_newlines=True)

    te = tb.TracebackException.from_exception(e)
    own_lines = "".join(te.format(chain=False)).rstrip("\n").split("\n")
    own = "\n".join(cut_text(line, MAX_MESSAGE // 4) for line in own_lines)
    own = cut_text(own, limit * 3 // 4) if cut else _cut_escaped(own, limit * 3 // 4)
    full = "".join(te.format(chain=True)).rstrip("\n")
    own_raw = "\n".join(own_lines)
    causes = full[:-len(own_raw)] if full.endswith(own_raw) else ""
    if not causes.strip():
        return own
    return cut_text(causes.rstrip("\n"), max(limit - len(own), limit // 8)) + "\n\n" + own


def _cut_escaped(text: str, limit: int) -> str:
    """Already escaped ``text`` (lines joined by line breaks) cut in the middle."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ... [{len(text) - 2 * half} characters cut] ... {text[-half:]}"


def _indented(text: str) -> str:
    """A traceback under its record, every line indented: a line break inside an
    exception's message cannot start a line that looks like a record of its own."""
    return "".join(f"\n  {line}" for line in escape_text(text, keep_newlines=True).split("\n"))


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is systemd's journal stream: ``$JOURNAL_STREAM`` names the
    ``device:inode`` of the socket systemd connected (systemd.exec(5)); the variable
    alone is not enough, a child may inherit it with its stderr redirected elsewhere."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    found = _JOURNAL_STREAM.fullmatch(value)  # ASCII digits: str.isdigit takes '\u00b2'
    if found is None:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError, TypeError):  # closed, or no descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(found[1]), int(found[2]))


_JOURNAL_STREAM = re.compile(r"([0-9]{1,20}):([0-9]{1,20})", re.ASCII)


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
    """``<N>`` before each record (sd-daemon(3)): journald reads it as the PRIORITY;
    before each line of a record that has several (a traceback's), as journald makes an
    entry of each line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        mark = f"<{syslog_priority(record.levelno)}>"
        return mark + self.inner.format(record).replace("\n", "\n" + mark)


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
    # (never above ERROR: no verbosity hides the error that ends a command)
    logging.basicConfig(level=min(max(level, logging.DEBUG), logging.ERROR),
                        handlers=[handler], force=True)
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


MAX_HINT = 1024  # characters of an error's hint, as printed

# a semicolon (or one that looks like it: NFKC folds these to ';') that does not go on
# with a word of ASCII letters other than an 'h': "; hint: ..." in a message must not
# look like the hint modelward appends
_HINT_LIKE = re.compile("[;\u037e\ufe54\uff1b](?![ \t]*[A-GI-Za-gi-z])")


def unhinted(message: str) -> str:
    """``message`` with every semicolon that could start a look-alike of modelward's
    ``; hint: `` written ``\\x3b`` (pure; before escaping, whose doubled backslash then
    shows it was not modelward's): only modelward's own hint follows ``; hint: ``."""
    return _HINT_LIKE.sub(lambda m: f"\\x{ord(m[0]):02x}" if m[0] == ";" else
                          f"\\u{ord(m[0]):04x}", message)


def error_line(prefix: str, message: str, hint: str, *, one_line: bool = False) -> str:
    """``PREFIX: MESSAGE; hint: HINT`` escaped: one line, unless the message has line
    breaks, which only ever start an indented continuation (an error may quote what a
    device or the origin sent). The message is cut in the middle at :data:`MAX_MESSAGE`
    characters, the hint at :data:`MAX_HINT` (journald splits a longer line, the next
    entry starting with text the origin chose), and a semicolon of the message that
    could start a look-alike of the hint is escaped (:func:`unhinted`). ``one_line``:
    line breaks are escaped too (a value quoted as it is)."""
    text = unhinted(cut_middle(message, MAX_MESSAGE, keep_newlines=not one_line))
    text = text.replace("\n", "\n  ")
    return f"{prefix}: {text}" + (f"; hint: {cut_middle(hint, MAX_HINT)}" if hint else "")


def _journal_prefix(stream: TextIO) -> str:
    return "<3>" if stream_is_journal(stream) else ""


def report_error(e: BaseException, *, fmt: str, prefix: str = "modelward: error",
                 hint: str = "", traceback: bool = False,
                 logger: logging.Logger | None = None, message: str = "",
                 one_line: bool = False) -> None:
    """Report the error that ends a command, once: one line on stderr for people
    (``fmt`` ``human``), one JSON record (error type, hint and the error's fields)
    otherwise, and always a record of ``logger`` when one is given (the daemon's child).
    ``traceback``: the exception's traceback too (``--debug``; an internal error in
    JSON, where the journal keeps it), escaped, bounded and indented under the error.
    ``message``: said instead of ``str(e)``; ``one_line``: its line breaks escaped too
    (in a JSON record they always are). When stderr is the journal, every line
    starts with ``<3>``, the error priority."""
    hint = hint or str(getattr(e, "hint", "") or "")
    try:
        text = message or str(e)
    except Exception:  # noqa: BLE001 - an error whose __str__ raises still gets its line
        text = f"({type(e).__name__}, whose message cannot be shown)"
    if fmt == "json" or logger is not None:
        log = logger or logging.getLogger("modelward")
        line = f"{prefix.removeprefix('modelward: ')}: {unhinted(text)}"
        line = escape_text_to(line, MAX_MESSAGE) + (
            f"; hint: {escape_text_to(hint, MAX_HINT)}" if hint else "")
        log.error(line, extra=error_fields(e) | ({"hint": hint} if hint else {}),
                  exc_info=e if traceback else None)
        return
    lines = error_line(prefix, text, hint, one_line=one_line).split("\n")
    if traceback:
        lines += [f"  {line}" for line in format_traceback(e).split("\n")]
    mark = _journal_prefix(sys.stderr)
    print("\n".join(mark + line for line in lines), file=sys.stderr, flush=True)


def _format_in(argv: Iterable[str]) -> str:
    """The ``--log-format`` of a command line that did not parse, else
    ``$MODELWARD_LOG_FORMAT``; ``auto`` for one that is not a format."""
    words = list(argv)
    found = os.environ.get(LOG_FORMAT_ENV, "auto")
    for i, w in enumerate(words):
        if w == "--log-format" and i + 1 < len(words):
            found = words[i + 1]
        elif w.startswith("--log-format="):
            found = w.partition("=")[2]
    return found if found in LOG_FORMATS else "auto"


def report_usage(text: str, argv: Iterable[str], *, error: bool) -> None:
    """Write what the argument parser wrote (``text``: a usage error is one escaped
    line) to stderr: for a usage error (``error``), in the log format of the command line
    or the environment, a JSON record under journald, with the ``<3>`` priority there."""
    if not error or not text.strip():
        sys.stderr.write(text)
        return
    fmt = setup_logging(0, _format_in(argv))
    if fmt == "json":
        logging.getLogger("modelward").error(" ".join(text.split("\n")).strip(),
                                             extra={"error": "UsageError"})
        return
    mark = _journal_prefix(sys.stderr)
    sys.stderr.write("".join(f"{mark}{line}\n" for line in text.rstrip("\n").split("\n")))
