"""Issue 16, operator side: `publish` signs a chunk index next to each bundle.

Real repository on disk, served by the world fixture's nginx; a stock python-tuf client
downloads and verifies both targets. Careless-operator attacks: a manifest that lies, a
bundle changed between verify and cut, the same version twice, a withdrawn release.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

from modelward.publisher._indexpub import INDEX_FIELD
from modelward.publisher.errors import OperatorInputError, RepositoryStateError
from modelward.updater.bundle._chunkindex import index_path, parse_index
from modelward.updater.errors import BundleFormatError
from tests._stock_tuf import stock_refresh
from tests.conftest import World

MODEL = "classifier"


@pytest.fixture
def pub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    """The operator's side only (a repository on disk, no origin, no device): for the
    tests that need no nginx; the stock-client tests use ``world``."""
    from tests.conftest import _new_repo

    repo_dir, keys, builds, repo, _ = _new_repo(tmp_path, monkeypatch)
    return World(tmp_path, repo_dir, keys, repo, builds, tmp_path / "unused.toml",
                 None, "", None)  # type: ignore[arg-type]


def _blob(path: Path, seed: int, size: int = 1 << 20) -> Path:
    """Incompressible file data, the same for the same seed (a model's frozen layers)."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _release(w: World, version: str, seed: int, blob_seed: int) -> Path:
    """A bundle of a small model plus a 1 MiB file that ``blob_seed`` decides."""
    blob = _blob(w.builds / f"blob-{blob_seed}.bin", blob_seed)
    return w.bundle(version, seed, extra=[(blob, "weights.bin")])


def _served(w: World) -> dict[str, bytes]:
    return {str(p.relative_to(w.repo_dir)): p.read_bytes()
            for p in sorted(w.repo_dir.rglob("*")) if p.is_file()}


def _targets(w: World) -> dict[str, dict[str, object]]:
    v = w.repo.current()[0].version
    md = json.loads((w.repo_dir / "metadata" / f"{v}.targets.json").read_bytes())
    return dict(md["signed"]["targets"])


def _stock_download(w: World, tmp: Path, paths: list[str]) -> dict[str, bytes]:
    """A stock python-tuf ngclient over nginx (HTTPS): refresh, then download and verify."""
    from tuf.ngclient import Updater

    ca = str(w.ca.cert)
    os.environ["REQUESTS_CA_BUNDLE"] = ca
    os.environ["SSL_CERT_FILE"] = ca
    try:
        md = tmp / "stock-md"
        md.mkdir(exist_ok=True)
        up = Updater(str(md), f"{w.origin_url}/metadata/", target_dir=str(tmp),
                     target_base_url=f"{w.origin_url}/targets/",
                     bootstrap=(w.repo_dir / "metadata" / "1.root.json").read_bytes())
        up.refresh()
        out = {}
        for p in paths:
            info = up.get_targetinfo(p)
            assert info is not None, p
            out[p] = Path(up.download_target(info, str(tmp / p.replace("/", "_")))).read_bytes()
        return out
    finally:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
        os.environ.pop("SSL_CERT_FILE", None)


def test_publish_signs_the_index_in_the_same_targets_version(world: World, tmp_path: Path
                                                            ) -> None:
    r1 = world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    assert r1.estimates == ()  # (no earlier release)
    r2 = world.repo.publish(_release(world, "1.1.0", 2, blob_seed=7))  # a small fine-tune
    stock_refresh(world.repo_dir)
    assert r2.targets_version == r1.targets_version + 1  # bundle and index: one signing
    targets = _targets(world)
    for r in (r1, r2):
        assert r.index_path == index_path(r.target_path)
        entry = targets[r.index_path]
        assert entry["custom"] == {INDEX_FIELD: {"bundle": r.target_path}}
    got = _stock_download(world, tmp_path, [r2.target_path, index_path(r2.target_path)])
    ix = parse_index(got[index_path(r2.target_path)], "index")
    bundle = got[r2.target_path]
    assert ix.bundle_length == len(bundle) == targets[r2.target_path]["length"]
    assert ix.bundle_sha256 == hashlib.sha256(bundle).hexdigest() \
        == targets[r2.target_path]["hashes"]["sha256"]  # type: ignore[index]
    assert ix.fingerprint == targets[r2.target_path]["custom"]["modelward"]["fingerprint"]  # type: ignore[index]
    # the operator view: a device on 1.0.0 fetches the small model, not the 1 MiB blob
    (e,) = r2.estimates
    assert e.version == "1.0.0" and e.fetch is not None and e.note == ""
    assert e.fetch < r2.length // 4, e.text()
    assert e.index_length == targets[r2.index_path]["length"]
    # the index target is never a release: releases(), withdraw and pin behave as before
    assert sorted(f.path for f in world.repo.releases(MODEL)) == \
        [r1.target_path, r2.target_path]


def test_publish_cli_prints_what_devices_fetch(pub: World) -> None:
    world = pub
    world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    r = world.cli("publish", "--repo", str(world.repo_dir), "--keys", str(world.keys),
                  str(_release(world, "1.1.0", 2, blob_seed=7)))
    assert r.returncode == 0, r.stderr
    assert "chunk index classifier/classifier-1.1.0.tar.chunks.json" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("devices on 1.0.0"))
    assert " KiB of 1.0 MiB (index " in line, line  # a fine-tune: the model, not the blob
    # an unrelated model (every byte differs): about the full bundle
    r3 = world.repo.publish(_release(world, "2.0.0", 3, blob_seed=8))
    for e in r3.estimates:
        assert e.fetch is not None and 0.95 * e.full < e.fetch < 1.05 * e.full, e.text()


def test_a_manifest_that_lies_is_refused_and_nothing_is_served(pub: World) -> None:
    world = pub
    good = _release(world, "1.0.0", 1, blob_seed=7)
    liar = world.builds / "liar.tar"
    with tarfile.open(good) as src, tarfile.open(liar, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "weights.bin":
                data = bytes([data[0] ^ 1]) + data[1:]  # the manifest's sha256 is now a lie
            dst.addfile(m, io.BytesIO(data))
    before = _served(world)
    with pytest.raises(BundleFormatError):
        world.repo.publish(liar)
    assert _served(world) == before  # no bundle, no index, no metadata


@pytest.mark.parametrize("when", ["after verify", "during the copy"])
def test_a_bundle_changed_between_verify_and_cut_is_refused(pub: World,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            when: str) -> None:
    world = pub
    import modelward.publisher._repo as repo_mod

    world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    swap = world.builds / "swap.tar"  # another valid bundle of the same version
    swap.write_bytes(_release(world, "1.1.0", 5, blob_seed=9).read_bytes())
    verified = _release(world, "1.1.0", 2, blob_seed=7)
    real_copy, real_extract = repo_mod.copy_atomic, repo_mod.extract_bundle

    def copy_then(src: Path, dst: Path, mode: int = 0o644) -> None:
        real_copy(swap, dst, mode)

    def extract_then(*a: object, **k: object) -> object:
        out = real_extract(*a, **k)  # type: ignore[arg-type]
        verified.write_bytes(swap.read_bytes())  # (the open file reads the new bytes on)
        return out

    if when == "during the copy":
        monkeypatch.setattr(repo_mod, "copy_atomic", copy_then)
    else:
        monkeypatch.setattr(repo_mod, "extract_bundle", extract_then)
    before = _served(world)
    with pytest.raises(OperatorInputError, match="not the one verified"):
        world.repo.publish(verified)
    assert _served(world) == before  # neither bundle nor index nor metadata
    stock_refresh(world.repo_dir)


def test_a_link_planted_at_the_index_name_is_not_followed(pub: World, tmp_path: Path
                                                          ) -> None:
    world = pub
    from modelward.publisher._indexpub import index_of_bytes, index_target, served_name

    bundle = _release(world, "1.0.0", 1, blob_seed=7)
    tf = index_target(index_of_bytes(bundle.read_bytes()).to_bytes(),
                      f"{MODEL}/{MODEL}-1.0.0.tar")
    dest = served_name(world.repo_dir / "targets", tf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    dest.symlink_to(victim)
    r = world.repo.publish(bundle)
    assert r.index_path == tf.path
    assert victim.read_bytes() == b"keep" and not dest.is_symlink()
    assert dest.stat().st_size == tf.length


def test_a_tampered_earlier_index_is_not_believed(pub: World) -> None:
    world = pub
    r1 = world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    r2 = world.repo.publish(_release(world, "1.1.0", 2, blob_seed=8))  # other weights
    d = world.repo_dir / "targets" / MODEL
    served = next(d.glob("*.classifier-1.0.0.tar.chunks.json"))
    # a valid index that names 1.0.0's bundle but lists 1.1.0's chunks: only its signed
    # hash tells it apart (believed, devices on 1.0.0 would "hold" all of 1.2.0's weights)
    forged = json.loads(next(d.glob("*.classifier-1.1.0.tar.chunks.json")).read_bytes())
    forged["bundle"] = {"length": r1.length,
                        "sha256": _targets(world)[r1.target_path]["hashes"]["sha256"]}  # type: ignore[index]
    served.write_bytes(json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
                       + b"\n")
    parse_index(served.read_bytes(), "forged")  # (it parses)
    r3 = world.repo.publish(_release(world, "1.2.0", 3, blob_seed=8))
    e1 = next(x for x in r3.estimates if x.version == "1.0.0")
    assert "not usable" in e1.note and "cut from its bundle" in e1.note, e1.note
    assert e1.fetch is not None and e1.fetch > 0.9 * r3.length, e1.text()
    e2 = next(x for x in r3.estimates if x.version == "1.1.0")
    assert e2.fetch is not None and e2.fetch < r3.length // 4 and r2.index_path


def test_careless_operator_same_version_twice_and_withdrawn(pub: World) -> None:
    world = pub
    r1 = world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    before = _served(world)
    with pytest.raises(RepositoryStateError, match="published already"):
        world.repo.publish(_release(world, "1.0.0", 2, blob_seed=8))
    assert _served(world) == before
    world.repo.withdraw(MODEL, "1.0.0")
    targets = _targets(world)
    assert targets[r1.target_path]["custom"]["modelward"]["withdrawn"] is True  # type: ignore[index]
    assert r1.index_path is not None and "modelward" not in targets[r1.index_path]["custom"]  # type: ignore[operator]
    with pytest.raises(RepositoryStateError, match="published already"):
        world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))  # not even the same bytes
    with pytest.raises(RepositoryStateError, match="withdrawn"):
        world.repo.pin(MODEL, "1.0.0")
    r2 = world.repo.publish(_release(world, "1.1.0", 2, blob_seed=7))
    (e,) = r2.estimates  # devices that installed 1.0.0 keep it: they are counted
    assert e.withdrawn and e.fetch is not None and e.fetch < r2.length // 4
    assert "(withdrawn)" in e.text()
    world.repo.pin(MODEL, "1.1.0")
    stock_refresh(world.repo_dir)


def test_a_team_publish_gets_its_index_in_the_teams_metadata(world: World, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    world.repo.delegate("team", ["classifier/*"])
    r1 = world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7), role="team")
    world.repo.withdraw(MODEL, "1.0.0")  # an operator tombstone over the team's entry
    r2 = world.repo.publish(_release(world, "1.1.0", 2, blob_seed=7), role="team")
    stock_refresh(world.repo_dir)
    team = world.repo._role_md("team").signed  # noqa: SLF001 - the team's signed metadata
    for r in (r1, r2):
        assert r.index_path is not None and r.index_path in team.targets
        assert r.index_path not in _targets(world)  # (not in the top-level targets)
    got = _stock_download(world, tmp_path, [r2.target_path, index_path(r2.target_path)])
    ix = parse_index(got[index_path(r2.target_path)], "index")
    ix.check_bundle(len(got[r2.target_path]), {
        "sha256": hashlib.sha256(got[r2.target_path]).hexdigest()}, "bundle")
    (e,) = r2.estimates  # 1.0.0's index is found in the team's role, under the tombstone
    assert e.withdrawn and e.note == "" and e.fetch is not None and e.fetch < r2.length // 4
    # a team whose delegation does not reach the index path: the bundle alone, and a warning
    world.repo.delegate("narrow", ["detector/*.tar"])
    caplog.set_level("WARNING")
    r3 = world.repo.publish(_release_named(world, "detector", "1.0.0"), role="narrow")
    assert r3.index_path is None and "without a chunk index" in caplog.text
    stock_refresh(world.repo_dir)


def _release_named(w: World, name: str, version: str) -> Path:
    blob = _blob(w.builds / "blob-7.bin", 7)
    return w.bundle(version, 1, name=name, extra=[(blob, "weights.bin")])


def test_an_earlier_release_without_an_index_is_cut_from_its_bundle(
        pub: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world = pub
    import modelward.publisher._repo as repo_mod
    from modelward.publisher._indexpub import NewIndex

    with monkeypatch.context() as m:  # a release from before indexes existed
        m.setattr(repo_mod, "add_index", lambda *a, **k: NewIndex(None, None))
        r1 = world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    assert r1.index_path is None and index_path(r1.target_path) not in _targets(world)
    r2 = world.repo.publish(_release(world, "1.1.0", 2, blob_seed=7))
    (e,) = r2.estimates
    assert e.fetch is not None and e.fetch < r2.length // 4
    assert e.note == "it has no chunk index: cut from its bundle", e.note
    # its bundle replaced by a link (to a copy of it): not followed, "full bundle"
    old = next((world.repo_dir / "targets" / MODEL).glob("*.classifier-1.0.0.tar"))
    copy = world.builds / "old-copy.tar"
    copy.write_bytes(old.read_bytes())
    old.unlink()
    old.symlink_to(copy)
    r21 = world.repo.publish(_release(world, "1.1.1", 4, blob_seed=7))
    e0 = next(x for x in r21.estimates if x.version == "1.0.0")
    assert e0.fetch is None and "is not its signed bundle" in e0.note, e0.note
    # its bundle gone from the served directory: "full bundle", said so
    old.unlink()
    r3 = world.repo.publish(_release(world, "1.2.0", 3, blob_seed=7))
    e1 = next(x for x in r3.estimates if x.version == "1.0.0")
    assert e1.fetch is None and "full bundle" in e1.text() and "not in the served" in e1.note
    e2 = next(x for x in r3.estimates if x.version == "1.1.0")
    assert e2.fetch is not None and e2.fetch < r3.length // 4
    assert [x.version for x in r3.estimates] == ["1.1.1", "1.1.0", "1.0.0"]  # newest first


def test_a_team_signed_version_string_is_escaped_in_the_estimates(pub: World) -> None:
    world = pub
    from modelward.simulator._teams import team_sign

    world.repo.delegate("team", ["classifier/*"])  # one team key, used by its holder
    team_sign(world.repo, "team", _release(world, "1.0.0", 1, blob_seed=7),
              path=f"{MODEL}/evil.tar", version="9.9.9\x1b]0;pwned\x07\x1b[2J")
    r = world.cli("publish", "--repo", str(world.repo_dir), "--keys", str(world.keys),
                  str(_release(world, "1.1.0", 2, blob_seed=7)))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "devices on 9.9.9\\x1b]0;pwned" in r.stdout, r.stdout


def test_an_index_a_device_would_refuse_is_not_published(pub: World,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    world = pub
    from modelward.updater.bundle import _chunkindex

    monkeypatch.setattr(_chunkindex, "MAX_CHUNKS", 2)  # (as a bundle of ~100 GiB would)
    caplog.set_level("WARNING")
    r = world.repo.publish(_release(world, "1.0.0", 1, blob_seed=7))
    assert r.index_path is None and "without a chunk index" in caplog.text
    assert index_path(r.target_path) not in _targets(world)
    assert not list((world.repo_dir / "targets" / MODEL).glob("*.chunks.json"))
    stock_refresh(world.repo_dir)
