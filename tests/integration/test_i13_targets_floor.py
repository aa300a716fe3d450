"""The TPM-kept targets floor (NV index FLOOR_INDEX, issue 13 a4): added to existing
devices by `agent provision` (idempotent, seeded from the record), written only when an
install raises it, and not writable by another TPM client (real swtpm)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from modelward.trust._tpm import FLOOR_INDEX
from tests.conftest import World


def _floor(w: World) -> int:
    s = w.store()
    try:
        return s.targets_floor()
    finally:
        s.tpm.close()


def _targets_version(w: World) -> int:
    rec = json.loads((w.state / "trust" / "record.json").read_bytes())["record"]
    return int(rec["targets_version"])


def _provision(w: World) -> subprocess.CompletedProcess[str]:
    return w.cli("agent", "provision", "--config", str(w.conf_path), "--root",
                 str(w.repo_dir / "metadata" / "1.root.json"))


def test_floor_rises_only_with_installs_and_a_second_client_cannot_write_it(
        world: World, tmp_path: Path) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    assert _floor(world) == _targets_version(world) > 0
    before = world.snapshot()
    world.update()  # nothing to install: no NV write, nothing moves
    assert world.snapshot() == before
    work = tmp_path / "attacker"
    work.mkdir()
    (work / "big").write_bytes((2**62).to_bytes(8, "big"))  # would refuse every release
    env = dict(os.environ, TPM2TOOLS_TCTI=world.tpm.tcti)
    for argv in (("tpm2_nvwrite", "-C", "o", "-i", "big", f"{FLOOR_INDEX:#x}"),
                 ("tpm2_nvwrite", "-i", "big", f"{FLOOR_INDEX:#x}"),
                 ("tpm2_nvwrite", "-P", "guess", "-i", "big", f"{FLOOR_INDEX:#x}")):
        r = subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=work,
                           timeout=60, check=False)
        assert r.returncode != 0, (argv, r.stdout)
    assert _floor(world) == _targets_version(world)
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"
    assert _floor(world) == _targets_version(world)


def test_existing_device_without_the_floor_index_keeps_working_and_provision_adds_it(
        world: World) -> None:
    import tpm2_pytss as t
    from tpm2_pytss import ESAPI

    world.publish("1.0.0", seed=1)
    world.update()
    e = ESAPI(world.tpm.tcti)  # a device provisioned before the floor index existed
    try:
        e.nv_undefine_space(e.tr_from_tpmpublic(FLOOR_INDEX), t.ESYS_TR.OWNER)
    finally:
        e.close()
    assert _floor(world) == 0
    world.publish("2.0.0", seed=2)
    world.update()  # not bricked: the record's floor still holds, the TPM's is skipped
    assert world.active_version() == "2.0.0"
    before = world.snapshot()
    r = _provision(world)
    assert r.returncode == 0, r.stderr
    assert _floor(world) == _targets_version(world)  # seeded from the record
    assert world.snapshot() == before  # record, counter, anchor, slots untouched
    r = _provision(world)  # idempotent
    assert r.returncode == 0, r.stderr
    assert world.snapshot() == before and _floor(world) == _targets_version(world)
