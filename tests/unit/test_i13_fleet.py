"""Issue 13 finding 5, pure and in-memory: the report sequence (device side) and the
freshness judgement of ``fleet status`` (operator side), with a software identity key."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from modelward.agent._observe import SEQUENCE_FILE, advance_sequence, build_report, read_sequence
from modelward.publisher._fleet import (
    FUTURE,
    MISSING,
    OTHER_FLEET,
    REJECTED,
    REPLAYED,
    STALE,
    Judgement,
    Seen,
    add_device,
    format_table,
    judge_fleet,
    judge_report,
    read_seen,
)
from modelward.trust._report import (
    MAX_SEQ,
    SEQ_SLACK_MS,
    ReportSequenceError,
    ReportSignatureError,
    next_sequence,
    report_digest,
    sign_report,
    verify_report,
)
from modelward.trust.errors import OperatorInputError
from tests.unit.test_report import _SoftKey

NOW = 1_800_000_000.0  # the operator's injected clock
POLL = 60.0


def _report(seq: int | None = 5, *, at: float = NOW - 10, fleet: str = "f1",
            poll: float | None = POLL, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"device_id": "d1", "fleet": fleet, "state": "idle",
                         "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
                         **extra}
    if seq is not None:
        r["seq"] = seq
    if poll is not None:
        r["poll_interval"] = poll
    return r


def _judge(report: dict[str, Any] | None, seen: Seen | None = None,
           digest: str | None = None) -> Judgement:
    d = digest if digest is not None else (report_digest(report) if report else "")
    return judge_report(report, d, seen=seen, now=NOW, fleet="f1", default_poll=3600.0)


# --- the pure judgement ---------------------------------------------------------------

def test_fresh_first_and_newer_reports_are_ok_and_move_seen_forward() -> None:
    r = _report(5)
    j = _judge(r)
    assert j.flags == () and j.seen == Seen(5, report_digest(r))
    r2 = _report(6)
    assert _judge(r2, seen=j.seen) == Judgement((), "", Seen(6, report_digest(r2)))


def test_the_same_report_seen_again_is_ok() -> None:
    r = _report(5)
    seen = Seen(5, report_digest(r))
    assert _judge(r, seen=seen) == Judgement((), "", seen)


def test_older_sequence_is_replayed_and_seen_does_not_move_back() -> None:
    old, new = _report(5), _report(9)
    seen = Seen(9, report_digest(new))
    j = _judge(old, seen=seen)
    assert j.flags == (REPLAYED,) and "seq 5 is older than seq 9" in j.detail
    assert j.seen == seen


def test_same_sequence_on_another_report_is_replayed() -> None:
    seen = Seen(5, report_digest(_report(5, state_note="a")))
    j = _judge(_report(5), seen=seen)
    assert j.flags == (REPLAYED,) and "another report" in j.detail and j.seen == seen


@pytest.mark.parametrize("seq", [None, -1, True, 1.5, "7", MAX_SEQ + 1])
def test_a_report_without_a_valid_sequence_is_replayed(seq: Any) -> None:
    r = _report(None)
    if seq is not None:
        r["seq"] = seq
    j = _judge(r, seen=None)
    assert REPLAYED in j.flags and j.seen is None


def test_age_against_three_poll_intervals() -> None:
    assert _judge(_report(at=NOW - 3 * POLL)).flags == ()
    j = _judge(_report(at=NOW - 3 * POLL - 1))
    assert j.flags == (STALE,) and "poll interval 1.0min" in j.detail
    assert j.seen is not None  # a stale report is still the newest one seen


def test_the_poll_interval_defaults_when_the_report_has_none() -> None:
    assert _judge(_report(at=NOW - 3 * 3600 + 5, poll=None)).flags == ()
    assert _judge(_report(at=NOW - 3 * 3600 - 5, poll=None)).flags == (STALE,)
    for bad in (0, -5, True, "60", 10**12):
        assert _judge(_report(at=NOW - 3 * 3600 - 5, poll=bad)).flags == (STALE,)  # type: ignore[arg-type]


@pytest.mark.parametrize("at", [None, "", "yesterday", "2026-12-01T10:00:00", 12, "9" * 100])
def test_no_valid_time_is_stale(at: Any) -> None:
    r = _report()
    r["at"] = at
    assert STALE in _judge(r).flags


def test_a_report_dated_ahead_of_the_clock_is_flagged_and_not_remembered() -> None:
    j = _judge(_report(at=NOW + 301))
    assert j.flags == (FUTURE,) and j.seen is None
    assert _judge(_report(at=NOW + 299)).flags == ()  # clock skew within bounds


def test_another_fleets_report_is_flagged_and_not_remembered() -> None:
    j = _judge(_report(fleet="f0"))
    assert j.flags == (OTHER_FLEET,) and "'f0'" in j.detail and j.seen is None
    assert OTHER_FLEET in _judge(_report(fleet=None)).flags  # type: ignore[arg-type]


def test_flags_combine_in_order() -> None:
    seen = Seen(9, "x")
    j = _judge(_report(5, fleet="f0", at=NOW - 10 * POLL), seen=seen)
    assert j.flags == (OTHER_FLEET, REPLAYED, STALE) and j.seen == seen


def test_no_report_is_missing_and_says_when_one_was_seen() -> None:
    assert _judge(None) == Judgement((MISSING,), "no status report", None)
    j = _judge(None, seen=Seen(9, "x"))
    assert j.flags == (MISSING,) and "seq 9 was seen before" in j.detail


# --- the device's sequence ------------------------------------------------------------

def test_next_sequence_rises_and_has_the_clock_as_floor() -> None:
    assert next_sequence(0, NOW) == int(NOW * 1000)
    assert next_sequence(int(NOW * 1000), NOW) == int(NOW * 1000) + 1  # same ms
    ahead = int(NOW * 1000) + SEQ_SLACK_MS
    assert next_sequence(ahead, NOW) == ahead + 1  # clock a little behind: believed
    # far ahead of the clock (planted by the disk, or an RTC-less boot): the clock is used
    assert next_sequence(ahead + 1, NOW) == int(NOW * 1000)
    assert next_sequence(MAX_SEQ, NOW) == int(NOW * 1000)
    with pytest.raises(ReportSequenceError):
        next_sequence(0, (MAX_SEQ + 1) / 1000)


def test_sequence_persists_before_use_and_survives_restart_and_rollback(
    tmp_path: Path,
) -> None:
    a = advance_sequence(tmp_path, NOW)
    assert read_sequence(tmp_path / SEQUENCE_FILE) == a  # persisted when returned
    b = advance_sequence(tmp_path, NOW)  # a new process reads the same file
    assert b == a + 1
    old = (tmp_path / SEQUENCE_FILE).read_bytes()
    c = advance_sequence(tmp_path, NOW + 1)
    (tmp_path / SEQUENCE_FILE).write_bytes(old)  # the disk attacker rolls it back
    assert advance_sequence(tmp_path, NOW + 2) > c
    (tmp_path / SEQUENCE_FILE).unlink()  # or deletes it
    assert advance_sequence(tmp_path, NOW + 3) > c


def test_a_planted_sequence_file_is_read_boundedly(tmp_path: Path) -> None:
    p = tmp_path / SEQUENCE_FILE
    os.mkfifo(p)  # must not block
    assert read_sequence(p) == 0
    p.unlink()
    (tmp_path / "elsewhere").write_text("123\n")
    p.symlink_to(tmp_path / "elsewhere")  # not followed
    assert read_sequence(p) == 0
    assert advance_sequence(tmp_path, NOW) == int(NOW * 1000)
    assert not p.is_symlink() and (tmp_path / "elsewhere").read_text() == "123\n"
    for junk in (b"", b"-5", b"12x", b"9" * 17, str(MAX_SEQ + 1).encode(),
                 b"1" + b" " * 40 + b"2"):
        p.write_bytes(junk)
        assert read_sequence(p) == 0
    with p.open("wb") as f:
        f.truncate(1 << 30)  # sparse 1 GiB: only a few bytes are read
    assert read_sequence(p) == 0


def test_a_sequence_that_cannot_be_persisted_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / SEQUENCE_FILE).mkdir()
    with pytest.raises(ReportSequenceError) as e:
        advance_sequence(tmp_path, NOW)
    assert e.value.path == str(tmp_path / SEQUENCE_FILE)
    (tmp_path / SEQUENCE_FILE).rmdir()
    (tmp_path / SEQUENCE_FILE).write_text(f"{MAX_SEQ}\n")  # planted: not believed
    assert advance_sequence(tmp_path, NOW) == int(NOW * 1000)
    with pytest.raises(ReportSequenceError, match="exhausted") as e:
        advance_sequence(tmp_path, (MAX_SEQ + 1) / 1000)  # only a clock past MAX_SEQ
    assert e.value.path == str(tmp_path / SEQUENCE_FILE)


def test_build_report_carries_seq_time_poll_and_fleet() -> None:
    r = build_report("d1", "f1", None, "idle", {}, seq=42, now=NOW, poll_interval=POLL)
    assert (r["seq"], r["poll_interval"], r["fleet"]) == (42, POLL, "f1")
    assert datetime.fromisoformat(r["at"]).timestamp() == NOW


def test_non_json_numbers_are_rejected() -> None:
    k = _SoftKey()
    for const in ("NaN", "Infinity", "-Infinity"):
        data = sign_report({"device_id": "d1", "poll_interval": 1.0}, k).replace(
            b"1.0", const.encode())
        with pytest.raises(ReportSignatureError, match="malformed"):
            verify_report(data, k.identity_public_pem(), "d1")


# --- the fleet view over an operator directory ----------------------------------------

def _enrol(fleet_dir: Path, device: str) -> _SoftKey:
    k = _SoftKey()
    add_device(fleet_dir, device, k.identity_public_pem())
    return k


def _signed(k: _SoftKey, device: str, seq: int, **kw: Any) -> bytes:
    r = _report(seq, **kw)
    r["device_id"] = device
    return sign_report(r, k)


def test_fleet_view_replay_missing_cleared_and_unenrolled(tmp_path: Path) -> None:
    fd = tmp_path / "fleet"
    k1, _k2, k3 = _enrol(fd, "d1"), _enrol(fd, "d2"), _enrol(fd, "d3")
    old, new = _signed(k1, "d1", 5), _signed(k1, "d1", 6)
    r3 = _signed(k3, "d3", 100)

    def view(payloads: dict[str, bytes]) -> dict[str, Any]:
        return {r.device_id: r for r in judge_fleet(payloads, fd, "f1", NOW, 3600.0)}

    rows = view({"d1": old, "d3": r3})
    assert rows["d1"].status == "ok" and rows["d3"].status == "ok"
    assert rows["d2"].status == MISSING and rows["d2"].report == {}  # silent, enrolled
    assert read_seen(fd, "d1") == Seen(5, report_digest(json.loads(old)["report"]))
    assert view({"d1": new})["d1"].status == "ok"
    rows = view({"d1": old, "d3": b"", "intruder": _signed(_SoftKey(), "intruder", 1)})
    assert rows["d1"].status == REPLAYED and rows["d1"].verified
    assert read_seen(fd, "d1") is not None and read_seen(fd, "d1").seq == 6  # type: ignore[union-attr]
    assert rows["d3"].status == MISSING and "seq 100 was seen before" in rows["d3"].problem
    assert rows["intruder"].flags == (REJECTED,) and "not enrolled" in rows["intruder"].problem
    assert set(rows) == {"d1", "d2", "d3", "intruder"}
    table = format_table(list(rows.values()))
    assert "REPLAYED: seq 5 is older than seq 6" in table
    assert "MISSING: no status report" in table and "REJECTED: " in table
    assert table.splitlines()[0].split() == ["DEVICE", "STATE", "SIGNATURE", "REPORT",
                                             "ACTIVE", "PREVIOUS", "CHANNEL", "STEP", "LAST",
                                             "ERROR", "AT", "SEQ"]


def test_damaged_operator_state_is_named(tmp_path: Path) -> None:
    fd = tmp_path / "fleet"
    k = _enrol(fd, "d1")
    (fd / "seen").mkdir()
    for junk in (b"{", b'{"seq": "5", "digest": "x"}', b'{"seq": 5}', b" " * 5000):
        (fd / "seen" / "d1.json").write_bytes(junk)
        with pytest.raises(OperatorInputError, match="d1.json"):
            judge_fleet({"d1": _signed(k, "d1", 5)}, fd, "f1", NOW)


def test_no_registry_is_an_operator_error(tmp_path: Path) -> None:
    with pytest.raises(OperatorInputError, match="no fleet registry"):
        judge_fleet({}, tmp_path / "nowhere", "f1", NOW)
    assert not (tmp_path / "nowhere").exists()


def test_concurrent_views_never_move_seen_back(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    import modelward.publisher._fleet as fleet_mod

    real_write = fleet_mod.write_seen

    def slow_write(fleet_dir: Path, device: str, seen: Seen) -> None:
        time.sleep(0.02 if seen.seq < 20 else 0)  # older views finish last
        real_write(fleet_dir, device, seen)

    monkeypatch.setattr(fleet_mod, "write_seen", slow_write)
    fd = tmp_path / "fleet"
    k = _enrol(fd, "d1")
    payloads = [_signed(k, "d1", n) for n in range(1, 21)]
    threads = [threading.Thread(target=judge_fleet, args=({"d1": p}, fd, "f1", NOW))
               for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_seen(fd, "d1") == Seen(20, report_digest(json.loads(payloads[-1])["report"]))


def test_cli_refuses_a_nonpositive_poll_interval(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from modelward.cli import main

    code = main(["fleet", "status", "--fleet-dir", str(tmp_path), "--broker",
                 "mqtts://127.0.0.1:1", "--fleet", "f1", "--poll-interval", "0"])
    # issue 15: refused by the parser, in one line naming the argument
    assert code == 2 and "argument --poll-interval: '0' must be above 0" in \
        capsys.readouterr().err
