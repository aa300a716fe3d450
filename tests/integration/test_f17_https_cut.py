"""The in-place range reader (updater/transport/_fetcher ``_pieces``) against an origin
that closes the connection inside a range body, through real TLS: every byte that came
before the close is handed on, in order (so that a chunk altered before the cut is found
altered by the delta path), then a transfer failure (resumed), never a refusal."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tuf.api import exceptions as tuf_exc

from modelward.simulator._pki import CertPair
from modelward.updater.transport._ranges import RangeAnswerError
from tests.integration.test_i16_ranges import DATA, _https, _Origin


@pytest.fixture(scope="module")
def origin(pki: tuple[CertPair, CertPair]) -> Iterator[_Origin]:
    o = _Origin(pki[1])
    try:
        yield o
    finally:
        o.close()


@pytest.mark.parametrize("cut", [1, 65_537, 654_321, 999_999])
def test_f17_the_bytes_before_a_close_are_handed_on_then_a_transfer_failure(
        origin: _Origin, pki: tuple[CertPair, CertPair], cut: int) -> None:
    off, n = 3_000, 1_000_000
    origin.answer = lambda rs: (206, {"Content-Range": f"bytes {off}-{off + n - 1}/{len(DATA)}",
                                      "Content-Length": str(n), "Connection": "close"},
                                iter([DATA[off:off + cut]]))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    got = bytearray()
    with pytest.raises(tuf_exc.DownloadError) as ei:
        for p_off, piece in f.fetch_ranges(origin.url + "/x", [(off, n)]):
            assert p_off == off + len(got)
            got += piece
    assert not isinstance(ei.value, RangeAnswerError)  # (resumed, not refused)
    assert bytes(got) == DATA[off:off + cut]  # (all that came, nothing more)
