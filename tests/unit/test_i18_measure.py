"""Issue 18 measurement: the event log's pure logic and the operator verifier's bounds
(no TPM here: the TPM side is tests/integration/test_i18_attest.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelward.publisher._attest import Attested, check_history, verify_answer
from modelward.publisher.errors import AttestationError
from modelward.trust import _measure as m
from modelward.trust._record import ModelRef
from modelward.trust._tpmimport import import_tpm2_pytss
from modelward.trust.errors import MeasureLogError

REF = ModelRef("classifier", "2.0.0", "ab" * 32, "b")


def test_replay_is_the_nv_extend_chain_from_zero() -> None:
    a, b = b"one", b"two"
    v1 = hashlib.sha256(bytes(32) + hashlib.sha256(a).digest()).digest()
    v2 = hashlib.sha256(v1 + hashlib.sha256(b).digest()).digest()
    assert m.replay([a, b]) == v2
    assert m.replay([b, a]) != v2 and m.replay([a]) == v1 and m.replay([]) == bytes(32)


def test_event_lines_are_canonical_and_parse_back() -> None:
    line = m.event_line(3, m.ACTIVATION, REF, "installed", 0.0)
    ev = m.event_json(line)
    assert ev is not None and ev["seq"] == 3 and ev["fingerprint"] == "ab" * 32
    assert ev["time"] == "1970-01-01T00:00:00Z" and ev["slot"] == "b"
    assert m.event_json(line.replace(b",", b", ", 1)) is None  # not canonical
    assert m.event_json(line.replace(b"activation", b"install")) is None  # unknown kind
    assert m.event_json(b"[" * 5000) is None  # bounded: no RecursionError
    long = m.event_line(0, m.NOTHING_TRUSTED, None, "x" * 5000, 0.0)
    assert len(long) < m.MAX_EVENT_BYTES and "fingerprint" not in json.loads(long)


def test_split_log_drops_a_torn_append_and_bounds_lines() -> None:
    assert m.split_log(b"a\nb\nto") == [b"a", b"b"]
    assert m.split_log(b"") == []
    with pytest.raises(ValueError, match="line 2"):
        m.split_log(b"a\n" + b"x" * (m.MAX_EVENT_BYTES + 1) + b"\n")


def test_event_log_files_never_through_a_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = m.EventLog(state)
    assert log.read() == []
    log.append(b"one")
    log.append(b"two")
    assert log.read() == [b"one", b"two"]
    log.cut_to(1, [b"one", b"two"])
    assert log.read() == [b"one"]
    log.new_boot()
    assert log.read() == [] and (state / "measure" / "previous.jsonl").read_bytes() == b"one\n"
    # the events file a symlink or a FIFO: refused, nothing written through it
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    os.symlink(outside, state / "measure" / "events.jsonl")
    with pytest.raises(MeasureLogError, match="symlink"):
        log.append(b"x")
    with pytest.raises(MeasureLogError):
        log.read()
    assert outside.read_bytes() == b""
    os.unlink(state / "measure" / "events.jsonl")
    os.mkfifo(state / "measure" / "events.jsonl")
    with pytest.raises(MeasureLogError, match="not a regular file"):
        log.read()
    os.unlink(state / "measure" / "events.jsonl")
    (state / "measure" / "events.jsonl").write_bytes(b"x" * (m.MAX_LOG_BYTES + 2 * 1024))
    with pytest.raises(MeasureLogError, match="over"):
        log.read()
    # the directory itself a symlink
    os.rename(state / "measure", tmp_path / "moved")
    os.symlink(tmp_path / "moved", state / "measure")
    with pytest.raises(MeasureLogError, match="refusing to follow"):
        log.append(b"x")


def test_measure_without_a_real_tpm_does_nothing(tmp_path: Path) -> None:
    assert m.measure(object(), tmp_path, m.BOOT_CHECK, REF) is False  # type: ignore[arg-type]
    assert not (tmp_path / "measure").exists()


@pytest.fixture
def ak_file(tmp_path: Path) -> Path:
    """An enrolled AK record (the public key of a P-256 key, as TPM2B_PUBLIC)."""
    t = import_tpm2_pytss()
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = t.TPM2B_PUBLIC.from_pem(pem)
    p = tmp_path / "dev-1.ak.json"
    p.write_text(json.dumps({"device_id": "dev-1",
                             "ak_public": base64.b64encode(pub.marshal()).decode()}))
    return p


def _reason(doc: object, ak: Path, device: str = "dev-1") -> str:
    with pytest.raises(AttestationError) as ei:
        verify_answer(doc, device, ak, b"n" * 32, lambda fp: None)
    return ei.value.reason


def test_verifier_refuses_malformed_answers_before_any_crypto(ak_file: Path,
                                                              tmp_path: Path) -> None:
    good = {"format": m.ANSWER_FORMAT, "device_id": "dev-1", "events": [],
            "attest": "", "signature": ""}
    assert _reason(good, tmp_path / "missing.ak.json") == "not enrolled"
    assert _reason(good, ak_file, device="dev-2") == "not enrolled"  # another device's AK
    for bad in (None, [], "x", {**good, "format": "other"}, {**good, "device_id": "dev-2"},
                {**good, "events": "x"}, {**good, "events": [1]},
                {**good, "events": ["é"]}, {**good, "events": ["x"] * (m.MAX_EVENTS + 1)},
                {**good, "events": ["x" * (m.MAX_EVENT_BYTES + 1)]},
                {**good, "attest": "!!"}, {**good, "attest": "A" * 100_000},
                {**good, "attest": base64.b64encode(b"\x00\x05abc").decode()},
                {**good, "attest": 7}):
        assert _reason(bad, ak_file) == "malformed", bad


def _attested(lines: list[bytes], epoch: str = "1:0") -> Attested:
    return Attested("classifier", "2.0.0", "stable", False, "ab" * 32, "b", "boot-check",
                    "", len(lines), "classifier 2.0.0", epoch, tuple(lines))


def test_history_refuses_a_register_reset_within_an_epoch(tmp_path: Path) -> None:
    check_history(tmp_path, "dev-1", _attested([b"a", b"b"]))
    check_history(tmp_path, "dev-1", _attested([b"a", b"b", b"c"]))  # grew: fine
    for erased in ([b"a"], [b"x", b"b", b"c"], []):
        with pytest.raises(AttestationError) as ei:
            check_history(tmp_path, "dev-1", _attested(erased))
        assert ei.value.reason == "register reset"
    check_history(tmp_path, "dev-1", _attested([b"z"], epoch="2:0"))  # a reboot: fresh
    check_history(tmp_path, "dev-2", _attested([]))  # another device: its own history


def test_a_damaged_history_is_refused_never_taken_as_absent(tmp_path: Path) -> None:
    hist = tmp_path / "attest" / "dev-1.json"
    hist.parent.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"format": "modelward-attest-history/1", "epoch": "1:0",
                                   "events": 0, "head": ""}))
    cases: list[tuple[str, object]] = [("garbage", b"{"), ("wrong types", json.dumps(
        {"format": "modelward-attest-history/1", "epoch": 1, "events": "2", "head": 3})),
        ("huge", b" " * 10_000), ("symlink", None), ("fifo", None)]
    for name, data in cases:
        if hist.exists() or hist.is_symlink():
            hist.unlink()
        if name == "symlink":
            os.symlink(outside, hist)
        elif name == "fifo":
            os.mkfifo(hist)
        else:
            hist.write_bytes(data if isinstance(data, bytes) else str(data).encode())
        with pytest.raises(AttestationError) as ei:
            check_history(tmp_path, "dev-1", _attested([b"a"]))
        assert ei.value.reason == "history unreadable", name
    assert json.loads(outside.read_text())["events"] == 0  # nothing written through it


def test_an_event_stays_within_its_bound_whatever_the_reason() -> None:
    """Found by review: fields were cut before JSON escaping, so 256 non-ASCII characters
    made a 1.9 KB line that broke every later read of the log."""
    for reason in ("é" * 256, "\x00" * 5000, "😀" * 300):
        line = m.event_line(7, m.FALLBACK, REF, reason, 0.0, "3:" + "ab" * 32)
        assert len(line) <= m.MAX_EVENT_BYTES and m.event_json(line) is not None
