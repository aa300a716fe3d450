"""Issue 18 "Audit trail", must-shows 4 and 5, against real swtpm (and the nginx origin).

The agent's real paths append the events; the TPM identity key signs the head into the
status report; `fleet audit` (the real command) verifies an exported log against it and
names the first bad entry of an edited, truncated or reordered copy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from modelward.agent._commands import signed_report
from modelward.publisher._fleet import add_device, judge_fleet
from modelward.simulator._attacks import RepoAttacker
from modelward.trust._audit import AuditConfig, AuditLog
from modelward.trust._auditchain import Head, split_lines, verify_audit, verify_segments
from modelward.trust._tpm import Tpm
from modelward.trust.errors import AuditError
from modelward.updater.errors import HealthCheckError, RollbackError, TargetHashError
from tests._helpers import publish_root_v2
from tests.conftest import PASSPHRASE, World, copytree


def _entries(w: World) -> list[dict[str, object]]:
    p = w.state / "audit" / "live.jsonl"
    return [json.loads(x) for x in split_lines(p.read_bytes())] if p.exists() else []


def _kinds(w: World) -> list[str]:
    return [str(e["kind"]) for e in _entries(w)]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _enrol(w: World) -> Path:
    fleet = w.tmp / "fleet"
    t = Tpm(w.tpm.tcti)
    try:
        pem = t.identity_public_pem()
    finally:
        t.close()
    add_device(fleet, w.cfg.device_id, pem)
    return fleet


def _report(w: World, fleet: Path) -> bytes:
    """The device signs a report; the operator's `fleet status` judges (and keeps) it."""
    payload = signed_report(w.cfg, "active")
    rows = judge_fleet({w.cfg.device_id: payload}, fleet, w.cfg.fleet, time.time())
    assert rows[0].verified, rows[0].problem
    return payload


def _fleet_audit(w: World, fleet: Path, log: Path, *extra: str) -> tuple[int, str, str]:
    r = w.cli("fleet", "audit", "--fleet-dir", str(fleet), "--device", w.cfg.device_id,
              "--log", str(log), *extra)
    assert "Traceback" not in r.stderr
    return r.returncode, r.stdout, r.stderr


def test_agent_events_signed_head_and_fleet_audit(world: World) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    assert _kinds(w) == ["install", "activation"]
    first = _entries(w)[0]
    assert first["fields"]["version"] == "1.0.0" and first["fields"]["slot"] == "a"  # type: ignore[index]
    publish_root_v2(w.repo_dir, w.keys, PASSPHRASE)  # a root rotation
    w.publish("2.0.0", seed=2)
    w.update()
    assert _kinds(w)[2:] == ["root-rotation", "install", "activation"]
    w.publish("3.0.0", seed=3, vectors_seed=4)  # signed, fails its test vectors
    with pytest.raises(HealthCheckError):
        w.update()
    e = _entries(w)[-1]
    assert e["kind"] == "health-check-failed"
    assert e["fields"]["version"] == "3.0.0" and "HealthCheckError" in e["fields"]["reason"]  # type: ignore[index]
    w.publish("4.0.0", seed=5)
    attacker = RepoAttacker(w.repo_dir, w.keys, PASSPHRASE)  # the origin serves other bytes
    attacker.replace_target("classifier", "4.0.0", w.bundle("4.0.0", seed=666).read_bytes())
    with pytest.raises(TargetHashError):
        w.update()
    e = _entries(w)[-1]
    assert e["kind"] == "download-refused" and e["fields"]["version"] == "4.0.0"  # type: ignore[index]
    assert "TargetHashError" in e["fields"]["reason"]  # type: ignore[index]
    _flip(w.state / "current" / "model.onnx")  # the disk alters the active model
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert r.returncode == 0, r.stderr
    e = _entries(w)[-1]
    assert e["kind"] == "fallback" and e["fields"]["version"] == "1.0.0"  # type: ignore[index]
    _flip(w.state / "current" / "model.onnx")
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert r.returncode == 3
    assert _entries(w)[-1]["kind"] == "nothing-trusted"
    seqs = [e["seq"] for e in _entries(w)]
    assert seqs == list(range(1, len(seqs) + 1))

    # the head goes into the signed report; the operator keeps the newest
    fleet = _enrol(w)
    payload = _report(w, fleet)
    report = json.loads(payload)["report"]
    head = AuditLog(w.state).head()
    assert report["audit"] == head.to_json() and head.seq == len(seqs)
    # `agent audit` prints the local history
    r = w.cli("agent", "audit", "--config", str(w.conf_path), "--json")
    assert r.returncode == 0, r.stderr
    assert [x["kind"] for x in json.loads(r.stdout)["entries"]] == _kinds(w)

    export = w.tmp / "export"
    shutil.copytree(w.state / "audit", export)
    code, out, err = _fleet_audit(w, fleet, export)
    assert code == 0, err
    assert f"head seq {head.seq}" in out and "health-check-failed" in out
    live = export / "live.jsonl"
    honest = live.read_bytes()
    lines = split_lines(honest)

    # edited: entry 3 (the root rotation) says another version, canonical again
    doc = json.loads(lines[2])
    doc["fields"]["root_version"] = "7"
    live.write_bytes(b"\n".join([*lines[:2], json.dumps(doc, sort_keys=True,
                                 separators=(",", ":")).encode(), *lines[3:]]) + b"\n")
    code, _, err = _fleet_audit(w, fleet, export)
    assert code == 1 and "entry seq 3 (line 3)" in err and "edited" in err
    # truncated: the last two entries cut
    live.write_bytes(b"\n".join(lines[:-2]) + b"\n")
    code, _, err = _fleet_audit(w, fleet, export)
    assert code == 1 and f"seq {head.seq - 1} (line {len(lines) - 1})" in err
    assert "truncated" in err
    # reordered: entries 4 and 5 swapped
    swapped = [*lines[:3], lines[4], lines[3], *lines[5:]]
    live.write_bytes(b"\n".join(swapped) + b"\n")
    code, _, err = _fleet_audit(w, fleet, export)
    assert code == 1 and "entry seq 4 (line 4)" in err
    live.write_bytes(honest)
    assert _fleet_audit(w, fleet, export)[0] == 0  # the honest copy still verifies
    # the live log on the device itself, edited in place, is caught the same way
    (w.state / "audit" / "live.jsonl").write_bytes(b"\n".join(
        [*lines[:1], *lines[2:]]) + b"\n")
    code, _, err = _fleet_audit(w, fleet, w.state / "audit")
    assert code == 1 and "entry seq 2 (line 2)" in err and "deleted" in err


def test_replayed_old_report_does_not_hide_a_truncation(world: World) -> None:
    """Root on the disk truncates the log back to an older head and replays the older
    status report that signed it: the operator kept the newer one, so it fails."""
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    fleet = _enrol(w)
    old_payload = _report(w, fleet)
    old_log = (w.state / "audit" / "live.jsonl").read_bytes()
    w.publish("2.0.0", seed=2)
    w.update()
    _report(w, fleet)
    rows = judge_fleet({w.cfg.device_id: old_payload}, fleet, w.cfg.fleet, time.time())
    assert "REPLAYED" in rows[0].flags  # not kept: the newer report stays
    (w.state / "audit" / "live.jsonl").write_bytes(old_log)  # consistent, older log
    code, _, err = _fleet_audit(w, fleet, w.state / "audit")
    assert code == 1 and "entry seq 3 (line 3)" in err and "truncated" in err
    # the replayed report itself, given explicitly, vouches only for the old head
    old = w.tmp / "old-report.json"
    old.write_bytes(old_payload)
    code, out, err = _fleet_audit(w, fleet, w.state / "audit", "--status", str(old))
    assert code == 0 and "head seq 2" in out, err


def test_rollback_refused_is_recorded(world: World) -> None:
    """The a4 heal from an authentic older copy of the disk, with replayed metadata."""
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    w.update()
    attacker = RepoAttacker(w.repo_dir, w.keys, PASSPHRASE)
    served_v2 = attacker.snapshot_served()
    copy = w.tmp / "state-at-v2"
    shutil.copytree(w.state, copy, symlinks=True)
    w.publish("3.0.0", seed=3)
    w.update()
    copytree(copy, w.state)
    attacker.replay(served_v2, *served_v2)
    with pytest.raises(RollbackError):
        w.update()
    e = _entries(w)[-1]
    assert e["kind"] == "rollback-refused" and "RollbackError" in e["fields"]["reason"]  # type: ignore[index]


def test_ten_thousand_events_stay_bounded_with_tpm_signed_checkpoints(world: World) -> None:
    w = world
    store = w.store()  # (the device's TPM, with its objects' auth value)
    try:
        signs: list[int] = []

        def sign(digest: bytes) -> bytes:
            signs.append(1)
            return store.tpm.sign(digest)

        cfg = AuditConfig()  # the defaults: 1000 entries / 256 KiB a segment, fsynced
        log = AuditLog(w.state, cfg, signer=sign)
        head = Head(0, "")
        for i in range(10_000):
            head = log.append("install", {"model": "classifier", "version": f"1.{i}.0",
                                          "fingerprint": f"{i:064x}", "slot": "ab"[i % 2]})
        pem = store.tpm.identity_public_pem()
    finally:
        store.tpm.close()
    a = w.state / "audit"
    sizes = {p.name: p.stat().st_size for p in a.iterdir()}
    assert sizes["live.jsonl"] <= cfg.max_bytes and sizes["old.jsonl"] <= cfg.max_bytes
    assert sum(sizes.values()) <= 2 * cfg.max_bytes + 3 * 4096
    assert 9 <= len(signs) <= 12  # signed only at rotations
    h = verify_audit(split_lines((a / "live.jsonl").read_bytes()),
                     (a / "checkpoint.json").read_bytes(), head, pem)
    assert h.dropped_count + len(h.entries) == 10_000 and h.head == head
    # the history before the checkpoint: a count and a hash, the older segment reaching it
    old = verify_audit(split_lines((a / "old.jsonl").read_bytes()),
                       (a / "old-checkpoint.json").read_bytes(),
                       Head(h.dropped_count, h.dropped_head_hash), pem)
    assert old.head.seq == h.dropped_count
    # a head the device signed before its last rotation: checked in the older segment,
    # across the TPM-signed checkpoint between the two (what `fleet audit DIR` reads)
    earlier = old.entries[len(old.entries) // 2]
    both = verify_segments(AuditLog(w.state).segments(), Head(earlier.seq, earlier.hash),
                           pem, allow_tail=True)
    assert both.signed == earlier.seq and both.head == head
    assert len(both.entries) == len(old.entries) + len(h.entries)
    forged = (a / "checkpoint.json").read_bytes().replace(b'"seq":', b'"seq":1', 1)
    with pytest.raises(AuditError):
        verify_audit(split_lines((a / "live.jsonl").read_bytes()), forged, head, pem)
