"""Attacker review of issue 13 "bounded before verified": the device's disk (``state_dir``).

The local files the agent parses without a MAC (journal, status, stage index) and the
MACed trust record are planted with deeply nested JSON (``json`` raises RecursionError,
a RuntimeError, which the readers' ``except (OSError, ValueError, ...)`` let through) or
with a large sparse file (no disk used, read whole into memory). What works is xfail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelward.agent._commands import StatusFile
from modelward.agent._daemon import Daemon
from modelward.trust._record import decode_record
from modelward.trust.errors import TrustRecordError
from modelward.updater.idle import BusyFileSignal
from modelward.updater.install._journal import Journal
from modelward.updater.install._stage import Stage

NESTED = b"[" * 100_000
MIB = 1 << 20


def test_a3_nested_journal_reads_as_idle(tmp_path: Path) -> None:
    (tmp_path / "journal.json").write_bytes(NESTED)
    assert Journal(tmp_path / "journal.json").read().step == "idle"


def test_a3_nested_status_file_reads_as_empty(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_bytes(NESTED)
    assert StatusFile(tmp_path).read() == {}


@pytest.mark.parametrize("name", ["journal.json", "status.json"])
def test_a3_nested_files_do_not_kill_the_daemon_status_line(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(NESTED)
    d = object.__new__(Daemon)
    d.cfg = SimpleNamespace(state_dir=tmp_path)  # type: ignore[assignment]
    line = d._journal_line() if name == "journal.json" else d._result_line()  # noqa: SLF001
    assert isinstance(line, str)


def test_a3_nested_trust_record_is_a_trust_record_error() -> None:
    with pytest.raises(TrustRecordError):
        decode_record(NESTED, "record.json")


def test_a3_nested_stage_index_line_ends_the_index(tmp_path: Path) -> None:
    s = Stage(tmp_path, tmp_path / "incoming", "k")
    s.part.write_bytes(b"")
    s.index.write_bytes(b'{"path":"a","offset":512,"size":1}\n' + NESTED + b"\n")
    assert [e.path for e in s.entries()] == ["a"]


# --- large sparse files, read whole ----------------------------------------------------------

_CHILD = """
import re, sys
from pathlib import Path
what, path = sys.argv[1], Path(sys.argv[2])
if what == "journal":
    from modelward.updater.install._journal import Journal
    Journal(path).read()
elif what == "index":
    from modelward.updater.install._stage import Stage
    s = Stage(path.parent, path.parent / "incoming", "k")
    s.entries()
elif what == "status":
    from modelward.agent._commands import StatusFile
    StatusFile(path.parent).read()
print('MAXRSS_KIB', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))
"""


def _rss(what: str, path: Path) -> int:
    r = subprocess.run([sys.executable, "-c", _CHILD, what, str(path)], capture_output=True,
                       text=True, timeout=120, check=False)
    m = re.search(r"MAXRSS_KIB (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return int(m.group(1))


@pytest.mark.parametrize(("what", "name"), [
    ("journal", "journal.json"),  # read_bounded: refused from its size, not read
    ("index", "k.index"),  # the stage index is read at most 1 MiB
    ("status", "status.json"),
])
@pytest.mark.xdist_group("machine")
def test_a3_sparse_local_file_keeps_rss_bounded(tmp_path: Path, what: str, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"{}")
    if what == "index":
        (tmp_path / "k.part").write_bytes(b"")
    normal = _rss(what, path)
    with open(path, "wb") as f:
        f.truncate(256 * MIB)
    assert os.stat(path).st_blocks * 512 < MIB  # the attacker spent no disk
    rss = _rss(what, path)
    print(f"{what}: normal {normal} KiB, sparse 256 MiB file {rss} KiB")
    assert rss <= normal + 16 * 1024, (normal, rss)


# --- busy_file: refused ----------------------------------------------------------------------


def test_a3_busy_file_sparse_huge_is_ignored_unread(tmp_path: Path) -> None:
    p = tmp_path / "busy"
    with open(p, "wb") as f:
        f.truncate(1 << 40)
    assert BusyFileSignal(p).busy() is None


def test_a3_busy_file_symlink_to_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = tmp_path / "busy"
    p.symlink_to(fifo)
    assert BusyFileSignal(p).busy() is None
    p.unlink()
    os.rename(fifo, p)  # the FIFO itself
    assert BusyFileSignal(p).busy() is None


def test_a3_busy_file_long_number_and_unicode_digits(tmp_path: Path) -> None:
    p = tmp_path / "busy"
    p.write_bytes(b"9" * 63)
    assert BusyFileSignal(p, max_depth=5).busy() is not None  # a depth: busy, by design
    p.write_text("\u0663\u0663\n")  # Arabic-Indic digits are not ASCII: no depth
    sig = BusyFileSignal(p, max_depth=5)
    assert sig.busy() is not None  # fresh and unparsable: busy within the grace only
