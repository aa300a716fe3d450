"""Operator input of the command line, checked where it is read: argument types that
refuse what makes no sense (NaN, out of range), readable-file checks that name the
argument, and a parser whose usage errors are one line with a hint.

Every check raises :class:`~modelward.trust.errors.OperatorInputError` naming the
argument and the file, or (argument types, inside argparse) a usage error naming the
argument. Nothing here reads configuration or the environment.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from modelward.trust.errors import OperatorInputError


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the argument, with a
    hint to the command's ``--help``, and exit code 2 (not the whole usage text)."""

    def error(self, message: str) -> NoReturn:
        from modelward.agent._log import escape_text

        self.exit(2, f"{self.prog}: error: {escape_text(message)}; "
                  f"hint: see `{self.prog} --help`\n")


# --- argument types (argparse turns ArgumentTypeError into a one-line usage error) --

#: ``scheme://`` at the start of an argument: a URL given where a local path is expected
#: (``repo init --repo s3://bucket/repo`` made a directory named ``s3:``, issue 17)
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def url_scheme(text: str) -> str | None:
    """The scheme of ``text`` if it starts like a URL (``s3://``, ``https://``), else None."""
    m = _URL_SCHEME.match(text)
    return m.group()[:-3] if m else None


def local_path(text: str) -> Path:
    """An argparse type: a local path, never a URL (a ``scheme://`` prefix is refused)."""
    scheme = url_scheme(text)
    if scheme is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a {scheme}:// URL, not a local path"
            + ("; for a bucket, keep the repository in a local directory and upload it "
               "(targets and versioned metadata first, timestamp.json last)"
               if scheme.lower() in ("s3", "gs", "az") else ""))
    return Path(text)



def number(lo: float, hi: float = math.inf, *, integer: bool = False,
           above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[lo, hi]`` (``above``: ``lo`` excluded);
    ``integer``: a whole number in ASCII digits."""

    def parse(text: str) -> float:
        try:
            value: float = int(text) if integer and text.isascii() else float(text)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        low_ok = value > lo if above else value >= lo
        if not (math.isfinite(value) and low_ok and value <= hi):
            top = "" if math.isinf(hi) else f" and at most {hi:g}"
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'above' if above else 'at least'} {lo:g}{top}")
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def whole(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[lo, hi]``."""
    inner = number(lo, math.inf if hi is None else hi, integer=True)

    def parse(text: str) -> int:
        return int(inner(text))

    parse.__name__ = "integer"
    return parse


_DURATION = re.compile(r"(?:[0-9]{1,6}[wdhms]){1,5}")  # (as repo set-expiry's)
_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def duration(hi: timedelta) -> Callable[[str], timedelta]:
    """An argparse type: ``30d``, ``12h``, ``1w2d``, ``90m``, ``3600s``, at most ``hi``."""

    def parse(text: str) -> timedelta:
        if len(text) > 40 or not _DURATION.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{text[:40]!r} is not a duration such as 30d, 12h or 1w2d "
                "(units w, d, h, m, s)")
        value = timedelta(seconds=sum(int(n) * _UNIT[u]
                                      for n, u in re.findall(r"([0-9]+)([wdhms])", text)))
        if value > hi:
            raise argparse.ArgumentTypeError(f"{text!r} is over {hi.days} days")
        return value

    parse.__name__ = "duration"
    return parse


# --- files named by arguments -------------------------------------------------


def _fault(flag: str, path: Path, e: OSError) -> OperatorInputError:
    why = e.strerror or str(e)
    return OperatorInputError(f"{flag} {path}: {why}",
                              hint="check the path: it must name an existing, readable file")


def _open_checked(flag: str, path: Path, *, regular: bool = False) -> int:
    """A descriptor of ``path`` opened for reading once, without blocking (a FIFO with no
    writer opens at once), and checked by ``fstat`` of that descriptor: what is checked is
    what is read, even if the path is swapped in between.

    Raises:
        OperatorInputError: it cannot be opened, is a directory or not a regular file (a
            character device or a pipe is accepted unless ``regular``).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except IsADirectoryError as e:
        raise OperatorInputError(f"{flag} {path}: is a directory",
                                 hint="give the path of the file itself") from e
    except OSError as e:
        raise _fault(flag, path, e) from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise _fault(flag, path, e) from e
    # (a character device or a pipe too: --password-file /dev/stdin)
    if not (stat.S_ISREG(mode) or (not regular and (stat.S_ISCHR(mode)
                                                    or stat.S_ISFIFO(mode)))):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise OperatorInputError(f"{flag} {path}: is {kind}",
                                 hint="give the path of the file itself")
    return fd


def readable_file(flag: str, path: Path) -> Path:
    """``path`` if it names a file this process can open for reading (a regular file, a
    character device or a pipe).

    Raises:
        OperatorInputError: it does not exist, is not a regular file, or cannot be read;
            the message names ``flag`` and the path.
    """
    os.close(_open_checked(flag, path))
    return path


def _read_fd(fd: int, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of ``fd`` (until end of file)."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = os.read(fd, limit + 1 - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_stream(flag: str, path: Path, fd: int, limit: int) -> bytes:
    """A pipe's or character device's bytes: what is there now, then (blocking) the rest
    until end of file; a FIFO at end of file at once has no writer and is refused."""
    try:
        first = os.read(fd, limit + 1)
    except BlockingIOError:  # a writer is there, nothing written yet: wait for it
        first = None
    if first == b"":
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OperatorInputError(f"{flag} {path}: a pipe with no writer (nothing to "
                                     "read)", hint="write to the pipe, or give a file")
        return first  # /dev/null
    os.set_blocking(fd, True)
    if first is None:
        return _read_fd(fd, limit)
    return first if len(first) > limit else first + _read_fd(fd, limit - len(first))


def read_file(flag: str, path: Path, limit: int = 1 << 20) -> bytes:
    """The bytes of the (small) file ``path`` named by ``flag``, at most ``limit``.

    The file is opened once (:func:`_open_checked`) and read from that descriptor. A pipe
    or character device is read as it comes (blocking only once a writer is there); a
    FIFO nobody has open for writing is refused rather than waited on forever.

    Raises:
        OperatorInputError: unreadable (see :func:`readable_file`), a FIFO without a
            writer, or larger than ``limit``.
    """
    fd = _open_checked(flag, path)
    try:
        data = _read_fd(fd, limit) if stat.S_ISREG(os.fstat(fd).st_mode) \
            else _read_stream(flag, path, fd, limit)
    except OSError as e:
        raise _fault(flag, path, e) from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OperatorInputError(f"{flag} {path}: larger than {limit} bytes",
                                 hint="is this the right file?")
    return data


def existing_dir(flag: str, path: Path) -> Path:
    """``path`` if it names an existing directory.

    Raises:
        OperatorInputError: it does not exist or is not a directory.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise OperatorInputError(f"{flag} {path}: {e.strerror or e}",
                                 hint="check the path: it must name an existing "
                                 "directory") from e
    if not stat.S_ISDIR(st.st_mode):
        raise OperatorInputError(f"{flag} {path}: is not a directory",
                                 hint="give the directory, not a file in it")
    return path


def creatable_dir(flag: str, path: Path) -> Path:
    """``path`` if it is a directory or can be made one: nothing that exists on the way
    to it is a file.

    Raises:
        OperatorInputError: ``path`` or one of its parents exists and is not a directory.
    """
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OperatorInputError(f"{flag} {path}: {e.strerror or e}",
                                     hint="give a directory that can be created") from e
        if not stat.S_ISDIR(st.st_mode):
            raise OperatorInputError(
                f"{flag} {path}: {p if p != path else 'it'} is not a directory",
                hint="give a directory that can be created")
        break
    return path


def _fd_path(fd: int, path: Path) -> str:
    """A name that opens the very file ``fd`` is open on (Linux ``/proc``), else ``path``."""
    return f"/proc/self/fd/{fd}" if Path("/proc/self/fd").is_dir() else str(path)


def tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """``--tls-ca``, ``--cert`` and ``--key`` are readable and hold what they should: a
    PEM CA certificate, and a client certificate with its key (loaded as the TLS
    connection will load them, so a mistake shows here, naming the file, and not as a
    failed connection). Each must be a regular file: the connection opens it again by
    its path, so a pipe would be read twice (or block, with no writer); each is opened
    once without blocking and loaded through that descriptor.

    Raises:
        OperatorInputError: a file is unreadable, not a regular file, or not PEM of the
            right kind.
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        fd = _open_checked("--tls-ca", ca, regular=True)
        try:
            ctx.load_verify_locations(cafile=_fd_path(fd, ca))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise OperatorInputError(f"--tls-ca {ca}: not a PEM CA certificate ({e})",
                                     hint="give the CA that signed the broker's "
                                     "certificate, in PEM") from e
        finally:
            os.close(fd)
    if (cert is None) != (key is None):
        raise OperatorInputError("--cert and --key go together",
                                 hint="give the client certificate and its key")
    if cert is not None and key is not None:
        cfd = _open_checked("--cert", cert, regular=True)
        try:
            kfd = _open_checked("--key", key, regular=True)
        except OperatorInputError:
            os.close(cfd)
            raise
        try:
            ctx.load_cert_chain(_fd_path(cfd, cert), _fd_path(kfd, key),
                                password=lambda: b"")
        except (ssl.SSLError, OSError, ValueError) as e:
            raise OperatorInputError(f"--cert {cert} / --key {key}: not a PEM certificate "
                                     f"and its unencrypted key ({e})",
                                     hint="give the client certificate and the key it "
                                     "certifies, in PEM") from e
        finally:
            os.close(cfd)
            os.close(kfd)


def mark_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Each subcommand's parser sets ``command_prog`` (``modelward repo init``) in the
    parsed arguments, for the hint of an error; returns ``parser``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(command_prog=parser.prog)
    for action in subs:
        for sub in action.choices.values():
            mark_commands(sub)
    return parser


def output_file(flag: str, path: Path) -> Path:
    """``path`` if a file can be written there: its directory exists, and it is not a
    directory itself.

    Raises:
        OperatorInputError: naming ``flag`` and the path.
    """
    parent = path.absolute().parent
    if not parent.is_dir():
        raise OperatorInputError(f"{flag} {path}: {parent} is not an existing directory",
                                 hint="write into an existing directory")
    if path.is_dir():
        raise OperatorInputError(f"{flag} {path}: is a directory",
                                 hint="give the path of the file to write")
    return path


MAX_ROOT_BYTES = 1 << 20  # a root.json; the trust store bounds it again


def root_metadata(flag: str, path: Path) -> None:
    """``path`` holds JSON TUF root metadata (by its shape; the trust store verifies it).

    Raises:
        OperatorInputError: unreadable, not JSON, or not root metadata.
    """
    import json

    raw = read_file(flag, path, MAX_ROOT_BYTES)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise OperatorInputError(f"{flag} {path}: not JSON ({e})",
                                 hint="give the repository's root.json (metadata/1.root.json)"
                                 ) from e
    signed = doc.get("signed") if isinstance(doc, dict) else None
    if not isinstance(signed, dict) or signed.get("_type") != "root":
        raise OperatorInputError(f"{flag} {path}: not TUF root metadata",
                                 hint="give the repository's root.json (metadata/1.root.json)")
