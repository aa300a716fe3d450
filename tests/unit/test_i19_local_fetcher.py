"""The local-media fetcher (issue 19): URLs map onto plain files under the medium only,
never through a symlink, only regular files, reads bounded by the length asked for and by
the size the file had when opened; typed errors that name the file."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from modelward.updater.errors import OperatorInputError
from modelward.updater.install._install import MAX_EXPIRED_GRACE, open_local_source
from modelward.updater.transport._local import (
    LOCAL_METADATA_URL as MD,
)
from modelward.updater.transport._local import (
    LOCAL_TARGETS_URL as TG,
)
from modelward.updater.transport._local import (
    LocalFetcher,
    LocalFileRefusedError,
)
from modelward.updater.transport._ranges import RangeAnswerError


@pytest.fixture
def medium(tmp_path: Path) -> Path:
    root = tmp_path / "medium"
    (root / "metadata").mkdir(parents=True)
    (root / "targets" / "classifier").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_bytes(b"t" * 100)
    (root / "targets" / "classifier" / "ab.c-1.tar").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "outside").write_bytes(b"secret")
    return root


def test_reads_metadata_and_targets_whole_and_counts(medium: Path) -> None:
    f = LocalFetcher(medium)
    assert f.download_bytes(MD + "timestamp.json", 100) == b"t" * 100
    data = b"".join(f.fetch(TG + "classifier/ab.c-1.tar"))
    assert data == bytes(range(256)) * 40
    assert f.bytes_received == 100 + len(data)


def test_missing_file_is_a_404_naming_it(medium: Path) -> None:
    with pytest.raises(tuf_exc.DownloadHTTPError) as ei:
        LocalFetcher(medium).download_bytes(MD + "2.root.json", 1000)
    assert ei.value.status_code == 404 and "2.root.json" in str(ei.value)
    with pytest.raises(tuf_exc.DownloadHTTPError):  # (a directory missing on the way)
        b"".join(LocalFetcher(medium).fetch(TG + "other/x.tar"))


@pytest.mark.parametrize("rel", ["../outside", "metadata/../../outside", "/etc/passwd",
                                 "", "a//b", "./timestamp.json", ".hidden", "a\\b",
                                 "x%2F..%2Foutside", "a\x00b", "a b", "a/" * 9 + "x",
                                 "é.json", "x" * 256])
def test_odd_paths_are_refused(medium: Path, rel: str) -> None:
    with pytest.raises(LocalFileRefusedError) as ei:
        LocalFetcher(medium).download_bytes(MD + rel, 1000)
    assert "refused" in str(ei.value)


def test_other_urls_are_refused(medium: Path) -> None:
    for url in ("https://example/metadata/timestamp.json", "file:///etc/passwd",
                "medium:///etc/passwd", "medium:///metadata"):
        with pytest.raises(LocalFileRefusedError):
            LocalFetcher(medium).download_bytes(url, 1000)


def test_symlinks_are_refused_file_dir_and_root(medium: Path, tmp_path: Path) -> None:
    md = medium / "metadata"
    (md / "1.root.json").symlink_to(tmp_path / "outside")
    with pytest.raises(LocalFileRefusedError) as ei:
        LocalFetcher(medium).download_bytes(MD + "1.root.json", 1000)
    assert "symlink" in str(ei.value) and str(md / "1.root.json") in str(ei.value)
    (medium / "targets" / "team").symlink_to(tmp_path)
    with pytest.raises(LocalFileRefusedError, match="symlink"):
        b"".join(LocalFetcher(medium).fetch(TG + "team/outside"))
    link = tmp_path / "link"
    link.symlink_to(medium)
    with pytest.raises(LocalFileRefusedError, match="symlink"):
        LocalFetcher(link).download_bytes(MD + "timestamp.json", 1000)


def test_non_regular_files_are_refused_without_blocking(medium: Path) -> None:
    os.mkfifo(medium / "metadata" / "snapshot.json")
    with pytest.raises(LocalFileRefusedError, match="not a regular file"):
        LocalFetcher(medium).download_bytes(MD + "snapshot.json", 1000)
    (medium / "metadata" / "targets.json").mkdir()
    with pytest.raises(LocalFileRefusedError, match="not a regular file"):
        LocalFetcher(medium).download_bytes(MD + "targets.json", 1000)


def test_a_fifo_on_the_medium_is_never_opened(medium: Path) -> None:
    """A writer waiting on a FIFO (or a device node's driver) sees no open: the type is
    looked at first. A non-blocking writer's open fails with ENXIO while no reader has it
    open, which is what it still does after the refusal."""
    import errno

    fifo = medium / "metadata" / "snapshot.json"
    os.mkfifo(fifo)
    with pytest.raises(LocalFileRefusedError, match="not a regular file"):
        LocalFetcher(medium).download_bytes(MD + "snapshot.json", 1000)
    with pytest.raises(OSError) as e:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert e.value.errno == errno.ENXIO


def test_oversized_metadata_is_refused_unread(medium: Path) -> None:
    with pytest.raises(tuf_exc.DownloadLengthMismatchError, match="timestamp.json"):
        LocalFetcher(medium).download_bytes(MD + "timestamp.json", 99)


def test_a_read_never_goes_past_the_size_when_opened(medium: Path) -> None:
    path = medium / "metadata" / "timestamp.json"
    f = LocalFetcher(medium)
    chunks = f.fetch(MD + "timestamp.json")
    with path.open("ab") as grow:  # the medium grows the file while it is read
        grow.write(b"x" * (3 << 20))
    assert b"".join(chunks) == b"t" * 100


def test_fetch_from_and_ranges_read_exactly_what_is_asked(medium: Path) -> None:
    data = bytes(range(256)) * 40
    f = LocalFetcher(medium)
    url = TG + "classifier/ab.c-1.tar"
    chunks, start = f.fetch_from(url, 1000)
    assert start == 1000 and b"".join(chunks) == data[1000:]
    before = f.bytes_received
    pieces = list(f.fetch_ranges(url, [(10, 5), (4000, 100), (10_000, 240)]))
    assert [(o, bytes(d)) for o, d in pieces] == [
        (10, data[10:15]), (4000, data[4000:4100]), (10_000, data[10_000:])]
    assert f.bytes_received - before == 345  # nothing between the ranges is read
    with pytest.raises(RangeAnswerError, match="ends past it"):
        list(f.fetch_ranges(url, [(10_000, 241)]))


def test_grace_is_bounded_and_only_for_media(tmp_path: Path) -> None:
    assert open_local_source(tmp_path).expired_grace is None
    assert open_local_source(tmp_path, timedelta(days=30)).expired_grace == timedelta(days=30)
    with pytest.raises(OperatorInputError):
        open_local_source(tmp_path, MAX_EXPIRED_GRACE + timedelta(seconds=1))
    with pytest.raises(OperatorInputError):
        open_local_source(tmp_path, timedelta(days=-1))


def test_cli_grace_bound_matches_the_updater_s() -> None:
    from modelward.cli import build_parser

    p = build_parser()
    args = p.parse_args(["agent", "update", "--once", "--from", "/media/x",
                         "--expired-grace", "365d"])
    assert args.expired_grace == MAX_EXPIRED_GRACE
    with pytest.raises(SystemExit):
        p.parse_args(["agent", "update", "--from", "/m", "--expired-grace", "366d"])
    with pytest.raises(SystemExit):
        p.parse_args(["agent", "update", "--from", "/m", "--expired-grace", "soon"])
