"""Attacks on ``repo export`` and ``agent update --from`` (issue 19, second round),
through the real CLI in a child process and a swtpm device. Each checks the error and
that nothing trusted moved."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelward.simulator._demo import write_device_config
from tests.conftest import World


def _offline_conf(w: World) -> Path:
    return write_device_config(w.tmp / "offline.toml", device_id="dev-1", state=w.state,
                               tcti=w.tpm.tcti)


def _export(w: World, to: Path, *extra: str):  # type: ignore[no-untyped-def]
    return w.cli("repo", "export", "--repo", str(w.repo_dir), "--to", str(to), *extra)


def _from(w: World, medium: Path, *extra: str):  # type: ignore[no-untyped-def]
    return w.cli("agent", "update", "--once", "--config", str(_offline_conf(w)),
                 "--from", str(medium), *extra)


def test_a_team_listing_another_teams_path_does_not_break_its_export(world: World) -> None:
    """Attack (one delegated team key): team ``det-team`` (``detector/*``) signs into its
    own role a target at ``classifier/…`` whose bytes it never uploads. Devices ignore
    that listing (TUF's search does not reach det-team for a classifier path); the
    export must too, instead of refusing the operator's classifier export as a damaged
    repository, and must not copy a listing no device would take."""
    from modelward.simulator._teams import team_sign
    from tests._helpers import repo_cli_ok

    world.publish("1.0.0", seed=1)
    repo_cli_ok(world, "repo", "delegate", "det-team", "--paths", "detector/*")
    team_sign(world.repo, "det-team", world.bundle("1.0.0", seed=5, name="detector"))
    rogue = team_sign(world.repo, "det-team", world.bundle("9.0.0", seed=9),
                      path="classifier/classifier-9.0.0.tar")
    for f in (world.repo_dir / "targets" / "classifier").glob("*.classifier-9.0.0.tar"):
        f.unlink()  # (the team signs metadata; it never had to upload the bytes)
    for extra in ((), ("--model", "classifier")):
        medium = world.tmp / f"usb{len(extra)}"
        r = _export(world, medium, *extra)
        assert r.returncode == 0, r.stderr
        doc = json.loads((medium / "modelward-export.json").read_bytes())
        assert rogue not in doc["targets"]
        assert "classifier/classifier-1.0.0.tar" in doc["targets"]
    r = _from(world, world.tmp / "usb0")
    assert r.returncode == 0, r.stderr
    assert world.active_version() == "1.0.0"


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "WARNING" not in ln
             and not ln.startswith("{")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) >= 1, stderr
    return lines[-1]


def test_an_empty_absent_or_file_medium_is_one_typed_line(world: World) -> None:
    """Careless technician: the stick did not mount (an empty mount point), a mistyped
    path, a file given as the medium. One line each, nothing trusted moved (TUF's cache
    included)."""
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    empty = world.tmp / "mnt"
    empty.mkdir()
    afile = world.tmp / "afile"
    afile.write_bytes(b"x")
    for medium in (empty, world.tmp / "nosuch", afile):
        r = _from(world, medium)
        assert r.returncode != 0, r.stdout
        line = _one_line(r.stderr)
        assert str(medium) in line, r.stderr
        assert world.snapshot() == before


def test_another_fleets_valid_export_moves_nothing(world: World, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack (a medium): a genuine export of another fleet (its own root, newer
    versions everywhere). Refused as unsigned; the device's TUF cache does not move."""
    from tests.conftest import _new_repo

    world.publish("1.0.0", seed=1)
    world.update()
    (tmp_path / "other").mkdir()
    other_dir, _k, _b, other, _root = _new_repo(tmp_path / "other", monkeypatch)
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        other.publish(world.bundle(v, seed=7))
    medium = world.tmp / "usb-other"
    r = world.cli("repo", "export", "--repo", str(other_dir), "--to", str(medium))
    assert r.returncode == 0, r.stderr
    before = world.snapshot()
    r = _from(world, medium)
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert "Unsigned" in line or "signature" in line, r.stderr
    assert world.snapshot() == before
    assert world.active_version() == "1.0.0"


def test_a_newer_root_not_signed_by_the_old_root_moves_nothing(world: World) -> None:
    """Attack (a medium): the genuine export plus a 2.root.json signed only by a key of
    its own (not the threshold of root 1's keys). Refused naming it; anchor, TUF cache,
    record stay."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    world.publish("1.0.0", seed=1)
    world.update()
    medium = world.tmp / "usb"
    assert _export(world, medium).returncode == 0
    root = Metadata[Root].from_bytes((medium / "metadata" / "1.root.json").read_bytes())
    signer = CryptoSigner(ec.generate_private_key(ec.SECP256R1()))
    root.signed.version = 2
    for role in root.signed.roles.values():
        for keyid in list(role.keyids):
            root.signed.revoke_key(keyid, next(n for n, r in root.signed.roles.items()
                                               if r is role))
    for name in ("root", "targets", "snapshot", "timestamp"):
        root.signed.add_key(signer.public_key, name)
    root.signatures.clear()
    root.sign(signer)
    (medium / "metadata" / "2.root.json").write_bytes(root.to_bytes())
    before = world.snapshot()
    r = _from(world, medium)
    assert r.returncode != 0
    line = _one_line(r.stderr)
    assert "root" in line, r.stderr
    assert world.snapshot() == before
    os.unlink(medium / "metadata" / "2.root.json")
    assert _from(world, medium).returncode == 0
