"""Issue 18 "Audit trail", in memory: a software key stands in for the TPM identity key.

Each tampering variant must be detected and name the first bad entry (seq and line);
the device side refuses symlinks and huge lines, stays within its bound on disk, and a
failing append never raises into the agent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.trust._audit import (
    MAX_CHUNK_ENTRIES,
    AuditConfig,
    AuditLog,
    append_event,
    audit_chunk,
)
from modelward.trust._auditchain import (
    GENESIS,
    MAX_LINE_BYTES,
    Head,
    canonical,
    checkpoint_body,
    checkpoint_digest,
    sha256_hex,
    signed_checkpoint,
    split_lines,
    verify_audit,
    verify_segments,
)
from modelward.trust.errors import AuditError, AuditLogError


class Key:
    """A P-256 key pair standing in for a TPM identity key."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, digest: bytes) -> bytes:
        return self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


@pytest.fixture
def key() -> Key:
    return Key()


def _fill(state: Path, n: int, key: Key | None = None,
          cfg: AuditConfig | None = None) -> tuple[AuditLog, Head]:
    log = AuditLog(state, cfg or AuditConfig(durable=False),
                   signer=key.sign if key else None, clock=lambda: 1_800_000_000.0)
    head = Head(0, GENESIS)
    for i in range(n):
        head = log.append("install", {"model": "classifier", "version": f"1.0.{i}",
                                      "fingerprint": "ab" * 32, "slot": "a"})
    return log, head


def _segment(state: Path) -> tuple[list[bytes], bytes | None]:
    a = state / "audit"
    cp = a / "checkpoint.json"
    return split_lines((a / "live.jsonl").read_bytes()), cp.read_bytes() if cp.exists() else None


def _fails(lines: list[bytes], cp: bytes | None, head: Head, key: Key,
           **kw: bool) -> AuditError:
    with pytest.raises(AuditError) as ei:
        verify_audit(lines, cp, head, key.pem, **kw)
    return ei.value


def _reline(doc: dict[str, object]) -> bytes:
    return canonical(doc)


# --- the chain -------------------------------------------------------------------------

def test_untouched_log_verifies_up_to_the_signed_head(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 5, key)
    lines, cp = _segment(tmp_path)
    h = verify_audit(lines, cp, head, key.pem)
    assert [e.seq for e in h.entries] == [1, 2, 3, 4, 5]
    assert h.head == head and h.signed == 5 and h.unsigned == 0 and h.dropped_count == 0
    assert h.entries[0].prev == GENESIS and h.entries[0].fields["version"] == "1.0.0"


def test_edited_entry_is_named(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 5, key)
    lines, cp = _segment(tmp_path)
    doc = json.loads(lines[2])
    doc["fields"]["version"] = "9.9.9"  # canonical again: only the chain shows it
    lines[2] = _reline(doc)
    e = _fails(lines, cp, head, key)
    assert (e.seq, e.line, e.reason) == (3, 3, "edited")
    assert "seq 3 (line 3)" in str(e)


def test_non_canonical_edit_is_named_at_its_own_line(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 4, key)
    lines, cp = _segment(tmp_path)
    lines[1] = lines[1].replace(b'"kind":', b'"kind": ')
    e = _fails(lines, cp, head, key)
    assert (e.seq, e.line, e.reason) == (2, 2, "edited")


def test_edited_last_entry_differs_from_the_signed_head(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 4, key)
    lines, cp = _segment(tmp_path)
    doc = json.loads(lines[3])
    doc["kind"] = "activation"
    lines[3] = _reline(doc)
    e = _fails(lines, cp, head, key)
    assert (e.seq, e.line, e.reason) == (4, 4, "head-mismatch")


def test_deleted_entry_is_named(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 5, key)
    lines, cp = _segment(tmp_path)
    del lines[1]
    e = _fails(lines, cp, head, key)
    assert (e.seq, e.line, e.reason) == (2, 2, "deleted")
    assert "seq 2 missing" in str(e)


def test_reordered_entries_are_named(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 5, key)
    lines, cp = _segment(tmp_path)
    lines[2], lines[3] = lines[3], lines[2]
    e = _fails(lines, cp, head, key)
    assert (e.seq, e.line) == (3, 3)  # line 3 holds seq 4 where seq 3 belongs


def test_duplicated_entry_is_named(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 4, key)
    lines, cp = _segment(tmp_path)
    lines.insert(2, lines[1])
    e = _fails(lines, cp, head, key)
    assert (e.seq, e.line, e.reason) == (3, 3, "reordered")


def test_truncated_log_is_named(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 5, key)
    lines, cp = _segment(tmp_path)
    e = _fails(lines[:3], cp, head, key)
    assert (e.seq, e.line, e.reason) == (4, 4, "truncated")
    e = _fails([], cp, head, key)
    assert (e.seq, e.line, e.reason) == (1, 1, "truncated")


def test_consistent_rewrite_fails_against_the_signed_head(tmp_path: Path, key: Key) -> None:
    """Root on the disk rewrites the whole log consistently (every prev recomputed)."""
    _, head = _fill(tmp_path, 4, key)
    lines, cp = _segment(tmp_path)
    prev, forged = GENESIS, []
    for raw in lines:
        doc = json.loads(raw)
        doc["prev"] = prev
        if doc["seq"] == 2:
            doc["kind"] = "activation"
        forged.append(_reline(doc))
        prev = sha256_hex(forged[-1])
    verify_audit(forged, cp, None, key.pem, allow_tail=True)  # the chain itself holds
    e = _fails(forged, cp, head, key)
    assert (e.seq, e.line, e.reason) == (4, 4, "head-mismatch")


def test_entries_after_the_signed_head(tmp_path: Path, key: Key) -> None:
    log, _ = _fill(tmp_path, 3, key)
    signed = log.head()
    log.append("fallback", {"model": "classifier"})
    lines, cp = _segment(tmp_path)
    e = _fails(lines, cp, signed, key)
    assert (e.seq, e.line, e.reason) == (4, 4, "unsigned-tail")
    h = verify_audit(lines, cp, signed, key.pem, allow_tail=True)
    assert h.signed == 3 and h.unsigned == 1


def test_huge_and_malformed_lines(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 3, key)
    lines, cp = _segment(tmp_path)
    e = _fails(lines[:1] + [b"x" * (MAX_LINE_BYTES + 1)] + lines[2:], cp, head, key)
    assert (e.seq, e.line, e.reason) == (2, 2, "too-large")
    e = _fails(lines[:1] + [b'{"seq": [[[[[[1]]]]]]}'] + lines[2:], cp, head, key)
    assert (e.seq, e.line, e.reason) == (2, 2, "malformed")


# --- checkpoints and rotation ------------------------------------------------------------

def test_ten_thousand_events_stay_within_the_bound(tmp_path: Path, key: Key) -> None:
    cfg = AuditConfig(max_entries=1000, max_bytes=256 * 1024, durable=False)
    log, head = _fill(tmp_path, 10_000, key, cfg)
    files = {p.name: p.stat().st_size for p in (tmp_path / "audit").iterdir()}
    assert set(files) == {"live.jsonl", "checkpoint.json", "old.jsonl", "old-checkpoint.json"}
    assert files["live.jsonl"] <= cfg.max_bytes and files["old.jsonl"] <= cfg.max_bytes
    assert sum(files.values()) <= 2 * cfg.max_bytes + 3 * 4096
    lines, cp = _segment(tmp_path)
    h = verify_audit(lines, cp, head, key.pem)
    assert h.head == head and h.dropped_count + len(h.entries) == 10_000
    assert h.entries[0].seq == h.dropped_count + 1
    # the older segment verifies from its own checkpoint up to the dropped head
    a = tmp_path / "audit"
    old = verify_audit(split_lines((a / "old.jsonl").read_bytes()),
                       (a / "old-checkpoint.json").read_bytes(),
                       Head(h.dropped_count, h.dropped_head_hash), key.pem)
    assert old.entries[-1].seq == h.dropped_count


def test_forged_checkpoint_is_refused(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 30, key, AuditConfig(max_entries=10, durable=False))
    lines, cp = _segment(tmp_path)
    assert cp is not None
    body = json.loads(cp)["checkpoint"]
    body["dropped_count"] = body["seq"] = body["seq"] - 1  # hides one dropped entry
    forged = signed_checkpoint(body, Key().sign(checkpoint_digest(body)))
    e = _fails(lines, forged, head, key)
    assert (e.line, e.reason) == (0, "checkpoint-signature")
    other = Key()  # another device's key signing an honest body: not this device's
    e = _fails(lines, signed_checkpoint(json.loads(cp)["checkpoint"],
                                        other.sign(checkpoint_digest(json.loads(cp)
                                                                     ["checkpoint"]))),
               head, key)
    assert e.reason == "checkpoint-signature"
    e = _fails(lines, None, head, key)  # checkpoint deleted: seq 1 to 20 unaccounted for
    assert (e.seq, e.line, e.reason) == (1, 1, "deleted") and "1 to 20 missing" in str(e)


def test_checkpoint_replaced_by_an_older_one(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 30, key, AuditConfig(max_entries=10, durable=False))
    lines, _ = _segment(tmp_path)
    old_cp = (tmp_path / "audit" / "old-checkpoint.json").read_bytes()
    e = _fails(lines, old_cp, head, key)
    assert (e.seq, e.line) == (11, 1)  # expected seq 11 after the older checkpoint


def test_head_before_the_checkpoint(tmp_path: Path, key: Key) -> None:
    """A replayed old status report whose head the checkpoint already dropped."""
    _, _ = _fill(tmp_path, 30, key, AuditConfig(max_entries=10, durable=False))
    lines, cp = _segment(tmp_path)
    e = _fails(lines, cp, Head(5, "00" * 32), key)
    assert e.reason == "head-mismatch" and "before the checkpoint" in str(e)


def test_interrupted_rotation_is_finished(tmp_path: Path, key: Key) -> None:
    log, _ = _fill(tmp_path, 10, key, AuditConfig(max_entries=10, durable=False))
    a = tmp_path / "audit"
    live = (a / "live.jsonl").read_bytes()
    # crash after checkpoint.next was written, before any rename
    h = log.head()
    body = checkpoint_body(h.seq, h.hash, h.seq, "t", GENESIS)
    (a / "checkpoint.next").write_bytes(signed_checkpoint(body, key.sign(
        checkpoint_digest(body))))
    head = log.append("activation", {"model": "classifier"})
    assert (a / "old.jsonl").read_bytes() == live and not (a / "checkpoint.next").exists()
    lines, cp = _segment(tmp_path)
    assert verify_audit(lines, cp, head, key.pem).dropped_count == 10


def test_torn_last_line_is_cut(tmp_path: Path, key: Key) -> None:
    log, _ = _fill(tmp_path, 3, key)
    with open(tmp_path / "audit" / "live.jsonl", "ab") as f:
        f.write(b'{"seq":4,"prev"')  # a power loss mid-append
    head = log.append("fallback", {"model": "classifier"})
    lines, cp = _segment(tmp_path)
    assert verify_audit(lines, cp, head, key.pem).head.seq == 4


def test_without_a_signer_the_segment_grows_to_twice_then_refuses(tmp_path: Path) -> None:
    log, _ = _fill(tmp_path, 20, None, AuditConfig(max_entries=10, durable=False))
    with pytest.raises(AuditLogError, match="no TPM"):
        log.append("install", {})
    assert len(split_lines((tmp_path / "audit" / "live.jsonl").read_bytes())) == 20


def test_a_tpm_that_does_not_sign_does_not_lose_events(tmp_path: Path, key: Key) -> None:
    from modelward.trust.errors import TpmUnavailableError

    def broken(digest: bytes) -> bytes:
        raise TpmUnavailableError("swtpm gone", tcti="swtpm:")

    log, _ = _fill(tmp_path, 10, key, AuditConfig(max_entries=10, durable=False))
    down = AuditLog(tmp_path, AuditConfig(max_entries=10, durable=False), signer=broken)
    assert append_event(tmp_path, "fallback", {"model": "m"}, signer=broken,
                        config=AuditConfig(max_entries=10, durable=False))
    head = down.append("install", {})
    assert head.seq == 12 and not (tmp_path / "audit" / "checkpoint.json").exists()
    head = log.append("install", {})  # the TPM is back: it rotates now
    lines, cp = _segment(tmp_path)
    assert cp is not None and verify_audit(lines, cp, head, key.pem).dropped_count == 12


def test_chunk_stops_before_a_line_being_written(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 3, key)
    with open(tmp_path / "audit" / "live.jsonl", "ab") as f:
        f.write(b'{"seq":4,')
    c = audit_chunk(tmp_path, 0)
    assert len(c["entries"]) == 3 and c["next"] is None


# --- the device's files ----------------------------------------------------------------

def test_symlinked_audit_dir_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "audit").symlink_to(elsewhere)
    with pytest.raises(AuditLogError, match="not a directory"):
        AuditLog(state).append("install", {})
    with caplog.at_level(logging.ERROR):
        assert append_event(state, "install", {"model": "m"}) is False  # logged, no raise
    assert "not recorded" in caplog.text
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    with pytest.raises(AuditLogError):
        audit_chunk(state, 0)


@pytest.mark.parametrize("name", ["live.jsonl", "checkpoint.json", "checkpoint.next"])
def test_symlinked_file_is_refused(tmp_path: Path, key: Key, name: str) -> None:
    log, _ = _fill(tmp_path, 2, key)
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    p = tmp_path / "audit" / name
    if p.exists():
        p.unlink()
    p.symlink_to(target)
    with pytest.raises(AuditLogError, match="symlink"):
        log.append("install", {})
    assert target.read_bytes() == b"precious\n"


def test_huge_last_line_on_disk_is_refused(tmp_path: Path, key: Key) -> None:
    log, _ = _fill(tmp_path, 2, key)
    with open(tmp_path / "audit" / "live.jsonl", "ab") as f:
        f.write(b"x" * (10 * MAX_LINE_BYTES) + b"\n")
    before = (tmp_path / "audit" / "live.jsonl").stat().st_size
    with pytest.raises(AuditLogError, match="over"):
        log.append("install", {})
    assert (tmp_path / "audit" / "live.jsonl").stat().st_size == before


def test_unknown_kind_and_oversized_fields(tmp_path: Path, key: Key) -> None:
    assert append_event(tmp_path, "made-up", {}) is False
    log = AuditLog(tmp_path, AuditConfig(durable=False))
    head = log.append("download-refused", {"reason": "r" * 10_000, "Bad-Name": "x"})
    lines, _ = _segment(tmp_path)
    e = json.loads(lines[0])
    assert len(e["fields"]["reason"]) == 256 and "Bad-Name" not in e["fields"]
    assert head.seq == 1


def test_chunks_are_bounded_and_cover_the_segment(tmp_path: Path, key: Key) -> None:
    _, head = _fill(tmp_path, 600, key, AuditConfig(max_entries=2000, max_bytes=1 << 20,
                                                    durable=False))
    got: list[bytes] = []
    offset: int | None = 0
    first = None
    while offset is not None:
        c = audit_chunk(tmp_path, offset)
        first = first or c
        assert len(c["entries"]) <= MAX_CHUNK_ENTRIES
        assert sum(len(x) + 1 for x in c["entries"]) <= 64 * 1024
        got += [x.encode() for x in c["entries"]]
        offset = c["next"]
    assert first is not None and "checkpoint" in first
    assert verify_audit(got, None, head, key.pem).head == head
    assert audit_chunk(tmp_path, 10**6)["entries"] == []


# --- the signed report's field -----------------------------------------------------------

def test_report_schema_takes_the_head_and_old_reports_without_it() -> None:
    check_report({"device_id": "dev-1"})  # an older device: no audit field
    check_report({"device_id": "dev-1", "audit": {"seq": 3, "hash": "ab" * 32}})
    for bad, field in (({"seq": -1, "hash": "ab" * 32}, "audit.seq"),
                       ({"seq": 1, "hash": "AB" * 32}, "audit.hash"),
                       ({"seq": 1}, "audit.hash"),
                       ({"seq": 1, "hash": "ab" * 32, "x": 1}, "audit.x")):
        with pytest.raises(ReportSchemaError) as ei:
            check_report({"device_id": "dev-1", "audit": bad})
        assert ei.value.field == field


def test_append_is_one_write_with_o_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    flags: list[int] = []
    real: Callable[..., int] = os.open

    def spy(path: object, fl: int, *a: object, **kw: object) -> int:
        if str(path) == "live.jsonl":
            flags.append(fl)
        return real(path, fl, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    AuditLog(tmp_path).append("install", {})
    w = [f for f in flags if f & os.O_WRONLY]
    assert w and all(f & os.O_APPEND and f & os.O_NOFOLLOW for f in w)


def test_history_prints_device_strings_escaped(tmp_path: Path, key: Key) -> None:
    from modelward.trust._auditview import format_history, history_json

    raw = canonical({"seq": 1, "prev": GENESIS, "time": "\x1b[2Jnow", "kind": "install",
                     "fields": {"model\n": "a\x1b]0;pwned\x07", "version": "1.0\u202e"}})
    h = verify_audit([raw], None, Head(1, sha256_hex(raw)), key.pem)
    text = format_history("dev-1", h)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert len(text.splitlines()) == 2  # the header and one entry: no injected line
    assert json.loads(json.dumps(history_json("dev-1", h)))["entries"][0]["kind"] == "install"


# --- rotation and the kept older segment ---------------------------------------------------

def _both(state: Path) -> list[tuple[list[bytes], bytes | None, str]]:
    return AuditLog(state).segments()


def test_no_checkpoint_is_signed_over_an_edited_segment(tmp_path: Path, key: Key) -> None:
    """Root on the disk edits an entry before the segment rotates: the device does not
    launder the edit into a signed checkpoint; the edited segment stays as evidence."""
    cfg = AuditConfig(max_entries=5, durable=False)
    log, head = _fill(tmp_path, 5, key, cfg)
    live = tmp_path / "audit" / "live.jsonl"
    lines = split_lines(live.read_bytes())
    doc = json.loads(lines[1])
    doc["fields"]["version"] = "6.6.6"
    lines[1] = _reline(doc)
    live.write_bytes(b"".join(x + b"\n" for x in lines))
    log.append("install", {"model": "classifier"})  # would rotate: refused, appended
    assert not (tmp_path / "audit" / "checkpoint.json").exists()
    assert not (tmp_path / "audit" / "old.jsonl").exists()
    kept = split_lines(live.read_bytes())
    assert kept[1] == lines[1] and len(kept) == 6  # the evidence is still there
    e = _fails(kept, None, head, key)
    assert (e.seq, e.line, e.reason) == (2, 2, "edited")


def test_head_signed_before_the_last_rotation_is_found_in_the_older_segment(
        tmp_path: Path, key: Key) -> None:
    cfg = AuditConfig(max_entries=5, durable=False)
    log, _ = _fill(tmp_path, 4, key, cfg)
    signed = log.head()  # the device's last report before the rotation
    _, head = _fill(tmp_path, 3, key, cfg)  # seq 5..7: rotates at seq 5
    segs = _both(tmp_path)
    assert [s[2] for s in segs] == ["old.jsonl", ""]
    h = verify_segments(segs, signed, key.pem, allow_tail=True)
    assert (h.signed, h.unsigned, h.head) == (4, 3, head)
    assert [e.seq for e in h.entries] == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(AuditError) as ei:
        verify_segments(segs, signed, key.pem)
    assert (ei.value.seq, ei.value.line, ei.value.reason) == (5, 5, "unsigned-tail")
    assert "old.jsonl line 5" in str(ei.value)
    # only the live segment: that head lies before its checkpoint
    with pytest.raises(AuditError, match="before the checkpoint"):
        verify_segments(segs[1:], signed, key.pem, allow_tail=True)


def test_edited_or_replaced_older_segment_is_named(tmp_path: Path, key: Key) -> None:
    cfg = AuditConfig(max_entries=5, durable=False)
    _, head = _fill(tmp_path, 8, key, cfg)
    (old_lines, old_cp, name), live = _both(tmp_path)
    doc = json.loads(old_lines[2])
    doc["kind"] = "activation"
    edited = [*old_lines[:2], _reline(doc), *old_lines[3:]]
    with pytest.raises(AuditError) as ei:
        verify_segments([(edited, old_cp, name), live], head, key.pem)
    assert (ei.value.seq, ei.value.line, ei.value.reason) == (3, 3, "edited")
    assert "old.jsonl line 3" in str(ei.value)
    # the older segment cut short (consistently): the live checkpoint does not follow it
    with pytest.raises(AuditError) as ei:
        verify_segments([(old_lines[:3], old_cp, name), live], head, key.pem)
    assert ei.value.reason == "checkpoint-mismatch"
    # an older segment without the live checkpoint after it
    with pytest.raises(AuditError, match="no checkpoint"):
        verify_segments([(old_lines, old_cp, name), (live[0], None, "")], head, key.pem)


def test_fleet_audit_reads_the_older_segment_of_an_exported_dir(tmp_path: Path,
                                                                key: Key) -> None:
    from modelward.publisher._audit import read_exported

    _fill(tmp_path, 8, key, AuditConfig(max_entries=5, durable=False))
    assert read_exported(tmp_path / "audit") == _both(tmp_path)
    assert [s[2] for s in read_exported(tmp_path / "audit")] == ["old.jsonl", ""]
    only_live = read_exported(tmp_path / "audit" / "live.jsonl",
                              tmp_path / "audit" / "checkpoint.json")
    assert only_live == _both(tmp_path)[1:]
