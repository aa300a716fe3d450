"""Attacks on the online host layout (issue 14 must-show 4) after the i14-online merge.

Attackers: the compromised online host (snapshot/timestamp keys, the served metadata/),
the origin or anyone who can write metadata/ (no keys), a leaked retired targets key, and
the careless operator. The offline machine's commands here read the same metadata/
directory the online host writes, as tests/unit/test_i14_online.py's Layout does: the
README's single-machine layout (MODELWARD_ONLINE_DIR), or an offline copy synced from the
served repository.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater

from modelward.publisher._bundle_build import build_bundle
from modelward.publisher._keys import load_signer_at
from modelward.publisher._online import attach
from modelward.publisher._repo import Repository
from modelward.publisher._rootstage import StagedRootError
from modelward.publisher.errors import RepositoryStateError
from modelward.simulator._models import make_linear_model
from tests.unit.test_i14_online import (
    OFFLINE,
    PASS,
    Layout,
    _DirFetcher,
    _pw,
    stock_client_refresh,
)

WORKTREE = Path(__file__).resolve().parents[2]
EVIL = "classifier/classifier-9.9.9.tar"


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def _evil_entry() -> TargetFile:
    tf = TargetFile(1234, {"sha256": "ab" * 32}, EVIL)
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": "classifier", "version": "9.9.9", "fingerprint": "00" * 32,
        "channel": "stable", "rollout": {"basis_points": 10000, "halted": False},
        "pinned": False}}
    return tf


def _write(lay: Layout, signed: Any, name: str, signer: Signer | None) -> None:
    md = Metadata(signed)
    if signer is not None:
        md.sign(signer)
    lay.write(md, name)


def _plant_forged_head(lay: Layout, signers: dict[str, Signer | None], version: int) -> None:
    """targets ``version`` = the published one plus EVIL, and a snapshot and timestamp
    naming it, each signed by ``signers[role]`` (None: unsigned)."""
    pub = lay.md(f"{lay.snapshot_meta()['targets.json']}.targets.json").signed
    _write(lay, Targets(version=version, expires=pub.expires,
                        targets={**pub.targets, EVIL: _evil_entry()}),
           f"{version}.targets.json", signers["targets"])
    snap_v = 1000 + version
    _write(lay, Snapshot(version=snap_v, expires=pub.expires,
                         meta={"targets.json": MetaFile(version=version)}),
           f"{snap_v}.snapshot.json", signers["snapshot"])
    _write(lay, Timestamp(version=snap_v, expires=pub.expires,
                          snapshot_meta=MetaFile(version=snap_v)),
           "timestamp.json", signers["timestamp"])


# --- the offline side signs what the online host (or the origin) wrote ------------------


@pytest.mark.parametrize("who", ["online-host-keys", "origin-no-keys"])
@pytest.mark.parametrize("where", ["offline-machine", "single-machine"])
def test_offline_publish_never_signs_a_target_the_online_host_wrote(
        lay: Layout, tmp_path: Path, who: str, where: str) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    if who == "online-host-keys":  # it has the snapshot and timestamp keys
        snap = load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
        ts = load_signer_at(lay.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp")
        signers: dict[str, Signer | None] = {"targets": snap, "snapshot": snap,
                                             "timestamp": ts}
    else:
        signers = {"targets": None, "snapshot": None, "timestamp": None}
    _plant_forged_head(lay, signers, 3)
    operator = lay.offline if where == "offline-machine" else \
        attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)
    try:
        r = operator.publish(lay.bundle("1.1.0"))
    except RepositoryStateError:
        return  # refusing to build on unverified targets is fine too
    signed = lay.md(f"{r.targets_version}.targets.json").signed
    assert EVIL not in signed.targets
    lay.online().refresh()
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(EVIL) is None


def test_offline_publish_ignores_targets_signed_by_a_retired_key(
        lay: Layout, tmp_path: Path) -> None:
    leaked = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")  # root v2, targets v3 under the new key
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 3}
    pub = lay.md("3.targets.json").signed
    _write(lay, Targets(version=50, expires=pub.expires,
                        targets={**pub.targets, EVIL: _evil_entry()}),
           "50.targets.json", leaked)
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 3}  # the online host resists
    r = lay.offline.publish(lay.bundle("1.1.0"))
    assert EVIL not in lay.md(f"{r.targets_version}.targets.json").signed.targets
    lay.online().refresh()
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(EVIL) is None


def test_online_host_with_a_retired_targets_key_cannot_seed_the_next_offline_publish(
        lay: Layout, tmp_path: Path) -> None:
    """The online host's keys and a leaked targets key retired by two rotations in a row:
    its served head (targets signed by the retired key, snapshot and timestamp by the real
    online keys) is never what the offline side builds on. Only bytes the offline side
    wrote itself, or targets signed under the newest root, are."""
    leaked = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    lay.offline.rotate("targets")
    with pytest.raises(StagedRootError):  # the online host has not refreshed in between
        lay.offline.rotate("targets")
    lay.online().refresh()  # publishes root v2
    lay.offline.rotate("targets")  # root v3 staged: the leaked key is retired twice over
    lay.online().refresh()
    snap = load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    ts = load_signer_at(lay.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp")
    _plant_forged_head(lay, {"targets": leaked, "snapshot": snap, "timestamp": ts}, 40)
    try:
        r = lay.offline.publish(lay.bundle("1.1.0"))
    except RepositoryStateError:
        return  # refusing to build on unverified targets is fine too
    assert EVIL not in lay.md(f"{r.targets_version}.targets.json").signed.targets


def test_offline_publish_ignores_targets_under_an_unchained_root(
        lay: Layout, tmp_path: Path) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    evil = CryptoSigner.generate_ed25519()
    root: Root = lay.md("1.root.json").signed
    root.add_key(evil.public_key, "targets")  # the real targets key stays, so publish works
    root.version = 99
    _write(lay, root, "99.root.json", evil)
    pub = lay.md("2.targets.json").signed
    _write(lay, Targets(version=1000, expires=pub.expires,
                        targets={**pub.targets, EVIL: _evil_entry()}),
           "1000.targets.json", evil)
    try:
        r = lay.offline.publish(lay.bundle("1.1.0"))
    except RepositoryStateError:
        return
    assert EVIL not in lay.md(f"{r.targets_version}.targets.json").signed.targets
    (lay.repo_dir / "metadata" / "99.root.json").unlink()  # the origin cleans up
    lay.online().refresh()
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(EVIL) is None


# --- the online refresh, fed by whoever writes metadata/ -------------------------------


def test_refresh_never_carries_forward_an_unsigned_snapshot(
        lay: Layout, tmp_path: Path) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    stock_client_refresh(lay, tmp_path)
    old = datetime(2000, 1, 1, tzinfo=UTC)  # "due": the refresh re-signs the snapshot
    _write(lay, Targets(version=1000, expires=old), "1000.targets.json", None)
    _write(lay, Snapshot(version=1 << 40, expires=old,
                         meta={"targets.json": MetaFile(version=1000)}),
           f"{1 << 40}.snapshot.json", None)
    _write(lay, Timestamp(version=1 << 40, expires=old, snapshot_meta=MetaFile(version=1 << 40)),
           "timestamp.json", None)
    with contextlib.suppress(RepositoryStateError):  # refusing is fine; signing is not
        lay.online().refresh()
    root: Root = lay.md("1.root.json").signed
    for p in (lay.repo_dir / "metadata").glob("*.snapshot.json"):
        md = lay.md(p.name)
        try:
            root.verify_delegate("snapshot", md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            continue  # the origin's own file: devices reject it
        assert md.signed.meta["targets.json"].version <= 2, p.name  # only signed versions


def test_refresh_never_falls_back_to_an_older_root(lay: Layout, tmp_path: Path) -> None:
    leaked = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    lay.online().refresh()
    stock_client_refresh(lay, tmp_path)
    _write(lay, Targets(version=50, expires=lay.md("3.targets.json").signed.expires),
           "50.targets.json", leaked)
    root2 = lay.repo_dir / "metadata" / "2.root.json"
    good = root2.read_bytes()
    bad = Metadata.from_bytes(good)
    bad.signed.expires = bad.signed.expires.replace(year=2099)  # parses, does not verify
    lay.write(bad, "2.root.json")
    with contextlib.suppress(RepositoryStateError):
        lay.online().refresh()
    root2.write_bytes(good)
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 3}
    stock_client_refresh(lay, tmp_path)


_READ_PROBE = textwrap.dedent("""
    import os, resource, sys
    from pathlib import Path
    sys.path.insert(0, {worktree!r})
    from tests.unit.test_i14_online import Layout
    lay = Layout(Path({tmp!r}))
    p = lay.repo_dir / "metadata" / "7.targets.json"
    kind = {kind!r}
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "devzero":
        p.symlink_to("/dev/zero")
    else:
        with open(p, "wb") as f:
            f.truncate(64 << 30)  # sparse: costs the origin no disk
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    print(lay.online().refresh())
""")


@pytest.mark.parametrize("kind", ["fifo", "devzero", "sparse"])
def test_refresh_survives_special_or_huge_files_in_metadata(tmp_path: Path, kind: str) -> None:
    code = _READ_PROBE.format(worktree=str(WORKTREE), tmp=str(tmp_path), kind=kind)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=20, check=False,
                           env={**os.environ, "PYTHONPATH": str(WORKTREE)})
    except subprocess.TimeoutExpired:
        pytest.fail("refresh hung on a FIFO in metadata/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "timestamp" in r.stdout


# --- the careless operator ---------------------------------------------------------------


def test_keys_copied_into_a_subdirectory_of_online_is_refused(lay: Layout) -> None:
    shutil.copytree(lay.keys, lay.online_dir / "keys-backup")
    ts = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()
    with pytest.raises(RepositoryStateError, match="online directory must hold only"):
        lay.online().refresh()
    assert (lay.repo_dir / "metadata" / "timestamp.json").read_bytes() == ts


# --- attacks the code resists ----------------------------------------------------------------


def test_symlinked_timestamp_is_replaced_not_written_through(lay: Layout) -> None:
    """The origin makes timestamp.json a symlink to a file of the online directory: the
    refresh replaces the link (atomic rename), the target file is untouched."""
    victim = lay.online_dir / "signers.json"
    before = victim.read_bytes()
    ts = lay.repo_dir / "metadata" / "timestamp.json"
    shutil.copyfile(ts, lay.tmp / "ts-copy")
    ts.unlink()
    shutil.copyfile(lay.tmp / "ts-copy", lay.tmp / "ts-target")
    ts.symlink_to(lay.tmp / "ts-target")
    lay.online().refresh()
    assert not ts.is_symlink()
    assert victim.read_bytes() == before
    assert (lay.tmp / "ts-target").read_bytes() == (lay.tmp / "ts-copy").read_bytes()


def test_forged_snapshot_signed_by_online_key_cannot_lower_targets(lay: Layout,
                                                                   tmp_path: Path) -> None:
    """The online host's own snapshot naming an older targets version (to resurrect a
    withdrawn release): the next refresh lists the newest verified targets again, and the
    offline side builds on the newest it signed (the withdraw stays)."""
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.withdraw("classifier", "1.0.0")  # targets v3
    lay.online().refresh()
    snap = load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    ts = load_signer_at(lay.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp")
    exp = lay.md("2.targets.json").signed.expires
    _write(lay, Snapshot(version=50, expires=exp, meta={"targets.json": MetaFile(version=2)}),
           "50.snapshot.json", snap)
    _write(lay, Timestamp(version=50, expires=exp, snapshot_meta=MetaFile(version=50)),
           "timestamp.json", ts)
    r = lay.offline.publish(lay.bundle("1.1.0"))
    signed = lay.md(f"{r.targets_version}.targets.json").signed
    assert r.targets_version == 4
    f = signed.targets["classifier/classifier-1.0.0.tar"].custom["modelward"]
    assert f.get("withdrawn") is True
    lay.online().refresh()
    assert lay.snapshot_meta()["targets.json"] == 4


def test_new_targets_without_their_root_are_left_out_with_a_warning(
        lay: Layout, caplog: pytest.LogCaptureFixture) -> None:
    """The operator carries targets signed by a rotated key but forgets N.root.json: the
    refresh still signs a timestamp, lists nothing it cannot verify, and says why."""
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()  # targets v2
    lay.offline.rotate("targets")  # root v2 staged, targets v3 by the old and new keys
    lay.offline.publish(lay.bundle("1.1.0"))  # v4 by both too, while v2 is staged
    held = lay.tmp / "2.root.json"  # what the online host sees: root v2 not carried
    (lay.repo_dir / "metadata" / "staged" / "2.root.json").rename(held)
    good = lay.md("4.targets.json")
    bad = Metadata.from_dict(good.to_dict())  # v5 by the new key only: no root to trust it
    bad.signed.version = 5
    bad.signatures.clear()
    new_key = next((lay.keys / "rotating").glob("targets-*.pem"))
    bad.sign(load_signer_at(new_key, OFFLINE, "targets"))
    lay.write(bad, "5.targets.json")
    with caplog.at_level(logging.WARNING):
        done = lay.online().refresh()
    assert done == ["snapshot", "timestamp"]  # v4 verifies under root v1: listed
    assert lay.snapshot_meta() == {"targets.json": 4}
    assert "ignoring 5.targets.json" in caplog.text and "root v1" in caplog.text
    held.rename(lay.repo_dir / "metadata" / "staged" / "2.root.json")
    assert lay.online().refresh() == ["root", "snapshot", "timestamp"]
    assert lay.snapshot_meta() == {"targets.json": 4}  # by both keys: still listed


def test_online_registry_naming_a_retired_offline_key_file_is_refused(lay: Layout) -> None:
    """signers.json of ONLINE edited to point at a key file outside it (KEYS)."""
    doc = json.loads((lay.online_dir / "signers.json").read_text())
    k = next(iter(doc))
    doc[k] = f"encfile:{os.path.relpath(lay.keys / 'root.pem', lay.online_dir)}"
    (lay.online_dir / "signers.json").write_text(json.dumps(doc))
    with pytest.raises(Exception, match="outside|not|cannot"):
        lay.online().refresh()


# --- later additions ------------------------------------------------------------------------


def test_stale_timestamp_copied_back_never_lowers_the_timestamp_version(
        lay: Layout, tmp_path: Path) -> None:
    stale = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()  # v1
    for _ in range(4):
        lay.online().refresh()
    client = tmp_path / "client"
    client.mkdir()

    def follow() -> None:
        u = Updater(str(client), "https://origin.invalid/metadata/", str(tmp_path),
                    "https://origin.invalid/targets/",
                    fetcher=_DirFetcher(lay.repo_dir / "metadata"),
                    bootstrap=lay.root_path.read_bytes())
        u.refresh()

    follow()  # trusts timestamp v5
    (lay.repo_dir / "metadata" / "timestamp.json").write_bytes(stale)
    lay.online().refresh()
    assert lay.md("timestamp.json").signed.version > 5
    follow()


def test_single_machine_publish_keeps_a_withdraw_the_online_host_hides(
        lay: Layout, tmp_path: Path) -> None:
    def operator() -> Repository:
        return attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)

    operator().publish(lay.bundle("1.0.0"))
    operator().withdraw("classifier", "1.0.0")  # targets v3: the tombstone
    snap = load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    ts = load_signer_at(lay.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp")
    exp = lay.md("2.targets.json").signed.expires
    _write(lay, Snapshot(version=50, expires=exp, meta={"targets.json": MetaFile(version=2)}),
           "50.snapshot.json", snap)
    _write(lay, Timestamp(version=50, expires=exp, snapshot_meta=MetaFile(version=50)),
           "timestamp.json", ts)
    withdrawn = (lay.repo_dir / "metadata" / "3.targets.json").read_bytes()
    r = operator().publish(lay.bundle("1.1.0"))  # built on its own v3, never on v2
    assert r.targets_version == 4
    assert (lay.repo_dir / "metadata" / "3.targets.json").read_bytes() == withdrawn
    t = lay.md(f"{r.targets_version}.targets.json").signed
    assert t.targets["classifier/classifier-1.0.0.tar"].custom["modelward"].get("withdrawn")
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(
        "classifier/classifier-1.1.0.tar") is not None


_ROOT_NAME_PROBE = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    sys.path.insert(0, {worktree!r})
    from modelward.publisher.errors import RepositoryStateError
    from tests.unit.test_i14_online import Layout
    lay = Layout(Path({tmp!r}))
    md = lay.repo_dir / "metadata"
    shutil.copyfile(md / "1.root.json", md / f"{{10 ** 9}}.root.json")
    try:
        lay.offline.publish(lay.bundle("1.0.0"))
    except RepositoryStateError as e:
        print("refused:", e)
    print("done")
""")


def test_offline_publish_survives_a_huge_root_file_name(tmp_path: Path) -> None:
    code = _ROOT_NAME_PROBE.format(worktree=str(WORKTREE), tmp=str(tmp_path))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=12, check=False,
                           env={**os.environ, "PYTHONPATH": str(WORKTREE)})
    except subprocess.TimeoutExpired:
        pytest.fail("the offline publish hung on 1000000000.root.json")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


def test_planted_team_file_never_enters_the_operators_snapshot(
        lay: Layout, tmp_path: Path) -> None:
    def operator() -> Repository:
        return attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)

    operator().delegate("team", ["detector/*"])
    det = tmp_path / "detector.tar"
    build_bundle(make_linear_model(tmp_path / "detector.onnx", 5), "detector", "1.0.0", det)
    operator().publish(det, role="team")  # team v2
    md = lay.md("2.team.json")
    md.signed.version = 99
    md.signatures.clear()
    lay.write(md, "99.team.json")  # the origin: unsigned
    operator().publish(lay.bundle("1.0.0"))
    (lay.repo_dir / "metadata" / "99.team.json").unlink()  # and it cleans up
    lay.online().refresh()
    assert lay.snapshot_meta()["team.json"] == 2
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(
        "detector/detector-1.0.0.tar") is not None


def _carry_as_readme_says(src: Path, dst: Path) -> None:
    """README "Production layout": ``rsync -a --exclude timestamp.json --exclude
    '*.snapshot.json'`` from the offline copy to the served repository: what is carried
    replaces what is there (rsync renames over an existing file or symlink)."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or p.name == "timestamp.json" or p.name.endswith(".snapshot.json"):
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_symlink() or out.exists():
            out.unlink()
        shutil.copy2(p, out)


def test_preplanted_targets_names_do_not_block_the_readme_carry(tmp_path: Path) -> None:
    off, served = tmp_path / "offline-repo", tmp_path / "served"
    keys, online_dir = tmp_path / "keys", tmp_path / "online"
    attach(Repository(off, keys, OFFLINE), online_dir, _pw).init()
    shutil.copytree(off, served)
    md1 = Metadata.from_bytes((served / "metadata" / "1.targets.json").read_bytes())
    for v in range(2, 41):  # the origin: unsigned placeholders for the next versions
        md1.signed.version = v
        md1.signatures.clear()
        (served / "metadata" / f"{v}.targets.json").write_bytes(md1.to_bytes())
    offline = Repository(off, keys, OFFLINE)
    lay = Layout.__new__(Layout)  # only for bundle()
    lay.tmp, lay.n = tmp_path, 0
    offline.publish(Layout.bundle(lay, "1.0.0"))  # offline: 2.targets.json
    _carry_as_readme_says(off, served)
    online = attach(Repository(served, online_dir, b""), online_dir, _pw)
    online.refresh()
    ts = Metadata.from_bytes((served / "metadata" / "timestamp.json").read_bytes()).signed
    snap = Metadata.from_bytes(
        (served / "metadata" / f"{ts.snapshot_meta.version}.snapshot.json").read_bytes()).signed
    assert snap.meta["targets.json"].version == 2


def test_planted_snapshot_of_the_same_versions_is_never_pinned(lay: Layout) -> None:
    """Review finding: someone who can write the served directory replaces the current
    snapshot with one of the same versions and a far expiry, signed by another key. The
    online host must not keep it (and pin its hash in every timestamp): it re-signs."""
    import hashlib
    from datetime import timedelta

    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    v = lay.md("timestamp.json").signed.snapshot_meta.version
    snap = lay.md(f"{v}.snapshot.json").signed
    snap.expires = snap.expires + timedelta(days=3650)
    _write(lay, snap, f"{v}.snapshot.json", CryptoSigner.generate_ed25519())
    lay.online().refresh()
    ts = lay.md("timestamp.json").signed
    assert ts.snapshot_meta.version > v  # re-signed, not reused
    served = (lay.repo_dir / "metadata" / f"{ts.snapshot_meta.version}.snapshot.json")
    assert ts.snapshot_meta.hashes == {"sha256": hashlib.sha256(served.read_bytes()).hexdigest()}
