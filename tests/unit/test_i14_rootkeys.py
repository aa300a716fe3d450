"""f14-rootkeys: crash-safe key filing, keys chosen by keyid, online thresholds, expired
parked roots, key-file parsing and cost ceilings, team passphrase variables, rekey reach.

Variants of the a14-rootkeys attacks (tests/unit/test_a14_rootkeys.py), each judged by a
stock python-tuf client where devices are concerned.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from modelward.publisher import _keyfile as kf
from modelward.publisher._keys import load_signer_at
from modelward.publisher._passphrases import EnvPassphrases, check_team_variable
from modelward.publisher._rekey import key_files, rekey
from modelward.publisher._repo import Repository, ThresholdNotMetError, _now
from modelward.publisher._rootflow import (
    RootExpiredError,
    RootNotPublishableError,
    UnsafeKeyPathError,
    key_file_inside,
    retire_key_files,
)
from modelward.publisher.errors import KeyError_
from tests._stock_tuf import stock_refresh

PW = b"unit test passphrase"


@pytest.fixture(autouse=True)
def _cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kf, "DEFAULT_SCRYPT", kf.ScryptParams(2**10, 8, 1))


def _repo(tmp: Path, thresholds: dict[str, int] | None = None,
          counts: dict[str, int] | None = None) -> Repository:
    r = Repository(tmp / "repo", tmp / "keys", PW)
    r.init(thresholds, counts or thresholds)
    return r


def _registry(repo: Repository) -> dict[str, str]:
    return json.loads((repo.keys / "signers.json").read_text())


def _set_registry(repo: Repository, doc: dict[str, str]) -> None:
    (repo.keys / "signers.json").write_text(json.dumps(doc))


# -- registry URIs: only files inside KEYS ---------------------------------------------------

@pytest.mark.parametrize("rest", ["../x.pem", "/etc/passwd", "a/../../x.pem", "", "a\\..\\x"])
def test_key_file_inside_refuses_paths_out_of_keys(tmp_path: Path, rest: str) -> None:
    with pytest.raises(UnsafeKeyPathError):
        key_file_inside(tmp_path, rest)


def test_key_file_inside_refuses_a_symlink_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "rotating").symlink_to(tmp_path / "out")
    with pytest.raises(UnsafeKeyPathError, match="symbolic link"):
        key_file_inside(tmp_path / "keys", "rotating/targets-x.pem")
    assert key_file_inside(tmp_path / "keys", "retired/t.pem") == \
        tmp_path / "keys" / "retired" / "t.pem"


def test_symlinked_old_key_file_is_never_moved(tmp_path: Path) -> None:
    """An old key's registry entry names a symlink in KEYS to a served file: the rotation
    leaves both alone, and devices follow."""
    repo = _repo(tmp_path)
    old = repo._trusted_root().roles["targets"].keyids[0]  # noqa: SLF001
    link = repo.keys / "targets-link.pem"
    link.symlink_to(repo.metadata_dir / "timestamp.json")
    reg = _registry(repo)
    reg[old] = "encfile:targets-link.pem"
    _set_registry(repo, reg)
    assert repo.rotate("targets") == 2  # the new key re-signs; the old entry is skipped
    assert link.is_symlink() and (repo.metadata_dir / "timestamp.json").is_file()
    assert stock_refresh(repo.repo) == repo.latest_root_version()


# -- crash-safe, idempotent key filing -------------------------------------------------------

def test_retire_key_files_finishes_a_half_done_move(tmp_path: Path) -> None:
    """The new key hard-linked to <role>.pem, the registry not yet updated (the crash):
    running the filing again completes it; a second run changes nothing."""
    repo = _repo(tmp_path)
    previous = repo._trusted_root()  # noqa: SLF001
    repo.rotate("snapshot")
    new = repo._trusted_root()  # noqa: SLF001
    newid = new.roles["snapshot"].keyids[0]
    # undo the last step of the filing: back to rotating/, with a hard link left behind
    rot = repo.keys / "rotating" / f"snapshot-{newid[:16]}.pem"
    os.link(repo.keys / "snapshot.pem", rot)
    reg = _registry(repo)
    reg[newid] = f"encfile:rotating/{rot.name}"
    _set_registry(repo, reg)
    for _ in range(2):
        retire_key_files(repo.keys, repo.signers, previous, new)
        assert _registry(repo)[newid] == "encfile:snapshot.pem"
        assert not rot.exists()
    repo.refresh()
    assert stock_refresh(repo.repo) == 2


def test_an_unregistered_stale_role_file_never_signs(tmp_path: Path) -> None:
    """KEYS/snapshot.pem replaced by a key the root does not list (stale, planted): the
    snapshot is signed by the registered key the root lists, by keyid."""
    repo = _repo(tmp_path)
    repo.rotate("snapshot")  # the key now in use is registered as snapshot.pem
    reg = _registry(repo)
    keyid = repo._trusted_root().roles["snapshot"].keyids[0]  # noqa: SLF001
    (repo.keys / "kept.pem").write_bytes((repo.keys / "snapshot.pem").read_bytes())
    reg[keyid] = "encfile:kept.pem"
    _set_registry(repo, reg)
    retired = next((repo.keys / "retired").glob("snapshot-*.pem"))
    (repo.keys / "snapshot.pem").write_bytes(retired.read_bytes())  # a retired key
    repo.refresh(margin=timedelta(days=3650))  # snapshot and timestamp
    assert stock_refresh(repo.repo) == 2


def test_rotation_retry_after_each_crash_point_for_snapshot_leaves_one_key_per_name(
        tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert repo.rotate("snapshot") == 2
    assert repo.rotate("snapshot") == 3
    reg = _registry(repo)
    current = repo._trusted_root().roles["snapshot"].keyids[0]  # noqa: SLF001
    assert reg[current] == "encfile:snapshot.pem"
    assert not list((repo.keys / "rotating").glob("snapshot-*.pem"))
    assert len(list((repo.keys / "retired").glob("snapshot-*.pem"))) == 2
    assert stock_refresh(repo.repo) == 3


# -- online roles: threshold signing; parked timestamps are found -----------------------------

def test_snapshot_threshold_two_is_signed_by_both_registered_keys(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"snapshot": 2, "timestamp": 2})
    assert repo.refresh(margin=timedelta(days=3650)) == ["snapshot", "timestamp"]
    assert stock_refresh(repo.repo) == 1


def test_parked_timestamp_is_signed_by_the_second_holder(tmp_path: Path) -> None:
    """Timestamp threshold 2, the second key held elsewhere (not registered here): the
    refresh parks VERSION.timestamp.json, `repo sign timestamp` finds and publishes it."""
    repo = _repo(tmp_path, {"timestamp": 2})
    reg = _registry(repo)
    second = next(k for k, u in reg.items() if u == "encfile:timestamp-2.pem")
    del reg[second]
    _set_registry(repo, reg)
    before = repo.current()[2].version
    with pytest.raises(ThresholdNotMetError):
        repo.refresh()
    assert (repo.pending_dir / f"{before + 1}.timestamp.json").is_file()
    assert repo.current()[2].version == before
    reg[second] = "encfile:timestamp-2.pem"
    _set_registry(repo, reg)
    repo.sign_pending("timestamp", "encfile:timestamp-2.pem")
    assert repo.current()[2].version == before + 1
    assert not list(repo.pending_dir.glob("*timestamp.json"))
    assert stock_refresh(repo.repo) == 1


# -- a parked root that expired ------------------------------------------------------------

def test_expired_parked_root_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"root": 2})
    repo.set_expiry({"root": timedelta(days=7)}, {"root": timedelta(days=1)})
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    parked = repo.pending_dir / "2.root.json"
    data = parked.read_bytes()
    later = Repository(repo.repo, repo.keys, PW, clock=lambda: _now() + timedelta(days=8))
    with pytest.raises(RootExpiredError, match="expired at") as e:
        later.sign_pending("root", "encfile:root-2.pem")
    assert "make the change again" in (e.value.hint or "")
    assert parked.read_bytes() == data
    assert not (repo.metadata_dir / "2.root.json").exists()
    assert stock_refresh(repo.repo) == 1


# -- key files: one block, every lane counted ---------------------------------------------

def test_key_file_with_two_key_blocks_is_refused() -> None:
    pem = kf.encrypt_scrypt(kf.ed25519.Ed25519PrivateKey.generate(), PW)
    with pytest.raises(kf.KeyFileFormatError, match="2 PEM blocks"):
        kf.kdf_of(pem + pem)


@pytest.mark.parametrize("label", ["RSA PRIVATE KEY", "OPENSSH PRIVATE KEY", "FOO"])
def test_non_pkcs8_block_is_refused(label: str) -> None:
    with pytest.raises(kf.KeyFileFormatError):
        kf.kdf_of(f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n".encode())


@pytest.mark.parametrize(("n", "r", "p", "refused"), [
    (2**14, 8, 5, False), (2, 2**20, 4, True), (2**10, 8, 2**13, True),
    (2**14, 8, 0, True), (2**17, 8, 1, False)])
def test_scrypt_ceiling(n: int, r: int, p: int, refused: bool) -> None:
    info = kf.KdfInfo("scrypt", scrypt=kf.ScryptParams(n, r, p))
    assert bool(info.excess()) is refused


# -- team passphrase variables --------------------------------------------------------------

@pytest.mark.parametrize("second", ["cls_team", "CLS-TEAM", "Cls.Team"[:3] + "-team"])
def test_team_variable_collisions_are_refused(tmp_path: Path, second: str) -> None:
    env = {"MODELWARD_KEY_PASSPHRASE": PW.decode()}
    repo = Repository(tmp_path / "repo", tmp_path / "keys", EnvPassphrases(env))
    repo.init()
    repo.delegate("cls-team", ["classifier/*"])
    if second == "cls-team":
        return
    with pytest.raises(KeyError_, match="would share"):
        repo.delegate(second, ["detector/*"])
    assert [p.name for p in repo.keys.glob("delegated-*.pem")] == ["delegated-cls-team.pem"]


def test_check_team_variable_allows_distinct_names() -> None:
    check_team_variable("vision", ["cls-team", "audio"])
    check_team_variable("cls-team", ["cls-team"])  # itself (a second parent)


# -- rekey reaches every registered key file --------------------------------------------

def test_rekey_reaches_registry_named_files_but_never_outside(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    keyid = repo._trusted_root().roles["targets"].keyids[0]  # noqa: SLF001
    (repo.keys / "elsewhere").mkdir()
    (repo.keys / "targets.pem").rename(repo.keys / "elsewhere" / "targets-a.pem")
    outside = tmp_path / "targets-out.pem"
    outside.write_bytes((repo.keys / "root.pem").read_bytes())
    reg = _registry(repo)
    reg[keyid] = "encfile:elsewhere/targets-a.pem"
    reg["x" * 64] = "encfile:../targets-out.pem"
    _set_registry(repo, reg)
    files = key_files(repo.keys)
    assert repo.keys / "elsewhere" / "targets-a.pem" in files
    assert outside not in files and (repo.keys / "../targets-out.pem") not in files
    fresh = b"a brand new targets passphrase"
    rekey(repo.keys, lambda _r: PW, lambda r: fresh if r == "targets" else PW)
    load_signer_at(repo.keys / "elsewhere" / "targets-a.pem", fresh, "targets")
    load_signer_at(outside, PW, "root")  # untouched


def test_pre_publish_gate_refuses_an_expired_newest_root(tmp_path: Path) -> None:
    """The stock-client gate itself (modelward.publisher._tufcheck) refuses an expired newest root,
    whatever path wrote it."""
    from modelward.publisher._tufcheck import StockClientWouldRejectError, check_root_chain

    repo = _repo(tmp_path)
    data = (repo.metadata_dir / "1.root.json").read_bytes()
    files = {"1.root.json": data}
    check_root_chain(files.get, _now())
    with pytest.raises(StockClientWouldRejectError, match="1.root.json"):
        check_root_chain(files.get, _now() + timedelta(days=3660))


def test_timestamp_threshold_two_skips_an_unusable_key_for_a_usable_one(
        tmp_path: Path) -> None:
    """Timestamp 2-of-3, one registered key unusable here (its file gone): the refresh
    signs with the two usable ones and publishes."""
    repo = _repo(tmp_path, {"timestamp": 2}, {"timestamp": 3})
    (repo.keys / "timestamp-2.pem").rename(tmp_path / "carried-away.pem")
    before = repo.current()[2].version
    repo.refresh()
    assert repo.current()[2].version == before + 1
    assert stock_refresh(repo.repo) == 1
