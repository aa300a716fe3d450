"""The TPM trust store on a real swtpm (issue #2 must-show 7 and the design's TPM layout)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.simulator._swtpm import SwtpmHandle, start_swtpm, stop_swtpm
from modelward.trust._tpm import (
    ANCHOR_INDEX,
    COUNTER_INDEX,
    IDENTITY_HANDLE,
    MAC_KEY_HANDLE,
    SRK_HANDLE,
    Tpm,
)
from modelward.trust.errors import TpmNotProvisionedError, TpmUnavailableError
from tests.conftest import World


def test_provisioning_twice_is_harmless(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    root = world.repo_dir / "metadata" / "1.root.json"
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already present") == 7  # (the measurement register too)
    assert world.snapshot() == before  # record, counter, anchor, slots untouched


def test_provisioning_with_another_root_is_refused(world: World, tmp_path: Path) -> None:
    import json

    doc = json.loads((world.repo_dir / "metadata" / "1.root.json").read_bytes())
    doc["signed"]["expires"] = "2030-01-01T00:00:00Z"
    other = tmp_path / "other-root.json"
    other.write_text(json.dumps(doc))
    before = world.snapshot()
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(other))
    assert r.returncode == 1
    assert "already anchored to another root" in r.stderr
    assert world.snapshot() == before


def test_provision_creates_the_design_layout(world: World) -> None:
    import tpm2_pytss as t

    tpm = world.store().tpm
    try:
        esys = tpm._esys
        _, data = esys.get_capability(t.TPM2_CAP.HANDLES, 0x81000000, 32)
        persistent = set(data.data.handles)
        assert {SRK_HANDLE, IDENTITY_HANDLE, MAC_KEY_HANDLE} <= persistent
        srk = esys.tr_from_tpmpublic(SRK_HANDLE)
        pub, _, _ = esys.read_public(srk)
        assert pub.publicArea.type == t.TPM2_ALG.ECC
        assert pub.publicArea.parameters.eccDetail.curveID == t.TPM2_ECC.NIST_P256
        ident = esys.tr_from_tpmpublic(IDENTITY_HANDLE)
        ipub, _, _ = esys.read_public(ident)
        assert ipub.publicArea.objectAttributes & t.TPMA_OBJECT.FIXEDTPM
        nvpub, _ = esys.nv_read_public(esys.tr_from_tpmpublic(COUNTER_INDEX))
        nt = (nvpub.nvPublic.attributes >> t.TPMA_NV.TPM2_NT_SHIFT) & 0xF
        assert nt == t.TPM2_NT.COUNTER
        assert not nvpub.nvPublic.attributes & t.TPMA_NV.ORDERLY
        anchored = (world.state / "trust" / "root.json").read_bytes()
        assert tpm.read_anchor() == hashlib.sha256(anchored).digest()
        assert esys.tr_from_tpmpublic(ANCHOR_INDEX)
    finally:
        tpm.close()


def test_state_mac_survives_a_tpm_restart(swtpm: SwtpmHandle) -> None:
    auth = os.urandom(32)
    tpm = Tpm(swtpm.tcti, auth=auth)
    tpm.provision()
    mac = tpm.mac(b"\x01" * 32)
    counter = tpm.read_counter()
    tpm.close()
    stop_swtpm(swtpm.state)
    h = start_swtpm(swtpm.state)  # a reboot: TPM2_Startup(CLEAR)
    tpm = Tpm(h.tcti, auth=auth)
    try:
        assert tpm.mac(b"\x01" * 32) == mac  # the persistent key, same MAC
        assert tpm.mac(b"\x02" * 32) != mac
        assert tpm.read_counter() == counter  # non-orderly NV survives
        assert tpm.increment_counter() == counter + 1
    finally:
        tpm.close()


def test_unprovisioned_tpm_is_named(swtpm: SwtpmHandle) -> None:
    tpm = Tpm(swtpm.tcti, auth=os.urandom(32))
    try:
        with pytest.raises(TpmNotProvisionedError, match="not provisioned") as ei:
            tpm.read_counter()
        assert "agent provision" in ei.value.hint
    finally:
        tpm.close()


def test_many_operations_do_not_leak_transient_handles(swtpm: SwtpmHandle) -> None:
    tpm = Tpm(swtpm.tcti, auth=os.urandom(32))
    try:
        tpm.provision()
        for i in range(20):  # swtpm has 3 object slots and no resource manager
            tpm.mac(bytes([i]) * 32)
    finally:
        tpm.close()


def test_stopped_swtpm_gives_a_diagnosis_not_a_traceback(world: World) -> None:
    stop_swtpm(world.tpm.state)
    for argv in (
        ("agent", "update", "--once"),
        ("agent", "boot-check", "--tpm-wait", "1"),  # (the default waits 120 s for a TPM)
    ):
        r = world.cli(*argv, "--config", str(world.conf_path))
        assert r.returncode == 1, argv
        assert "Traceback" not in r.stderr
        first = r.stderr.strip().splitlines()
        diag = [line for line in first if line.startswith("modelward: error:")]
        assert diag, r.stderr
        assert world.tpm.tcti in diag[0]
        assert "not running or not reachable" in diag[0]
        assert any("modelward sim tpm start" in line for line in first)
    # `agent status` shows the files, UNVERIFIED, with the same diagnosis (issue 15)
    r = world.cli("agent", "status", "--config", str(world.conf_path))
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stdout.startswith("UNVERIFIED") and world.tpm.tcti in r.stdout.splitlines()[0]
    assert "not running or not reachable" in r.stdout.splitlines()[0]


def test_missing_device_node_names_device_and_group(tmp_path: Path) -> None:
    with pytest.raises(TpmUnavailableError) as ei:
        Tpm("device:/dev/tpmrm-does-not-exist")
    assert "/dev/tpmrm-does-not-exist does not exist" in str(ei.value)
    assert "swtpm" in ei.value.hint


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_unreadable_device_names_the_tss_group() -> None:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="modelward-dev-"))
    try:
        d.chmod(0o755)
        node = d / "tpmrm0"
        node.write_bytes(b"")
        node.chmod(0o600)  # root-only, like /dev/tpmrm0 without the tss group
        code = (
            "import os; from modelward.trust._tpm import _diagnose_unavailable as d;"
            "os.setgid(65534); os.setuid(65534);"
            f"c, h = d('device:{node}'); print(c); print(h)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=Path(__file__).parents[2], check=False)
    finally:
        shutil.rmtree(d)
    assert "no read/write permission" in r.stdout, r.stderr
    assert "group `tss`" in r.stdout


def test_sim_tpm_cli_start_and_stop(tmp_path: Path) -> None:
    state = tmp_path / "t"
    r = subprocess.run([sys.executable, "-m", "modelward", "sim", "tpm", "start", "--state",
                        str(state)], capture_output=True, text=True, check=False)
    try:
        assert r.returncode == 0, r.stderr
        tcti = r.stdout.strip()
        assert tcti.startswith("swtpm:host=127.0.0.1,port=")
        Tpm(tcti).close()
        # idempotent: a second start reports the same TPM
        r2 = subprocess.run([sys.executable, "-m", "modelward", "sim", "tpm", "start",
                             "--state", str(state)], capture_output=True, text=True, check=False)
        assert r2.stdout.strip() == tcti
    finally:
        s = subprocess.run([sys.executable, "-m", "modelward", "sim", "tpm", "stop", "--state",
                            str(state)], capture_output=True, text=True, check=False)
    assert s.stdout.strip() == "stopped"
    with pytest.raises(TpmUnavailableError):
        Tpm(tcti)
