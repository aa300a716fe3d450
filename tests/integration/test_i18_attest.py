"""Issue 18 "Measurement" and "Attest", must-show 3, against real swtpm (and the nginx
origin): the agent's real paths extend the register, ``agent attest`` (the real command)
answers, and the operator's verifier (``publisher._attest.verify_answer``) with the
AK enrolled by credential activation and the releases of the signed repository decides.

Forgeries tried: an old nonce (a replayed answer), another TPM's certification (for this
device id, alone or grafted onto this device's events), an event log edited, reordered,
shortened or lengthened (in the answer and on the device's disk), a fingerprint no
release carries, a planted symlink for the log directory, a power cut between the append
and the extend, a full log, and a register of the wrong type at modelward's index.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._attest import Attested, make_nonce, verify_answer
from modelward.publisher._devrpc import release_index
from modelward.publisher.errors import AttestationError
from modelward.simulator._demo import write_device_config
from modelward.simulator._fleet import enroll_device
from modelward.simulator._swtpm import SwtpmHandle, start_swtpm, stop_swtpm
from modelward.trust import _measure
from modelward.trust._audit import AuditLog
from modelward.trust._measure import EventLog, attest_answer, measure
from modelward.trust._record import ModelRef
from modelward.trust._tpm import Tpm
from modelward.trust._tpmauth import auth_dir_for
from modelward.trust.errors import TpmError
from tests.conftest import World, agent_provision


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Operator:
    """The operator's side for one World device: enrolled AK, signed releases."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.fleet = w.tmp / "operator"
        self.fleet.mkdir()
        enroll_device(self.fleet, w.conf_path, w.tmp / "challenge.json")
        self.ak = self.fleet / "devices" / "dev-1.ak.json"

    def releases(self) -> Callable[[str], Any]:
        return release_index(self.w.repo_dir, self.w.keys)

    def ask(self) -> tuple[bytes, dict[str, Any]]:
        """A fresh nonce and the device's answer, from the real `agent attest`."""
        nonce = make_nonce()
        r = self.w.cli("agent", "attest", "--config", str(self.w.conf_path), "--nonce",
                       nonce.hex(), "--json")
        assert r.returncode == 0, r.stderr
        return nonce, json.loads(r.stdout)

    def verify(self, doc: dict[str, Any], nonce: bytes,
               releases: Callable[[str], Any] | None = None) -> Attested:
        return verify_answer(doc, "dev-1", self.ak, nonce, releases or self.releases())

    def refused(self, doc: dict[str, Any], nonce: bytes,
                releases: Callable[[str], Any] | None = None) -> str:
        with pytest.raises(AttestationError) as ei:
            self.verify(doc, nonce, releases)
        assert ei.value.device == "dev-1"
        return ei.value.reason


@pytest.fixture
def op(world: World) -> Operator:
    return Operator(world)


def _tpm(w: World) -> Tpm:
    t = Tpm(w.tpm.tcti)
    t.use_auth_dir(auth_dir_for(w.state))
    return t


def _boot_check(w: World) -> int:
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert "Traceback" not in r.stderr
    return r.returncode


def test_attested_release_follows_activation_boot_check_and_fallback(
        world: World, op: Operator) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.name, a.version, a.reason, a.events) == ("classifier", "1.0.0", "activation", 1)
    # the audit trail's head then is measured with the event: fleet audit verifies to it
    head = AuditLog(w.state).head()
    assert a.audit == f"{head.seq}:{head.hash}" and head.seq == 2  # install, activation
    r = w.cli("fleet", "audit", "--fleet-dir", str(op.fleet), "--device", "dev-1", "--log",
              str(w.state / "audit"), "--head", a.audit)
    assert r.returncode == 0, r.stderr
    assert "activation" in r.stdout
    export = w.tmp / "audit-copy"
    shutil.copytree(w.state / "audit", export)
    live = export / "live.jsonl"
    lines = live.read_bytes().split(b"\n")
    ev = json.loads(lines[0])
    ev["fields"]["version"] = "0.0.1"
    live.write_bytes(b"\n".join([_measure.canonical(ev), *lines[1:]]))
    r = w.cli("fleet", "audit", "--fleet-dir", str(op.fleet), "--device", "dev-1", "--log",
              str(export), "--head", a.audit)
    assert r.returncode == 1 and "entry seq 1 (line 1)" in r.stderr, r.stderr
    w.publish("2.0.0", seed=2)
    w.update()
    assert _boot_check(w) == 0
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.version, a.reason, a.events) == ("2.0.0", "boot-check", 3)
    verified_fp = a.fingerprint
    # the active model swapped on disk after boot-check, no reboot: the attested
    # fingerprint still names what boot-check verified (the TPM's word of this boot)
    _flip(w.state / "current" / "model.onnx")
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.version, a.fingerprint) == ("2.0.0", verified_fp)
    # ... and the next boot-check shows the swap: it falls back, and that is attested
    assert _boot_check(w) == 0
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.version, a.reason, a.events) == ("1.0.0", "fallback", 4)
    assert a.fingerprint != verified_fp
    # the audit trail names it too
    r = w.cli("agent", "audit", "--config", str(w.conf_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"][-1]["kind"] == "fallback"
    # the human-readable form of `agent attest`
    r = w.cli("agent", "attest", "--config", str(w.conf_path), "--nonce", "ab" * 16)
    assert r.returncode == 0, r.stderr
    assert "3: " in r.stdout and "fallback" in r.stdout and "1.0.0" in r.stdout
    # a disk attacker's terminal escapes in the log are printed escaped, never raw
    log = w.state / "measure" / "events.jsonl"
    lines = log.read_bytes().split(b"\n")
    ev = json.loads(lines[0])
    ev["time"], ev["model"] = "\x1b]0;owned\x07", "\x1b[8mhidden"
    log.write_bytes(b"\n".join([_measure.canonical(ev), *lines[1:]]))
    r = w.cli("agent", "attest", "--config", str(w.conf_path), "--nonce", "ab" * 16)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "owned" in r.stdout and "hidden" in r.stdout


def test_forged_answers_are_refused_with_the_reason(world: World, op: Operator,
                                                    tmp_path: Path) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    w.update()
    assert _boot_check(w) == 0
    old_nonce, old = op.ask()
    op.verify(old, old_nonce)
    nonce, doc = op.ask()
    # a replayed answer (to an earlier request): stale nonce
    assert op.refused(old, nonce) == "stale nonce"
    # another TPM's certification, made for this device id (its own AK signs it), alone
    # and grafted onto this device's events
    other = start_swtpm(tmp_path / "tpm-other")
    try:
        forged = _other_tpm_answer(w, tmp_path, other, nonce, doc)
    finally:
        stop_swtpm(other.state)
    assert forged["events"] == doc["events"]
    assert op.refused(forged, nonce) == "wrong key"
    grafted = {**doc, "attest": forged["attest"], "signature": forged["signature"]}
    assert op.refused(grafted, nonce) == "wrong key"
    # the event log edited in the answer: one field, reordered, one dropped, one added
    ev = [json.loads(e) for e in doc["events"]]
    edited = [dict(e) for e in ev]
    edited[-1]["version"] = "9.9.9"
    canon = [_measure.canonical(e).decode() for e in edited]
    assert op.refused({**doc, "events": canon}, nonce) == "log mismatch"
    assert op.refused({**doc, "events": doc["events"][::-1]}, nonce) == "log mismatch"
    assert op.refused({**doc, "events": doc["events"][:-1]}, nonce) == "log mismatch"
    assert op.refused({**doc, "events": [*doc["events"], doc["events"][-1]]}, nonce) \
        == "log mismatch"
    # a certification of a fingerprint the repository signs in no release
    assert op.refused(doc, nonce, lambda fp: None) == "unknown fingerprint"
    # malformed documents: a typed refusal, never a traceback
    for bad in ({}, {**doc, "attest": "***"}, {**doc, "events": "x"},
                {**doc, "device_id": "dev-2"}, {**doc, "signature": doc["attest"]},
                {**doc, "attest": doc["signature"]}, [], None):
        assert op.refused(bad, nonce) in ("malformed", "wrong key")  # type: ignore[arg-type]
    # the log edited on the device's disk: the device sends it, the operator refuses it
    log = w.state / "measure" / "events.jsonl"
    honest = log.read_bytes()
    lines = honest.split(b"\n")[:-1]
    log.write_bytes(b"\n".join([lines[1], lines[0], *lines[2:]]) + b"\n")
    nonce, doc = op.ask()
    assert op.refused(doc, nonce) == "log mismatch"
    log.write_bytes(honest)
    nonce, doc = op.ask()
    assert op.verify(doc, nonce).version == "2.0.0"  # the honest log verifies again


def _root(w: World) -> Path:
    return w.repo_dir / "metadata" / "1.root.json"


def _other_tpm_answer(w: World, tmp_path: Path, other: SwtpmHandle, nonce: bytes,
                      doc: dict[str, Any]) -> dict[str, Any]:
    """What a device with another TPM answers when it claims to be dev-1 and measured
    exactly dev-1's events."""
    from modelward.agent._config import load_config

    conf = write_device_config(tmp_path / "other.toml", device_id="dev-1",
                               state=tmp_path / "state-other", tcti=other.tcti,
                               origin_url=w.origin_url, ca=w.ca.cert)
    cfg = load_config(conf)
    agent_provision(cfg, _root(w))
    t = Tpm(other.tcti)
    t.use_auth_dir(auth_dir_for(cfg.state_dir))
    try:
        for line in doc["events"]:  # the same events, extended into the other register
            EventLog(cfg.state_dir).append(line.encode())
            _measure._extend(t, line.encode())
        return attest_answer(t, cfg.state_dir, nonce, "dev-1")
    finally:
        t.close()


def test_power_cut_full_log_symlink_and_tpm_restart(world: World, op: Operator) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    assert _boot_check(w) == 0
    log = w.state / "measure" / "events.jsonl"
    # a power cut after the append, before the extend: the next measurement cuts the line
    stray = _measure.event_line(2, "activation", None, "never extended", 0.0)
    with open(log, "ab") as f:
        f.write(stray + b"\n")
    nonce, doc = op.ask()  # (an answer meanwhile leaves the in-flight line out)
    assert len(doc["events"]) == 2 and op.verify(doc, nonce).reason == "boot-check"
    assert _boot_check(w) == 0
    assert stray not in log.read_bytes()
    nonce, doc = op.ask()
    assert op.verify(doc, nonce).events == 3
    # a symlink planted for the log directory: never followed; the register is still
    # extended, so the device cannot be attested (fail closed) rather than attested stale
    outside = w.tmp / "outside"
    outside.mkdir()
    shutil.move(str(w.state / "measure"), str(w.tmp / "measure-moved"))
    os.symlink(outside, w.state / "measure")
    assert _boot_check(w) == 0  # the model still serves
    assert list(outside.iterdir()) == []
    r = w.cli("agent", "attest", "--config", str(w.conf_path), "--nonce", "cd" * 16)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "symlink" in r.stderr or "not a directory" in r.stderr, r.stderr
    os.unlink(w.state / "measure")
    shutil.move(str(w.tmp / "measure-moved"), str(w.state / "measure"))
    nonce, doc = op.ask()
    assert op.refused(doc, nonce) == "log mismatch"  # one extend has no line
    # a TPM restart (reboot) clears the register: a new log; the old one is kept
    stop_swtpm(w.tpm.state)
    start_swtpm(w.tpm.state, port=w.tpm.port)
    r = w.cli("agent", "attest", "--config", str(w.conf_path), "--nonce", "cd" * 16)
    assert r.returncode != 0 and "nothing measured since the TPM last restarted" in r.stderr
    assert _boot_check(w) == 0
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.version, a.reason, a.events) == ("1.0.0", "boot-check", 1)
    assert (w.state / "measure" / "previous.jsonl").exists()


def test_full_log_fails_closed_until_reboot(world: World, op: Operator,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    monkeypatch.setattr(_measure, "MAX_EVENTS", 4)
    ref = ModelRef("classifier", "1.0.0", "00" * 32, "a")
    t = _tpm(w)
    try:
        assert measure(t, w.state, "boot-check", ref, "x")  # event 1 (0: the activation)
        assert measure(t, w.state, "boot-check", ref, "x")  # event 2
        assert measure(t, w.state, "boot-check", ref, "x")  # event 3: the overflow marker
        assert not measure(t, w.state, "boot-check", ref, "x")  # nothing more
        nonce = make_nonce()
        doc = attest_answer(t, w.state, nonce, "dev-1")
    finally:
        t.close()
    assert json.loads(doc["events"][-1])["kind"] == "overflow" and len(doc["events"]) == 4
    assert op.refused(doc, nonce) == "log overflow"


def test_provision_adds_the_register_once_and_refuses_a_wrong_one(world: World) -> None:
    w = world
    r = w.cli("agent", "provision", "--config", str(w.conf_path), "--root", str(_root(w)))
    assert r.returncode == 0, r.stderr
    assert "measurement reg. 0x01000131: already present" in r.stdout
    # a local TPM client (owner auth) replaces it with an ordinary index
    t = _tpm(w)
    try:
        t._undefine(_measure.REGISTER_INDEX)
        t._handles.clear()
        t._provision_nv(_measure.REGISTER_INDEX, 32, counter=False)  # (plain, writable)
        with pytest.raises(TpmError, match="not modelward's measurement register"):
            measure_raises(t, w.state)
        with pytest.raises(TpmError, match="0x1000131"):
            t._handles.clear()
            t.provision()
    finally:
        t.close()


def measure_raises(t: Tpm, state: Path) -> None:
    _measure._measure(t, EventLog(state), "boot-check", None, "x", 0.0)



def test_fifo_or_torn_log_neither_hangs_nor_breaks_the_register(world: World,
                                                                op: Operator) -> None:
    """A disk attacker's FIFO at the log: typed refusals within seconds (no open blocks);
    a power cut mid-append (a torn line, or a NUL tail): the next measurement cuts it."""
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    log = w.state / "measure" / "events.jsonl"
    honest = log.read_bytes()
    log.unlink()
    os.mkfifo(log)
    import subprocess
    import sys

    for argv in (("agent", "boot-check"), ("agent", "attest", "--nonce", "ab" * 16)):
        r = subprocess.run([sys.executable, "-m", "modelward", *argv, "--config",
                            str(w.conf_path)], capture_output=True, text=True, timeout=60,
                           check=False)
        assert "Traceback" not in r.stderr
    assert r.returncode != 0 and "not a regular file" in r.stderr, r.stderr
    log.unlink()
    log.write_bytes(honest)
    nonce, doc = op.ask()
    assert op.refused(doc, nonce) == "log mismatch"  # the boot-check extended regardless
    # reboot, then the two kinds of torn append
    stop_swtpm(w.tpm.state)
    start_swtpm(w.tpm.state, port=w.tpm.port)
    assert _boot_check(w) == 0
    for tail in (_measure.event_line(1, "boot-check", None, "torn", 0.0)[:40], b"\0" * 100):
        with open(log, "ab") as f:
            f.write(tail)
        assert _boot_check(w) == 0
        assert not log.read_bytes().endswith(tail)
        nonce, doc = op.ask()
        assert op.verify(doc, nonce).reason == "boot-check"


def test_register_reset_within_a_boot_is_refused(world: World, op: Operator) -> None:
    """Root with the TPM owner's (empty) password undefines the register and defines it
    again, same attributes and name: a clean history. The operator who attested before
    in the same TPM boot refuses it; after a real TPM restart a short history is fine."""
    from modelward.publisher._attest import check_history

    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    w.update()
    _flip(w.state / "current" / "model.onnx")
    assert _boot_check(w) == 0  # falls back to 1.0.0: the history shows it
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.version, a.reason) == ("1.0.0", "fallback")
    check_history(op.fleet, "dev-1", a)
    two = next(json.loads(x) for x in doc["events"] if json.loads(x)["version"] == "2.0.0")
    t = _tpm(w)
    try:
        t._undefine(_measure.REGISTER_INDEX)
        t._handles.clear()
        assert _measure.provision_register(t)
        (w.state / "measure" / "events.jsonl").unlink()
        assert measure(t, w.state, "boot-check",
                       ModelRef("classifier", "2.0.0", two["fingerprint"], two["slot"]), "x")
    finally:
        t.close()
    nonce, doc = op.ask()
    forged = op.verify(doc, nonce)  # each answer alone verifies ...
    assert (forged.version, forged.events) == ("2.0.0", 1)
    with pytest.raises(AttestationError) as ei:  # ... but not after what was seen
        check_history(op.fleet, "dev-1", forged)
    assert ei.value.reason == "register reset"
    stop_swtpm(w.tpm.state)  # a real reboot: a new epoch, a fresh history is believed
    start_swtpm(w.tpm.state, port=w.tpm.port)
    assert _boot_check(w) == 0
    nonce, doc = op.ask()
    fresh = op.verify(doc, nonce)
    assert fresh.epoch != a.epoch and fresh.events == 1
    check_history(op.fleet, "dev-1", fresh)


def test_a_log_padded_to_its_bound_does_not_stop_the_register(world: World,
                                                             op: Operator) -> None:
    """Found by review: a disk attacker padded the log to 1024 lines, so every later
    measurement was refused as 'log full' without an extend; with the real log put back,
    the device was attested with the model it had before. A log that does not replay is
    no reason to skip the extend."""
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    log = w.state / "measure" / "events.jsonl"
    honest = log.read_bytes()
    log.write_bytes(b"x\n" * _measure.MAX_EVENTS)
    w.publish("2.0.0", seed=2)
    w.update()  # activation of 2.0.0: measured although the log is padded
    assert w.active_version() == "2.0.0"
    log.write_bytes(honest)  # the attacker puts the log of 1.0.0 back
    nonce, doc = op.ask()
    assert op.refused(doc, nonce) == "log mismatch"  # never "attested: 1.0.0"


def test_an_update_that_rolls_an_interrupted_install_forward_is_attested(
        world: World, op: Operator) -> None:
    """Found by review: an update killed after its commit is rolled forward by the next
    update (no boot-check between), which activated 2.0.0 unmeasured: the register still
    named 1.0.0 while 2.0.0 served."""
    import signal

    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    killed = w.cli("agent", "update", "--config", str(w.conf_path), "--once",
                   env={"MODELWARD_TEST_KILL_AT": "committed"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = w.cli("agent", "update", "--config", str(w.conf_path), "--once")
    assert again.returncode == 0, again.stderr
    assert w.active_version() == "2.0.0"
    nonce, doc = op.ask()
    a = op.verify(doc, nonce)
    assert (a.version, a.reason) == ("2.0.0", "activation")
    assert "reconciled" in json.loads(doc["events"][-1])["reason"]
