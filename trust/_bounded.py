"""Bounded before verified: the one JSON parser and the one local-file reader for bytes
nobody has verified yet (network payloads, files under ``state_dir``, a child's output).

* :func:`loads_bounded` checks the size and the nesting depth with a cheap scan before
  ``json.loads`` (whose recursion would otherwise raise ``RecursionError``, a
  ``RuntimeError`` that ``except ValueError`` lets through), refuses ``NaN``/``Infinity``,
  non-finite numbers and an object with the same key twice (which ``json.loads`` would
  resolve to the last one, and another parser to the first: a signed document two tools
  read differently), and turns every way the parse can fail into
  :class:`UntrustedJsonError`, a ``ValueError``: the caller converts it into its own typed
  error naming the thing at fault.
* :func:`read_bounded` opens a file without following a link or blocking (a FIFO), checks
  with ``fstat`` that it is a regular file (with one link where that matters) and reads at
  most ``limit`` bytes: a planted sparse file or ``/dev/zero`` costs nothing. What was
  planted is an :class:`UnsafeFileError` (an ``OSError``) with the reason in ``reason``.

This module imports nothing of the project, so ``agent``, ``updater`` and ``publisher``
can all use it cheaply.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

DEFAULT_MAX_DEPTH = 32  # every document modelward writes nests at most ~8 deep

# The depth pre-scan runs on bytes nobody has verified (before any signature check), so
# it must be linear in every input. Two regex passes, each linear because no pattern can
# be retried over text another attempt already scanned: first every escape pair ``\\x``
# goes (left to right, so ``\\\\"`` keeps its quote); then every string, now free of
# backslashes, is ``"[^"]*"``: an attempt ends at the next quote, and only an unclosed
# last one runs to the end, once. (The old single pattern for a string with escapes was
# retried from every escaped quote of an unclosed string: quadratic, ~10 s for 64 KiB.)
_ESCAPE_B = re.compile(rb"\\.", re.DOTALL)
_ESCAPE_S = re.compile(r"\\.", re.DOTALL)
_PLAIN_STRING_B = re.compile(rb'"[^"]*"')
_PLAIN_STRING_S = re.compile(r'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class UntrustedJsonError(ValueError):
    """Bytes that are not one bounded, plain JSON document.

    Attributes:
        what: the thing the bytes claim to be (a file, a topic, ...).
    """

    def __init__(self, message: str, *, what: str) -> None:
        super().__init__(message)
        self.what = what


class UnsafeFileError(OSError):
    """A local file that the agent would not have written: a symlink, a FIFO or device, a
    hard link, or one over its bound.

    Attributes:
        path: the file.
        reason: what is wrong ("is a symlink", "is not a regular file", ...).
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def json_depth(data: bytes | bytearray | str, limit: int) -> int:
    """The bracket nesting depth of ``data`` outside JSON strings, counted up to
    ``limit + 1`` (the scan stops there), in time linear in ``len(data)`` whatever it is.

    Exact for JSON. An unterminated string counts its brackets, and a backslash outside a
    string swallows the character after it: both only in input ``json.loads`` refuses at
    or before that point, so what it would recurse into is still counted."""
    if isinstance(data, str):
        rest = _PLAIN_STRING_S.sub("", _ESCAPE_S.sub("", data)).encode("utf-8", "replace")
    else:
        rest = _PLAIN_STRING_B.sub(b"", _ESCAPE_B.sub(b"", data))
    brackets = rest.translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for c in brackets:
        if c in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"number {text[:20]}... is out of range")
    return f


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key[:40]!r} appears twice in one object")
            seen.add(key)
    return obj


def loads_bounded(data: bytes | bytearray | str, *, max_bytes: int, what: str,
                  max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``json.loads(data)`` for bytes nobody has verified yet.

    Args:
        data: the document (bytes must be UTF-8).
        max_bytes: the most bytes (or characters) the document may have.
        what: names the document in the error.
        max_depth: the most nested arrays/objects.

    Raises:
        UntrustedJsonError: over ``max_bytes``, nested deeper than ``max_depth``, not JSON,
            not decodable, ``NaN``/``Infinity``, a number out of range or too many digits,
            a key twice in one object.
    """
    if len(data) > max_bytes:
        raise UntrustedJsonError(f"{what} is over {max_bytes} bytes", what=what)
    if not isinstance(data, str):
        try:  # UTF-8 only (all modelward writes): the scan below then sees every bracket
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UntrustedJsonError(f"{what} is not UTF-8: {e}", what=what) from e
    if json_depth(data, max_depth) > max_depth:
        raise UntrustedJsonError(f"{what} is nested deeper than {max_depth}", what=what)
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError, TypeError) as e:  # UnicodeDecodeError: ValueError
        raise UntrustedJsonError(f"{what} is not valid JSON: {str(e)[:200]}",
                                 what=what) from e


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device or special file")


def read_bounded(path: Path, limit: int, *, single_link: bool = False,
                 parent_nofollow: bool = False, cut: bool = False) -> bytes | None:
    """The bytes of ``path`` (None if it does not exist), at most ``limit``.

    Opened ``O_NOFOLLOW | O_NONBLOCK`` (a symlink is refused, a FIFO does not block), then
    ``fstat`` on what was opened: a regular file, with one link if ``single_link`` (a hard
    link could be the name of a file outside ``state_dir``), no larger than ``limit``; at
    most ``limit + 1`` bytes are read whatever ``st_size`` says.

    Args:
        path: the file.
        limit: the most bytes it may have.
        single_link: refuse a file with more than one hard link.
        parent_nofollow: open ``path.parent`` without following a link too (a missing
            parent is a missing file).
        cut: return the first ``limit`` bytes of a larger file instead of refusing it (an
            append-only log whose torn tail is normal).

    Raises:
        UnsafeFileError: not something the agent writes (symlink, not a regular file, hard
            link, over ``limit``), or a parent that is not a directory.
        OSError: any other I/O or permission error.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    dfd: int | None = None
    if parent_nofollow:
        try:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFileError(path, f"is unusable: {path.parent} is not a directory "
                                            "(a symlink?)") from e
            raise
    try:
        try:
            fd = (os.open(path.name, flags, dir_fd=dfd) if dfd is not None
                  else os.open(path, flags))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFileError(path, "is a symlink (not followed)") from e
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFileError(path, f"is not a regular file ({_kind(st.st_mode)})")
            if single_link and st.st_nlink != 1:
                raise UnsafeFileError(path, f"has {st.st_nlink} hard links")
            if st.st_size > limit and not cut:
                raise UnsafeFileError(path, f"is over {limit} bytes")
            chunks: list[bytes] = []
            left = limit + (not cut)
            while left > 0 and (chunk := os.read(fd, left)):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
    finally:
        if dfd is not None:
            os.close(dfd)
    data = b"".join(chunks)
    if len(data) > limit:  # (never with cut)
        raise UnsafeFileError(path, f"is over {limit} bytes")
    return data


def read_json_file(path: Path, limit: int, *, what: str | None = None,
                   max_depth: int = DEFAULT_MAX_DEPTH, single_link: bool = False) -> Any:
    """:func:`read_bounded` then :func:`loads_bounded`; None if the file does not exist.

    Raises:
        UnsafeFileError, OSError: as :func:`read_bounded`.
        UntrustedJsonError: as :func:`loads_bounded`.
    """
    data = read_bounded(path, limit, single_link=single_link)
    if data is None:
        return None
    return loads_bounded(data, max_bytes=limit, what=what or str(path), max_depth=max_depth)
