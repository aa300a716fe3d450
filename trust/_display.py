"""Untrusted text made safe for a terminal or a log line (issue 14 finding 6).

Everything a device (or anyone with its credentials) controls, a report's strings, a
topic's device id, an error message, a simulated device's status file, is passed through
:func:`escape` before an operator tool prints it. A terminal acts on control and format
characters: ``ESC ] 0 ; ... BEL`` retitles the window, ``ESC [ 8 m`` hides what follows,
a newline or ``U+2028`` forges a row, ``U+202E`` reverses the text after it, zero-width
characters make two different ids look alike, and a lone surrogate cannot even be encoded
(``print`` raises). :func:`escape` replaces each such character with a visible escape, so
what is printed is printable and on one line, and the same input always prints the same.

Escaped: every character of Unicode category Cc (C0, DEL, C1), Cf (format: bidi controls,
zero-width, BOM, tags, ...), Cs (surrogates), Co (private use), Cn (unassigned: their
meaning may change), Zl and Zp (line and paragraph separators), every Zs space other than
U+0020 (look-alike spacing), a combining mark at the start (it would combine with what
is printed before the value), every combining mark after the first
:data:`MAX_COMBINING` on one character ("Zalgo" text stacks marks until they cover the rows
above and below), and the backslash itself (so an escape in the output always came from
this function, never from the device). Nothing else is changed.

This module imports nothing of the project.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_COMBINING = frozenset({"Mn", "Me"})
MAX_COMBINING = 2  # combining marks kept on one character ("e\u0301" stays as it is)
ELLIPSIS = "..."
DEFAULT_LIMIT = 200  # characters of one device-supplied value in a table cell
_WIDE = frozenset({"W", "F"})


def _hex(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n <= 0xFF else f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def _pieces(s: str) -> Iterator[str]:
    """``s`` escaped, one piece per character (lazily: a cut stops the scan). A mark
    with no character of ``s`` kept before it (at the start, after an escape) is
    escaped: it would combine with whatever is printed there (a column's padding, a
    quote, the last character of an escape)."""
    marks = MAX_COMBINING
    for c in s:
        if unicodedata.category(c) in _COMBINING:
            marks += 1
            yield c if marks <= MAX_COMBINING else _hex(c)
        else:
            piece = _escape_char(c)
            marks = 0 if piece == c else MAX_COMBINING
            yield piece


def printed_widths(s: str) -> Iterator[int]:
    """The length of each character of ``s`` once escaped by :func:`escape`, in turn
    (lazily): what a cut that must bound the printed form counts."""
    return (len(p) for p in _pieces(s))


def _escape_char(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    if c == " " or unicodedata.category(c) not in _ESCAPED_CATEGORIES:
        return c
    return _hex(c)


def escape(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """``text`` (``str()`` of it if it is not a string) with every control and format
    character escaped, and cut to about ``limit`` characters (pure).

    Args:
        text: what a device supplied.
        limit: the most characters of output before the cut (the cut never splits an
            escape; ``...`` is appended); None for no cut.

    Returns:
        A string of printable characters only, with no line break.
    """
    return _cut(_pieces(text if isinstance(text, str) else str(text)), limit)


def _cut(pieces: Iterator[str], limit: int | None) -> str:
    """The pieces joined, cut before the piece that would pass ``limit`` characters."""
    out: list[str] = []
    used = 0
    for piece in pieces:
        if limit is not None and used + len(piece) > limit:
            out.append(ELLIPSIS)
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)


ID_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _id_char(c: str) -> str:
    return c if c in ID_ALPHABET else "\\\\" if c == "\\" else _hex(c)


def escape_id(text: object, limit: int | None = 64) -> str:
    """``text`` with every character outside the enrolled-id alphabet ``[A-Za-z0-9._-]``
    escaped (pure), and cut like :func:`escape`: for identifiers (device ids named by a
    topic, which the broker or a device chose). A space (``dev-9  ok  ok``) cannot make
    one id look like a row's cells, nor ``dеv-1`` with a Cyrillic ``е`` like ``dev-1``.
    Enrolled ids (``check_id``) print unchanged; the output is one token of ASCII."""
    s = text if isinstance(text, str) else str(text)
    return _cut((_id_char(c) for c in s), limit)


def escape_ascii(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    """``text`` as :func:`escape` prints it, and every character outside ASCII escaped too
    (``\\u0430``), cut to about ``limit`` characters of the output (pure): for names a
    device chooses that people compare by eye (a channel, model or version), so
    ``st\\u0430ble`` with a Cyrillic ``а`` never reads as ``stable``. Printable ASCII,
    the space included, prints unchanged; the output is ASCII."""
    s = text if isinstance(text, str) else str(text)
    return _cut((p if p.isascii() else "".join(_hex(c) for c in p) for p in _pieces(s)),
                limit)


def display_width(text: str) -> int:
    """The terminal columns ``text`` takes (pure; for text :func:`escape` has made
    printable): East Asian wide and fullwidth characters two, combining marks none,
    everything else one."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.category(c) in _COMBINING or unicodedata.combining(c)
               else 2 if unicodedata.east_asian_width(c) in _WIDE else 1 for c in text)


def pad(text: str, width: int) -> str:
    """``text`` followed by spaces up to ``width`` terminal columns (pure)."""
    return text + " " * (width - display_width(text))


def for_encoding(text: str, encoding: str | None) -> str:
    """``text`` with every character ``encoding`` (a stream's; None: UTF-8) cannot write
    replaced by its ``\\uNNNN`` escape (pure): printing it under a non-UTF-8 locale
    (``LANG=C``, ISO-8859-1) never raises ``UnicodeEncodeError``. Text from
    :func:`escape` has its backslashes doubled, so such an escape is never the device's."""
    enc = encoding or "utf-8"
    try:
        return text.encode(enc, "backslashreplace").decode(enc)
    except LookupError:  # an encoding Python does not know: ASCII is safe everywhere
        return text.encode("ascii", "backslashreplace").decode("ascii")


def is_clean(text: str) -> bool:
    """Whether ``text`` would print unchanged by :func:`escape` (without a cut)."""
    return all(p == c for p, c in zip(_pieces(text), text, strict=True))
