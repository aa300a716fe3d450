"""Attack (issue 16, the origin/CDN): the most a multipart answer the reader accepts can
make a device download for a delta of small scattered ranges (the tails of small files).

A hostile CDN pads every part header to ``MAX_PART_HEADER`` and coalesces as many gaps as
``merge_slack`` lets it: the reader accepts it (bytes handed on: exactly the requested
ones) and the body stays under the bound ``_multipart`` enforces. For 64 ranges of 100
bytes that bound is ~22x the bytes asked (64 KiB slack + ~1 KiB a part), and this body
~18x: bounded per request, not by what was asked.
"""

from __future__ import annotations

import random

from modelward.updater.transport._ranges import (
    MAX_PART_HEADER,
    ByteRangesReader,
    framing_bound,
    merge_slack,
)

DATA = random.Random(5).randbytes(1 << 20)
B = b"cdn"


def _hostile_body(ranges: list[tuple[int, int]]) -> bytes:
    """Parts that coalesce consecutive ranges while the slack lasts, each header padded."""
    slack = merge_slack(ranges)
    out, i = [], 0
    while i < len(ranges):
        j = i
        while j + 1 < len(ranges):
            gap = ranges[j + 1][0] - (ranges[j][0] + ranges[j][1])
            if gap > slack:
                break
            slack -= gap
            j += 1
        first, last = ranges[i][0], ranges[j][0] + ranges[j][1] - 1
        cr = f"Content-Range: bytes {first}-{last}/{len(DATA)}\r\n".encode()
        pad = b"X: " + b"p" * (MAX_PART_HEADER - len(cr) - 2 - 3 - 2) + b"\r\n"
        out.append(b"\r\n--" + B + b"\r\n" + pad + cr + b"\r\n" + DATA[first:last + 1])
        i = j + 1
    return b"".join(out) + b"\r\n--" + B + b"--\r\n"


def test_a_padded_coalescing_cdn_stays_within_the_bound() -> None:
    ranges = [(i * 3000, 100) for i in range(64)]
    body = _hostile_body(ranges)
    reader = ByteRangesReader(B, ranges)
    got = bytearray()
    for k in range(0, len(body), 1500):
        for _, piece in reader.feed(body[k:k + 1500]):
            got += piece
    reader.finish()
    assert bytes(got) == b"".join(DATA[o:o + n] for o, n in ranges)
    asked = sum(n for _, n in ranges)
    bound = asked + merge_slack(ranges) + framing_bound(ranges, B)
    assert len(body) <= bound
    assert 15 * asked < len(body)  # the amplification a hostile CDN gets: ~18x here
