"""Reviewer a4: the device's disk as the attacker, cheap variants without a TPM or network.

A test marked ``xfail(strict=True)`` shows an attack that WORKS today (its assertions say
what should hold); the others show an attack that is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelward.agent._commands import StatusFile
from modelward.agent._observe import SEQUENCE_FILE, advance_sequence, read_sequence
from modelward.trust._report import MAX_SEQ
from modelward.updater.install._journal import Journal
from modelward.updater.install._rejections import (
    Rejection,
    RejectionsFileError,
    RejectionStore,
    decode,
    digest,
    encode,
)

KEY = b"a4" * 16


class _Tpm:
    def mac(self, d: bytes) -> bytes:
        return hmac.new(KEY, d, hashlib.sha256).digest()

    def mac_ok(self, d: bytes, m: bytes) -> bool:
        return hmac.compare_digest(self.mac(d), m)


# --- report-seq ------------------------------------------------------------------------


def test_a4_planted_max_report_seq_does_not_silence_the_device(tmp_path: Path) -> None:
    (tmp_path / SEQUENCE_FILE).write_text(f"{MAX_SEQ}\n")
    now = time.time()
    seq = advance_sequence(tmp_path, now)  # not silenced: the clock is the floor
    assert seq >= int(now * 1000)
    assert read_sequence(tmp_path / SEQUENCE_FILE) == seq
    assert advance_sequence(tmp_path, now + 60) > seq


def test_a4_planted_future_report_seq_does_not_make_fresh_reports_look_replayed(
        tmp_path: Path) -> None:
    from modelward.publisher._fleet import REPLAYED, judge_report
    from modelward.trust._report import report_digest

    now = time.time()
    ahead = int((now + 30 * 86400) * 1000)
    (tmp_path / SEQUENCE_FILE).write_text(f"{ahead}\n")

    def report(seq: int, at: float) -> dict[str, object]:
        return {"device_id": "d", "fleet": "f", "seq": seq, "poll_interval": 60,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(at))}

    r1 = report(advance_sequence(tmp_path, now), now)  # sent and seen by the operator
    j1 = judge_report(r1, report_digest(r1), seen=None, now=now, fleet="f")
    (tmp_path / SEQUENCE_FILE).unlink()  # the disk removes its plant
    r2 = report(advance_sequence(tmp_path, now + 60), now + 60)  # genuine, fresh
    j2 = judge_report(r2, report_digest(r2), seen=j1.seen, now=now + 60, fleet="f")
    assert REPLAYED not in j2.flags, j2.detail


def test_a4_report_seq_rolled_back_or_deleted_never_reissues(tmp_path: Path) -> None:
    """Refused: rolling report-seq back, deleting it or planting junk never lets a number be
    issued twice (the clock is the floor)."""
    now = time.time()
    first = advance_sequence(tmp_path, now)
    (tmp_path / SEQUENCE_FILE).write_text("1\n")
    second = advance_sequence(tmp_path, now + 1)  # reports are seconds apart
    assert second > first
    (tmp_path / SEQUENCE_FILE).unlink()
    assert advance_sequence(tmp_path, now + 2) > second


def test_a4_symlinked_report_seq_is_not_followed(tmp_path: Path) -> None:
    """Refused: report-seq -> a file outside state_dir is neither read nor written."""
    state = tmp_path / "state"
    state.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("999999999999999\n")
    os.symlink(outside, state / SEQUENCE_FILE)
    assert read_sequence(state / SEQUENCE_FILE) == 0
    advance_sequence(state, time.time())
    assert outside.read_text() == "999999999999999\n"
    assert not (state / SEQUENCE_FILE).is_symlink()


# --- FIFOs planted at files the agent reads ------------------------------------------


def _returns_within(fn: Callable[[], object], fifo: Path, seconds: float = 3.0) -> bool:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    if hung:  # unblock the reader so the thread ends
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
    return not hung


def test_a4_fifo_at_journal_json_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "journal.json")
    assert _returns_within(Journal(tmp_path / "journal.json").read, tmp_path / "journal.json")


def test_a4_fifo_at_status_json_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "status.json")
    assert _returns_within(StatusFile(tmp_path).read, tmp_path / "status.json")


# --- rejections.json -----------------------------------------------------------------


def _rej(path: str, version: str, at: float) -> Rejection:
    return Rejection(path, (("sha256", hashlib.sha256(path.encode()).hexdigest()),),
                     "HealthCheckError", "failed", "m", version, at, at + 3600)


def test_a4_rejection_entries_swapped_between_two_maced_files_are_refused(
        tmp_path: Path) -> None:
    """Refused: the MAC covers the whole list, so an entry lifted from one authentic file
    into another (or a list spliced from two) does not verify."""
    tpm = _Tpm()
    now = time.time()
    a = (_rej("m/m-1.tar", "1", now),)
    b = (_rej("m/m-2.tar", "2", now),)
    file_a = json.loads(encode(a, tpm.mac(digest(a))))
    file_b = json.loads(encode(b, tpm.mac(digest(b))))
    spliced = dict(file_a, rejections=file_a["rejections"] + file_b["rejections"])
    with pytest.raises(RejectionsFileError, match="MAC"):
        decode(json.dumps(spliced).encode(), "r", tpm.mac_ok)
    swapped = dict(file_a, rejections=file_b["rejections"])
    with pytest.raises(RejectionsFileError, match="MAC"):
        decode(json.dumps(swapped).encode(), "r", tpm.mac_ok)
    # a whole authentic file put back is believed, but says only what really failed
    store = RejectionStore(tmp_path, tpm, clock=lambda: now + 7200)
    (tmp_path / "rejections.json").write_bytes(encode(b, tpm.mac(digest(b))))
    assert store.entries() == b
    assert not any(r.live(now + 7200) for r in store.entries())  # expired: holds nothing


def test_a4_rejections_from_another_device_are_refused(tmp_path: Path) -> None:
    """Refused: a file MACed by another device's TPM (another key) is not believed."""
    class _Other(_Tpm):
        def mac(self, d: bytes) -> bytes:
            return hmac.new(b"other" * 8, d, hashlib.sha256).digest()

    now = time.time()
    entries = (_rej("m/m-2.tar", "2", now),)
    (tmp_path / "rejections.json").write_bytes(encode(entries, _Other().mac(digest(entries))))
    assert RejectionStore(tmp_path, _Tpm(), clock=lambda: now).entries() == ()


@pytest.mark.parametrize("name", ["status.json", "journal.json", "rejections.json"])
def test_a4_symlinked_state_files_are_replaced_not_written_through(
        tmp_path: Path, name: str) -> None:
    """Refused: writing status.json, journal.json or rejections.json over a planted symlink
    replaces the link; the file outside state_dir keeps its bytes."""
    state = tmp_path / "state"
    state.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("operator data\n")
    os.symlink(outside, state / name)
    if name == "status.json":
        StatusFile(state).write({"x": 1})
    elif name == "journal.json":
        Journal(state / name).enter("checking")
    else:
        RejectionStore(state, _Tpm()).save((_rej("m/m-1.tar", "1", time.time()),))
    assert outside.read_text() == "operator data\n"
    assert not (state / name).is_symlink()
