"""Keys that stay secret (issue 14, must show 3): scrypt key files, a minimum passphrase
length, a passphrase per role and team, one-line wrong-passphrase errors, `repo rekey`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelward.publisher import _keys as keys_mod
from modelward.publisher._keyfile import ScryptParams, encrypt_scrypt, kdf_of
from modelward.publisher._keys import (
    WeakPassphraseError,
    generate_key_at,
    load_signer_at,
    role_of_key_file,
)
from modelward.publisher._passphrases import EnvPassphrases, env_var
from modelward.publisher._rekey import choose_action, rekey
from modelward.publisher._repo import Repository
from modelward.publisher.errors import KeyError_, OperatorInputError
from tests.conftest import tree_digest

GOOD = "a long enough passphrase"
ROOT_PW, TEAM_PW = "root passphrase, offline", "vision team passphrase"


@pytest.fixture
def cheap(monkeypatch: pytest.MonkeyPatch) -> ScryptParams:
    """A cheaper scrypt for tests about passphrases and rekeying, not about the KDF cost
    (the format tests above use the real default)."""
    params = ScryptParams(2**10, 8, 1)
    monkeypatch.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT", params)
    return params


def _uncached() -> None:
    keys_mod._DECRYPTED.clear()  # each check below really decrypts


def _asn1(path: Path) -> str:
    """An independent parser: OpenSSL's own view of the file's ASN.1."""
    return subprocess.run(["openssl", "asn1parse", "-in", str(path)], capture_output=True,
                          text=True, check=True).stdout


def _legacy(path: Path, passphrase: bytes, new: bytes | None = None) -> None:
    """Rewrite ``path`` as the files made before: PBKDF2-HMAC-SHA256, 2,048 iterations."""
    priv = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    path.write_bytes(priv.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(new or passphrase)))


# --- the file format ------------------------------------------------------------


def test_new_key_file_is_scrypt_pkcs8_as_openssl_parses_it(tmp_path: Path) -> None:
    key = generate_key_at(tmp_path / "targets.pem", GOOD.encode())
    path = tmp_path / "targets.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    asn1 = _asn1(path)
    assert ":PBES2" in asn1 and ":scrypt" in asn1 and ":aes-256-cbc" in asn1
    assert "PBKDF2" not in asn1
    ints = [line.rsplit(":", 1)[1] for line in asn1.splitlines() if "INTEGER" in line]
    assert ints[:3] == ["4000", "08", "05"]  # N=2**14, r=8, p=5 (OWASP's scrypt setting)
    info = kdf_of(path.read_bytes())
    assert (info.kind, info.scrypt, info.meets()) == ("scrypt", ScryptParams(2**14, 8, 5), True)
    # any PKCS#8 reader opens it: OpenSSL itself, with the passphrase
    out = subprocess.run(["openssl", "pkey", "-in", str(path), "-passin", f"pass:{GOOD}",
                          "-pubout"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("-----BEGIN PUBLIC KEY-----")
    _uncached()
    assert load_signer_at(path, GOOD.encode()).public_key.keyid == key.keyid


@pytest.mark.xdist_group("machine")
def test_key_load_time_stays_well_under_a_second(tmp_path: Path) -> None:
    generate_key_at(tmp_path / "root.pem", GOOD.encode())
    _uncached()
    t0 = time.perf_counter()
    load_signer_at(tmp_path / "root.pem", GOOD.encode())
    took = time.perf_counter() - t0
    print(f"scrypt key load: {took:.3f} s")
    assert took < 1.0


def test_old_pbkdf2_2048_files_are_recognised_as_weak_and_still_load(tmp_path: Path,
        cheap: ScryptParams) -> None:
    path = tmp_path / "root.pem"
    generate_key_at(path, b"abc" * 4)
    _legacy(path, b"abc" * 4, b"abc")  # an old file with a 3-character passphrase
    info = kdf_of(path.read_bytes())
    assert (info.kind, info.iterations, info.prf, info.meets()) == \
        ("pbkdf2", 2048, "hmacWithSHA256", False)
    _uncached()
    load_signer_at(path, b"abc")  # loading an existing file: any length


# --- passphrase length ------------------------------------------------------------


def test_short_passphrase_is_refused_at_init_before_any_key_file(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", tmp_path / "keys", b"short")
    with pytest.raises(WeakPassphraseError) as e:
        repo.init()
    assert e.value.role == "root" and e.value.length == 5
    assert not (tmp_path / "keys").exists() or not list((tmp_path / "keys").iterdir())
    assert not (tmp_path / "repo" / "metadata").exists()


def test_one_short_role_passphrase_refuses_init_whole(tmp_path: Path) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD,
                         "MODELWARD_KEY_PASSPHRASE_TIMESTAMP": "eleven char"})
    with pytest.raises(WeakPassphraseError, match="timestamp key has 11 characters"):
        Repository(tmp_path / "repo", tmp_path / "keys", pw).init()
    assert not list(tmp_path.rglob("*.pem"))


def test_short_team_passphrase_is_refused_at_delegate(tmp_path: Path,
        cheap: ScryptParams) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD,
                         "MODELWARD_KEY_PASSPHRASE_VISION": "1234"})
    repo = Repository(tmp_path / "repo", tmp_path / "keys", pw)
    repo.init()
    before = tree_digest(tmp_path / "repo")
    with pytest.raises(WeakPassphraseError, match="vision key has 4 characters"):
        repo.delegate("vision", ["vision/*"])
    assert not (tmp_path / "keys" / "delegated-vision.pem").exists()
    assert tree_digest(tmp_path / "repo") == before


def test_passphrase_length_counts_characters_not_bytes(tmp_path: Path,
        cheap: ScryptParams) -> None:
    with pytest.raises(WeakPassphraseError):
        generate_key_at(tmp_path / "root.pem", "ääääää".encode())  # 12 bytes, 6 characters
    generate_key_at(tmp_path / "root.pem", ("ä" * 12).encode())


# --- a passphrase per role ------------------------------------------------------------


def test_env_passphrase_per_role_with_fallback() -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": "shared",
                         "MODELWARD_KEY_PASSPHRASE_ROOT": "r",
                         "MODELWARD_KEY_PASSPHRASE_VISION_TEAM_2": "t"})
    assert pw("root") == b"r"
    assert pw("targets") == b"shared" and pw("snapshot") == b"shared"
    assert pw("vision-team.2") == b"t"
    assert pw.source("timestamp") == "MODELWARD_KEY_PASSPHRASE"
    assert env_var("vision-team.2") == "MODELWARD_KEY_PASSPHRASE_VISION_TEAM_2"


def test_no_passphrase_and_no_terminal_names_both_variables() -> None:
    with pytest.raises(OperatorInputError, match="MODELWARD_KEY_PASSPHRASE_SNAPSHOT or "
                       "MODELWARD_KEY_PASSPHRASE"):
        EnvPassphrases({})("snapshot")
    with pytest.raises(OperatorInputError, match="MODELWARD_KEY_PASSPHRASE_ROOT is empty"):
        EnvPassphrases({"MODELWARD_KEY_PASSPHRASE_ROOT": ""})("root")


def test_prompt_once_per_role_naming_it() -> None:
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "R" * 12 if "root" in text else "T" * 12

    pw = EnvPassphrases({}, prompt, confirm=True)
    assert pw("root") == b"R" * 12 and pw("targets") == b"T" * 12 and pw("root") == b"R" * 12
    assert asked == ["passphrase for the root key: ", "the root passphrase again: ",
                     "passphrase for the targets key: ", "the targets passphrase again: "]
    answers = iter(["one passphrase", "another one!"])
    with pytest.raises(OperatorInputError, match="two root passphrases differ"):
        EnvPassphrases({}, lambda _t: next(answers), confirm=True)("root")


@pytest.mark.parametrize("team", ["Root", "TARGETS", "SnapShot",
                                  "timeStamp"])
def test_team_named_like_a_top_level_role_cannot_share_its_variable(team: str) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE_ROOT": ROOT_PW,
                         "MODELWARD_KEY_PASSPHRASE": GOOD})
    with pytest.raises(KeyError_, match="must be its own"):
        pw(team)


def test_team_key_does_not_open_with_the_root_passphrase(tmp_path: Path,
        cheap: ScryptParams) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE_ROOT": ROOT_PW,
                         "MODELWARD_KEY_PASSPHRASE": GOOD,
                         "MODELWARD_KEY_PASSPHRASE_VISION": TEAM_PW})
    repo = Repository(tmp_path / "repo", tmp_path / "keys", pw)
    repo.init()
    team_file = repo.delegate("vision", ["vision/*"])
    _uncached()
    for wrong in (ROOT_PW, GOOD):
        with pytest.raises(KeyError_, match="cannot decrypt the vision key"):
            load_signer_at(team_file, wrong.encode(), "vision")
    for wrong in (TEAM_PW, GOOD):
        with pytest.raises(KeyError_, match="cannot decrypt the root key"):
            load_signer_at(tmp_path / "keys" / "root.pem", wrong.encode(), "root")
    load_signer_at(team_file, TEAM_PW.encode())
    load_signer_at(tmp_path / "keys" / "root.pem", ROOT_PW.encode())


def test_team_sharing_the_root_passphrase_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    pw("vision")
    assert "same passphrase as the root key" in caplog.text
    assert "MODELWARD_KEY_PASSPHRASE_VISION" in caplog.text


def test_wrong_passphrase_is_one_line_naming_role_and_variables(tmp_path: Path,
        cheap: ScryptParams) -> None:
    generate_key_at(tmp_path / "snapshot.pem", GOOD.encode())
    _uncached()
    with pytest.raises(KeyError_) as e:
        load_signer_at(tmp_path / "snapshot.pem", b"not the passphrase")
    msg = str(e.value)
    assert "\n" not in msg and not e.value.hint
    assert msg.startswith("cannot decrypt the snapshot key")
    assert "MODELWARD_KEY_PASSPHRASE_SNAPSHOT" in msg


def test_role_of_key_file_names() -> None:
    assert role_of_key_file(Path("k/root-2.pem")) == "root"
    assert role_of_key_file(Path("k/targets.pem.new")) == "targets"
    assert role_of_key_file(Path("k/retired/timestamp-0123456789abcdef.pem")) == "timestamp"
    assert role_of_key_file(Path("k/delegated-root-2.pem")) == "root-2"  # a team, not root
    with pytest.raises(KeyError_):
        role_of_key_file(Path("k/rootish.pem"))


# --- repo rekey --------------------------------------------------------------------


def _old_keys(tmp_path: Path, passphrase: bytes) -> Path:
    """A key directory as `repo init` made it before: PBKDF2-2048 files."""
    repo = Repository(tmp_path / "repo", tmp_path / "keys", passphrase)
    repo.init()
    repo.delegate("vision", ["vision/*"])
    keys = tmp_path / "keys"
    for path in keys.glob("*.pem"):
        _legacy(path, passphrase)
        os.chmod(path, 0o600)
    return keys


def _pubs(keys: Path, pw: EnvPassphrases) -> dict[str, str]:
    _uncached()
    return {p.name: load_signer_at(p, pw).public_key.keyid for p in sorted(keys.glob("*.pem"))}


def test_rekey_upgrades_old_files_in_place_and_is_idempotent(tmp_path: Path,
        cheap: ScryptParams) -> None:
    keys = _old_keys(tmp_path, GOOD.encode())
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    ids = _pubs(keys, pw)
    steps = rekey(keys, pw, pw)
    assert sorted(s.path.name for s in steps) == sorted(ids)
    assert {s.action for s in steps} == {"upgrade"}
    assert all(s.before.iterations == 2048 for s in steps)
    for path in keys.glob("*.pem"):
        assert kdf_of(path.read_bytes()).meets(), path
        assert path.stat().st_mode & 0o777 == 0o600
        assert ":scrypt" in _asn1(path)
    assert _pubs(keys, pw) == ids  # the same keys: devices see no change
    assert not list(keys.glob(".*.tmp"))
    again = tree_digest(keys)
    assert {s.action for s in rekey(keys, pw, pw)} == {"keep"}
    assert tree_digest(keys) == again


def test_rekey_per_role_touches_only_that_role(tmp_path: Path,
        cheap: ScryptParams) -> None:
    keys = _old_keys(tmp_path, GOOD.encode())
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    before = tree_digest(keys)
    steps = rekey(keys, pw, pw, {"vision"})
    assert [s.path.name for s in steps] == ["delegated-vision.pem"]
    after = tree_digest(keys)
    assert {k for k in before if before[k] != after[k]} == {"delegated-vision.pem"}


def test_rekey_gives_each_role_its_own_passphrase(tmp_path: Path,
        cheap: ScryptParams) -> None:
    keys = _old_keys(tmp_path, GOOD.encode())
    old = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    new = EnvPassphrases({"MODELWARD_NEW_KEY_PASSPHRASE_ROOT": ROOT_PW,
                          "MODELWARD_NEW_KEY_PASSPHRASE_VISION": TEAM_PW},
                         prefix="MODELWARD_NEW_KEY_PASSPHRASE", fallback=old)
    ids = _pubs(keys, old)
    rekey(keys, old, new)
    _uncached()
    with pytest.raises(KeyError_):
        load_signer_at(keys / "root.pem", GOOD.encode())
    with pytest.raises(KeyError_, match="vision"):
        load_signer_at(keys / "delegated-vision.pem", ROOT_PW.encode())
    after = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD,
                            "MODELWARD_KEY_PASSPHRASE_ROOT": ROOT_PW,
                            "MODELWARD_KEY_PASSPHRASE_VISION": TEAM_PW})
    assert _pubs(keys, after) == ids
    # run again with the same variables (interrupted, or by habit): nothing changes
    digest = tree_digest(keys)
    assert {s.action for s in rekey(keys, old, new)} == {"keep"}
    assert tree_digest(keys) == digest


def test_rekey_with_one_wrong_passphrase_changes_no_file(tmp_path: Path,
        cheap: ScryptParams) -> None:
    keys = _old_keys(tmp_path, GOOD.encode())
    wrong_team = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD,
                                 "MODELWARD_KEY_PASSPHRASE_VISION": "not the vision one"})
    before = tree_digest(keys)
    _uncached()
    with pytest.raises(KeyError_, match="cannot decrypt the vision key"):
        rekey(keys, wrong_team, wrong_team)
    assert tree_digest(keys) == before


def test_rekey_refuses_a_short_new_passphrase(tmp_path: Path,
        cheap: ScryptParams) -> None:
    keys = _old_keys(tmp_path, GOOD.encode())
    old = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    new = EnvPassphrases({"MODELWARD_NEW_KEY_PASSPHRASE_TARGETS": "tiny"},
                         prefix="MODELWARD_NEW_KEY_PASSPHRASE", fallback=old)
    before = tree_digest(keys)
    with pytest.raises(WeakPassphraseError, match="targets"):
        rekey(keys, old, new)
    assert tree_digest(keys) == before


def test_rekey_never_lowers_stronger_parameters(tmp_path: Path,
        cheap: ScryptParams) -> None:
    path = tmp_path / "root.pem"
    strong = ScryptParams(cheap.n * 2, 8, 2)
    path.write_bytes(encrypt_scrypt(ed25519.Ed25519PrivateKey.generate(), GOOD.encode(),
                                    strong))
    old = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    assert [s.action for s in rekey(tmp_path, old, old)] == ["keep"]
    new = EnvPassphrases({"MODELWARD_NEW_KEY_PASSPHRASE": ROOT_PW},
                         prefix="MODELWARD_NEW_KEY_PASSPHRASE")
    [step] = rekey(tmp_path, old, new)
    assert step.action == "new-passphrase" and step.params == strong
    assert kdf_of(path.read_bytes()).scrypt == strong
    # the pure decision, for the weaker-than-default cases
    weak = kdf_of(encrypt_scrypt(ed25519.Ed25519PrivateKey.generate(), GOOD.encode(),
                                 ScryptParams(cheap.n // 2, 8, 4)))  # more work, less memory
    assert choose_action(weak, True) == ("upgrade", cheap)


def test_rekey_encrypts_a_plain_private_key_and_skips_public_keys(tmp_path: Path,
        cheap: ScryptParams) -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "targets.pem").write_bytes(priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "hsm-public.pem").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    assert [(s.path.name, s.action) for s in rekey(tmp_path, pw, pw)] == \
        [("targets.pem", "upgrade")]
    assert kdf_of((tmp_path / "targets.pem").read_bytes()).kind == "scrypt"


# --- attacks --------------------------------------------------------------------------


def _planted(n: int, r: int = 8, p: int = 1) -> bytes:
    """A key file whose scrypt parameters make every opener allocate 128*r*n bytes."""
    import base64

    from modelward.publisher import _keyfile as k

    der = k._seq(k._seq(k._oid(k._PBES2), k._seq(
        k._seq(k._oid(k._SCRYPT), k._seq(k._octets(os.urandom(16)), k._int(n), k._int(r),
                                         k._int(p))),
        k._seq(k._oid(k._AES256_CBC), k._octets(os.urandom(16))))), k._octets(os.urandom(48)))
    return (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + base64.encodebytes(der) +
            b"-----END ENCRYPTED PRIVATE KEY-----\n")


@pytest.mark.parametrize(("n", "r", "p"), [(2**24, 8, 1), (2**14, 8, 2**20), (2**30, 1, 1)])
@pytest.mark.xdist_group("machine")
def test_planted_key_file_with_huge_kdf_cost_is_refused_at_once(
        tmp_path: Path, n: int, r: int, p: int) -> None:
    # the disk, or a key file handed over by a team: without a ceiling the loader spends
    # 16 GiB and minutes (measured 250 s for N=2**24) before it says "wrong passphrase"
    (tmp_path / "root.pem").write_bytes(_planted(n, r, p))
    t0 = time.perf_counter()
    with pytest.raises(KeyError_, match="refusing to open the root key"):
        load_signer_at(tmp_path / "root.pem", GOOD.encode())
    with pytest.raises(KeyError_, match="refusing to open the root key"):
        rekey(tmp_path, EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD}),
              EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD}))
    assert time.perf_counter() - t0 < 1.0


def test_damaged_key_file_is_a_typed_error_and_rekey_changes_nothing(
        tmp_path: Path, cheap: ScryptParams) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD})
    generate_key_at(tmp_path / "targets.pem", pw, "targets")
    _legacy(tmp_path / "targets.pem", GOOD.encode())
    good = (tmp_path / "targets.pem").read_bytes()
    (tmp_path / "root.pem").write_bytes(good[:60] + b"\n-----END ENCRYPTED PRIVATE KEY-----\n")
    before = tree_digest(tmp_path)
    with pytest.raises(KeyError_, match="root key .* damaged"):
        load_signer_at(tmp_path / "root.pem", pw)
    with pytest.raises(KeyError_, match="root key .* damaged"):
        rekey(tmp_path, pw, pw)
    assert tree_digest(tmp_path) == before


def test_team_named_like_root_is_refused_before_any_key_file(
        tmp_path: Path, cheap: ScryptParams) -> None:
    pw = EnvPassphrases({"MODELWARD_KEY_PASSPHRASE": GOOD,
                         "MODELWARD_KEY_PASSPHRASE_ROOT": ROOT_PW})
    repo = Repository(tmp_path / "repo", tmp_path / "keys", pw)
    repo.init()
    before = tree_digest(tmp_path)
    with pytest.raises(KeyError_, match="would share MODELWARD_KEY_PASSPHRASE_ROOT"):
        repo.delegate("Root", ["root-model/*"])
    assert tree_digest(tmp_path) == before


def test_a_key_opened_once_still_needs_its_passphrase_next_time(
        tmp_path: Path, cheap: ScryptParams) -> None:
    # keys are decrypted once per process: the cache must never stand in for the passphrase
    path = tmp_path / "delegated-vision.pem"
    generate_key_at(path, TEAM_PW.encode())
    load_signer_at(path, TEAM_PW.encode())
    for wrong in (ROOT_PW.encode(), b"", TEAM_PW.encode()[:-1]):
        with pytest.raises(KeyError_, match="cannot decrypt the vision key"):
            load_signer_at(path, wrong)


def test_prompt_asks_twice_only_for_the_roles_the_policy_names() -> None:
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return "same answer, twelve+"

    pw = EnvPassphrases({}, prompt, confirm=lambda role: role == "vision")  # a new team key
    pw("targets")
    pw("vision")
    assert asked == ["passphrase for the targets key: ", "passphrase for the vision key: ",
                     "the vision passphrase again: "]


def _pem(der: bytes) -> bytes:
    import base64

    return (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + base64.encodebytes(der)
            + b"-----END ENCRYPTED PRIVATE KEY-----\n")


def test_a_scheme_whose_cost_cannot_be_bounded_is_refused_before_it_runs(
        tmp_path: Path) -> None:
    """Review finding: PBES1 / PKCS#12 PBE (which OpenSSL decrypts) or an unknown KDF has no
    cost this module can bound, so a planted file could ask for billions of iterations."""
    from modelward.publisher._keyfile import _octets, _oid, _seq

    pbes1 = _seq(_seq(_oid("1.2.840.113549.1.5.3"), _seq(_octets(b"s" * 8))),
                 _octets(b"\0" * 48))  # pbeWithMD5AndDES-CBC
    path = tmp_path / "targets.pem"
    path.write_bytes(_pem(pbes1))
    assert kdf_of(path.read_bytes()).kind == "unknown"
    with pytest.raises(KeyError_, match="cannot be bounded"):
        load_signer_at(path, b"x" * 12, "targets")


@pytest.mark.parametrize("der", [b"\x30\x00", b"\x30\x02\x30\x00", b"\x30\x04\x30\x02\x06\x00"])
def test_a_truncated_encrypted_key_is_a_typed_error_not_a_traceback(
        tmp_path: Path, der: bytes) -> None:
    path = tmp_path / "targets.pem"
    path.write_bytes(_pem(der))
    with pytest.raises(KeyError_, match="damaged"):
        load_signer_at(path, b"x" * 12, "targets")
