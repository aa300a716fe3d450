"""Issue 13 finding 8 / must-show 10: TPM objects only modelward can use (real swtpm).

A second process talks to the device's swtpm with tpm2-tools, as any process that may open
the TPM could (group ``tss``, the health-check child). It tries to move the counter,
rewrite the anchor, forge a record MAC, sign as the device and lock the agent out; none of
it works, nothing trusted moves, and the agent keeps working. Devices provisioned the old
way (open objects) migrate with ``agent provision``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.simulator._swtpm import SwtpmHandle
from modelward.trust._measure import REGISTER_INDEX
from modelward.trust._record import decode_record, encode_record
from modelward.trust._store import TrustStore
from modelward.trust._tpm import (
    ANCHOR_INDEX,
    COUNTER_INDEX,
    IDENTITY_HANDLE,
    LEGACY_ANCHOR_INDEX,
    LEGACY_COUNTER_INDEX,
    LEGACY_IDENTITY_HANDLE,
    LEGACY_MAC_KEY_LABEL,
    MAC_KEY_HANDLE,
    Tpm,
    _TpmLegacy,
)
from modelward.trust._tpmauth import AUTH_FILE, auth_dir_for
from modelward.trust.errors import TpmAuthError, TpmError, TrustRecordError
from tests.conftest import World
from tests.integration._i13_legacy_tpm import make_legacy


def _tools(world: World, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """tpm2-tools in another process, against the device's swtpm."""
    env = dict(os.environ, TPM2TOOLS_TCTI=world.tpm.tcti)
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60, check=False)


def _refused(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, (r.args, r.stdout)
    return r.stderr


def _lockout_counter(world: World) -> int:
    import tpm2_pytss as t

    tpm = Tpm(world.tpm.tcti)
    try:
        _, data = tpm._esys.get_capability(t.TPM2_CAP.TPM_PROPERTIES,
                                           t.TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)
    finally:
        tpm.close()


def _boot_check(world: World) -> subprocess.CompletedProcess[str]:
    return world.cli("agent", "boot-check", "--config", str(world.conf_path))


def test_second_tpm_client_cannot_move_counter_anchor_or_forge_record_mac(
        world: World, tmp_path: Path) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    work = tmp_path / "attacker"
    work.mkdir()
    lockouts = _lockout_counter(world)

    # 1. the counter: owner hierarchy (empty owner auth) and the index's own empty auth
    for argv in (("tpm2_nvincrement", "-C", "o", f"{COUNTER_INDEX:#x}"),
                 ("tpm2_nvincrement", f"{COUNTER_INDEX:#x}"),
                 ("tpm2_nvincrement", "-C", "o", f"{LEGACY_COUNTER_INDEX:#x}")):
        _refused(_tools(world, *argv, cwd=work))
    # guessing the auth value: refused, and it never counts toward lockout (noDA)
    for i in range(8):
        _refused(_tools(world, "tpm2_nvincrement", "-P", f"guess{i}", f"{COUNTER_INDEX:#x}",
                        cwd=work))
    s = world.store()
    try:  # the agent is not locked out by them
        assert s.load().counter == before.counter
    finally:
        s.tpm.close()

    # 2. the anchor
    (work / "evil").write_bytes(hashlib.sha256(b"attacker root").digest())
    for argv in (("tpm2_nvwrite", "-C", "o", "-i", "evil", f"{ANCHOR_INDEX:#x}"),
                 ("tpm2_nvwrite", "-i", "evil", f"{ANCHOR_INDEX:#x}"),
                 ("tpm2_nvwrite", "-P", "guess", "-i", "evil", f"{ANCHOR_INDEX:#x}")):
        _refused(_tools(world, *argv, cwd=work))
    # reading stays open: the values are not secret
    r = _tools(world, "tpm2_nvread", "-C", "o", "-s", "32", f"{ANCHOR_INDEX:#x}", "-o", "a",
               cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "a").read_bytes() == before.anchor

    # 3. the record MAC: the agent's key refuses to HMAC without its auth value ...
    rec, _ = decode_record(before.record, "record.json")
    assert rec.active is not None
    forged_rec = rec.replace(active=rec.active.replace(version="9.9.9"),
                             targets_version=rec.targets_version + 100)
    (work / "digest").write_bytes(forged_rec.digest())
    _refused(_tools(world, "tpm2_hmac", "-c", f"{MAC_KEY_HANDLE:#x}", "-g", "sha256",
                    "-o", "mac", "digest", cwd=work))
    # ... and the old fixed-label key can still be derived by anyone, but it is not it
    # -u from a file is the raw TPMU_PUBLIC_ID: a TPM2B_DIGEST with a host-order size
    label = hashlib.sha256(LEGACY_MAC_KEY_LABEL).digest()
    (work / "unique").write_bytes(len(label).to_bytes(2, sys.byteorder) + label)
    r = _tools(world, "tpm2_createprimary", "-C", "o", "-G", "hmac", "-g", "sha256",
               "-a", "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
               "-u", "unique", "-c", "old.ctx", cwd=work)
    assert r.returncode == 0, r.stderr
    r = _tools(world, "tpm2_hmac", "-c", "old.ctx", "-g", "sha256", "-o", "mac", "digest",
               cwd=work)
    assert r.returncode == 0, r.stderr
    forged_mac = (work / "mac").read_bytes()
    tpm = Tpm(world.tpm.tcti)
    try:  # exactly the MAC the old agent computed and accepted
        assert forged_mac == _TpmLegacy(tpm).mac(forged_rec.digest())
    finally:
        tpm.close()
    forged = encode_record(forged_rec, forged_mac)

    # 4. the identity key that signs status reports
    _refused(_tools(world, "tpm2_sign", "-c", f"{IDENTITY_HANDLE:#x}", "-g", "sha256",
                    "-o", "sig", "digest", cwd=work))

    assert world.snapshot() == before  # the TPM attacks moved nothing
    assert _lockout_counter(world) == lockouts

    # the forged record on disk (a disk attacker's help): not accepted
    path = world.state / "trust" / "record.json"
    path.write_bytes(forged)
    forged_state = world.snapshot()
    with pytest.raises(TrustRecordError, match="TPM MAC does not verify"):
        world.store().load()
    r = _boot_check(world)
    assert r.returncode in (1, 3), r.stdout
    assert "TPM MAC does not verify" in r.stderr and "Traceback" not in r.stderr
    assert world.snapshot() == forged_state
    # the next update does not believe it either: it heals from the TPM-anchored root
    # (finding 7) and none of the forged content survives
    r = world.cli("agent", "update", "--once", "--config", str(world.conf_path))
    assert "TPM MAC does not verify" in r.stderr, r.stderr
    s = world.store()
    try:
        healed = s.load()
    finally:
        s.tpm.close()
    assert healed.active is not None and healed.active.version == "1.0.0"
    assert healed.targets_version < forged_rec.targets_version
    assert path.read_bytes() != forged
    assert world.active_version() == "1.0.0"

    # the agent still works
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"
    assert world.snapshot().counter > before.counter
    r = _boot_check(world)
    assert r.returncode == 0, r.stderr
    r = world.cli("agent", "status", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("keep_identity", [False, True])
def test_old_style_device_migrates_with_agent_provision(world: World, tmp_path: Path,
                                                        keep_identity: bool) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    old_counter = make_legacy(world.tpm.tcti, world.state)
    legacy_record = (world.state / "trust" / "record.json").read_bytes()
    identity = Tpm(world.tpm.tcti)
    old_pem = identity.identity_public_pem()
    identity.close()

    # the new agent does not trust the open objects: it names the fix
    r = _boot_check(world)
    assert r.returncode == 1
    assert "older modelward" in r.stderr and "agent provision" in r.stderr, r.stderr
    assert (world.state / "trust" / "record.json").read_bytes() == legacy_record

    root = world.repo_dir / "metadata" / "1.root.json"
    keep = ("--keep-identity",) if keep_identity else ()
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(root),
                  *keep)
    assert r.returncode == 0, r.stderr
    assert "migrated" in r.stdout
    assert ("re-enrol" in r.stdout) is not keep_identity, r.stdout

    tpm = Tpm(world.tpm.tcti)
    try:
        import tpm2_pytss as t

        _, data = tpm._esys.get_capability(t.TPM2_CAP.HANDLES, 0x01000000, 64)
        nv = set(data.data.handles)
        _, data = tpm._esys.get_capability(t.TPM2_CAP.HANDLES, 0x81000000, 64)
        persistent = set(data.data.handles)
        # a new key by default: any TPM client could have copied the old one
        assert (tpm.identity_public_pem() == old_pem) is keep_identity
    finally:
        tpm.close()
    assert {ANCHOR_INDEX, COUNTER_INDEX, REGISTER_INDEX} <= nv  # (the register added)
    assert not {LEGACY_ANCHOR_INDEX, LEGACY_COUNTER_INDEX} & nv
    assert LEGACY_IDENTITY_HANDLE not in persistent
    assert {IDENTITY_HANDLE, MAC_KEY_HANDLE} <= persistent
    auth = auth_dir_for(world.state) / AUTH_FILE
    assert auth.stat().st_mode & 0o777 == 0o600
    work = tmp_path / "attacker"
    work.mkdir()
    (work / "digest").write_bytes(b"\1" * 32)
    for argv in (("tpm2_sign", "-c", f"{IDENTITY_HANDLE:#x}", "-g", "sha256", "-o", "sig",
                  "digest"),
                 ("tpm2_nvincrement", "-C", "o", f"{COUNTER_INDEX:#x}"),
                 ("tpm2_nvincrement", f"{COUNTER_INDEX:#x}")):
        _refused(_tools(world, *argv, cwd=work))

    migrated = world.snapshot()
    rec, _ = decode_record(migrated.record, "record.json")
    old, _ = decode_record(legacy_record, "record.json")
    assert rec.replace(counter=old.counter) == old  # same content, new counter
    assert rec.counter == migrated.counter
    assert migrated.counter >= 1 and old.counter == old_counter
    assert _boot_check(world).returncode == 0
    assert world.active_version() == "1.0.0"

    # provisioning again is a no-op
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already present") == 7 and "migrated" not in r.stdout
    assert world.snapshot() == migrated

    # the old record, put back, no longer verifies; the migrated device updates
    (world.state / "trust" / "record.json").write_bytes(legacy_record)
    with pytest.raises(TrustRecordError):
        world.store().load()
    (world.state / "trust" / "record.json").write_bytes(migrated.record)
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"
    assert _boot_check(world).returncode == 0
    signed = world.cli("agent", "status", "--config", str(world.conf_path))
    assert signed.returncode == 0, signed.stderr


def test_migration_of_an_altered_old_record_does_not_carry_it_over_and_heals(
        world: World) -> None:
    """An old record that does not verify under the old objects (edited before the
    migration) is not re-MACed: the device migrates, boot-check refuses the record, and
    the next update heals from the anchored root to the newest signed release."""
    world.publish("1.0.0", seed=1)
    world.update()
    make_legacy(world.tpm.tcti, world.state)
    path = world.state / "trust" / "record.json"
    doc = json.loads(path.read_bytes())
    doc["record"]["active"]["version"] = "9.9.9"
    path.write_text(json.dumps(doc))
    edited = path.read_bytes()
    root = world.repo_dir / "metadata" / "1.root.json"
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "not carried over" in r.stdout and "Traceback" not in r.stderr, r.stdout
    assert path.read_bytes() == edited  # never MACed under the new key
    with pytest.raises(TrustRecordError):
        world.store().load()
    assert _boot_check(world).returncode != 0
    world.update()  # heals
    assert world.active_version() == "1.0.0"
    s = world.store()
    try:
        rec = s.load()
    finally:
        s.tpm.close()
    assert rec.active is not None and rec.active.version == "1.0.0"
    assert _boot_check(world).returncode == 0


def test_migration_does_not_carry_over_an_old_anchor_no_root_matches(world: World) -> None:
    """Any TPM client could write the old anchor: one that matches neither the operator's
    root nor the device's root.json is not carried over."""
    import tpm2_pytss as t
    from tpm2_pytss import ESAPI

    world.publish("1.0.0", seed=1)
    world.update()
    make_legacy(world.tpm.tcti, world.state)
    e = ESAPI(world.tpm.tcti)
    try:  # what any process could do to an old device
        e.nv_write(e.tr_from_tpmpublic(LEGACY_ANCHOR_INDEX), b"\xee" * 32, 0, t.ESYS_TR.OWNER)
    finally:
        e.close()
    root = world.repo_dir / "metadata" / "1.root.json"
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert world.snapshot().anchor == hashlib.sha256(root.read_bytes()).digest()
    assert _boot_check(world).returncode == 0


def _squat_counter(tcti: str, auth: bytes, attrs: int | None = None) -> None:
    """Another TPM client defines modelward's counter index first, with its own auth."""
    import tpm2_pytss as t
    from tpm2_pytss import ESAPI

    e = ESAPI(tcti)
    try:
        N = t.TPMA_NV
        a = attrs if attrs is not None else int(
            N.AUTHWRITE | N.AUTHREAD | N.OWNERREAD | N.NO_DA
            | (t.TPM2_NT.COUNTER << N.TPM2_NT_SHIFT))
        pub = t.TPM2B_NV_PUBLIC(nvPublic=t.TPMS_NV_PUBLIC(
            nvIndex=COUNTER_INDEX, nameAlg=t.TPM2_ALG.SHA256, attributes=a, dataSize=8))
        e.nv_define_space(t.TPM2B_AUTH(auth), pub, t.ESYS_TR.OWNER)
    finally:
        e.close()


@pytest.mark.parametrize("same_attrs", [True, False])
def test_objects_planted_before_provisioning_are_refused(
        swtpm: SwtpmHandle, tmp_path: Path, same_attrs: bool) -> None:
    """A local TPM client that squats on modelward's handles with a value it knows does
    not get a device that trusts them: provisioning refuses, naming the index."""
    import tpm2_pytss as t

    _squat_counter(swtpm.tcti, b"attacker knows this",
                   None if same_attrs else int(t.TPMA_NV.OWNERWRITE | t.TPMA_NV.OWNERREAD
                                               | (t.TPM2_NT.COUNTER << t.TPMA_NV.TPM2_NT_SHIFT)))
    store = TrustStore(tmp_path / "state", Tpm(swtpm.tcti))
    root = _root_json(tmp_path)
    try:
        with pytest.raises(TpmError, match="0x1000111") as ei:
            store.provision(root, "root.json")
        if same_attrs:
            assert isinstance(ei.value, TpmAuthError)
        assert not (store.record_path.exists())
    finally:
        store.tpm.close()


def test_mac_key_planted_before_provisioning_is_refused(swtpm: SwtpmHandle,
                                                        tmp_path: Path) -> None:
    """An HMAC key the attacker made (its own auth) at the MAC-key handle is not used."""
    import tpm2_pytss as t

    setup = Tpm(swtpm.tcti, auth=b"attacker knows this")
    try:
        setup.provision()  # all objects, with the attacker's value
        for index in (ANCHOR_INDEX, COUNTER_INDEX):
            setup._esys.nv_undefine_space(setup._esys.tr_from_tpmpublic(index),
                                          t.ESYS_TR.OWNER)
        setup._esys.evict_control(t.ESYS_TR.OWNER,
                                  setup._esys.tr_from_tpmpublic(IDENTITY_HANDLE), IDENTITY_HANDLE)
    finally:
        setup.close()
    store = TrustStore(tmp_path / "state", Tpm(swtpm.tcti))
    try:
        with pytest.raises(TpmAuthError, match="HMAC"):
            store.provision(_root_json(tmp_path), "root.json")
        assert not store.record_path.exists()
    finally:
        store.tpm.close()


def _root_json(tmp_path: Path) -> bytes:
    from modelward.publisher._repo import Repository
    from tests.conftest import PASSPHRASE

    repo = Repository(tmp_path / "repo", tmp_path / "keys", PASSPHRASE)
    return repo.init().read_bytes()


class _Crash(BaseException):
    """Stands in for power loss."""


@pytest.mark.parametrize("step", ["before re-MAC", "before removing the old objects",
                                  "after removing the old anchor"])
def test_migration_interrupted_at_each_step_completes_on_the_next_run(
        world: World, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    from modelward.agent._commands import provision as agent_provision
    from modelward.trust._store import TrustStore as Store
    from modelward.trust._tpm import Tpm as RealTpm

    world.publish("1.0.0", seed=1)
    world.update()
    make_legacy(world.tpm.tcti, world.state)
    old, _ = decode_record((world.state / "trust" / "record.json").read_bytes(), "r")
    root = world.repo_dir / "metadata" / "1.root.json"

    def crash(*_: object) -> None:
        raise _Crash(step)

    with monkeypatch.context() as m:
        if step == "before re-MAC":
            m.setattr(Store, "_remac", crash)
        elif step == "before removing the old objects":
            m.setattr(RealTpm, "retire_legacy", crash)
        else:
            real_undefine = RealTpm._undefine

            def undefine_then_crash(self: RealTpm, index: int) -> None:
                real_undefine(self, index)
                raise _Crash(step)
            m.setattr(RealTpm, "_undefine", undefine_then_crash)
        with pytest.raises(_Crash):
            agent_provision(world.cfg, root)
    agent_provision(world.cfg, root)  # the operator runs it again
    after = world.snapshot()
    rec, _ = decode_record(after.record, "r")
    assert rec.replace(counter=old.counter) == old and rec.counter == after.counter
    assert _boot_check(world).returncode == 0
    assert world.active_version() == "1.0.0"
    tpm = Tpm(world.tpm.tcti)
    try:
        import tpm2_pytss as t

        _, data = tpm._esys.get_capability(t.TPM2_CAP.HANDLES, 0x01000000, 64)
        assert not {LEGACY_ANCHOR_INDEX, LEGACY_COUNTER_INDEX} & set(data.data.handles)
    finally:
        tpm.close()


def test_owner_password_closes_the_owner_hierarchy_and_the_agent_needs_none(
        world: World, tmp_path: Path) -> None:
    """What README "TPM" recommends: after provisioning, set the owner password. A local
    TPM client then cannot undefine or evict modelward's objects either, and the agent
    (boot-check, update, provisioning again) works without knowing the password."""
    world.publish("1.0.0", seed=1)
    world.update()
    work = tmp_path / "attacker"
    work.mkdir()
    r = _tools(world, "tpm2_changeauth", "-c", "owner", "operator-secret", cwd=work)
    assert r.returncode == 0, r.stderr
    before = world.snapshot()
    _refused(_tools(world, "tpm2_nvundefine", "-C", "o", f"{COUNTER_INDEX:#x}", cwd=work))
    _refused(_tools(world, "tpm2_nvundefine", "-C", "o", f"{ANCHOR_INDEX:#x}", cwd=work))
    _refused(_tools(world, "tpm2_evictcontrol", "-C", "o", "-c", f"{MAC_KEY_HANDLE:#x}",
                    cwd=work))
    assert world.snapshot() == before
    root = world.repo_dir / "metadata" / "1.root.json"
    r = world.cli("agent", "provision", "--config", str(world.conf_path), "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert world.snapshot() == before
    assert _boot_check(world).returncode == 0
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"


def test_provisioning_a_tpm_whose_owner_has_a_password(swtpm: SwtpmHandle, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(os.environ, TPM2TOOLS_TCTI=swtpm.tcti)
    subprocess.run(["tpm2_changeauth", "-c", "owner", "operator-secret"], env=env,
                   check=True, capture_output=True)
    root = _root_json(tmp_path)
    store = TrustStore(tmp_path / "state", Tpm(swtpm.tcti))
    try:
        with pytest.raises(TpmAuthError) as ei:
            store.provision(root, "root.json")
        assert "MODELWARD_TPM_OWNER_AUTH" in ei.value.hint
    finally:
        store.tpm.close()
    monkeypatch.setenv("MODELWARD_TPM_OWNER_AUTH", "operator-secret")
    store = TrustStore(tmp_path / "state", Tpm(swtpm.tcti))
    try:
        store.provision(root, "root.json")
        assert store.load().counter == store.tpm.read_counter()
    finally:
        store.tpm.close()


def test_auth_value_survives_the_loss_of_the_state_dir(world: World) -> None:
    """The auth value lives outside ``state_dir``: a deleted state directory (a disk
    attacker, must-show 9) leaves the TPM objects usable, so the device can heal."""
    import shutil

    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    assert not (world.state / "trust" / AUTH_FILE).exists()
    shutil.rmtree(world.state)
    s = world.store()
    try:
        assert s.tpm.read_counter() == before.counter
        assert s.tpm.read_anchor() == before.anchor
        assert s.tpm.mac(b"\0" * 32)
    finally:
        s.tpm.close()
    r = _boot_check(world)
    assert r.returncode != 0, r.stdout
    assert "TpmAuth" not in r.stderr and AUTH_FILE not in r.stderr, r.stderr


_READ_PROBE = """
import json, sys
try:
    with open(sys.argv[1], "rb") as f:
        f.read()
    print(json.dumps("ok"))
except OSError as e:
    print(json.dumps(type(e).__name__))
"""


def test_health_sandbox_cannot_read_the_auth_value(world: World) -> None:
    """The signed-but-malicious model runs as the agent user; the health sandbox (finding
    9) must keep it from the auth value, or it could use the TPM objects."""
    import dataclasses

    from modelward.updater._config import HealthConfig
    from modelward.updater.install._health import health_policy, memory_limit
    from modelward.updater.install._sandbox import run

    world.publish("1.0.0", seed=1)
    world.update()
    state = world.state.resolve()
    slot = state / "slots" / os.readlink(state / "current").split("/")[-1]
    auth = auth_dir_for(state) / AUTH_FILE
    assert auth.exists()
    cfg = HealthConfig()
    policy = health_policy(slot, cfg, os.environ, memory_limit(cfg))
    bare = run([sys.executable, "-c", _READ_PROBE, str(auth)],
               dataclasses.replace(policy, isolate=False, env=dict(os.environ)), timeout=60)
    assert json.loads(bare.stdout) == "ok"  # the probe can fail
    done = run([sys.executable, "-c", _READ_PROBE, str(auth)], policy, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) in ("PermissionError", "FileNotFoundError")
