"""Issue 18 must-show 1: enrollment by credential activation against real swtpms.

Devices are swtpms manufactured like a TPM vendor's (EK certificate from a local CA,
swtpm_localca), provisioned by ``agent provision``. The happy path runs the real commands
(``agent enroll --json``, ``fleet add-device --enrollment``, ``agent
activate-credential``, ``fleet add-device --response``); the refusals also go through
the library entry points with the time injected. After every refusal the fleet dir is
byte for byte what it was.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelward.agent._commands import activate_credential, enrollment
from modelward.agent._config import AgentConfig, load_config
from modelward.publisher._enroll import (
    CHALLENGE_TTL,
    begin_enrollment,
    finish_enrollment,
    load_ek_ca,
)
from modelward.publisher.errors import ChallengeError, EnrollmentError
from modelward.simulator._demo import write_device_config
from modelward.simulator._swtpm import SwtpmHandle, ek_ca_bundle, start_swtpm, stop_swtpm
from modelward.trust._ak import AK_HANDLE
from modelward.trust._tpm import Tpm
from modelward.trust.errors import TpmError
from tests.conftest import _new_repo, agent_provision, tree_digest

NOW = 1_900_000_000.0


@dataclass
class Device:
    id: str
    conf: Path
    tpm: SwtpmHandle

    @property
    def cfg(self) -> AgentConfig:
        return load_config(self.conf)


@dataclass
class Lab:
    tmp: Path
    ca1: Path  # the EK CA bundle of the vendor that made dev-1 and dev-2
    ca2: Path  # another vendor's (made dev-3)
    devs: dict[str, Device]
    fleet: Path

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelward", *argv], capture_output=True,
                              text=True, timeout=300, check=False,
                              env={**os.environ, "TSS2_LOG": "all+NONE"})

    def enroll_doc(self, dev: str) -> dict[str, object]:
        return enrollment(self.devs[dev].cfg)

    def fleet_files(self) -> dict[str, str]:
        return tree_digest(self.fleet)


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        pki: tuple[object, object]) -> Iterator[Lab]:
    *_, root = _new_repo(tmp_path, monkeypatch)
    ca_dirs = {"dev-1": tmp_path / "ca1", "dev-2": tmp_path / "ca1", "dev-3": tmp_path / "ca2"}
    devs: dict[str, Device] = {}
    try:
        for d, ca in ca_dirs.items():
            h = start_swtpm(tmp_path / f"tpm-{d}", ek_ca=ca)
            conf = write_device_config(tmp_path / f"{d}.toml", device_id=d,
                                       state=tmp_path / f"state-{d}", tcti=h.tcti,
                                       origin_url="https://127.0.0.1:9/",
                                       ca=pki[0].cert)  # type: ignore[attr-defined]
            devs[d] = Device(d, conf, h)
            agent_provision(devs[d].cfg, root)
        fleet = tmp_path / "fleet"
        fleet.mkdir()
        yield Lab(tmp_path, ek_ca_bundle(tmp_path / "ca1"), ek_ca_bundle(tmp_path / "ca2"),
                  devs, fleet)
    finally:
        for d in devs.values():
            stop_swtpm(d.tpm.state)


def _bytes(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode()


def _challenge(lab: Lab, dev: str, doc: dict[str, object], now: float = NOW) -> bytes:
    out = lab.tmp / f"challenge-{dev}.json"
    begin_enrollment(lab.fleet, dev, _bytes(doc), load_ek_ca(lab.ca1.read_bytes(), "ca1"),
                     out, now=now)
    return out.read_bytes()


def test_enrollment_with_credential_activation_records_the_device(lab: Lab) -> None:
    d = lab.devs["dev-1"]
    enr, chal, resp = lab.tmp / "enr.json", lab.tmp / "chal.json", lab.tmp / "resp.json"
    r = lab.cli("agent", "enroll", "--config", str(d.conf), "--json")
    assert r.returncode == 0, r.stderr
    enr.write_text(r.stdout)
    doc = json.loads(r.stdout)
    assert doc["ek_certificate"] and doc["device_id"] == "dev-1"
    r = lab.cli("fleet", "add-device", "--fleet-dir", str(lab.fleet), "--device", "dev-1",
                "--enrollment", str(enr), "--ek-ca", str(lab.ca1), "--challenge", str(chal))
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    pending = lab.fleet / "pending" / "dev-1.json"
    assert pending.stat().st_mode & 0o777 == 0o600
    assert not (lab.fleet / "devices").exists()  # nothing recorded before the answer
    r = lab.cli("agent", "activate-credential", "--config", str(d.conf),
                "--challenge", str(chal), "--response", str(resp))
    assert r.returncode == 0, r.stderr
    r = lab.cli("fleet", "add-device", "--fleet-dir", str(lab.fleet), "--device", "dev-1",
                "--response", str(resp))
    assert r.returncode == 0, r.stderr
    assert (lab.fleet / "devices" / "dev-1.pem").read_text() == doc["public_key"]
    ak = json.loads((lab.fleet / "devices" / "dev-1.ak.json").read_text())
    assert ak["ak_public"] == doc["ak_public"] and ak["ek_certified"] is True
    assert not pending.exists()
    # replayed: the challenge is used up, and the fleet dir stays as it is
    before = lab.fleet_files()
    r = lab.cli("fleet", "add-device", "--fleet-dir", str(lab.fleet), "--device", "dev-1",
                "--response", str(resp))
    assert r.returncode != 0 and "no challenge is pending" in r.stderr
    assert "Traceback" not in r.stderr
    assert lab.fleet_files() == before


def test_another_tpms_ak_with_this_devices_ek_is_refused(lab: Lab) -> None:
    """dev-2's TPM (same vendor) offers its own AK and identity with dev-1's EK and EK
    certificate: every check on the file passes, but no TPM can answer."""
    real, other = lab.enroll_doc("dev-1"), lab.enroll_doc("dev-2")
    forged = {**other, "device_id": "dev-1", "ek_public": real["ek_public"],
              "ek_certificate": real["ek_certificate"]}
    # dev-2's AK certified dev-2's identity for "dev-2": re-certify it for dev-1's id
    tpm = Tpm(lab.devs["dev-2"].tpm.tcti)
    from modelward.trust import _ak
    from modelward.trust._tpm import IDENTITY_HANDLE
    from modelward.trust._tpmauth import auth_dir_for

    tpm.use_auth_dir(auth_dir_for(lab.devs["dev-2"].cfg.state_dir))
    from modelward.trust import _deckey

    try:
        attest, sig = _ak._certify(tpm, IDENTITY_HANDLE, _ak.certify_qualifier("dev-1"))
        dattest, dsig = _ak._certify(tpm, _deckey.DECRYPT_HANDLE,  # (its decryption key too)
                                     _deckey.certify_qualifier("dev-1"))
    finally:
        tpm.close()
    forged["identity_certify"] = {"attest": base64.b64encode(attest.marshal()).decode(),
                                  "signature": base64.b64encode(sig.marshal()).decode()}
    forged["decrypt_certify"] = {"attest": base64.b64encode(dattest.marshal()).decode(),
                                 "signature": base64.b64encode(dsig.marshal()).decode()}
    chal = json.loads(_challenge(lab, "dev-1", forged))
    before = lab.fleet_files()
    # dev-2's TPM holds the AK but not the EK the secret is sealed to
    dev2 = lab.devs["dev-2"].cfg
    with pytest.raises(TpmError, match="activate credential"):
        activate_credential(dataclasses.replace(dev2, device_id="dev-1"), _bytes(chal))
    # dev-1's TPM holds the EK but not that AK
    with pytest.raises(TpmError, match="not this TPM.s"):
        activate_credential(lab.devs["dev-1"].cfg, _bytes(chal))
    # a made-up answer
    guess = {"format": "modelward-credential-response/1", "device_id": "dev-1",
             "ak_name": chal["ak_name"], "secret": base64.b64encode(os.urandom(32)).decode()}
    with pytest.raises(ChallengeError) as e:
        finish_enrollment(lab.fleet, "dev-1", _bytes(guess), now=NOW + 1)
    assert e.value.reason == "wrong-secret"
    assert lab.fleet_files() == before
    assert not (lab.fleet / "devices").exists()


def test_real_tpm_cannot_answer_through_dev1s_tpm_with_the_right_name(lab: Lab) -> None:
    """The name check on the device is not what stops it: dev-1's own AK, asked to
    activate a credential made for dev-2's AK name, fails in the TPM."""
    from modelward.trust import _ak
    from modelward.trust._tpmauth import auth_dir_for

    real, other = lab.enroll_doc("dev-1"), lab.enroll_doc("dev-2")
    import tpm2_pytss as t
    from tpm2_pytss.utils import make_credential

    ek, _ = t.TPM2B_PUBLIC.unmarshal(base64.b64decode(str(real["ek_public"])))
    blob, enc = make_credential(ek, b"s" * 32, t.TPM2B_NAME(bytes.fromhex(str(other["ak_name"]))))
    tpm = Tpm(lab.devs["dev-1"].tpm.tcti)
    tpm.use_auth_dir(auth_dir_for(lab.devs["dev-1"].cfg.state_dir))
    try:
        own = bytes.fromhex(str(real["ak_name"]))
        with pytest.raises(TpmError, match="activate credential"):
            _ak.activate_credential(tpm, blob.marshal(), enc.marshal(), own)
    finally:
        tpm.close()


def test_ek_certificate_from_another_ca_is_refused(lab: Lab) -> None:
    doc = lab.enroll_doc("dev-3")  # made by the other vendor
    before = lab.fleet_files()
    with pytest.raises(EnrollmentError) as e:
        _challenge(lab, "dev-3", doc)
    assert e.value.field == "ek_certificate" and "not issued by" in str(e.value)
    # and through the CLI: a one-line diagnosis, nothing written
    enr, chal = lab.tmp / "enr3.json", lab.tmp / "chal3.json"
    enr.write_bytes(_bytes(doc))
    r = lab.cli("fleet", "add-device", "--fleet-dir", str(lab.fleet), "--device", "dev-3",
                "--enrollment", str(enr), "--ek-ca", str(lab.ca1), "--challenge", str(chal))
    assert r.returncode != 0 and "ek_certificate" in r.stderr and "Traceback" not in r.stderr
    assert not chal.exists()
    assert lab.fleet_files() == before
    # with its own vendor's CA it is accepted
    begin_enrollment(lab.fleet, "dev-3", _bytes(doc), load_ek_ca(lab.ca2.read_bytes(), "ca2"),
                     chal, now=NOW)


def test_ek_certificate_of_another_tpm_is_refused(lab: Lab) -> None:
    doc = {**lab.enroll_doc("dev-1"), "ek_certificate": lab.enroll_doc("dev-2")["ek_certificate"]}
    before = lab.fleet_files()
    with pytest.raises(EnrollmentError, match="certifies another key") as e:
        _challenge(lab, "dev-1", doc)
    assert e.value.field == "ek_certificate"
    assert lab.fleet_files() == before


def test_tampered_ak_attributes_are_refused(lab: Lab) -> None:
    import tpm2_pytss as t

    doc = lab.enroll_doc("dev-1")
    pub, _ = t.TPM2B_PUBLIC.unmarshal(base64.b64decode(str(doc["ak_public"])))
    pub.publicArea.objectAttributes &= ~t.TPMA_OBJECT.RESTRICTED
    tampered = {**doc, "ak_public": base64.b64encode(pub.marshal()).decode(),
                "ak_name": bytes(pub.get_name()).hex()}
    before = lab.fleet_files()
    with pytest.raises(EnrollmentError, match="restricted") as e:
        _challenge(lab, "dev-1", tampered)
    assert e.value.field == "ak_public"
    # a name that is not the AK's is refused too
    with pytest.raises(EnrollmentError) as e:
        _challenge(lab, "dev-1", {**doc, "ak_name": "000b" + "00" * 32})
    assert e.value.field == "ak_name"
    assert lab.fleet_files() == before


@pytest.mark.parametrize(("field", "value"), [
    ("ak_public", "not base64!"),
    ("ek_public", base64.b64encode(b"\x00\x10short").decode()),
    ("identity_public", "A" * 10_000),
    ("format", "modelward-enrollment/0"),
])
def test_malformed_enrollment_fields_are_named(lab: Lab, field: str, value: str) -> None:
    doc = {**lab.enroll_doc("dev-1"), field: value}
    before = lab.fleet_files()
    with pytest.raises(EnrollmentError) as e:
        _challenge(lab, "dev-1", doc)
    assert e.value.field == field
    assert lab.fleet_files() == before


def test_expired_or_replaced_challenge_is_refused(lab: Lab) -> None:
    doc = lab.enroll_doc("dev-1")
    first = _challenge(lab, "dev-1", doc)
    answer = activate_credential(lab.devs["dev-1"].cfg, first)
    before = lab.fleet_files()
    with pytest.raises(ChallengeError) as e:
        finish_enrollment(lab.fleet, "dev-1", answer, now=NOW + CHALLENGE_TTL + 1)
    assert e.value.reason == "expired"
    assert lab.fleet_files() == before
    # a new challenge replaces the first: the first one's (correct) answer no longer counts
    _challenge(lab, "dev-1", doc, now=NOW + 10)
    before = lab.fleet_files()
    with pytest.raises(ChallengeError) as e:
        finish_enrollment(lab.fleet, "dev-1", answer, now=NOW + 20)
    assert e.value.reason == "wrong-secret"
    assert lab.fleet_files() == before


def test_response_for_device_a_is_refused_for_device_b(lab: Lab) -> None:
    a = _challenge(lab, "dev-1", lab.enroll_doc("dev-1"))
    _challenge(lab, "dev-2", lab.enroll_doc("dev-2"))
    answer = activate_credential(lab.devs["dev-1"].cfg, a)
    before = lab.fleet_files()
    with pytest.raises(ChallengeError) as e:
        finish_enrollment(lab.fleet, "dev-2", answer, now=NOW + 1)
    assert e.value.reason == "other-device"
    relabelled = {**json.loads(answer), "device_id": "dev-2"}
    with pytest.raises(ChallengeError) as e:
        finish_enrollment(lab.fleet, "dev-2", _bytes(relabelled), now=NOW + 1)
    assert e.value.reason == "other-ak"
    assert lab.fleet_files() == before
    # the device refuses to answer a challenge made for another device
    with pytest.raises(Exception, match="not this one"):
        activate_credential(lab.devs["dev-2"].cfg, a)
    # and dev-1's answer still enrolls dev-1
    finish_enrollment(lab.fleet, "dev-1", answer, now=NOW + 2)
    assert (lab.fleet / "devices" / "dev-1.pem").exists()
    assert not (lab.fleet / "devices" / "dev-2.pem").exists()


def test_wrong_object_at_the_ak_handle_is_refused(lab: Lab) -> None:
    """An unrestricted key planted at 0x81000104 is a typed error, never used as the AK."""
    import tpm2_pytss as t

    d = lab.devs["dev-1"]
    tpm = Tpm(d.tpm.tcti)
    try:
        e = tpm._esys
        ak = e.tr_from_tpmpublic(AK_HANDLE)
        e.evict_control(t.ESYS_TR.OWNER, ak, AK_HANDLE)
        srk = e.tr_from_tpmpublic(0x81000001)
        tmpl = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=(
            t.TPMA_OBJECT.SIGN_ENCRYPT | t.TPMA_OBJECT.FIXEDTPM | t.TPMA_OBJECT.FIXEDPARENT
            | t.TPMA_OBJECT.SENSITIVEDATAORIGIN | t.TPMA_OBJECT.USERWITHAUTH))
        priv, pub, *_ = e.create(srk, None, tmpl)
        h = e.load(srk, priv, pub)
        e.evict_control(t.ESYS_TR.OWNER, h, AK_HANDLE)
        e.flush_context(h)
    finally:
        tpm.close()
    r = lab.cli("agent", "provision", "--config", str(d.conf), "--root",
                str(lab.tmp / "repo" / "metadata" / "1.root.json"))
    assert r.returncode != 0 and "0x81000104" in r.stderr and "Traceback" not in r.stderr
    r = lab.cli("agent", "enroll", "--config", str(d.conf), "--json")
    assert r.returncode != 0 and "not modelward's attestation key" in r.stderr
    assert r.stdout == ""
