"""Threshold 2-of-3 targets with one key in SoftHSM2, on a real device (issue #5 must-show 1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.agent._commands import provision as agent_provision
from modelward.publisher._repo import Repository
from modelward.simulator._demo import write_device_config
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._swtpm import SwtpmHandle
from tests.conftest import PASSPHRASE, World

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4321"
LABEL = "modelward-test"

pytestmark = pytest.mark.skipif(
    not Path(SOFTHSM_LIB).exists() or shutil.which("softhsm2-util") is None,
    reason="softhsm2 missing (scripts/setup installs it)")


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A SoftHSM2 token with one EC P-256 key (CKA_ID 7); yields the key id.

    The key is made in a child process: SoftHSM reads SOFTHSM2_CONF once per process.
    """
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.setenv("PYKCS11LIB", SOFTHSM_LIB)
    monkeypatch.setenv("MODELWARD_HSM_PIN", PIN)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--so-pin",
                    "0000", "--pin", PIN], check=True, capture_output=True)
    keygen = (
        "import pkcs11; from pkcs11 import Attribute, KeyType;"
        "from pkcs11.util.ec import encode_named_curve_parameters as p;"
        f"t = pkcs11.lib({SOFTHSM_LIB!r}).get_token(token_label={LABEL!r});"
        f"s = t.open(user_pin={PIN!r}, rw=True);"
        "d = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: p('secp256r1')},"
        " local=True);"
        "d.generate_keypair(store=True, id=b'\\x07', label='targets-hsm'); s.close()"
    )
    subprocess.run([sys.executable, "-c", keygen], check=True, env=dict(os.environ))
    yield 7


@pytest.fixture
def threshold_world(tmp_path: Path, swtpm: SwtpmHandle, pki: tuple[object, object],
                    hsm: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """targets: 2-of-3, two encrypted files + one SoftHSM2 key; a provisioned device."""
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE.decode())
    repo_dir, keys, builds = tmp_path / "repo", tmp_path / "keys", tmp_path / "builds"
    builds.mkdir()
    repo = Repository(repo_dir, keys, PASSPHRASE, secrets=lambda _m: PIN)
    repo.init({"targets": 2}, {"targets": 2})
    ca, server = pki
    origin = start_origin(repo_dir, tmp_path / "origin", server)  # type: ignore[arg-type]
    try:
        conf = write_device_config(tmp_path / "agent.toml", device_id="dev-1",
                                   state=tmp_path / "state", tcti=swtpm.tcti,
                                   origin_url=origin.url, ca=ca.cert)  # type: ignore[attr-defined]
        w = World(tmp_path, repo_dir, keys, repo, builds, conf, swtpm, origin.url,
                  ca)  # type: ignore[arg-type]
        r = w.cli("repo", "add-key", "targets", "--hsm-keyid", str(hsm), "--token-label",
                  LABEL, "--repo", str(repo_dir), "--keys", str(keys))
        assert r.returncode == 0, r.stderr
        # The device is provisioned with root v1; it walks to v2 (with the HSM key) itself.
        agent_provision(w.cfg, repo_dir / "metadata" / "1.root.json")
        yield w
    finally:
        stop_origin(tmp_path / "origin")


def test_two_of_three_with_an_hsm_key(threshold_world: World) -> None:
    w = threshold_world
    status = w.cli("repo", "status", "--repo", str(w.repo_dir), "--keys", str(w.keys)).stdout
    assert any(line.startswith("targets") and "/2" in line for line in status.splitlines())

    bundle = w.bundle("1.0.0", seed=1)
    one = w.cli("publish", "--repo", str(w.repo_dir), "--keys", str(w.keys), str(bundle))
    assert one.returncode == 1
    assert "targets metadata has 1 of the 2 signatures" in one.stderr
    assert "1 missing" in one.stderr and "Traceback" not in one.stderr
    assert w.update().outcome.value == "up-to-date"  # nothing reached the device
    assert w.active_version() is None

    hsm_uri = f"hsm:7?label={LABEL}"
    two = w.cli("repo", "sign", "targets", "--yes", "--key", hsm_uri, "--repo", str(w.repo_dir),
                "--keys", str(w.keys))
    assert two.returncode == 0, two.stderr
    assert "2 of 2 signatures" in two.stdout
    w.update()
    assert w.active_version() == "1.0.0"

    # Both signatures at once: two operators' keys given to publish directly.
    r = w.cli("publish", "--repo", str(w.repo_dir), "--keys", str(w.keys),
              "--sign-with", "encfile:targets-2.pem", "--sign-with", hsm_uri,
              str(w.bundle("2.0.0", seed=2)))
    assert r.returncode == 0, r.stderr
    w.update()
    assert w.active_version() == "2.0.0"


def test_pending_metadata_is_not_served(threshold_world: World) -> None:
    w = threshold_world
    w.cli("publish", "--repo", str(w.repo_dir), "--keys", str(w.keys),
          str(w.bundle("1.0.0", seed=1)))
    assert list((w.keys / "pending").glob("*.targets.json"))
    assert not (w.repo_dir / "metadata" / "3.targets.json").exists()
    assert not any("pending" in p.relative_to(w.repo_dir).as_posix()
                   for p in w.repo_dir.rglob("*"))


def test_envvar_key_joins_a_threshold(world: World, tmp_path: Path) -> None:
    """A targets key handed in through an environment variable (e.g. from a CI secret)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    priv = ed25519.Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    pub = tmp_path / "ci.pub.pem"
    pub.write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = world.cli("repo", "add-key", "targets", "--uri", "envvar:CI_TARGETS_KEY",
                  "--public-key", str(pub), "--threshold", "2", "--repo", str(world.repo_dir),
                  "--keys", str(world.keys))
    # Issue 14: root v2 raises the targets threshold, so the published targets must be
    # re-signed by both keys with it; without the envvar key the root waits.
    assert r.returncode == 1 and "cannot be re-signed here" in r.stderr, r.stderr
    r = world.cli("repo", "sign", "root", "--yes", "--key", "encfile:root.pem", "--repo",
                  str(world.repo_dir), "--keys", str(world.keys), env={"CI_TARGETS_KEY": pem})
    assert r.returncode == 0, r.stderr
    bundle = world.bundle("1.0.0", seed=1)
    short = world.cli("publish", "--repo", str(world.repo_dir), "--keys", str(world.keys),
                      str(bundle))
    assert short.returncode == 1 and "1 of the 2 signatures" in short.stderr
    unset = world.cli("repo", "sign", "targets", "--yes", "--key", "envvar:CI_TARGETS_KEY",
                      "--repo", str(world.repo_dir), "--keys", str(world.keys))
    assert unset.returncode == 1 and "CI_TARGETS_KEY" in unset.stderr
    ok = world.cli("repo", "sign", "targets", "--yes", "--key", "envvar:CI_TARGETS_KEY",
                   "--repo", str(world.repo_dir), "--keys", str(world.keys),
                   env={"CI_TARGETS_KEY": pem})
    assert ok.returncode == 0, ok.stderr
    world.update()
    assert world.active_version() == "1.0.0"
