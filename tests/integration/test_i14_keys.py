"""Keys that stay secret, through the real CLI (issue 14, must show 3): `repo init` writes
scrypt key files and refuses a short passphrase, a team's key does not open with the root
passphrase, and `repo rekey` upgrades old PBKDF2-2048 files while a device keeps updating."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from modelward.cli import build_parser
from modelward.publisher._bundle_build import build_bundle
from modelward.simulator._models import make_linear_model
from tests.conftest import PASSPHRASE, World, tree_digest

PER_ROLE = {
    "MODELWARD_KEY_PASSPHRASE_ROOT": "root: offline, typed on the signing machine",
    "MODELWARD_KEY_PASSPHRASE_TARGETS": "targets: offline too, a different one",
    "MODELWARD_KEY_PASSPHRASE_SNAPSHOT": "snapshot: online host only",
    "MODELWARD_KEY_PASSPHRASE_TIMESTAMP": "timestamp: online host only",
}
TEAM = {"MODELWARD_KEY_PASSPHRASE_VISION": "the vision team's own passphrase"}


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MODELWARD_")}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "modelward", *argv], capture_output=True,
                          text=True, env=e, timeout=120, check=False, stdin=subprocess.DEVNULL)


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("modelward: error:")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], r.stderr


def _scrypt_params(path: Path) -> list[str]:
    asn1 = subprocess.run(["openssl", "asn1parse", "-in", str(path)], capture_output=True,
                          text=True, check=True).stdout
    assert ":PBES2" in asn1 and ":scrypt" in asn1 and "PBKDF2" not in asn1, asn1
    return [line.rsplit(":", 1)[1] for line in asn1.splitlines() if "INTEGER" in line][:3]


def test_init_help_encourages_offline_root_and_targets(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["repo", "init", "--help"])
    helptext = capsys.readouterr().out
    assert "offline" in helptext and "HSM" in helptext and "separate machine" in helptext
    assert "MODELWARD_KEY_PASSPHRASE_ROOT" in helptext


def test_init_per_role_passphrases_and_a_team_key_root_cannot_open(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    where = ("--repo", str(repo), "--keys", str(keys))

    short = _cli("repo", "init", *where, env={**PER_ROLE,
                                               "MODELWARD_KEY_PASSPHRASE_TARGETS": "2short"})
    _one_line_error(short, "targets key has 6 characters", "at least 12")
    assert not list(tmp_path.rglob("*.pem")) and not (repo / "metadata").exists()

    r = _cli("repo", "init", *where, env=PER_ROLE)
    assert r.returncode == 0, r.stderr
    assert "offline" in r.stdout and "HSM" in r.stdout
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert _scrypt_params(keys / f"{role}.pem") == ["4000", "08", "05"]  # N=2^14 r=8 p=5
        assert (keys / f"{role}.pem").stat().st_mode & 0o777 == 0o600

    r = _cli("repo", "delegate", "vision", "--paths", "detector/*", *where,
             env={**PER_ROLE, **TEAM})
    assert r.returncode == 0, r.stderr
    assert _scrypt_params(keys / "delegated-vision.pem") == ["4000", "08", "05"]
    bundle = tmp_path / "detector-1.0.0.tar"
    build_bundle(make_linear_model(tmp_path / "m.onnx", 3), "detector", "1.0.0", bundle)

    # the team's key with the root passphrase (what a team member who learnt root's would
    # try the other way round): refused in one line naming the team, nothing published
    # (publish copies the bundle to targets/ before it signs: an unlisted file stays there,
    # which devices never fetch; the signed metadata is what must not move)
    before = tree_digest(repo / "metadata")
    r = _cli("publish", "--role", "vision", *where, str(bundle), env={
        **PER_ROLE, "MODELWARD_KEY_PASSPHRASE_VISION": PER_ROLE["MODELWARD_KEY_PASSPHRASE_ROOT"]})
    _one_line_error(r, "cannot decrypt the vision key", "MODELWARD_KEY_PASSPHRASE_VISION")
    assert tree_digest(repo / "metadata") == before
    # and root's key does not open with the team's passphrase
    team_pw = TEAM["MODELWARD_KEY_PASSPHRASE_VISION"].encode()
    for role in ("root", "targets"):
        try:
            serialization.load_pem_private_key((keys / f"{role}.pem").read_bytes(), team_pw)
        except ValueError:
            continue
        raise AssertionError(f"{role}.pem opened with the team's passphrase")

    r = _cli("publish", "--role", "vision", *where, str(bundle), env={**PER_ROLE, **TEAM})
    assert r.returncode == 0, r.stderr  # the right passphrase: published


def test_rekey_old_key_files_then_publish_and_the_device_updates(world: World) -> None:
    # the world's key files as `repo init` wrote them before: PBKDF2-HMAC-SHA256, 2,048
    for path in world.keys.glob("*.pem"):
        priv = serialization.load_pem_private_key(path.read_bytes(), PASSPHRASE)
        path.write_bytes(priv.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(PASSPHRASE)))
    old = {"MODELWARD_KEY_PASSPHRASE": PASSPHRASE.decode()}
    new = {k.replace("MODELWARD_", "MODELWARD_NEW_"): v for k, v in PER_ROLE.items()}
    world.update()  # nothing published yet: the device fetches and trusts the metadata
    repo_before, device_before = tree_digest(world.repo_dir), world.snapshot()

    r = _cli("repo", "rekey", "--keys", str(world.keys), env={**old, **new})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("PBKDF2 hmacWithSHA256 2048 iterations -> upgrade") == 4, r.stdout
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert _scrypt_params(world.keys / f"{role}.pem") == ["4000", "08", "05"]
        assert (world.keys / f"{role}.pem").stat().st_mode & 0o777 == 0o600
    keys_after = tree_digest(world.keys)
    again = _cli("repo", "rekey", "--keys", str(world.keys), env={**old, **new})
    assert again.returncode == 0 and again.stdout.count("-> keep") == 4, again.stdout
    assert tree_digest(world.keys) == keys_after  # idempotent
    assert tree_digest(world.repo_dir) == repo_before and world.snapshot() == device_before

    # the old shared passphrase no longer opens the targets key: one line, nothing moves
    where = ("--repo", str(world.repo_dir), "--keys", str(world.keys))
    bundle = world.bundle("1.0.0", seed=1)
    r = _cli("publish", *where, str(bundle), env=old)
    _one_line_error(r, "cannot decrypt the targets key", "MODELWARD_KEY_PASSPHRASE_TARGETS")
    assert {k: v for k, v in tree_digest(world.repo_dir).items()
            if k.startswith("metadata/")} == {k: v for k, v in repo_before.items()
                                              if k.startswith("metadata/")}
    world.update()
    assert world.snapshot() == device_before

    r = _cli("publish", *where, str(bundle), env=PER_ROLE)
    assert r.returncode == 0, r.stderr
    world.update()
    assert world.active_version() == "1.0.0"  # the same keys: the device trusts them
