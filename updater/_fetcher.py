"""HTTPS transport: a requests-based ``tuf.ngclient.FetcherInterface`` with Range resume."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import requests
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from updater._config import HttpsConfig
from updater.errors import OperatorInputError

logger = logging.getLogger(__name__)

_FIRST_READ = 64 * 1024
_SMALLEST_READ = 16 * 1024


class RangeFetcher(FetcherInterface):
    """A fetcher that can also continue a download from an offset (for staging resume).

    Attributes:
        bytes_received: payload bytes received so far (metrics).
    """

    bytes_received: int = 0
    last_url: str = ""

    def fetch(self, url: str) -> Iterator[bytes]:
        """Fetch ``url`` (remembered as :attr:`last_url`, for error messages)."""
        self.last_url = url
        return super().fetch(url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Download metadata into memory (ngclient's default goes through a temporary file
        per request; TUF bounds every metadata file's length, so memory is bounded too).

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: more than ``max_length`` bytes.
            tuf.api.exceptions.DownloadError: the transfer failed.
        """
        chunks: list[bytes] = []
        received = 0
        for chunk in self.fetch(url):
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


class RequestsFetcher(RangeFetcher):
    """HTTPS fetcher on a persistent ``requests.Session``, with the origin's CA pinned.

    Raises:
        OperatorInputError: a URL is not https:// or the CA file is missing.
    """

    def __init__(self, config: HttpsConfig) -> None:
        for url in (config.metadata_url, config.targets_url):
            if not url.startswith("https://"):
                raise OperatorInputError(
                    f"{url!r} is not an https:// URL", hint="modelward only fetches over TLS"
                )
        self._config = config
        self._session = requests.Session()
        # Pinning: the environment (REQUESTS_CA_BUNDLE, proxies, .netrc) must not widen
        # whom we trust or where we connect; requests lets REQUESTS_CA_BUNDLE override
        # Session.verify, so verify is also passed on every request.
        self._session.trust_env = False
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
            # Read a small error body to its end, so that the connection goes back to the
            # pool: every refresh asks for the next root and gets a 404, and closing it
            # unread cost a new TLS handshake per refresh.
            try:
                if int(resp.headers.get("Content-Length", "-1")) in range(0, 65537):
                    resp.content  # noqa: B018 - drained on purpose
            except (requests.RequestException, ValueError):
                pass
            finally:
                resp.close()
            raise tuf_exc.DownloadHTTPError(
                f"{url} answered HTTP {resp.status_code}", resp.status_code
            )
        return resp

    def _chunks(self, resp: requests.Response, url: str) -> Iterator[bytes]:
        """The body in reads that adapt to the link: each read that fills in under 50 ms
        doubles the next (up to ``chunk_size``), one that takes over a second halves it.

        Big reads cost far less per byte (a 512 MiB bundle: 3.3 s in 64 KiB reads, 1.7 s
        in 1 MiB reads); small ones keep the slow-retrieval check responsive, since a read
        returns only once it is full.
        """
        cfg = self._config
        size = min(_FIRST_READ, cfg.chunk_size)
        window_start, window_bytes = time.monotonic(), 0
        try:
            while True:
                started = time.monotonic()
                chunk = resp.raw.read(size, decode_content=False)
                if not chunk:
                    break
                took = time.monotonic() - started
                if took < 0.05:
                    size = min(size * 2, cfg.chunk_size)
                elif took > 1.0:
                    size = max(size // 2, _SMALLEST_READ)
                self.bytes_received += len(chunk)
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= cfg.min_speed_window:
                    if window_bytes < cfg.min_speed * elapsed:
                        raise tuf_exc.SlowRetrievalError(
                            f"{url} sent {window_bytes} bytes in {elapsed:.1f}s, under the "
                            f"minimum of {cfg.min_speed} bytes/s (slow retrieval)")
                    window_start, window_bytes = time.monotonic(), 0
                yield chunk
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise tuf_exc.DownloadError(f"Transfer of {url} broke off: {e}") from e
        finally:
            resp.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        resp = self._get(url, {"Accept-Encoding": "identity"})
        return self._chunks(resp, url)

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        resp = self._get(url, {"Accept-Encoding": "identity", "Range": f"bytes={offset}-"})
        start = offset if resp.status_code == 206 else 0
        return self._chunks(resp, url), start

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()
