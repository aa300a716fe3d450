"""Updates from local media (issue 19): ``repo export`` onto a directory, then
``agent update --once --from DIR`` on a device whose configuration has no network
transport at all; through the real components (swtpm device, onnxruntime health check,
the real CLI in a child process). A medium attacker (old copies, tampered files, planted
symlinks, expired metadata) gets nothing trusted to move."""

from __future__ import annotations

import json
import shutil
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelward.agent._commands import update as agent_update
from modelward.agent._config import load_config
from modelward.publisher._expiry import Expiry
from modelward.publisher._repo import Repository
from modelward.simulator._demo import write_device_config
from modelward.updater.errors import (
    DownloadFailedError,
    MetadataError,
    RollbackError,
    TargetHashError,
)
from modelward.updater.install._install import UpdateResult
from modelward.updater.transport._local import LocalFileRefusedError
from tests._helpers import Clock
from tests.conftest import PASSPHRASE, DeviceState, World


def _offline_conf(w: World) -> Path:
    """The device's configuration without [https] or [mqtt]: same id, state, TPM, model."""
    return write_device_config(w.tmp / "offline.toml", device_id="dev-1", state=w.state,
                               tcti=w.tpm.tcti)


def _export(w: World, to: Path, *extra: str) -> str:
    r = w.cli("repo", "export", "--repo", str(w.repo_dir), "--to", str(to), *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _from(w: World, medium: Path, *extra: str):  # type: ignore[no-untyped-def]
    return w.cli("agent", "update", "--once", "--config", str(_offline_conf(w)),
                 "--from", str(medium), *extra)


def _update_from(w: World, medium: Path, grace: timedelta | None = None) -> UpdateResult:
    """The same attempt in this process (typed errors), on the offline configuration."""
    cfg = load_config(_offline_conf(w), need_transport=False)
    assert cfg.updater.transports == () and cfg.updater.https is None
    return agent_update(cfg, source_dir=medium, expired_grace=grace)


def _trusted(s: DeviceState) -> tuple[bytes, int, bytes, str | None, dict[str, str]]:
    """What a refused medium must not move (TUF's cache may take verified roles)."""
    return s.record, s.counter, s.anchor, s.current, s.slots


def test_export_then_update_from_the_medium_installs_without_network(world: World) -> None:
    world.publish("1.0.0", seed=1)
    medium = world.tmp / "usb"
    out = _export(world, medium)
    assert "root v1" in out and "all models" in out
    names = {p.relative_to(medium).as_posix() for p in medium.rglob("*") if p.is_file()}
    assert {"metadata/1.root.json", "metadata/timestamp.json",
            "modelward-export.json"} <= names
    assert any(n.startswith("targets/classifier/") and n.endswith(".classifier-1.0.0.tar")
               for n in names)
    assert any(n.endswith(".classifier-1.0.0.tar.chunks.json") or "chunks" in n
               for n in names if n.startswith("targets/")), names  # the chunk index too
    assert not any(p.name.startswith(".") for p in medium.rglob("*"))  # no temporary left
    doc = json.loads((medium / "modelward-export.json").read_bytes())
    assert doc["versions"]["root"] == 1 and doc["models"] is None
    r = _from(world, medium)
    assert r.returncode == 0, r.stderr
    assert "installed classifier 1.0.0" in r.stdout
    assert world.active_version() == "1.0.0"
    st = world.cli("agent", "status", "--json", "--config", str(_offline_conf(world)))
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["active"]["version"] == "1.0.0"
    again = _from(world, medium)  # the same medium again: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr


def test_export_of_one_model_and_an_incremental_re_export(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.publish("1.0.0", seed=5, name="detector")
    medium = world.tmp / "usb"
    _export(world, medium, "--model", "classifier")
    tars = sorted(p.name for p in (medium / "targets").rglob("*.tar"))
    assert tars and all(".classifier-" in t for t in tars), tars
    world.publish("2.0.0", seed=2)
    out = _export(world, medium, "--model", "classifier")
    assert "unchanged" in out and json.loads(
        (medium / "modelward-export.json").read_bytes())["models"] == ["classifier"]
    bad = world.cli("repo", "export", "--repo", str(world.repo_dir), "--to", str(medium),
                    "--model", "nosuch")
    assert bad.returncode != 0 and "nosuch" in bad.stderr


def test_an_older_export_is_refused_as_a_rollback(world: World) -> None:
    world.publish("1.0.0", seed=1)
    old = world.tmp / "old-usb"
    _export(world, old)
    world.publish("2.0.0", seed=2)
    world.update()  # (over the network, as a device that was online once)
    assert world.active_version() == "2.0.0"
    before = world.snapshot()
    r = _from(world, old)  # the technician's command: refused, one line naming it
    assert r.returncode != 0 and "BadVersionNumberError" in r.stderr, r.stderr
    with pytest.raises(MetadataError, match="BadVersionNumberError"):
        _update_from(world, old)
    assert world.snapshot() == before
    # a disk attacker also deletes the device's TUF cache: the TPM floor still refuses
    shutil.rmtree(world.state / "metadata")
    (world.state / "metadata").mkdir()
    with pytest.raises(RollbackError, match="rollback of metadata"):
        _update_from(world, old)
    assert _trusted(world.snapshot()) == _trusted(before)
    assert world.active_version() == "2.0.0"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_tampered_media_are_refused_with_a_typed_error(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    medium = world.tmp / "usb"
    _export(world, medium)
    bundle = next((medium / "targets" / "classifier").glob("*.classifier-2.0.0.tar"))
    before = _trusted(world.snapshot())

    flipped = _copy(medium, world.tmp / "flipped")
    b = flipped / bundle.relative_to(medium)
    with tarfile.open(b) as tar:  # a byte of the model itself (not tar padding)
        member = next(m for m in tar.getmembers() if m.name.endswith(".onnx"))
    data = bytearray(b.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    b.write_bytes(bytes(data))
    with pytest.raises(TargetHashError, match="does not match the signed target"):
        _update_from(world, flipped)  # (the delta refused its chunk, then the whole file)
    assert _trusted(world.snapshot()) == before

    altered = _copy(medium, world.tmp / "altered")
    ts = altered / "metadata" / "timestamp.json"
    doc = json.loads(ts.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"  # a longer life, not re-signed
    ts.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="UnsignedMetadataError"):
        _update_from(world, altered)
    assert _trusted(world.snapshot()) == before

    planted = _copy(medium, world.tmp / "planted")
    p = planted / bundle.relative_to(medium)
    p.unlink()
    p.symlink_to(bundle)  # the very bytes, through a link: still refused
    with pytest.raises(DownloadFailedError, match="symlink") as ei:
        _update_from(world, planted)
    assert isinstance(ei.value.__cause__, LocalFileRefusedError)
    assert ei.value.__cause__.path == str(p)
    r = _from(world, planted)  # the command line names the file
    assert r.returncode != 0 and "symlink" in r.stderr and p.name in r.stderr, r.stderr
    assert _trusted(world.snapshot()) == before

    linked = _copy(medium, world.tmp / "linked")
    t = linked / "metadata" / "timestamp.json"
    t.unlink()
    t.symlink_to(medium / "metadata" / "timestamp.json")
    with pytest.raises(DownloadFailedError, match="timestamp.json: a symlink"):
        _update_from(world, linked)
    assert _trusted(world.snapshot()) == before

    huge = _copy(medium, world.tmp / "huge")
    with (huge / "metadata" / "timestamp.json").open("ab") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of timestamp, over the bound
    with pytest.raises(DownloadFailedError, match="over the maximum allowed length"):
        _update_from(world, huge)
    assert _trusted(world.snapshot()) == before

    _update_from(world, medium)  # the medium itself was fine
    assert world.active_version() == "2.0.0"


def test_export_refuses_to_write_through_a_symlink(world: World) -> None:
    world.publish("1.0.0", seed=1)
    medium = world.tmp / "usb"
    (medium / "metadata").mkdir(parents=True)
    elsewhere = world.tmp / "elsewhere"
    elsewhere.mkdir()
    (medium / "metadata" / "timestamp.json").symlink_to(elsewhere / "ts")
    r = world.cli("repo", "export", "--repo", str(world.repo_dir), "--to", str(medium))
    assert r.returncode != 0 and "symlink" in r.stderr, r.stderr
    assert not (elsewhere / "ts").exists()
    link = world.tmp / "usb-link"
    link.symlink_to(elsewhere)
    r = world.cli("repo", "export", "--repo", str(world.repo_dir), "--to", str(link))
    assert r.returncode != 0 and "symlink" in r.stderr, r.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_planted_sparse_giant_does_not_stall_the_export(world: World) -> None:
    """Attack: 1 TiB sparse files on the stick under names the export writes. They are
    not read (their size differs): a versioned root there is another repository's
    (refused, nothing written), a target there is replaced."""
    world.publish("1.0.0", seed=1)
    medium = world.tmp / "usb"
    (medium / "metadata").mkdir(parents=True)
    with open(medium / "metadata" / "1.root.json", "wb") as f:
        f.truncate(1 << 40)
    r = world.cli("repo", "export", "--repo", str(world.repo_dir), "--to", str(medium))
    assert r.returncode != 0 and "1.root.json there holds other bytes" in r.stderr, r.stderr
    assert not (medium / "metadata" / "timestamp.json").exists()
    (medium / "metadata" / "1.root.json").unlink()
    bundle = next((world.repo_dir / "targets" / "classifier").glob("*.tar"))
    planted = medium / "targets" / "classifier" / bundle.name
    planted.parent.mkdir(parents=True)
    with open(planted, "wb") as f:
        f.truncate(1 << 40)
    _export(world, medium)
    assert planted.read_bytes() == bundle.read_bytes()


@pytest.mark.parametrize("grace", [None, "1d", "7d"])
def test_expired_metadata_needs_the_grace_option(world: World, grace: str | None) -> None:
    short = Expiry(targets=timedelta(hours=1), snapshot=timedelta(hours=1),
                   timestamp=timedelta(hours=1))
    past = Repository(world.repo_dir, world.keys, PASSPHRASE, expiry=short,
                      clock=Clock(datetime.now(UTC) - timedelta(days=3)))
    past.publish(world.bundle("1.0.0", seed=1))  # expired about 3 days ago
    medium = world.tmp / "usb"
    _export(world, medium)
    before = _trusted(world.snapshot())
    if grace != "7d":
        with pytest.raises(MetadataError, match="ExpiredMetadataError"):
            _update_from(world, medium, None if grace is None else timedelta(days=1))
        assert _trusted(world.snapshot()) == before and world.active_version() is None
        return
    r = _from(world, medium, "--expired-grace", grace)  # the technician's command
    assert r.returncode == 0, r.stderr
    assert "expired-grace" in r.stderr  # said, as a warning
    assert world.active_version() == "1.0.0"


def test_grace_is_refused_on_the_network_path(world: World) -> None:
    r = world.cli("agent", "update", "--once", "--config", str(world.conf_path),
                  "--expired-grace", "7d")
    assert r.returncode != 0 and "--from" in r.stderr, r.stderr
    assert not (world.state / "current").exists()


def test_a_delegated_release_is_exported_and_installed_from_the_medium(world: World) -> None:
    from modelward.simulator._teams import team_sign
    from tests._helpers import repo_cli_ok

    world.publish("1.0.0", seed=1)
    repo_cli_ok(world, "repo", "delegate", "cls-team", "--paths", "classifier/*")
    team_sign(world.repo, "cls-team", world.bundle("3.0.0", seed=3))
    medium = world.tmp / "usb"
    _export(world, medium)
    doc = json.loads((medium / "modelward-export.json").read_bytes())
    assert "cls-team" in doc["versions"]
    assert (medium / "metadata" / f"{doc['versions']['cls-team']}.cls-team.json").is_file()
    _update_from(world, medium)
    assert world.active_version() == "3.0.0"
