"""Where ``repo sync`` writes: an S3-compatible bucket (boto3) or a local directory.

Both follow :class:`modelward.publisher._sync.Destination`: ``existing`` says what is
there (size and sha256), ``put`` writes one file so that a reader sees the old or the new
bytes. boto3's errors become :class:`SyncTransportError`; credentials come from boto3's
own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role)
and appear in no message and no log line (the CLI keeps botocore's loggers at WARNING).

The directory destination never follows a symlink: every component is opened relative to
its parent's descriptor with ``O_NOFOLLOW``, and a link (or a non-directory, non-file)
where the repository has a directory or a file is refused, naming it; each file is written
to a temporary name beside it, fsynced and renamed over the old one, then the directory is
fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from modelward.publisher._sync import Remote, Upload
from modelward.publisher.errors import SyncDestinationError, SyncTransportError

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # (a URL's start)

SHA256_META = "sha256"  # S3 user metadata (x-amz-meta-sha256) the compare reads back
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BAD_PREFIX_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\\%?#]")
_COPY_CHUNK = 1 << 20
#: a listing of more pages (1000 keys each) is an endpoint that never ends it
MAX_LIST_PAGES = 10_000


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/prefix``, checked."""

    bucket: str
    prefix: str  # "" or "a/b/" (ends with a slash)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, rel: str) -> str:
        return self.prefix + rel


def parse_s3_url(text: str) -> S3Url:
    """``s3://bucket[/prefix]`` as an :class:`S3Url`.

    Raises:
        SyncDestinationError: not a valid bucket name, or a prefix component that is
            empty, ``.`` or ``..``, or holds control characters, ``\\``, ``%``, ``?``, ``#``.
    """
    rest = text[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise SyncDestinationError(
            f"--to {text!r}: {bucket!r} is not an S3 bucket name", destination=text,
            hint="3-63 lowercase letters, digits, dots and hyphens: s3://BUCKET/PREFIX")
    parts = prefix.removesuffix("/").split("/") if prefix.strip("/") else []
    for part in parts:
        if part in ("", ".", "..") or _BAD_PREFIX_CHARS.search(part):
            raise SyncDestinationError(
                f"--to {text!r}: the prefix component {part!r} is not a plain name",
                destination=text, key=part,
                hint="give a prefix of plain names separated by single slashes, no '..'")
    return S3Url(bucket, "".join(p + "/" for p in parts))


def check_endpoint(url: str) -> str:
    """``url`` if it is an ``http(s)://host[:port]`` endpoint without credentials.

    Raises:
        SyncDestinationError: another scheme, no host, or a user or password in it (the
            message shows neither).
    """
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - parses the port
    except ValueError as e:
        raise SyncDestinationError("--endpoint-url: not a URL", destination=url,
                                   hint="e.g. --endpoint-url https://s3.example:9000") from e
    if u.username is not None or u.password is not None:
        raise SyncDestinationError(
            f"--endpoint-url {u.scheme}://…@{u.hostname}: credentials in the URL "
            "(refused: they would show in process lists and logs)", destination="",
            hint="give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SyncDestinationError(f"--endpoint-url {url!r}: not an http(s):// URL",
                                   destination=url,
                                   hint="e.g. --endpoint-url https://s3.example:9000")
    return url


class S3Destination:
    """An S3 prefix; each object records its sha256 as user metadata."""

    stores_cache_control = True

    def __init__(self, url: S3Url, client: Any) -> None:
        self._url = url
        self._client = client

    def describe(self) -> str:
        return str(self._url)

    def _error(self, e: Exception, key: str, what: str) -> SyncTransportError:
        from botocore.exceptions import ClientError

        code = ""
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
        why = f"{code}" if code else type(e).__name__
        hint = {"NoSuchBucket": "create the bucket first",
                "AccessDenied": "the credentials may not write this prefix",
                "InvalidAccessKeyId": "check the credentials (AWS_ACCESS_KEY_ID, profile)",
                "SignatureDoesNotMatch": "check the credentials (AWS_SECRET_ACCESS_KEY)",
                }.get(code, "check --endpoint-url and the network")
        return SyncTransportError(f"{self._url}: {what}{' ' + key if key else ''} failed: {why}",
                                  destination=str(self._url), key=key, code=code, hint=hint)

    def existing(self, keys: Sequence[str],
                 local_sizes: Mapping[str, int] | None = None) -> Mapping[str, Remote]:
        """Objects under the prefix that ``keys`` name: sizes from one listing, sha256 and
        Cache-Control from a HEAD of those whose size matches a local file's
        (``local_sizes``: unused, a listing costs nothing per byte)."""
        from botocore.exceptions import BotoCoreError, ClientError

        wanted = {self._url.key(k): k for k in keys}
        sizes: dict[str, int] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._url.bucket, Prefix=self._url.prefix)
            for n, page in enumerate(pages, 1):
                for obj in page.get("Contents", []):
                    if obj["Key"] in wanted:
                        sizes[wanted[obj["Key"]]] = int(obj["Size"])
                if len(sizes) == len(wanted):
                    break  # every key seen: the rest of the prefix does not matter
                if n >= MAX_LIST_PAGES:
                    raise SyncTransportError(
                        f"{self._url}: the listing goes on past {n} pages ({n * 1000} "
                        "objects?): stopped, nothing uploaded", destination=str(self._url),
                        hint="check --endpoint-url (an S3-compatible server that ends its "
                        "listings), or sync to a prefix of its own")
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, "", "listing") from e
        out: dict[str, Remote] = {}
        for rel, size in sizes.items():
            try:
                head = self._client.head_object(Bucket=self._url.bucket,
                                                Key=self._url.key(rel))
            except (BotoCoreError, ClientError) as e:
                raise self._error(e, self._url.key(rel), "HEAD of") from e
            meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
            out[rel] = Remote(size, meta.get(SHA256_META), head.get("CacheControl"))
        return out

    def read(self, key: str, limit: int) -> bytes | None:
        """The object ``key`` (None: absent or above ``limit`` bytes), read to ``limit``."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._url.key(key)
        try:
            obj = self._client.get_object(Bucket=self._url.bucket, Key=full)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                return None
            raise self._error(e, full, "GET of") from e
        except BotoCoreError as e:
            raise self._error(e, full, "GET of") from e
        body = obj["Body"]
        try:
            data: bytes = body.read(limit + 1)
        except (BotoCoreError, OSError) as e:
            raise self._error(e, full, "GET of") from e
        finally:
            body.close()
        return None if len(data) > limit else data

    def put(self, upload: Upload, body: BinaryIO) -> None:
        """One object (multipart above boto3's threshold); S3 makes it visible whole."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._url.key(upload.file.key)
        try:
            self._client.upload_fileobj(body, self._url.bucket, key, ExtraArgs={
                "CacheControl": upload.cache_control, "ContentType": upload.content_type,
                "Metadata": {SHA256_META: upload.file.sha256}})
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, key, "upload of") from e
        except S3UploadFailedError as e:  # (s3transfer wraps a ClientError in it)
            cause = e.__cause__ or e.__context__
            if isinstance(cause, ClientError | BotoCoreError):
                raise self._error(cause, key, "upload of") from e
            raise SyncTransportError(f"{self._url}: upload of {key} failed",
                                     destination=str(self._url), key=key,
                                     hint="check --endpoint-url and the network") from e


def s3_destination(url: S3Url, endpoint_url: str | None, region: str | None) -> S3Destination:
    """A boto3 client for ``url`` (path-style addressing when an endpoint is given, as
    S3-compatible servers expect)."""
    import boto3
    from botocore.config import Config

    cfg = Config(s3={"addressing_style": "path"} if endpoint_url else {},
                 retries={"max_attempts": 5, "mode": "standard"})
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                            region_name=region, config=cfg)
    return S3Destination(url, client)


# --- a directory ------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirDestination:
    """A local directory (a CDN's origin, what nginx serves)."""

    stores_cache_control = False

    def __init__(self, root: Path) -> None:
        self._root = root
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            try:
                os.mkdir(root, 0o755)  # the last component only: its parent must exist
            except OSError as e:
                raise SyncDestinationError(f"--to {root}: {e.strerror or e}",
                                           destination=str(root),
                                           hint="give a directory whose parent exists") from e
            st = os.lstat(root)
        if stat.S_ISLNK(st.st_mode):
            raise SyncDestinationError(f"--to {root}: a symlink (refused, not followed)",
                                       destination=str(root),
                                       hint="give the real directory the origin serves")
        if not stat.S_ISDIR(st.st_mode):
            raise SyncDestinationError(f"--to {root}: not a directory",
                                       destination=str(root), hint="give a directory")

    def describe(self) -> str:
        return str(self._root)

    def _refuse(self, rel: str, what: str) -> SyncDestinationError:
        return SyncDestinationError(
            f"--to {self._root}: {rel} is {what} (refused: nothing is written through it)",
            destination=str(self._root), key=rel,
            hint="remove it; the destination holds plain directories and files only")

    @contextlib.contextmanager
    def _parent(self, rel: str, create: bool) -> Iterator[int | None]:
        """The descriptor of ``rel``'s directory, each component opened without following
        a link (made when ``create``); None when a component is missing."""
        fd = os.open(self._root, _DIR_FLAGS)
        try:
            parts = rel.split("/")[:-1]
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        fd = -1
                        yield None
                        return
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.fsync(fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):  # (O_DIRECTORY on a link)
                        link = stat.S_ISLNK(os.stat(part, dir_fd=fd,
                                                    follow_symlinks=False).st_mode)
                        raise self._refuse("/".join(parts[:i + 1]),
                                           "a symlink" if link else "not a directory") from e
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            if fd >= 0:
                os.close(fd)

    def existing(self, keys: Sequence[str],
                 sizes: Mapping[str, int] | None = None) -> Mapping[str, Remote]:
        """Files already there (hashed); a link or non-file on a key's way is refused.

        A file whose size is not the one ``sizes`` gives for its key is not read (its
        digest is unknown: other bytes): a sparse giant planted there costs nothing."""
        out: dict[str, Remote] = {}
        for rel in keys:
            with self._parent(rel, create=False) as dfd:
                if dfd is None:
                    continue
                name = rel.rsplit("/", 1)[-1]
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | os.O_CLOEXEC, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise self._refuse(rel, "a symlink") from e
                    raise
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise self._refuse(rel, "not a regular file")
                    if sizes is not None and sizes.get(rel) != st.st_size:
                        out[rel] = Remote(st.st_size, "")  # (not None: other bytes)
                        continue
                    h, size = hashlib.sha256(), 0
                    limit = st.st_size + 1  # (a file growing meanwhile: read no further)
                    while size < limit and (chunk := f.read(min(_COPY_CHUNK, limit - size))):
                        h.update(chunk)
                        size += len(chunk)
                out[rel] = Remote(size, h.hexdigest())
        return out

    def read(self, key: str, limit: int) -> bytes | None:
        """The file ``key`` (None: absent or above ``limit`` bytes), never through a link."""
        with self._parent(key, create=False) as dfd:
            if dfd is None:
                return None
            try:
                fd = os.open(key.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise self._refuse(key, "a symlink") from e
                raise
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise self._refuse(key, "not a regular file")
                data = f.read(limit + 1)
        return None if len(data) > limit else data

    def put(self, upload: Upload, body: BinaryIO) -> None:
        """Temp file beside it (``O_EXCL|O_NOFOLLOW``), fsync, rename, fsync the dir."""
        rel = upload.file.key
        name = rel.rsplit("/", 1)[-1]
        with self._parent(rel, create=True) as dfd:
            assert dfd is not None
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise self._refuse(rel, "a symlink" if stat.S_ISLNK(st.st_mode)
                                       else "not a regular file")
            except FileNotFoundError:
                pass
            tmp = f".{name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    while chunk := body.read(_COPY_CHUNK):
                        f.write(chunk)
                    f.flush()
                    os.fchmod(f.fileno(), 0o644)
                    os.fsync(f.fileno())
                # rename replaces a name, never follows one: a link swapped in meanwhile
                # is replaced itself
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)


def destination(to: str, repo_dir: Path, endpoint_url: str | None,
                region: str | None) -> S3Destination | DirDestination:
    """The destination ``--to`` names: ``s3://bucket/prefix`` or a local directory.

    Raises:
        SyncDestinationError: another URL scheme, a bad S3 URL or endpoint, a directory
            that is or is inside the repository (or holds it), a symlink.
    """
    m = _URL_SCHEME.match(to)  # (as modelward._inputs.url_scheme: publisher imports
    scheme = m.group()[:-3] if m else None  # only updater and trust, issue 15's layers)
    if scheme is not None and scheme.lower() == "s3":
        url = parse_s3_url(to)
        return s3_destination(url, check_endpoint(endpoint_url) if endpoint_url else None,
                              region)
    if scheme is not None:
        raise SyncDestinationError(
            f"--to {to!r}: a {scheme}:// URL, not s3://BUCKET/PREFIX or a local "
            "directory", destination=to,
            hint="for another store, sync to a directory and upload it in the same order")
    if endpoint_url:
        raise SyncDestinationError("--endpoint-url goes with --to s3://…", destination=to,
                                   hint="drop --endpoint-url for a directory")
    root = Path(to)
    here, there = repo_dir.resolve(), root.resolve()
    if there == here or there.is_relative_to(here) or here.is_relative_to(there):
        raise SyncDestinationError(f"--to {to}: overlaps --repo {repo_dir}",
                                   destination=to,
                                   hint="give a directory outside the repository")
    return DirDestination(root)
