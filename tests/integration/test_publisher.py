"""Operator side: repository init, publish, refusals, and plain-TUF interop."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from modelward.publisher._repo import Repository
from modelward.publisher.errors import KeyError_, RepositoryStateError
from tests.conftest import PASSPHRASE, World


def test_keys_are_encrypted_and_outside_the_repo(world: World) -> None:
    for role in ("root", "targets", "snapshot", "timestamp"):
        key = world.keys / f"{role}.pem"
        assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    served = [p.name for p in world.repo_dir.rglob("*")]
    assert not any(n.endswith(".pem") for n in served)


def test_keys_inside_repo_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryStateError, match="inside the served repository"):
        Repository(tmp_path / "repo", tmp_path / "repo" / "keys", PASSPHRASE)


def test_init_twice_is_refused(world: World) -> None:
    with pytest.raises(RepositoryStateError, match="already holds"):
        world.repo.init()


def test_wrong_passphrase_is_named(world: World) -> None:
    bundle = world.bundle("1.0.0", seed=1)
    r = world.cli("publish", "--repo", str(world.repo_dir), "--keys", str(world.keys),
                  str(bundle), env={"MODELWARD_KEY_PASSPHRASE": "wrong"})
    assert r.returncode == 1
    assert "cannot decrypt the targets key" in r.stderr
    assert "Traceback" not in r.stderr


def test_republishing_a_version_is_refused(world: World) -> None:
    world.publish("1.0.0", seed=1)
    ts = (world.repo_dir / "metadata" / "timestamp.json").read_bytes()
    with pytest.raises(RepositoryStateError, match="published already"):
        world.repo.publish(world.bundle("1.0.0", seed=9))
    assert (world.repo_dir / "metadata" / "timestamp.json").read_bytes() == ts


def test_published_target_carries_signed_modelward_fields(world: World) -> None:
    world.publish("1.0.0", seed=1)
    targets = json.loads((world.repo_dir / "metadata" / "2.targets.json").read_bytes())
    entry = targets["signed"]["targets"]["classifier/classifier-1.0.0.tar"]
    field = entry["custom"]["modelward"]
    assert field["name"] == "classifier" and field["version"] == "1.0.0"
    assert len(field["fingerprint"]) == 64
    sha = entry["hashes"]["sha256"]
    assert (world.repo_dir / "targets" / "classifier" / f"{sha}.classifier-1.0.0.tar").exists()


def test_stock_python_tuf_client_reads_the_repository(world: World, tmp_path: Path) -> None:
    from tuf.ngclient import Updater

    world.publish("1.0.0", seed=1)
    ca = str(world.ca.cert)
    os.environ["REQUESTS_CA_BUNDLE"] = ca  # stock fetcher: urllib3 honours SSL_CERT_FILE
    os.environ["SSL_CERT_FILE"] = ca
    try:
        md = tmp_path / "md"
        md.mkdir()
        up = Updater(str(md), f"{world.origin_url}/metadata/",
                     target_dir=str(tmp_path), target_base_url=f"{world.origin_url}/targets/",
                     bootstrap=(world.repo_dir / "metadata" / "1.root.json").read_bytes())
        up.refresh()
        info = up.get_targetinfo("classifier/classifier-1.0.0.tar")
        assert info is not None
        path = up.download_target(info, str(tmp_path / "b.tar"))
        assert Path(path).stat().st_size == info.length
    finally:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
        os.environ.pop("SSL_CERT_FILE", None)


def test_bundle_build_cli_refuses_bad_version(world: World, tmp_path: Path) -> None:
    from modelward.simulator._models import make_linear_model

    m = make_linear_model(tmp_path / "m.onnx", 1)
    r = world.cli("bundle", "build", str(m), "--name", "x", "--version", "1.0", "-o",
                  str(tmp_path / "o.tar"))
    assert r.returncode == 1
    assert "not a semantic version" in r.stderr
    assert not (tmp_path / "o.tar").exists()


def test_key_error_type(tmp_path: Path) -> None:
    from modelward.publisher._keys import load_signer

    with pytest.raises(KeyError_, match="cannot read"):
        load_signer(tmp_path, "root", PASSPHRASE)


def test_progress_reports_every_byte(world: World, tmp_path: Path) -> None:
    from modelward.publisher._bundle_build import build_bundle
    from modelward.simulator._models import make_linear_model

    pad = tmp_path / "pad.bin"
    pad.write_bytes(os.urandom(3 << 20))
    model = make_linear_model(tmp_path / "m.onnx", 1)
    seen: list[int] = []
    out = tmp_path / "b.tar"
    m = build_bundle(model, "classifier", "1.0.0", out, extra=[(pad, "data/pad.bin")],
                     progress=seen.append)
    assert sum(seen) == 2 * sum(f.size for f in m.files)  # hashed once, written once
    published: list[int] = []
    world.repo.publish(out, progress=published.append)
    assert sum(published) == 3 * out.stat().st_size  # verified, hashed, copied


def test_progress_bar_on_a_terminal(world: World, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("script") is None:
        pytest.skip("util-linux `script` missing")
    from modelward.simulator._models import make_linear_model

    model = make_linear_model(tmp_path / "m.onnx", 1)
    cmd = (f"{sys.executable} -m modelward bundle build {model} --name c --version 1.0.0 "
           f"-o {tmp_path / 'o.tar'}")
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout
    assert "building" in r.stdout  # rich drew the bar (then cleared it)
    assert "wrote" in r.stdout
