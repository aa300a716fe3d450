"""A streaming reader for the POSIX tar that bundles use, handing member data out uncopied.

``tarfile`` in stream mode copies every byte several times (its stream buffer joins
reads, its member reader slices them again) and hides where in the stream a member's
data lies. This reader parses the headers with ``tarfile.TarInfo.frombuf`` (checksums,
ustar prefixes) and pax extended headers itself, yields member data as ``memoryview``
slices of the chunks it is fed, and reports every byte that is *not* member data to a
``skeleton`` callback with its offset: headers, pax records, padding, the end-of-archive
blocks and anything after them. Together with the member files, the skeleton is enough
to rebuild the stream byte for byte (see ``modelward.updater.install._stage``).

Only what a bundle may contain is understood: ustar and pax headers. GNU extensions and
global pax headers are refused; what a member *is* (file, link, device) is left to the
caller.

Everything is bounded before it is verified (the stream is read before its TUF hash is
known to match): each member has at most one pax extended header, of at most
:data:`MAX_PAX_BYTES` bytes and :data:`MAX_PAX_RECORDS` records, each with a key from
:data:`PAX_KEYS` (what ``tarfile``'s PAX writer, and so the publisher, emits) and none
twice. What the reader holds at any time is then a few blocks plus one such header,
whatever the stream's length: a stream made only of pax headers is refused at its
second one instead of being collected.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

BLOCK = 512
READ_SIZE = 1 << 20
MAX_PAX_BYTES = 8 * 1024  # per member: a path of PATH_MAX and every other known key
MAX_PAX_RECORDS = 16  # per member
# The keys ``tarfile``'s PAX writer (``bundle build``) emits for a member whose ustar
# fields do not fit; nothing else is understood, so nothing else is accepted.
PAX_KEYS = frozenset({"path", "linkpath", "size", "mtime", "uid", "gid", "uname", "gname"})
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_REFUSED = {
    tarfile.XGLTYPE: "a global pax header",
    tarfile.GNUTYPE_LONGNAME: "a GNU long name",
    tarfile.GNUTYPE_LONGLINK: "a GNU long link",
    tarfile.GNUTYPE_SPARSE: "a GNU sparse file",
}


class TarFormatError(Exception):
    """The stream is not a tar archive this reader accepts (the message says why).

    Attributes:
        member: the member at fault as far as it is known (its pax or ustar name, or
            ``"<extended header at offset N>"``), or "".
    """

    def __init__(self, message: str, *, member: str = "") -> None:
        super().__init__(message)
        self.member = member


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes | memoryview: ...


@dataclass(frozen=True)
class Member:
    """One archive member: its (pax-resolved) name, size, type and data offset."""

    name: str
    size: int
    type: bytes
    data_offset: int

    def isreg(self) -> bool:
        """A regular file (the only kind a bundle may hold)."""
        return self.type in _REGULAR


def check_member_path(path: str) -> str:
    """Validate a relative bundle path; returns it unchanged.

    Raises:
        ValueError: absolute, ``..``, empty component, backslash, or a character that is
            not printable (control, format, separator other than the space: a path is
            printed by the operator's tools and logged by devices).
    """
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"unsafe path {ascii(path)}")
    if not path.isprintable():
        raise ValueError(f"unsafe path {ascii(path)}")
    parts = PurePosixPath(path).parts
    if any(p in ("", ".", "..") for p in path.split("/")) or not parts:
        raise ValueError(f"unsafe path {path!r}")
    return path


def _pad(size: int) -> int:
    return -size % BLOCK


def pax_records(raw: bytes, member: str = "") -> dict[str, str]:
    """Parse pax extended header records (``"<len> <key>=<value>\\n"``).

    At most :data:`MAX_PAX_RECORDS` records, each key from :data:`PAX_KEYS` and none twice.

    Raises:
        TarFormatError: a malformed, unknown, repeated or surplus record (naming
            ``member``).
    """
    out: dict[str, str] = {}

    def bad(msg: str) -> TarFormatError:
        return TarFormatError(msg, member=out.get("path", member))

    pos = 0
    while pos < len(raw):
        if raw[pos] == 0:  # NUL padding after the last record
            if raw[pos:].count(0) != len(raw) - pos:
                raise bad("garbage after the pax records")
            break
        space = raw.find(b" ", pos, pos + 21)
        digits = raw[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise bad("malformed pax record length")
        end = pos + int(digits)
        if end <= space + 1 or end > len(raw) or raw[end - 1] != 0x0A:
            raise bad("malformed pax record")
        key, eq, value = raw[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise bad("malformed pax record")
        try:
            k, v = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad("pax record is not UTF-8") from e
        if k not in PAX_KEYS:
            raise bad(f"unknown pax key {k[:64]!r}")
        if k in out:
            raise bad(f"pax key {k!r} given twice")
        if len(out) >= MAX_PAX_RECORDS:
            raise bad(f"more than {MAX_PAX_RECORDS} pax records")
        out[k] = v
        pos = end
    return out


class TarStream:
    """Pull-parse a tar stream from ``source.read`` (any chunk sizes).

    Use :meth:`next` for each member, then iterate :meth:`data` to its end before the
    next call; :meth:`drain` after the last member passes what follows to the skeleton.
    A member's header bytes reach the skeleton only when its data is first asked for,
    so a caller can record the member (the stage index) before any trace of it is on disk.
    """

    def __init__(
        self, source: Readable, skeleton: Callable[[int, memoryview], None] | None = None
    ) -> None:
        self._source = source
        self._skeleton = skeleton
        self._view = memoryview(b"")
        self._eof = False
        self._held: list[tuple[int, bytes]] = []
        self._pending: Member | None = None
        self.pos = 0  # stream offset of the next unread byte
        self.ended = False

    # --- bytes ---------------------------------------------------------------------------

    def _take(self, n: int) -> memoryview:
        """Up to ``n`` bytes of the current chunk, uncopied; empty at the end of the stream."""
        if not self._view:
            if self._eof:
                return self._view
            data = self._source.read(READ_SIZE)
            if not data:
                self._eof = True
                return memoryview(b"")
            self._view = memoryview(data).cast("B")
        out, self._view = self._view[:n], self._view[n:]
        self.pos += len(out)
        return out

    def _exact(self, n: int) -> bytes:
        """``n`` bytes (fewer only at the end of the stream), copied: headers only."""
        parts: list[memoryview] = []
        got = 0
        while got < n and (view := self._take(n - got)):
            parts.append(view)
            got += len(view)
        return b"".join(parts)

    def _to_skeleton(self, pos: int, data: bytes | memoryview) -> None:
        if self._skeleton is not None and data:
            self._skeleton(pos, memoryview(data))

    def _release_held(self) -> None:
        for pos, data in self._held:
            self._to_skeleton(pos, data)
        self._held.clear()

    # --- members -------------------------------------------------------------------------

    def next(self) -> Member | None:
        """The next member, or None at the end of the archive.

        Raises:
            TarFormatError: a bad or truncated header, or a refused extension.
        """
        if self._pending is not None:  # the caller skipped the data: pass it by
            for _ in self.data():
                pass
        if self.ended:
            return None
        pax: dict[str, str] = {}
        pax_at = -1  # offset of this member's extended header, if it has one
        while True:
            at = self.pos
            block = self._exact(BLOCK)
            if not block:
                if pax:
                    raise TarFormatError("the archive ends after an extended header")
                if at == 0:
                    raise TarFormatError("empty file")
                self.ended = True
                return None
            if len(block) < BLOCK:
                raise TarFormatError("truncated header")
            self._held.append((at, block))
            if block.count(0) == BLOCK:  # end-of-archive marker
                if pax:
                    raise TarFormatError("the archive ends after an extended header")
                if at == 0:
                    raise TarFormatError("empty archive")
                self.ended = True
                self._release_held()
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise TarFormatError(f"bad header at offset {at} ({e})") from e
            if info.size < 0:
                raise TarFormatError(f"negative size at offset {at}")
            if info.type in _REFUSED:
                raise TarFormatError(f"{_REFUSED[info.type]} at offset {at} (bundles are "
                                     "POSIX tar)")
            if info.type != tarfile.XHDTYPE:
                break
            where = f"<extended header at offset {at}>"
            if pax_at >= 0:
                raise TarFormatError(
                    f"a second extended header at offset {at} for one member (the first "
                    f"at {pax_at})", member=pax.get("path", where))
            pax_at = at
            if info.size > MAX_PAX_BYTES:
                raise TarFormatError(f"extended header of {info.size} bytes at offset {at} "
                                     f"(at most {MAX_PAX_BYTES})", member=where)
            raw_at = self.pos
            raw = self._exact(info.size + _pad(info.size))
            if len(raw) < info.size + _pad(info.size):
                raise TarFormatError("truncated extended header", member=where)
            self._held.append((raw_at, raw))
            pax = pax_records(raw[:info.size], where)
        size = info.size
        if "size" in pax:
            if not (pax["size"].isascii() and pax["size"].isdigit()
                    and len(pax["size"]) <= 18):  # (int() refuses over 4300 digits)
                raise TarFormatError(f"pax size {pax['size']!r} of {info.name!r}",
                                     member=pax.get("path", info.name))
            size = int(pax["size"])
        self._pending = Member(pax.get("path", info.name), size, info.type, self.pos)
        return self._pending

    def data(self) -> Iterator[memoryview]:
        """The pending member's data as uncopied slices; then its padding goes to the skeleton.

        Raises:
            TarFormatError: the stream ends inside the member.
        """
        member = self._pending
        if member is None:
            return
        self._release_held()
        left = member.size
        while left:
            view = self._take(min(left, READ_SIZE))
            if not view:
                raise TarFormatError(f"unexpected end of data in {member.name!r}",
                                     member=member.name)
            left -= len(view)
            yield view
        pad_at = self.pos
        padding = self._exact(_pad(member.size))
        if len(padding) < _pad(member.size):
            raise TarFormatError(f"unexpected end of data after {member.name!r}",
                                 member=member.name)
        self._to_skeleton(pad_at, padding)
        self._pending = None

    def drain(self) -> None:
        """After the end of the archive: pass every remaining byte to the skeleton."""
        self._release_held()
        while view := self._take(READ_SIZE):
            self._to_skeleton(self.pos - len(view), view)
