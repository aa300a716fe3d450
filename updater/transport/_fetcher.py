"""HTTPS transport: a requests-based ``tuf.ngclient.FetcherInterface`` with Range resume."""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from modelward.updater._config import HttpsConfig
from modelward.updater.errors import OperatorInputError
from modelward.updater.transport._ranges import (
    ByteRangesReader,
    Cover,
    Piece,
    Range,
    RangeAnswerError,
    batch_ranges,
    check_ranges,
    framing_bound,
    merge_slack,
    parse_boundary,
    parse_content_range,
    range_header,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_FIRST_READ = 64 * 1024
_SMALLEST_READ = 16 * 1024
_LONGEST_CHUNK = 1.0  # seconds a chunk is gathered at most before it is handed on
_ERROR_BODY_MAX = 4096  # bytes of an error answer read (to reuse the connection), at most


class _HeaderDeadlineConnection(HTTPSConnection):
    """An HTTPS connection whose response headers must all arrive within
    ``header_timeout`` seconds of the request: the socket is shut down when they do not.
    ``read_timeout`` bounds only the gap between two bytes, and a status line and header
    lines trickled a byte at a time stay under it for hours."""

    header_timeout: float = 30.0

    def getresponse(self) -> Any:  # noqa: D102 - as urllib3's
        sock = self.sock
        timer, cut = None, threading.Event()
        if isinstance(sock, socket.socket):
            timer = threading.Timer(self.header_timeout, _cut, (sock, cut))
            timer.daemon = True
            timer.start()
        try:
            resp = super().getresponse()
        finally:
            if timer is not None:
                timer.cancel()
        if cut.is_set():  # (headers cut short parse as complete: not an answer)
            resp.close()
            raise TimeoutError(f"no complete response headers within {self.header_timeout}s")
        return resp


def _cut(sock: socket.socket, cut: threading.Event) -> None:
    """End a transfer from another thread: the blocked read returns."""
    logger.warning("the origin sent no complete response headers in time: disconnecting")
    cut.set()
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # (not SSLSocket's: no TLS state)


class _HeaderDeadlineAdapter(HTTPAdapter):
    """requests' adapter with :class:`_HeaderDeadlineConnection` for https://."""

    def __init__(self, header_timeout: float) -> None:
        self._header_timeout = header_timeout
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        super().init_poolmanager(*args, **kwargs)
        conn_cls = type("HeaderDeadlineConnection", (_HeaderDeadlineConnection,),
                        {"header_timeout": self._header_timeout})
        pool_cls = type("HeaderDeadlinePool", (HTTPSConnectionPool,),
                        {"ConnectionCls": conn_cls})
        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme, "https": pool_cls}


def _drain_error_body(resp: requests.Response) -> None:
    """Read a small error body to its end, so that the connection goes back to the pool
    (every refresh asks for the next root and gets a 404; closing it unread cost a new TLS
    handshake per refresh); close any other.

    Only a plain body of a stated ``Content-Length`` of at most :data:`_ERROR_BODY_MAX`
    bytes is read, raw: never decoded (a 64 KiB gzip body was 64 MiB once inflated), and
    never a chunked one (``Transfer-Encoding`` overrides ``Content-Length``: the origin
    alone decides where it ends).
    """
    try:
        length = resp.headers.get("Content-Length", "")
        if "Transfer-Encoding" not in resp.headers and length.isascii() and \
                length.isdecimal() and len(length) <= 5 and int(length) <= _ERROR_BODY_MAX:
            resp.raw.read(int(length), decode_content=False)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError):
        pass
    finally:
        resp.close()


class RangeFetcher(FetcherInterface):
    """A fetcher that can also continue a download from an offset (for staging resume).

    Attributes:
        bytes_received: payload bytes received so far (metrics).
        range_skipped: bytes received for :meth:`fetch_ranges` that were not asked for
            (multipart framing, gaps of coalesced parts, an origin that ignores ranges).
    """

    bytes_received: int = 0
    range_skipped: int = 0
    last_url: str = ""
    metadata_timeout: float = 120.0  # seconds one metadata download may take in all

    def fetch(self, url: str) -> Iterator[bytes]:
        """Fetch ``url`` (remembered as :attr:`last_url`, for error messages)."""
        self.last_url = url
        return super().fetch(url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Download metadata into memory (ngclient's default goes through a temporary file
        per request; TUF bounds every metadata file's length, so memory is bounded too).

        A transport yields at least every ``read_timeout`` (HTTPS: every second or so), so
        :attr:`metadata_timeout` bounds the whole download.

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: more than ``max_length`` bytes.
            tuf.api.exceptions.SlowRetrievalError: longer than :attr:`metadata_timeout`.
            tuf.api.exceptions.DownloadError: the transfer failed.
        """
        chunks: list[bytes] = []
        received = 0
        deadline = time.monotonic() + self.metadata_timeout
        for chunk in self.fetch(url):
            if time.monotonic() > deadline:
                raise tuf_exc.SlowRetrievalError(
                    f"{url}: {received + len(chunk)} bytes after {self.metadata_timeout:.0f}s"
                    f", the most one metadata file may take (slow retrieval)")
            received += len(chunk)
            if received > max_length:
                raise tuf_exc.DownloadLengthMismatchError(
                    f"Downloaded {received} bytes exceeding the maximum allowed length of "
                    f"{max_length}")
            chunks.append(chunk)
        return b"".join(chunks)

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        """Fetch ``url`` from byte ``offset``.

        Returns:
            The chunks, and the offset they actually start at (0 if the server
            ignored the range and sends the whole file).

        Raises:
            tuf.api.exceptions.DownloadError: the transfer failed.
        """
        if offset == 0:
            return self.fetch(url), 0
        self.last_url = url
        try:
            return self._fetch_from(url, offset)
        except tuf_exc.DownloadError:
            raise
        except Exception as e:  # noqa: BLE001 - FetcherInterface contract: wrap the rest
            raise tuf_exc.DownloadError(f"Failed to download {url}") from e

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        return self._fetch(url), 0

    def fetch_ranges(self, url: str, ranges: Sequence[Range]) -> Iterator[Piece]:
        """The bytes of ``url`` in ``ranges`` ((offset, length) pairs, sorted,
        non-overlapping): (offset, data) pieces that cover each range exactly, in order, and
        nothing outside them. Memory stays bounded (a piece is at most one read).

        Raises:
            ValueError: ``ranges`` breaks that contract (at once, not while iterating).
            tuf.api.exceptions.DownloadError: while iterating: the transfer failed or the
                origin's answer does not match the ranges (:class:`RangeAnswerError`).
        """
        check_ranges(ranges)
        self.last_url = url
        return self._guarded_ranges(url, list(ranges))

    def _guarded_ranges(self, url: str, ranges: list[Range]) -> Iterator[Piece]:
        if not ranges:
            return
        try:
            yield from self._fetch_ranges(url, ranges)
        except RangeAnswerError as e:
            if e.url:
                raise
            raise RangeAnswerError(str(e), url) from e
        except tuf_exc.DownloadError:
            raise
        except Exception as e:  # noqa: BLE001 - FetcherInterface contract: wrap the rest
            raise tuf_exc.DownloadError(f"Failed to download {url}") from e

    def _fetch_ranges(self, url: str, ranges: list[Range]) -> Iterator[Piece]:
        """Ranges from one stream that starts at the first one (a transport without a
        native way; the in-memory harness): what lies between them is read and dropped."""
        chunks, pos = self.fetch_from(url, ranges[0][0])
        cover = Cover(ranges)
        if pos > ranges[0][0]:
            raise RangeAnswerError(f"a stream from {pos}, past the range at {ranges[0][0]}")
        try:
            for chunk in chunks:
                view = memoryview(chunk)[:max(0, cover.last_end - pos)]
                yield from cover.pieces(pos, view)
                pos += len(view)
                if cover.done:
                    break
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        self.range_skipped += cover.skipped
        if not cover.done:
            raise RangeAnswerError(f"the file ended at {pos}, before the end of the range "
                                   f"at {ranges[cover.index][0]}")

    def _counted(self, pieces: Iterable[Piece]) -> Iterator[Piece]:
        for off, data in pieces:
            self.bytes_received += len(data)
            yield off, data


class RequestsFetcher(RangeFetcher):
    """HTTPS fetcher on a persistent ``requests.Session``, with the origin's CA pinned.

    Raises:
        OperatorInputError: a URL is not https:// or the CA file is missing.

    Attributes:
        stable_pieces: the pieces :meth:`fetch_ranges` yields are views of buffers never
            written again (the delta path hashes and writes chunks from them, uncopied).
    """

    stable_pieces: bool = True

    def __init__(self, config: HttpsConfig) -> None:
        for url in (config.metadata_url, config.targets_url):
            if not url.startswith("https://"):
                raise OperatorInputError(
                    f"{url!r} is not an https:// URL", hint="modelward only fetches over TLS"
                )
        self._config = config
        self.metadata_timeout = config.metadata_timeout
        self._session = requests.Session()
        # Pinning: the environment (REQUESTS_CA_BUNDLE, proxies, .netrc) must not widen
        # whom we trust or where we connect; requests lets REQUESTS_CA_BUNDLE override
        # Session.verify, so verify is also passed on every request.
        self._session.trust_env = False
        self._session.mount("https://", _HeaderDeadlineAdapter(config.header_timeout))
        self._verify: str | bool = config.ca_file if config.ca_file is not None else True
        self._session.headers["User-Agent"] = "modelward-agent"

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        cfg = self._config
        try:
            resp = self._session.get(
                url,
                stream=True,
                timeout=(cfg.connect_timeout, cfg.read_timeout),
                headers=headers,
                allow_redirects=False,
                verify=self._verify,
            )
        except requests.exceptions.SSLError as e:
            raise tuf_exc.DownloadError(
                f"TLS verification of {url} failed (is the origin's CA the pinned ca_file?)"
            ) from e
        except requests.RequestException as e:
            raise tuf_exc.DownloadError(f"cannot reach {url}: {type(e).__name__}") from e
        if resp.status_code not in (200, 206):
            _drain_error_body(resp)
            raise tuf_exc.DownloadHTTPError(
                f"{url} answered HTTP {resp.status_code}", resp.status_code
            )
        return resp

    def _chunks(self, resp: requests.Response, url: str, limit: int | None = None,
                count: bool = True) -> Iterator[bytes]:
        """The body in chunks that adapt to the link: one that fills in under 50 ms
        doubles the next (up to ``chunk_size``), one that takes over a second halves it.

        Big chunks cost far less per byte (a 512 MiB bundle: 3.3 s in 64 KiB reads, 1.7 s
        in 1 MiB reads). A chunk is gathered from reads that return what has arrived
        (``read1``), never waiting for a full one: the slow-retrieval check runs after
        every read (at least every ``read_timeout``), and a chunk is handed on after at
        most a second however little it holds, so that the caller's heartbeat goes on. A
        plain ``read(size)`` returned only once full: a byte every 0.2 s held its 64 KiB
        for 3.6 h, under ``read_timeout`` and never measured against ``min_speed``.

        At most ``limit`` bytes are read (None: to the end); ``count``: add them to
        :attr:`bytes_received` (range answers count only the requested bytes).

        Raises:
            tuf.api.exceptions.SlowRetrievalError: under ``min_speed`` over a window.
            tuf.api.exceptions.DownloadError: the transfer broke off.
        """
        raw = resp.raw
        parts: list[bytes] = []

        def read1(n: int) -> int:
            part = raw.read1(n, decode_content=False)
            parts.append(part)
            return len(part)

        def gathered(have: int) -> bytes:
            out = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            return out

        try:
            yield from self._paced(url, lambda n: None, read1, gathered, limit, count)
            if limit is not None and raw.length_remaining == 0:
                raw.read(0, decode_content=False)  # at the end: the connection is reused
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise tuf_exc.DownloadError(f"Transfer of {url} broke off: {e}") from e
        finally:
            resp.close()

    def _pieces(self, resp: requests.Response, url: str, limit: int) -> Iterator[memoryview]:
        """Like :meth:`_chunks` (``count=False``) for a range answer, but each chunk is a
        view of a fresh buffer filled in place by the socket's own buffered reader (one
        call per TLS record instead of four layers of urllib3 and http.client, and no
        copy), never written again once handed on (:attr:`stable_pieces`). At most
        ``limit`` bytes, and never past the stated ``Content-Length``, are read; the
        connection is then closed (urllib3 did not count what was read: it must not
        reuse it).

        A body of no stated length, a chunked one, or one that urllib3 holds otherwise
        than expected is read by :meth:`_chunks`.
        """
        reader = _body_readinto(resp)
        if reader is None:
            for chunk in self._chunks(resp, url, limit=limit, count=False):
                yield memoryview(chunk)
            return
        readinto, stated = reader
        fill = _Fill(readinto)
        want, handed = min(limit, stated), 0
        try:
            for piece in self._paced(url, fill.start, fill.read1, fill.gathered, want, False):
                handed += len(piece)
                yield piece
            if handed < want:  # (as urllib3's IncompleteRead: a transfer cut, not a short
                # answer; raised after the bytes that came were handed on, so that a chunk
                # altered before the cut is found altered, not taken for the cut's victim)
                raise tuf_exc.DownloadError(f"the connection closed after {handed} of the "
                                            f"{stated} bytes of the body of {url}")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                ValueError) as e:
            raise tuf_exc.DownloadError(f"Transfer of {url} broke off: {e}") from e
        finally:
            resp.close()

    def _paced(self, url: str, start: Callable[[int], None], read1: Callable[[int], int],
               gathered: Callable[[int], _T], limit: int | None,
               count: bool) -> Iterator[_T]:
        """The pacing of :meth:`_chunks`, over ``start`` (a chunk of at most that many
        bytes begins), ``read1`` (read what has arrived into it, at most that many bytes;
        0 at the end) and ``gathered`` (the chunk of the bytes read)."""
        cfg = self._config
        size = min(_FIRST_READ, cfg.chunk_size)
        window_start, window_bytes = time.monotonic(), 0
        left = -1 if limit is None else limit  # (-1: no limit)
        while left:
            started = now = time.monotonic()
            want = size if left < 0 else min(size, left)
            start(want)
            have = 0
            while have < want and now - started <= _LONGEST_CHUNK:
                got = read1(want - have)
                if not got:
                    break
                have += got
                window_bytes += got
                now = time.monotonic()
                elapsed = now - window_start
                if elapsed >= cfg.min_speed_window:
                    if window_bytes < cfg.min_speed * elapsed:
                        raise tuf_exc.SlowRetrievalError(
                            f"{url} sent {window_bytes} bytes in {elapsed:.1f}s, under "
                            f"the minimum of {cfg.min_speed} bytes/s (slow retrieval)")
                    window_start, window_bytes = now, 0
            if not have:
                break
            took = now - started
            if have >= size and took < 0.05:
                size = min(size * 2, cfg.chunk_size)
            elif took > 1.0:
                size = max(size // 2, _SMALLEST_READ)
            if count:
                self.bytes_received += have
            if left > 0:
                left -= have
            yield gathered(have)

    def _fetch(self, url: str) -> Iterator[bytes]:
        resp = self._get(url, {"Accept-Encoding": "identity"})
        return self._chunks(resp, url)

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        resp = self._get(url, {"Accept-Encoding": "identity", "Range": f"bytes={offset}-"})
        start = offset if resp.status_code == 206 else 0
        return self._chunks(resp, url), start

    def _fetch_ranges(self, url: str, ranges: list[Range]) -> Iterator[Piece]:
        """Multi-range requests of :func:`batch_ranges`, each answer streamed."""
        done = 0
        for batch in batch_ranges(ranges):
            resp = self._get(url, {"Accept-Encoding": "identity",
                                   "Range": range_header(batch)})
            if resp.status_code == 200:
                logger.warning("%s ignores Range requests: reading it from the start up to "
                               "the last range's end", url)
                yield from self._ranges_of_whole(resp, url, ranges[done:])
                return
            yield from self._ranges_of_partial(resp, url, batch)
            done += len(batch)

    def _ranges_of_whole(self, resp: requests.Response, url: str,
                         ranges: list[Range]) -> Iterator[Piece]:
        """A 200 (the origin ignored the ranges): the requested bytes, up to the last."""
        cover = Cover(ranges)
        pos = 0
        try:
            _check_identity(resp)
            length = _content_length(resp)
            if length is not None and length < cover.last_end:
                raise RangeAnswerError(f"the origin sends the whole file, of {length} bytes, "
                                       f"and the ranges end at {cover.last_end}")
            for chunk in self._pieces(resp, url, cover.last_end):
                yield from self._counted(cover.pieces(pos, memoryview(chunk)))
                pos += len(chunk)
        finally:
            resp.close()
            self.range_skipped += cover.skipped
        if not cover.done:
            raise RangeAnswerError(f"the body ended at {pos}, before the end of the range "
                                   f"at {ranges[cover.index][0]}")

    def _ranges_of_partial(self, resp: requests.Response, url: str,
                           batch: list[Range]) -> Iterator[Piece]:
        """A 206: one part (``Content-Range``) or ``multipart/byteranges``."""
        try:
            _check_identity(resp)
            if "Content-Range" in resp.headers:
                yield from self._single_part(resp, url, batch)
            else:
                yield from self._multipart(resp, url, batch)
        finally:
            resp.close()

    def _single_part(self, resp: requests.Response, url: str,
                     batch: list[Range]) -> Iterator[Piece]:
        if resp.headers.get("Content-Type", "").lower().startswith("multipart/"):
            raise RangeAnswerError("a multipart 206 with a Content-Range header")
        cr = parse_content_range(resp.headers["Content-Range"])
        cover = Cover(batch)
        last = cover.span_for(cr)
        span = cr.last + 1 - cr.first
        if last != len(batch) - 1:
            raise RangeAnswerError(f"one range, bytes {cr.first}-{cr.last}, answers only "
                                   f"{last + 1} of the {len(batch)} ranges asked")
        if span - sum(ln for _, ln in batch) > merge_slack(batch):
            raise RangeAnswerError(f"bytes {cr.first}-{cr.last} coalesce more unrequested "
                                   "bytes than allowed")
        length = _content_length(resp)
        if length is not None and length != span:
            raise RangeAnswerError(f"a Content-Length of {length} for bytes "
                                   f"{cr.first}-{cr.last}")
        pos = cr.first
        for chunk in self._pieces(resp, url, span):
            yield from self._counted(cover.pieces(pos, memoryview(chunk)))
            pos += len(chunk)
        self.range_skipped += cover.skipped
        if pos <= cr.last:
            raise RangeAnswerError(f"the body ended at {pos}, before the end of bytes "
                                   f"{cr.first}-{cr.last}")

    def _multipart(self, resp: requests.Response, url: str,
                   batch: list[Range]) -> Iterator[Piece]:
        boundary = parse_boundary(resp.headers.get("Content-Type", ""))
        reader = ByteRangesReader(boundary, batch)
        asked = sum(ln for _, ln in batch)
        bound = asked + merge_slack(batch) + framing_bound(batch, boundary)
        length = _content_length(resp)
        if length is not None and length > bound:
            raise RangeAnswerError(f"a multipart body of {length} bytes for {asked} bytes "
                                   f"in {len(batch)} ranges (at most {bound})")
        got, before = 0, self.bytes_received
        for chunk in self._pieces(resp, url,
                                  bound if length is None else length):
            got += len(chunk)
            yield from self._counted(reader.feed(chunk))
            if reader.done and length is None:
                break
        self.range_skipped += got - (self.bytes_received - before)
        if not reader.done and got >= bound:
            raise RangeAnswerError(f"a multipart body over {bound} bytes for {asked} bytes "
                                   f"in {len(batch)} ranges")
        reader.finish()

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()


def _check_identity(resp: requests.Response) -> None:
    """Refuse an encoded body (identity was asked for: offsets count raw bytes)."""
    enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if enc not in ("", "identity"):
        raise RangeAnswerError(f"a body in Content-Encoding {enc[:40]!r} (asked: identity)")


def _content_length(resp: requests.Response) -> int | None:
    """The stated Content-Length (None: none, or chunked).

    Raises:
        RangeAnswerError: not a decimal number.
    """
    if "Transfer-Encoding" in resp.headers:
        return None
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdecimal() and len(value) <= 19):
        raise RangeAnswerError(f"a malformed Content-Length {value[:40]!r}")
    return int(value)


class _Fill:
    """One chunk of :meth:`RequestsFetcher._pieces` at a time: a fresh buffer, filled by
    ``readinto`` and handed on as a view of the bytes read (never touched again)."""

    def __init__(self, readinto: Callable[[memoryview], int]) -> None:
        self._readinto = readinto
        self._buf, self._have = memoryview(b""), 0

    def start(self, n: int) -> None:
        self._buf, self._have = memoryview(bytearray(n)), 0

    def read1(self, n: int) -> int:
        got = self._readinto(self._buf[self._have:self._have + n])
        self._have += got
        return got

    def gathered(self, have: int) -> memoryview:
        out = self._buf[:have]
        self._buf, self._have = memoryview(b""), 0
        return out


def _body_readinto(resp: requests.Response) -> tuple[Callable[[memoryview], int], int] | None:
    """``readinto1`` of the buffered socket reader below urllib3's and http.client's
    responses, and the body's stated length, when the body is plain (identity, not
    chunked, a ``Content-Length``) and nothing of it was read yet; else None.

    Reading there bypasses their length accounting: the caller reads at most the stated
    length, so that nothing past the body (an origin that sends more than it states) is
    ever read as data, and closes the connection afterwards.
    """
    raw = resp.raw
    fp = getattr(raw, "_fp", None)
    buffered = getattr(fp, "fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or not isinstance(
            buffered, io.BufferedReader) or fp.chunked or fp.length is None or \
            getattr(raw, "_fp_bytes_read", None) != 0 or \
            getattr(raw, "length_remaining", None) != fp.length or \
            "Transfer-Encoding" in resp.headers:
        return None
    stated = fp.length
    left = [stated]

    def readinto(view: memoryview) -> int:
        view = view[:left[0]]
        if not view:
            return 0
        # (0: the connection closed before the stated length; the caller hands on what
        # came before it, then raises the transfer failure)
        got = buffered.readinto1(view)
        left[0] -= got
        return got

    return readinto, stated
