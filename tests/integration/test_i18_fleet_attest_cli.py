"""Issue 18 step 2c: ``modelward fleet attest`` and ``fleet audit`` as the operator runs
them (the CLI in-process, real mosquitto, the placeholder answer makers and verifier of
``test_i18_rpc_channel``: the TPM-signed ones come with steps 2a/2b)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelward.cli import main
from modelward.publisher import _audit, _devrpc
from modelward.publisher._served import TRUSTED_ROOT_FILE
from modelward.simulator._pki import CertPair
from modelward.trust._audit import AuditLog, audit_chunk
from modelward.updater.transport._rpc import Request
from tests.integration.test_i14_broker import FLEET, Broker, _broker
from tests.integration.test_i18_rpc_channel import (
    OP,
    Dev,
    PlaceholderAttestError,
    placeholder_attest,
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory,
           pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    yield from _broker(tmp_path_factory.mktemp("i18cli"), pki)


@dataclass(frozen=True)
class Attested:
    name: str
    version: str
    fingerprint: str
    slot: str
    since: str
    reason: str


def _verify(doc: dict[str, Any], device: str, ak: Path, nonce: bytes, releases: Any
            ) -> Attested:
    if doc.get("nonce") != nonce.hex():
        raise PlaceholderAttestError("stale nonce")
    if doc.get("device") != device:
        raise PlaceholderAttestError("wrong key")
    rel = releases("cd" * 32)
    if rel is None:
        raise PlaceholderAttestError("unknown fingerprint")
    return Attested(rel.name, rel.version, "cd" * 32, "b", "2026-12-03T10:00:00Z",
                    "boot-check")


@pytest.fixture
def op(tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    fleet = tmp_path / "fleet"
    (fleet / "devices").mkdir(parents=True)
    for d in ("dev-1", "dev-2"):
        (fleet / "devices" / f"{d}.pem").write_text("placeholder\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / TRUSTED_ROOT_FILE).write_text("{}")
    monkeypatch.setitem(_devrpc.VERIFIERS, "attest", _verify)
    index = {"cd" * 32: _devrpc.SignedRelease("classifier", "2.0.0", "stable", False)}
    monkeypatch.setattr(_devrpc, "release_index", lambda repo, keys: index.get)
    return ["--fleet-dir", str(fleet), "--repo", str(tmp_path / "repo"), "--keys",
            str(tmp_path / "keys"), "--broker", f"mqtts://127.0.0.1:{broker.handle.port}",
            "--fleet", FLEET, "--tls-ca", str(broker.ca), "--username", OP,
            "--password-file", str(broker.creds[OP])]


def test_fleet_attest_all_prints_each_devices_release_and_the_latency_summary(
        broker: Broker, op: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    devs = [Dev(broker, d, {"attest": placeholder_attest(d)}) for d in ("dev-1", "dev-2")]
    try:
        assert main(["fleet", "attest", "--all", *op]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[:2] == [
            f"{d}: attested: classifier 2.0.0 (fingerprint {'cd' * 8}…, slot b, since "
            "boot-check at 2026-12-03T10:00:00Z)" for d in ("dev-1", "dev-2")]
        assert out[2].startswith("2 of 2 attested; latency p50 ") and " p95 " in out[2]
        assert out[2].endswith("0 stale answers ignored")
        assert main(["fleet", "attest", "--device", "dev-2", "--json", *op]) == 0
        doc = json.loads(capsys.readouterr().out)
        (row,) = doc["devices"]
        assert row["device"] == "dev-2" and row["attested"] is True
        assert row["release"]["version"] == "2.0.0" and row["release"]["slot"] == "b"
        assert row["latency_ms"] >= row["verify_ms"] >= 0
        assert doc["summary"]["attested"] == 1 and doc["summary"]["verify_ms"]["p95"] >= 0
        print(f"fleet attest: latency p95 {doc['summary']['latency_ms']['p95']:.1f} ms, "
              f"verify p95 {doc['summary']['verify_ms']['p95']:.2f} ms")
    finally:
        for d in devs:
            d.close()


def test_fleet_attest_exits_nonzero_naming_each_failure(
        broker: Broker, op: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # dev-1 answers with a document that is not its own; dev-2 does not answer at all
    dev1 = Dev(broker, "dev-1", {"attest": placeholder_attest("dev-9")})
    try:
        assert main(["fleet", "attest", "--all", "--timeout", "2", *op]) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("dev-1: FAILED: wrong key")
        assert out[1] == "dev-2: FAILED: no answer"
        assert out[2].startswith("0 of 2 attested")
    finally:
        dev1.close()


def test_fleet_attest_refuses_unknown_devices_before_asking(
        op: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "attest", "--device", "dev-7", *op]) == 1
    assert "--device dev-7: not enrolled" in capsys.readouterr().err
    assert main(["fleet", "attest", "--device", "dev/+", *op]) == 1
    no_repo = [a for i, a in enumerate(op) if a != "--repo" and op[i - 1] != "--repo"]
    assert main(["fleet", "attest", "--all", *no_repo]) == 1
    assert "needs --repo and --keys" in capsys.readouterr().err


def test_fleet_audit_fetches_every_chunk_and_verifies_the_joined_log(
        broker: Broker, op: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """300 real audit entries (3 chunks) fetched over MQTT, joined, and verified
    against the head (here given: the signed one is tested in test_i18_sim_attest)."""
    (tmp_path / "state").mkdir()
    log = AuditLog(tmp_path / "state")
    for i in range(300):
        head = log.append("install", {"version": f"{i}.0.0", "pad": "y" * 300})
    offsets: list[int] = []

    def audit(req: Request) -> dict[str, Any]:
        offsets.append(req.offset)
        return audit_chunk(tmp_path / "state", req.offset, req.limit)

    monkeypatch.setattr(_audit, "signed_head", lambda fleet, dev, status=None: (head, ""))
    monkeypatch.setattr(_audit, "enrolled_pem", lambda fleet, dev: b"unused: no checkpoint")
    no_repo = [a for i, a in enumerate(op) if a not in ("--repo", "--keys")
               and op[i - 1] not in ("--repo", "--keys")]
    dev1 = Dev(broker, "dev-1", {"audit": audit})
    try:
        assert main(["fleet", "audit", "--device", "dev-1", "--json", *no_repo]) == 0
        assert offsets == [0, 150, 299]  # (each chunk within 64 KiB: 150 entries of ~430 B)
        out = json.loads(capsys.readouterr().out)
        assert [e["seq"] for e in out["entries"]] == list(range(1, 301))
        # a device that sends a chunk out of place is refused, naming it
        entries = audit_chunk(tmp_path / "state", 0, 256)

        def skipping(req: Request) -> dict[str, Any]:
            return {**audit_chunk(tmp_path / "state", req.offset + 1, req.limit),
                    "offset": req.offset} if req.offset else entries
        dev1.close()
        dev1 = Dev(broker, "dev-1", {"audit": skipping})
        assert main(["fleet", "audit", "--device", "dev-1", *no_repo]) == 1
        err = capsys.readouterr().err
        assert "entry seq 151 (line 151)" in err and "deleted" in err, err
    finally:
        dev1.close()


def test_fleet_audit_over_mqtt_verifies_a_head_signed_before_the_last_rotation(
        broker: Broker, op: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The device rotated after its last report: the signed head lies in the kept older
    segment, which `fleet audit` now fetches too (segment "old") and checks against the
    live checkpoint; an edit in the older segment is named there."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    from modelward.trust._audit import AuditConfig

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    state = tmp_path / "state"
    state.mkdir()
    log = AuditLog(state, AuditConfig(max_entries=10, durable=False),
                   signer=lambda d: key.sign(d, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
    signed = None
    for i in range(25):
        head = log.append("install", {"version": f"{i}.0.0"})
        if i == 14:
            signed = head  # (the head the last report carried: before the rotation at 20)
    assert signed is not None and (state / "audit" / "old.jsonl").exists()
    segments: list[str] = []

    def audit(req: Request) -> dict[str, Any]:
        segments.append(req.segment)
        return audit_chunk(state, req.offset, req.limit, old=req.segment == "old")

    monkeypatch.setattr(_audit, "signed_head", lambda fleet, dev, status=None: (signed, ""))
    monkeypatch.setattr(_audit, "enrolled_pem", lambda fleet, dev: pem)
    no_repo = [a for i, a in enumerate(op) if a not in ("--repo", "--keys")
               and op[i - 1] not in ("--repo", "--keys")]
    dev1 = Dev(broker, "dev-1", {"audit": audit})
    try:
        assert main(["fleet", "audit", "--device", "dev-1", "--json", "--allow-unsigned-tail",
                     *no_repo]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        assert segments == ["live", "old"]
        assert out["signed_through"] == 15 and out["head"]["seq"] == 25
        old = state / "audit" / "old.jsonl"
        lines = old.read_bytes().split(b"\n")
        doc = json.loads(lines[2])
        doc["fields"]["version"] = "99.0.0"
        old.write_bytes(b"\n".join([*lines[:2], json.dumps(doc, sort_keys=True, separators=(
            ",", ":")).encode(), *lines[3:]]))
        assert main(["fleet", "audit", "--device", "dev-1", "--allow-unsigned-tail",
                     *no_repo]) == 1
        err = capsys.readouterr().err
        assert "old.jsonl" in err and "edited" in err, err
    finally:
        dev1.close()
