"""Byte ranges over HTTP, as pure decisions: the ranges a request asks for, and a bounded,
incremental reader of what an origin answers (``multipart/byteranges``, a single-range
206, or a 200 that ignored the ``Range`` header). No I/O here: ``_fetcher`` feeds bytes.

What an origin answers is untrusted (the chunk hashes verify the bytes later): this module
only makes sure that nothing outside the requested ranges is handed on, that every
requested byte is handed on exactly once and in order, and that memory and the bytes read
stay bounded (RFC 9110 section 14 for ranges, RFC 2046 section 5.1.1 for the multipart
framing).

nginx (1.22, ``ngx_http_range_filter_module``): ``max_ranges`` is unlimited by default;
ranges are answered in request order, never merged; a request whose ranges add up to more
than the file is answered 200 with the whole file; unsatisfiable ranges are skipped (all
unsatisfiable: 416) and a range past the end is cut at the end; exactly one remaining
range gets a plain 206 with ``Content-Range``. Its request header buffers are
``large_client_header_buffers 4 8k``: a ``Range`` line over 8 KiB is answered 400, which
is why :func:`batch_ranges` keeps each line to :data:`MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tuf.api import exceptions as tuf_exc

MAX_BATCH_RANGES = 64  # ranges in one request at most
MAX_HEADER_BYTES = 3 * 1024  # bytes of one "Range:" value at most (nginx: 8 KiB lines)
MAX_PART_HEADER = 1024  # bytes of one part's boundary line remainder and headers
MAX_PREAMBLE = 1024  # bytes before the first delimiter
MAX_EPILOGUE = 256  # bytes after the close delimiter
DELIMITER_FRAMING = 8  # CRLF "--" ... "--" CRLF around each boundary
MERGE_SLACK = 64 * 1024  # unrequested bytes one batch may bring (coalesced parts), besides
MERGE_SLACK_SHARE = 16  # ... 1/16 of the batch's requested bytes

Range = tuple[int, int]  # (offset, length)
Piece = tuple[int, memoryview | bytes]  # (offset in the file, bytes): the brief's API

_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")
_CONTENT_RANGE = re.compile(rb"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)",
                            re.IGNORECASE)  # (range units compare case-insensitively)


class RangeAnswerError(tuf_exc.DownloadError):
    """The origin's answer to a range request does not match what was asked (a part out of
    order, a lying ``Content-Range``, framing over its bounds, a short body...).

    Attributes:
        url: what was fetched ("" until the fetcher sets it).
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(f"{url}: {message}" if url else message)
        self.url = url


def check_ranges(ranges: Sequence[Range]) -> None:
    """The caller's side of the contract: (offset, length) pairs, sorted, non-overlapping,
    with length >= 1 and offsets >= 0.

    Raises:
        ValueError: a range breaks it (a caller's bug, not the origin's).
    """
    end = 0
    for i, r in enumerate(ranges):
        if not (isinstance(r, tuple) and len(r) == 2):
            raise ValueError(f"range {i} is not an (offset, length) pair: {r!r}")
        off, ln = r
        if not (isinstance(off, int) and isinstance(ln, int)) or off < 0 or ln < 1 or \
                off + ln >= 2**63:
            raise ValueError(f"range {i} ({r!r}) is not an offset >= 0 and a length >= 1")
        if off < end:
            raise ValueError(f"range {i} ({r!r}) overlaps or precedes range {i - 1}")
        end = off + ln


def _spec(r: Range) -> str:
    return f"{r[0]}-{r[0] + r[1] - 1}"


def batch_ranges(ranges: Sequence[Range], max_ranges: int = MAX_BATCH_RANGES,
                 max_header: int = MAX_HEADER_BYTES) -> list[list[Range]]:
    """Split checked ``ranges`` into batches, in order, of at most ``max_ranges`` ranges
    whose ``Range`` value (:func:`range_header`) is at most ``max_header`` bytes."""
    batches: list[list[Range]] = []
    cur: list[Range] = []
    size = len("bytes=")
    for r in ranges:
        add = len(_spec(r)) + (1 if cur else 0)
        if cur and (len(cur) >= max_ranges or size + add > max_header):
            batches.append(cur)
            cur, size, add = [], len("bytes="), len(_spec(r))
        cur.append(r)
        size += add
    if cur:
        batches.append(cur)
    return batches


def range_header(batch: Sequence[Range]) -> str:
    """The ``Range`` header value for ``batch``."""
    return "bytes=" + ",".join(_spec(r) for r in batch)


def merge_slack(batch: Sequence[Range]) -> int:
    """Unrequested bytes a batch's answer may carry inside coalesced parts, at most."""
    return MERGE_SLACK + sum(ln for _, ln in batch) // MERGE_SLACK_SHARE


def framing_bound(batch: Sequence[Range], boundary: bytes) -> int:
    """The most bytes a multipart answer to ``batch`` may carry besides the parts' data."""
    per_part = len(boundary) + DELIMITER_FRAMING + MAX_PART_HEADER
    return MAX_PREAMBLE + len(batch) * per_part + per_part + MAX_EPILOGUE


def parse_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/byteranges`` Content-Type.

    Raises:
        RangeAnswerError: not that type, no boundary, two, or one outside RFC 2046's
            1 to 70 characters (bchars without space).
    """
    if len(content_type) > 512:
        raise RangeAnswerError("a Content-Type header over 512 characters")
    kind, *params = content_type.split(";")
    if kind.strip().lower() != "multipart/byteranges":
        raise RangeAnswerError(f"a 206 of Content-Type {kind.strip()[:80]!r} to a multi-range "
                               "request, not multipart/byteranges")
    found: list[str] = []
    for p in params:
        name, eq, value = p.strip().partition("=")
        if eq and name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            found.append(value)
    if len(found) != 1:
        raise RangeAnswerError(f"multipart/byteranges with {len(found)} boundary parameters")
    if not _BCHARS.fullmatch(found[0]):
        raise RangeAnswerError(f"an invalid multipart boundary {found[0][:80]!r}")
    return found[0].encode("ascii")


@dataclass(frozen=True)
class ContentRange:
    """``bytes first-last/total`` (total None for ``*``)."""

    first: int
    last: int
    total: int | None


def parse_content_range(value: bytes | str) -> ContentRange:
    """A strict ``Content-Range`` value.

    Raises:
        RangeAnswerError: malformed, first > last, or last beyond the total.
    """
    raw = value.encode("latin-1") if isinstance(value, str) else value
    m = _CONTENT_RANGE.fullmatch(raw.strip(b" \t"))
    if m is None:
        raise RangeAnswerError(f"a malformed Content-Range {raw[:80]!r}")
    first, last = int(m[1]), int(m[2])
    total = None if m[3] == b"*" else int(m[3])
    if first > last or (total is not None and last >= total):
        raise RangeAnswerError(f"an impossible Content-Range {raw[:80]!r}")
    return ContentRange(first, last, total)


class Cover:
    """Hands on, from contiguous bytes of the file, only those inside the requested ranges,
    each once and in order; counts what it skipped."""

    def __init__(self, ranges: Sequence[Range]) -> None:
        self.ranges = ranges
        self.ends = [off + ln for off, ln in ranges]
        self.index = 0  # the range the next requested byte belongs to
        self.skipped = 0  # bytes fed that were not asked for

    @property
    def done(self) -> bool:
        """Every requested byte has been handed on."""
        return self.index >= len(self.ranges)

    @property
    def last_end(self) -> int:
        """One past the last requested byte."""
        return self.ends[-1] if self.ends else 0

    def pieces(self, pos: int, data: memoryview) -> Iterator[Piece]:
        """The requested bytes among ``data``, which holds the file's bytes from ``pos``
        (the caller guarantees ``pos`` never moves back past a byte handed on)."""
        n = len(self.ranges)
        while data and self.index < n:
            off = self.ranges[self.index][0]
            end = self.ends[self.index]
            if pos < off:
                skip = min(off - pos, len(data))
                self.skipped += skip
                data, pos = data[skip:], pos + skip
                continue
            take = min(end - pos, len(data))
            yield pos, data[:take]
            data, pos = data[take:], pos + take
            if pos >= end:
                self.index += 1
        self.skipped += len(data)

    def span_for(self, cr: ContentRange) -> int:
        """Check that ``cr`` starts at the next requested range and ends exactly at the end
        of one (itself or a later one: an origin may coalesce ranges); the index of that
        last range.

        Raises:
            RangeAnswerError: it does not.
        """
        if self.done:
            raise RangeAnswerError(f"a part (bytes {cr.first}-{cr.last}) beyond the "
                                   f"{len(self.ranges)} requested ranges")
        off = self.ranges[self.index][0]
        j = bisect.bisect_left(self.ends, cr.last + 1, lo=self.index)
        if cr.first != off or j >= len(self.ends) or self.ends[j] != cr.last + 1:
            raise RangeAnswerError(
                f"a part of bytes {cr.first}-{cr.last} where the next requested range is "
                f"{_spec(self.ranges[self.index])} (out of order, unrequested, overlapping "
                "or cut short)")
        return j


class _State:
    PREAMBLE, HEAD, DATA, DELIM, EPILOGUE = range(5)


class ByteRangesReader:
    """An incremental, bounded reader of a ``multipart/byteranges`` body answering
    ``ranges`` (the batch asked for, in order).

    Each part's ``Content-Range`` must be the next requested range exactly (or cover
    several consecutive ones exactly, from the first one's start: coalesced, with at most
    :func:`merge_slack` unrequested bytes in all); a part header is at most
    :data:`MAX_PART_HEADER` bytes; the preamble and epilogue are bounded. Only header
    bytes are buffered: the parts' data is handed on as views of what was fed.

    Raises (from :meth:`feed` and :meth:`finish`):
        RangeAnswerError: the body breaks any of that.
    """

    def __init__(self, boundary: bytes, ranges: Sequence[Range]) -> None:
        self.cover = Cover(ranges)
        self._dash = b"--" + boundary
        self._delim = b"\r\n" + self._dash
        self._state = _State.PREAMBLE
        self._buf = bytearray()
        self._pos = 0  # file offset of the next data byte
        self._left = 0  # data bytes left in the current part
        self._slack = merge_slack(ranges)
        self._total: int | None = None
        self._epilogue = 0
        self.parts = 0

    @property
    def done(self) -> bool:
        """The close delimiter has been read (and every range was covered)."""
        return self._state == _State.EPILOGUE

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        """The requested bytes in the next ``data`` of the body."""
        view = memoryview(data)
        while view:
            st = self._state
            if st == _State.DATA:
                take = min(self._left, len(view))
                yield from self.cover.pieces(self._pos, view[:take])
                self._pos += take
                self._left -= take
                view = view[take:]
                if not self._left:
                    self._state = _State.DELIM
            elif st == _State.EPILOGUE:
                self._epilogue += len(view)
                if self._epilogue > MAX_EPILOGUE:
                    raise RangeAnswerError(f"over {MAX_EPILOGUE} bytes after the close "
                                           "delimiter")
                return
            else:
                view = self._framing(view)

    def _framing(self, view: memoryview) -> memoryview:
        """Buffer framing bytes (bounded) and act once a delimiter or header is complete;
        the bytes of ``view`` not consumed."""
        st, buf = self._state, self._buf
        if st == _State.DELIM:  # exactly CRLF "--" boundary after a part's data
            need = len(self._delim) - len(buf)
            buf += view[:need]
            if not self._delim.startswith(bytes(buf)):
                raise RangeAnswerError(f"part {self.parts} is longer than its Content-Range "
                                       "(no delimiter after its data)")
            if len(buf) == len(self._delim):
                buf.clear()
                self._state = _State.HEAD
            return view[need:]
        keep = len(buf)
        if st == _State.PREAMBLE:  # [preamble CRLF] "--" boundary
            limit = MAX_PREAMBLE + len(self._delim)
            buf += view[:limit - keep]
            if buf.startswith(self._dash):
                token_end = len(self._dash)
            elif (at := buf.find(self._delim)) >= 0:
                token_end = at + len(self._delim)
            elif len(buf) >= limit:
                raise RangeAnswerError(f"no multipart delimiter in the first {MAX_PREAMBLE} "
                                       "bytes")
            else:
                return view[len(view):]
            buf.clear()
            self._state = _State.HEAD
            return view[token_end - keep:]
        # HEAD, after a delimiter: "--" (the close delimiter) or [LWSP] CRLF headers CRLF
        limit = MAX_PART_HEADER + 4
        buf += view[:limit - keep]
        if len(buf) >= 2 and buf[:2] == b"--":
            if not self.cover.done:
                raise RangeAnswerError(
                    f"the body ended after {self.parts} parts, before range "
                    f"{_spec(self.cover.ranges[self.cover.index])}")
            buf.clear()
            self._state = _State.EPILOGUE
            return view[2 - keep:]
        if len(buf) >= 2 and self.cover.done:
            raise RangeAnswerError(f"a part beyond the {len(self.cover.ranges)} requested "
                                   "ranges")
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_PART_HEADER:
                raise RangeAnswerError(f"a part header over {MAX_PART_HEADER} bytes")
            return view[len(view):]
        header = bytes(buf[:end])
        buf.clear()
        self._start_part(header)
        return view[end + 4 - keep:]

    def _start_part(self, header: bytes) -> None:
        lines = header.split(b"\r\n")
        if lines[0].strip(b" \t"):
            raise RangeAnswerError("a multipart delimiter followed by other characters")
        found: list[bytes] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or not name.isascii():
                raise RangeAnswerError(f"a malformed part header line {line[:80]!r}")
            if name.lower() == b"content-range":
                found.append(value)
        if len(found) != 1:
            raise RangeAnswerError(f"a part with {len(found)} Content-Range headers")
        cr = parse_content_range(found[0])
        if self._total is not None and cr.total is not None and cr.total != self._total:
            raise RangeAnswerError(f"parts give the file's size as {self._total} and "
                                   f"{cr.total}")
        self._total = self._total if cr.total is None else cr.total
        j = self.cover.span_for(cr)
        length = cr.last + 1 - cr.first
        asked = sum(ln for _, ln in self.cover.ranges[self.cover.index:j + 1])
        self._slack -= length - asked
        if self._slack < 0:
            raise RangeAnswerError(f"a part of bytes {cr.first}-{cr.last} coalesces more "
                                   "unrequested bytes than allowed")
        self.parts += 1
        self._pos, self._left = cr.first, length
        self._state = _State.DATA

    def finish(self) -> None:
        """The body ended here.

        Raises:
            RangeAnswerError: before the close delimiter (a short body).
        """
        if not self.done:
            missing = self.cover.ranges[self.cover.index] if not self.cover.done else None
            raise RangeAnswerError(
                "the multipart body ended early" +
                (f", before the end of range {_spec(missing)}" if missing else
                 " (no close delimiter)"))
