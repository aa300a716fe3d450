"""Attacks on issue 14's root flow and key files (a14-rootkeys).

Attackers: a careless operator (Ctrl-C, retries, late signers, the two-machine layout),
someone with write access to KEYS (signers.json, planted key files), and one delegated
team. A stock python-tuf client (tests/_stock_tuf.py) judges whether devices keep
updating. Attacks that work are strict xfails whose assertions say what should happen.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner

import modelward.publisher._keys as keys_mod
import modelward.publisher._repo as repo_mod
import modelward.publisher._rootstage as stage_mod
from modelward.publisher import _keyfile as kf
from modelward.publisher._keys import decrypt_key, load_signer_at
from modelward.publisher._passphrases import EnvPassphrases
from modelward.publisher._rekey import rekey
from modelward.publisher._repo import Repository, _now
from modelward.publisher._rootflow import RootNotPublishableError
from modelward.publisher.errors import KeyError_, RepositoryStateError
from tests._stock_tuf import stock_refresh

PW = b"unit test passphrase"


@pytest.fixture(autouse=True)
def _cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test speed: throwaway keys with a cheap scrypt (as tests/conftest.py's _new_repo);
    the ceilings tested here are constants, not the default."""
    monkeypatch.setattr(kf, "DEFAULT_SCRYPT", kf.ScryptParams(2**10, 8, 1))


def _repo(tmp: Path, root_threshold: int = 1, **kw: object) -> Repository:
    r = Repository(tmp / "repo", tmp / "keys", PW, **kw)  # type: ignore[arg-type]
    r.init({"root": root_threshold}, {"root": root_threshold})
    return r


def _registry(repo: Repository) -> dict[str, str]:
    return json.loads((repo.keys / "signers.json").read_text())


class Crash(BaseException):
    """The operator's Ctrl-C (or the power) in the middle of a command."""


@pytest.fixture
def crash_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[Path, bytes],
                                                                          bool]], None]]:
    """crash_on(pred): the first write_atomic for which pred(path, data) holds raises
    Crash before writing; every other write goes through."""
    real = repo_mod.write_atomic

    def arm(pred: Callable[[Path, bytes], bool]) -> None:
        fired = [False]

        def write(path: Path, data: bytes, mode: int = 0o644) -> None:
            if not fired[0] and pred(path, data):
                fired[0] = True
                raise Crash(path.name)
            real(path, data, mode)

        monkeypatch.setattr(repo_mod, "write_atomic", write)
        monkeypatch.setattr(keys_mod, "write_atomic", write)
        monkeypatch.setattr(stage_mod, "write_atomic", write)

    yield arm
    monkeypatch.setattr(repo_mod, "write_atomic", real)
    monkeypatch.setattr(keys_mod, "write_atomic", real)
    monkeypatch.setattr(stage_mod, "write_atomic", real)


# -- careless operator: Ctrl-C, then the same command again ---------------------------------

@pytest.mark.parametrize("role", ["snapshot", "timestamp"])
def test_ctrl_c_in_online_role_rotation_then_retry_keeps_devices_updating(
        tmp_path: Path, role: str,
        crash_on: Callable[[Callable[[Path, bytes], bool]], None]) -> None:
    repo = _repo(tmp_path)
    state = {"root2": False, "registry": 0}

    def pred(path: Path, _data: bytes) -> bool:
        if path.name == "2.root.json":
            state["root2"] = True
        if state["root2"] and path.name == "signers.json":
            state["registry"] += 1
            return state["registry"] == 2  # rotating/<role>-ID.pem -> <role>.pem
        return False

    crash_on(pred)
    with pytest.raises(Crash):
        repo.rotate(role)
    assert os.path.samefile(repo.keys / f"{role}.pem",
                            next((repo.keys / "rotating").glob(f"{role}-*.pem")))
    repo = Repository(repo.repo, repo.keys, PW)  # the operator runs the command again
    with contextlib.suppress(RepositoryStateError):  # refusing is fine; stranding is not
        repo.rotate(role)
    assert stock_refresh(repo.repo) == repo.latest_root_version()
    repo.refresh()  # and the timer keeps working
    assert stock_refresh(repo.repo) == repo.latest_root_version()


@pytest.mark.parametrize("role", ["targets", "root"])
def test_ctrl_c_at_every_write_of_a_rotation_then_retry(
        tmp_path: Path, role: str,
        crash_on: Callable[[Callable[[Path, bytes], bool]], None]) -> None:
    """Resists: crash before each write of `repo rotate ROLE` (snapshot and timestamp:
    above); the operator runs it again; devices follow (the window between N.root.json and
    the re-signed role is the known one, completed by the retry)."""
    k = 0
    while True:
        k += 1
        d = tmp_path / f"k{k}"
        repo = _repo(d)
        seen = [0]

        def pred(_p: Path, _d: bytes, k: int = k, seen: list[int] = seen) -> bool:
            seen[0] += 1
            return seen[0] == k

        crash_on(pred)
        try:
            repo.rotate(role)
        except Crash:
            pass
        else:
            break  # k is past the last write
        crash_on(lambda _p, _d: False)
        repo = Repository(repo.repo, repo.keys, PW)
        try:
            repo.rotate(role)
        except RootNotPublishableError as e:  # root: the half-filed key is named
            uri = next(u for g in e.gaps for u in [_registry(repo)[x] for x in g.unsigned])
            repo.sign_pending("root", uri)
        assert stock_refresh(repo.repo) == repo.latest_root_version() >= 2, k
        repo.refresh()
        assert stock_refresh(repo.repo) == repo.latest_root_version()
    assert k > 4


# -- careless operator: a late second signer ------------------------------------------------

def test_expired_pending_root_is_not_published(tmp_path: Path) -> None:
    repo = _repo(tmp_path, root_threshold=2)
    repo.set_expiry({"root": timedelta(days=7)}, {"root": timedelta(days=1)})
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    later = Repository(repo.repo, repo.keys, PW, clock=lambda: _now() + timedelta(days=10))
    _, lines = later.review_pending("root")
    assert any("ALREADY EXPIRED" in line for line in lines)
    with pytest.raises(RepositoryStateError):
        later.sign_pending("root", "encfile:root-2.pem")
    assert not (repo.metadata_dir / "2.root.json").exists()  # devices never see it
    assert stock_refresh(repo.repo) == 1


# -- careless operator: the two-machine layout ----------------------------------------------

def test_targets_rotation_in_the_two_machine_layout_never_strands(tmp_path: Path) -> None:
    from tests.unit.test_i14_online import Layout

    lay = Layout(tmp_path)
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 1
    with contextlib.suppress(RepositoryStateError):  # waiting for the online host is fine
        lay.offline.rotate("targets")
    stock_refresh(lay.repo_dir)  # a device refreshing now must still succeed
    lay.online().refresh()
    assert stock_refresh(lay.repo_dir) == 2


# -- write access to KEYS: signers.json -----------------------------------------------------

def test_registry_uri_outside_keys_is_never_moved(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    old = repo._trusted_root().roles["targets"].keyids[0]  # noqa: SLF001
    reg = _registry(repo)
    reg[old] = "encfile:../repo/metadata/timestamp.json"
    (repo.keys / "signers.json").write_text(json.dumps(reg))
    with contextlib.suppress(RepositoryStateError, KeyError_):
        repo.rotate("targets")
    assert (repo.metadata_dir / "timestamp.json").exists()
    assert stock_refresh(repo.repo) == repo.latest_root_version()


def test_registry_maps_a_root_keyid_to_a_team_key(tmp_path: Path) -> None:
    """Resists: the team key stands in for root-2 in signers.json; its signature counts for
    nothing and the root stays parked, nothing published."""
    repo = Repository(tmp_path / "repo", tmp_path / "keys",
                      lambda role: b"team passphrase 123" if role == "cls-team" else PW)
    repo.init({"root": 2}, {"root": 2})
    repo.delegate("cls-team", ["classifier/*"])
    reg = _registry(repo)
    root2 = next(k for k, u in reg.items() if u == "encfile:root-2.pem")
    reg[root2] = "encfile:delegated-cls-team.pem"
    (repo.keys / "signers.json").write_text(json.dumps(reg))
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    with pytest.raises((KeyError_, RepositoryStateError)):
        repo.sign_pending("root", "encfile:delegated-cls-team.pem")
    assert repo.latest_root_version() == 1
    assert stock_refresh(repo.repo) == 1


# -- write access to KEYS: planted key files -------------------------------------------------

def _planted(n: int, r: int, p: int) -> bytes:
    """An ENCRYPTED PRIVATE KEY asking for scrypt(n, r, p); the ciphertext is junk (scrypt
    runs in full before the wrong padding is noticed)."""
    der = kf._seq(  # noqa: SLF001
        kf._seq(kf._oid(kf._PBES2), kf._seq(  # noqa: SLF001
            kf._seq(kf._oid(kf._SCRYPT), kf._seq(  # noqa: SLF001
                kf._octets(os.urandom(16)), kf._int(n), kf._int(r), kf._int(p),  # noqa: SLF001
                kf._int(32))),  # noqa: SLF001
            kf._seq(kf._oid(kf._AES256_CBC), kf._octets(os.urandom(16))))),  # noqa: SLF001
        kf._octets(os.urandom(64)))  # noqa: SLF001
    return (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + base64.encodebytes(der) +
            b"-----END ENCRYPTED PRIVATE KEY-----\n")


def test_decoy_pem_block_does_not_hide_scrypt_cost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = _planted(2**14, 8, 2**16)
    assert kf.kdf_of(huge).excess()  # alone, the file is refused
    data = b"-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n" + huge
    calls = []

    def loader(*a: object, **kw: object) -> object:
        calls.append(a)
        raise ValueError("scrypt would run here")

    monkeypatch.setattr(serialization, "load_pem_private_key", loader)
    with pytest.raises(KeyError_):
        decrypt_key(data, b"x" * 12, "root", tmp_path / "root-2.pem")
    assert calls == []  # refused before any key derivation


def test_scrypt_ceiling_counts_every_lane() -> None:
    info = kf.kdf_of(_planted(2, 2**20, 4))
    assert info.excess()  # > MAX_SCRYPT_LANE_BYTES of memory in all


def test_planted_huge_scrypt_behind_a_registry_uri_is_refused_fast(tmp_path: Path) -> None:
    """Resists: the incoming key's URI points at a planted N=2**24 file; the ceiling
    refuses it, the root stays parked with the reason."""
    repo = _repo(tmp_path, root_threshold=2)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    new = next((repo.keys / "rotating").glob("targets-*.pem"))
    new.write_bytes(_planted(2**24, 8, 1))
    with pytest.raises(RepositoryStateError, match="cannot be re-signed here"):
        repo.sign_pending("root", "encfile:root-2.pem")
    assert repo.latest_root_version() == 1
    assert stock_refresh(repo.repo) == 1


# -- one delegated team: passphrase variables ------------------------------------------------

def test_two_teams_never_share_a_passphrase_variable(tmp_path: Path) -> None:
    env = {"MODELWARD_KEY_PASSPHRASE": PW.decode(),
           "MODELWARD_KEY_PASSPHRASE_CLS_TEAM": "team passphrase of cls-team"}
    repo = Repository(tmp_path / "repo", tmp_path / "keys", EnvPassphrases(env))
    repo.init()
    repo.delegate("cls-team", ["classifier/*"])
    try:
        repo.delegate("cls_team", ["detector/*"])
    except (KeyError_, RepositoryStateError):
        return  # refused: fine
    other = tmp_path / "keys" / "delegated-cls_team.pem"
    with pytest.raises(KeyError_):  # cls-team's passphrase must not open it
        load_signer_at(other, b"team passphrase of cls-team", "cls_team")


def test_team_named_like_a_top_level_role_is_refused(tmp_path: Path) -> None:
    """Resists: Root, TARGETS, snap-shot... never share a top-level role's variable."""
    env = {"MODELWARD_KEY_PASSPHRASE": PW.decode()}
    repo = Repository(tmp_path / "repo", tmp_path / "keys", EnvPassphrases(env))
    repo.init()
    for name in ("Root", "TARGETS", "Timestamp"):
        with pytest.raises((KeyError_, RepositoryStateError)):
            repo.delegate(name, [f"{name.lower()}x/*"])
    assert not list((tmp_path / "keys").glob("delegated-*.pem"))


# -- careless operator: rekey during a parked rotation --------------------------------------

def test_rekey_reaches_the_key_of_a_parked_rotation(tmp_path: Path) -> None:
    repo = _repo(tmp_path, root_threshold=2)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    incoming = next((repo.keys / "rotating").glob("targets-*.pem"))
    fresh = b"a brand new targets passphrase"
    rekey(repo.keys, lambda _r: PW, lambda r: fresh if r == "targets" else PW)
    load_signer_at(repo.keys / "targets.pem", fresh, "targets")
    load_signer_at(incoming, fresh, "targets")  # the key about to take over, too


def test_team_key_gets_no_root_signature_after_a_late_registry_swap(tmp_path: Path) -> None:
    """Resists: a team that can also run `repo sign` (its own passphrase only) tries each
    root URI; without the root passphrase nothing opens and the root stays parked."""
    def pp(role: str) -> bytes:
        return b"team passphrase 123" if role == "cls-team" else PW

    repo = Repository(tmp_path / "repo", tmp_path / "keys", pp)
    repo.init({"root": 2}, {"root": 2})
    repo.delegate("cls-team", ["classifier/*"])
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    team = Repository(repo.repo, repo.keys, lambda _r: b"team passphrase 123")
    for uri in ("encfile:root.pem", "encfile:root-2.pem"):
        with pytest.raises(KeyError_, match="cannot decrypt the root key"):
            team.sign_pending("root", uri)
    assert repo.latest_root_version() == 1


# -- careless operator: a second online key with threshold 2 --------------------------------

def _envvar_key() -> tuple[CryptoSigner, str]:
    s = CryptoSigner.generate_ed25519()
    pem = s._private_key.private_bytes(  # noqa: SLF001 - a test key
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    return s, pem


@pytest.mark.parametrize("role", ["snapshot", "timestamp"])
def test_add_online_key_with_threshold_two_keeps_devices_updating(
        tmp_path: Path, role: str) -> None:
    extra, pem = _envvar_key()
    repo = Repository(tmp_path / "repo", tmp_path / "keys", PW, environ={"EXTRA": pem})
    repo.init()
    with contextlib.suppress(RepositoryStateError):  # refusing up front is fine
        repo.add_key(role, "envvar:EXTRA", extra.public_key, threshold=2)
    assert stock_refresh(repo.repo) == repo.latest_root_version()
    repo.refresh()
    assert stock_refresh(repo.repo) == repo.latest_root_version()


def test_add_targets_key_with_threshold_two_publishes_both_signatures(tmp_path: Path) -> None:
    """Resists (targets): the plan's URIs sign the re-keyed targets."""
    extra, pem = _envvar_key()
    repo = Repository(tmp_path / "repo", tmp_path / "keys", PW, environ={"EXTRA": pem})
    repo.init()
    assert repo.add_key("targets", "envvar:EXTRA", extra.public_key, threshold=2) == 2
    assert stock_refresh(repo.repo) == 2
    repo.refresh()
    assert stock_refresh(repo.repo) == 2
    without = Repository(repo.repo, repo.keys, PW)  # EXTRA gone: parks, publishes nothing
    with pytest.raises(RepositoryStateError):
        without.pin("classifier", None)
    assert stock_refresh(repo.repo) == 2


def test_abandoned_rotation_then_add_key_then_rotate(tmp_path: Path) -> None:
    """Resists: a parked targets rotation is abandoned (pending file deleted, its key left in
    KEYS/rotating/), then add-key root --threshold 1 (both old signatures), then a rotation
    that publishes: the abandoned key never signs, devices follow each step."""
    repo = _repo(tmp_path, root_threshold=2)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    abandoned = next((repo.keys / "rotating").glob("targets-*.pem"))
    (repo.pending_dir / "2.root.json").unlink()
    extra, _ = _envvar_key()
    with pytest.raises(RootNotPublishableError):
        repo.add_key("root", "envvar:OFFLINE", extra.public_key, threshold=1)
    repo.sign_pending("root", "encfile:root-2.pem")
    assert stock_refresh(repo.repo) == 2
    assert repo.rotate("targets") == 3
    assert stock_refresh(repo.repo) == 3
    targets, _, _ = repo.current()
    md = json.loads((repo.metadata_dir / f"{targets.version}.targets.json").read_bytes())
    abandoned_id = load_signer_at(abandoned, PW, "targets").public_key.keyid
    assert abandoned_id not in {s["keyid"] for s in md["signatures"]}


def test_timestamp_threshold_two_can_still_be_renewed(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", tmp_path / "keys", PW)
    repo.init({"timestamp": 2}, {"timestamp": 2})
    before = repo.current()[2].version
    with contextlib.suppress(RepositoryStateError):
        repo.refresh()  # the timer
    if repo.current()[2].version == before:  # parked: the second holder signs it
        repo.sign_pending("timestamp", "encfile:timestamp-2.pem")
    assert repo.current()[2].version == before + 1
    assert stock_refresh(repo.repo) == 1
