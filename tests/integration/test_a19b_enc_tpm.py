"""Round 2 of the issue-19 attacks: a local TPM client and the decryption key
(persistent 0x81000105), through the real swtpm, tpm2-tools in another process and the
agent's own ``provision`` and ``update``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from modelward.publisher._encrypt import content_key
from modelward.simulator._fleet import enroll_device
from modelward.trust._deckey import DECRYPT_HANDLE
from modelward.trust._tpm import SRK_HANDLE
from modelward.trust.errors import TpmAuthError, TpmError
from tests._a19_enc import build_enc
from tests.conftest import World, agent_provision
from tests.integration._i16_delta import big_model


def _tools(world: World, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TPM2TOOLS_TCTI=world.tpm.tcti)
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60, check=False)


def _trusted(w: World) -> tuple[object, ...]:
    s = w.snapshot()
    return s.record, s.counter, s.anchor, s.current, s.slots


def _plant_decrypt_key(world: World, work: Path) -> None:
    """Another TPM client (empty owner auth) evicts the agent's decryption key and puts
    its own there: the same attributes, an auth value it chose."""
    work.mkdir(exist_ok=True)
    steps = [
        ("tpm2_evictcontrol", "-C", "o", "-c", f"{DECRYPT_HANDLE:#x}"),
        ("tpm2_create", "-C", f"{SRK_HANDLE:#x}", "-G", "ecc256:null:null", "-p", "mine",
         "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt|noda",
         "-u", "k.pub", "-r", "k.priv"),
        ("tpm2_load", "-C", f"{SRK_HANDLE:#x}", "-u", "k.pub", "-r", "k.priv", "-c", "k.ctx"),
        ("tpm2_evictcontrol", "-C", "o", "-c", "k.ctx", f"{DECRYPT_HANDLE:#x}"),
        ("tpm2_flushcontext", "-t"),  # (no resource manager in front of swtpm)
    ]
    for argv in steps:
        r = _tools(world, *argv, cwd=work)
        assert r.returncode == 0, (argv, r.stderr)


def test_a_decryption_key_planted_by_another_tpm_client_is_refused_at_provision(
        world: World, tmp_path: Path) -> None:
    """`agent provision` keeps a key it finds at 0x81000105 only if it takes this
    device's auth value (as the identity key): a planted key would otherwise be enrolled
    for the operator to wrap content keys for, usable by its planter, not the agent."""
    root = world.repo_dir / "metadata" / "1.root.json"
    assert not agent_provision(world.cfg, root).decrypt_created  # (its own: kept)
    _plant_decrypt_key(world, tmp_path / "attacker")
    with pytest.raises(TpmAuthError):
        agent_provision(world.cfg, root)



def test_a_decryption_key_replaced_after_enrollment_is_a_tpm_fault_not_a_rejection(
        world: World, tmp_path: Path) -> None:
    """Replaced after the device enrolled: the agent cannot use the planted key (auth),
    the release is not remembered as rejected and nothing trusted moves; once the agent's
    own key is back (re-provisioned and re-enrolled, a new content key), it installs."""
    w = world
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    assert enroll_device(fleet, w.conf_path, tmp_path / "challenge.json") == "dev-1"
    w.publish("1.0.0", seed=1)
    w.update()
    model = big_model(w.builds / "big.onnx")
    w.repo.publish(build_enc(model, w.builds / "c-1.1.0.tar",
                             content_key(fleet, "classifier", ["dev-1"]), "1.1.0"))
    before = _trusted(w)
    _plant_decrypt_key(w, tmp_path / "attacker")
    for _ in range(2):
        with pytest.raises(TpmError) as e:
            w.update()
        assert "auth" in str(e.value)
    assert _trusted(w) == before  # (TUF metadata is persisted as it verifies)
    assert not (w.state / "rejections.json").exists() or b"1.1.0" not in (
        w.state / "rejections.json").read_bytes()
