"""Round 2 of the attacks on the operator's half of encrypted bundles (issue 19): a
careless operator, through the real ``modelward bundle build`` and ``modelward publish``
CLI and the real repository, with software recipient keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.simulator._models import make_linear_model
from tests._a19_enc import enroll_soft

PASS = "a19b-passphrase-for-tests"


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MODELWARD_KEY_PASSPHRASE=PASS)
    return subprocess.run([sys.executable, "-m", "modelward", *argv], capture_output=True,
                          text=True, timeout=300, check=False, cwd=cwd, env=env)


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


@pytest.fixture
def op(tmp_path: Path) -> Path:
    enroll_soft(tmp_path / "fleet", "dev-1", "dev-2")
    make_linear_model(tmp_path / "m1.onnx", 1)
    make_linear_model(tmp_path / "m2.onnx", 2)
    _ok(_cli("repo", "init", "--repo", "R", "--keys", "K", cwd=tmp_path))
    return tmp_path


def _build(op: Path, model: str, version: str, *enc: str) -> str:
    out = f"b-{version}.tar"
    _ok(_cli("bundle", "build", model, "--name", "classifier", "--version", version,
             *(("--encrypt-for", ",".join(enc), "--fleet-dir", "fleet") if enc else ()),
             "-o", out, cwd=op))
    return out


def _targets(op: Path) -> list[str]:
    return sorted(p.name.partition(".")[2] for p in (op / "R" / "targets" / "classifier")
                  .iterdir())


def test_a_plaintext_release_after_an_encrypted_one_is_refused_unless_named_unsafe(
        op: Path) -> None:
    """A build that forgot ``--encrypt-for`` after encrypted releases: published as is,
    the next model reaches the origin (the CDN, the broker) in the clear. Refused, with
    nothing served or signed; ``--unsafe-plaintext`` publishes it, with a warning."""
    _ok(_cli("publish", _build(op, "m1.onnx", "1.0.0", "dev-1", "dev-2"), "--repo", "R",
             "--keys", "K", cwd=op))
    before = (_targets(op), sorted(os.listdir(op / "R" / "metadata")))
    plain = _build(op, "m2.onnx", "1.1.0")
    r = _cli("publish", plain, "--repo", "R", "--keys", "K", cwd=op)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "1.0.0" in r.stderr and "--unsafe-plaintext" in r.stderr, r.stderr
    assert (_targets(op), sorted(os.listdir(op / "R" / "metadata"))) == before
    out = _ok(_cli("publish", plain, "--repo", "R", "--keys", "K", "--unsafe-plaintext",
                   cwd=op))
    assert "in the clear" in out
    # the model is plaintext from then on: the next plaintext release needs no flag, and
    # an encrypted one after it is published as usual
    _ok(_cli("publish", _build(op, "m2.onnx", "1.2.0"), "--repo", "R", "--keys", "K",
             cwd=op))
    _ok(_cli("publish", _build(op, "m1.onnx", "1.3.0", "dev-1"), "--repo", "R", "--keys",
             "K", cwd=op))
    assert "classifier-1.2.0.tar" in _targets(op) and "classifier-1.3.0.tar" in _targets(op)


def test_republishing_a_version_for_other_recipients_is_refused(op: Path) -> None:
    """The same version built again for fewer devices (to revoke one) is no new release:
    refused, the served release stays the one signed."""
    _ok(_cli("publish", _build(op, "m1.onnx", "1.0.0", "dev-1", "dev-2"), "--repo", "R",
             "--keys", "K", cwd=op))
    before = _targets(op)
    again = _build(op, "m1.onnx", "1.0.0", "dev-1")
    r = _cli("publish", again, "--repo", "R", "--keys", "K", cwd=op)
    assert r.returncode != 0 and "published already" in r.stderr, r.stderr
    assert _targets(op) == before


@pytest.mark.parametrize("spec", ["", ",", " , ", "../dev-1", "dev-1;dev-2", "dev-9"])
def test_encrypt_for_lists_that_name_no_enrolled_device_write_nothing(
        op: Path, spec: str) -> None:
    r = _cli("bundle", "build", "m1.onnx", "--name", "classifier", "--version", "1.0.0",
             "--encrypt-for", spec, "--fleet-dir", "fleet", "-o", "b.tar", cwd=op)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "error:" in r.stderr
    assert not (op / "b.tar").exists() and not (op / "fleet" / "content-keys").exists()
